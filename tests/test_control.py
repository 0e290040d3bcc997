"""The control protocol: ubridge's line format, commands and reply codes, our extensions, and
a server that survives whatever a client sends."""

from __future__ import annotations

import contextlib
import re
import secrets
import shlex
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import peers
import pytest
import tshark
from command import TUNNELSCOPE

from tunnelscope.datapath.engine import Engine, available_backends
from tunnelscope.lab.control import (
    MAX_CONNECTIONS,
    Code,
    ControlClient,
    ControlError,
    ControlServer,
    Reply,
    Switchboard,
    gns3_captures_dir,
    parse_address,
    quote,
    run_service,
    tokenize,
)
from tunnelscope.lab.labfile import load_lab
from tunnelscope.nio import open_endpoint

pytestmark = pytest.mark.timeout(120)


class Service:
    """A Switchboard served on 127.0.0.1:<any port> by a thread; closed by `stop`."""

    def __init__(
        self,
        captures: Path,
        backend: str = "auto",
        lab_file: str | None = None,
        netio_dir: str | None = None,
    ) -> None:
        captures.mkdir(exist_ok=True)
        self.captures = captures
        self.engine = Engine(backend)
        lab = load_lab(lab_file, str(captures)) if lab_file else None
        self.switchboard = Switchboard(self.engine, str(captures), lab, 1, netio_dir)
        if lab:
            self.switchboard.start_lab()
        self.address = ""
        self.notes: list[str] = []
        ready = threading.Event()

        def serve() -> None:
            def on_ready(bound: tuple[str, int]) -> None:
                self.address = f"{bound[0]}:{bound[1]}"
                ready.set()

            self.notes = run_service(self.switchboard, ("127.0.0.1", 0), on_ready=on_ready)

        self.thread = threading.Thread(target=serve, daemon=True)
        self.thread.start()
        assert ready.wait(10)

    def client(self) -> ControlClient:
        return ControlClient(self.address)

    def stop(self) -> None:
        self.engine.stop()
        self.thread.join(10)
        self.engine.close()


@pytest.fixture(params=available_backends())
def service(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Service]:
    served = Service(tmp_path / "captures", request.param)
    yield served
    served.stop()


class Peer:
    """A tunnel end the bridge talks to: a UDP socket on 127.0.0.1."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.05)
        self.port = self.sock.getsockname()[1]

    def connect(self, port: int) -> None:
        self.sock.connect(("127.0.0.1", port))

    def send(self, numbers: list[int]) -> None:
        for number in numbers:
            frame = b"\xff" * 6 + b"\x02\x00\x00\x00\x00\x01\x88\xb5" + bytes([number]) * 50
            try:
                self.sock.send(frame)
            except ConnectionRefusedError:  # reported for an earlier send to a stopped bridge
                self.sock.send(frame)
            time.sleep(0.002)

    def numbers(self, expected: int, timeout: float = 1.0) -> list[int]:
        got: list[int] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(got) < expected:
            try:
                got.append(self.sock.recv(2048)[14])
            except (TimeoutError, socket.timeout):
                continue
        time.sleep(0.05)  # anything beyond `expected` would be a bug: look for it
        with contextlib.suppress(TimeoutError, socket.timeout):
            got.append(self.sock.recv(2048)[14])
        return got


def bridge_between(client: ControlClient, name: str = "br0") -> tuple[Peer, Peer]:
    """The cloud sequence GNS3 sends: create, first NIO, filters, second NIO, start."""
    a, b = Peer(), Peer()
    ports = peers.free_udp_ports(2)
    a.connect(ports[0])
    b.connect(ports[1])
    client.request("bridge", "create", name)
    client.request("bridge", "add_nio_udp", name, str(ports[0]), "127.0.0.1", str(a.port))
    client.request("bridge", "reset_packet_filters", name)
    client.request("bridge", "add_nio_udp", name, str(ports[1]), "127.0.0.1", str(b.port))
    client.request("bridge", "start", name)
    return a, b


@pytest.mark.parametrize(
    ("line", "tokens"),
    [
        ("bridge create br0", ["bridge", "create", "br0"]),
        (
            'bridge start_capture br0 "/tmp/a b.pcap" EN10MB',
            ["bridge", "start_capture", "br0", "/tmp/a b.pcap", "EN10MB"],
        ),
        ("  bridge\tlist  # a comment", ["bridge", "list"]),
        ('bridge create "" x', ["bridge", "create", "x"]),  # ubridge: "" is no token
        ('a "b"c', ["a", "b", "c"]),
        ("hypervisor version!", ["hypervisor", "version"]),
        ("", []),
    ],
)
def test_requests_split_as_ubridge_splits_them(line: str, tokens: list[str]) -> None:
    assert tokenize(line) == tokens


@pytest.mark.parametrize(
    ("line", "error"), [('a b"c', "unexpected quote"), ('a "bc', "end of line")]
)
def test_bad_quoting_is_a_parse_error(line: str, error: str) -> None:
    with pytest.raises(ControlError) as caught:
        tokenize(line)
    assert caught.value.code == Code.PARSING and error in caught.value.text


def test_arguments_are_quoted_only_when_needed() -> None:
    assert quote("br0") == "br0"
    assert quote("/tmp/a b.pcap") == '"/tmp/a b.pcap"'
    assert tokenize(" ".join(quote(w) for w in ("x#y", "a!b", "c d"))) == ["x#y", "a!b", "c d"]
    for word in ("", 'say "hi"', "two\nlines"):
        with pytest.raises(ValueError):
            quote(word)


def test_control_addresses_default_to_loopback() -> None:
    assert parse_address("4242") == ("127.0.0.1", 4242)
    assert parse_address("0.0.0.0:7300") == ("0.0.0.0", 7300)
    assert parse_address("[::1]:7300") == ("::1", 7300)
    with pytest.raises(ValueError):
        parse_address("127.0.0.1:http")


def test_the_gns3_sequence_bridges_two_tunnels_both_ways(service: Service) -> None:
    with service.client() as client:
        assert client.request("hypervisor", "version") == ["0.9.18"]
        a, b = bridge_between(client)
        a.send(list(range(1, 31)))
        assert b.numbers(30) == list(range(1, 31))
        b.send(list(range(31, 41)))
        assert a.numbers(10) == list(range(31, 41))
        show = client.request("bridge", "show", "br0")
        assert show[0] == "bridge 'br0' is running"
        assert show[1].startswith("Source NIO: udp:") and show[-1] == "OK"
        stats = client.request("bridge", "get_stats", "br0")
        assert stats[:2] == [
            "Source NIO:      IN: 30 packets OUT: 10 packets",
            "Destination NIO: IN: 10 packets OUT: 30 packets",
        ]
        client.request("bridge", "reset_stats", "br0")
        assert "IN: 0 packets" in client.request("bridge", "get_stats", "br0")[0]
        assert client.request("bridge", "list") == ["br0 (NIOs = 2)", "OK"]


def test_frequency_drop_is_dynamips_one_counter_for_both_directions(service: Service) -> None:
    with service.client() as client:
        a, b = bridge_between(client)
        client.request("bridge", "add_packet_filter", "br0", "filter0", "frequency_drop", "3")
        a.send([1, 2, 3, 4])
        assert b.numbers(3) == [1, 2, 4]
        b.send([5, 6])
        assert a.numbers(1) == [5]  # 6 is the 3rd frame since 3
        client.request("bridge", "reset_packet_filters", "br0")
        client.request("bridge", "add_packet_filter", "br0", "filter0", "frequency_drop", "-1")
        a.send([7])
        b.send([8])
        assert b.numbers(0) == [] and a.numbers(0) == []
        client.request("bridge", "delete_packet_filter", "br0", "filter0")
        a.send([9])
        assert b.numbers(1) == [9]


def test_set_packet_filter_impairs_one_direction(service: Service) -> None:
    with service.client() as client:
        a, b = bridge_between(client)
        reply = client.request("bridge", "set_packet_filter", "br0", "f", "a2b", "freq_drop", "2")
        assert reply == ["Filter 'f' set on bridge 'br0': a2b freq_drop 2"]
        a.send([1, 2, 3, 4])
        b.send([5, 6, 7, 8])
        assert b.numbers(2) == [1, 3]
        assert a.numbers(4) == [5, 6, 7, 8]
        client.request("bridge", "set_packet_filter", "br0", "f", "b2a", "freq_drop", "-1")
        a.send([9])
        b.send([10])
        assert b.numbers(1) == [9] and a.numbers(0) == []
        shown = client.request("bridge", "show", "br0")
        assert "Filter 'f' configured in position 1" in shown


def test_bpf_filters_drop_what_matches_both_ways_counted_as_bpf(service: Service) -> None:
    with service.client() as client:
        a, b = bridge_between(client)
        # GNS3's bpf filter: one quoted tcpdump expression; matching frames are dropped
        client.request("bridge", "add_packet_filter", "br0", "filter0", "bpf", "ether[14] == 3")
        client.request("bridge", "add_packet_filter", "br0", "filter1", "bpf", "ether[14] > 7")
        a.send([1, 2, 3, 4])
        assert b.numbers(3) == [1, 2, 4]
        b.send([3, 5, 8, 9, 6])
        assert a.numbers(2) == [5, 6]
        [link] = client.links()
        assert link["stats"]["a2b"]["dropped"] == {"bpf": 1}
        assert link["stats"]["b2a"]["dropped"] == {"bpf": 3}
        assert [f["impairment"] for f in link["filters"]] == [
            "bpf ether[14] == 3",
            "bpf ether[14] > 7",
        ]
        client.request("bridge", "reset_packet_filters", "br0")
        a.send([3])
        assert b.numbers(1) == [3]


def hdlc_icmp(number: int) -> bytes:
    """A Cisco HDLC frame holding an ICMP echo request (as a serial interface sends it)."""
    ip = bytes.fromhex("4500001c0000000040010000") + bytes([10, 0, 0, 1, 10, 0, 0, 2])
    return b"\x0f\x00\x08\x00" + ip + bytes([8, 0, 0, 0, 0, 1, 0, number])


def hdlc_slarp(number: int) -> bytes:
    """A Cisco HDLC SLARP keepalive (ethertype 0x8035)."""
    return b"\x8f\x00\x80\x35" + bytes(11) + bytes([2, 0, 0, 0, number, 0, 0, 0, 0, 0xFF, 0xFF])


def received(peer: Peer, expected: int, timeout: float = 1.0) -> list[bytes]:
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and len(got) < expected + 1:
        with contextlib.suppress(TimeoutError, socket.timeout):
            got.append(peer.sock.recv(2048))
    return got


@pytest.mark.parametrize("told", ["filter", "capture", "detected"])
def test_bpf_filters_are_compiled_for_a_serial_links_own_type(service: Service, told: str) -> None:
    """ubridge compiles `icmp` for Ethernet, which never matches a C-HDLC frame; tunnelscope
    compiles it for the link's type: given to the filter, to start_capture, or detected."""
    with service.client() as client:
        a, b = bridge_between(client)
        extra = ["C_HDLC"] if told == "filter" else []
        client.request("bridge", "add_packet_filter", "br0", "filter0", "bpf", "icmp", *extra)
        path = str(service.captures / "serial.pcap")
        if told == "capture":
            client.request("bridge", "start_capture", "br0", path, "DLT_C_HDLC")
        elif told == "detected":
            client.request("bridge", "start_capture_ext", "br0", path, "auto")
            for number in range(40):  # enough keepalives to decide the link type
                a.sock.send(hdlc_slarp(number))
                time.sleep(0.002)
            assert len(received(b, 40)) == 40
            assert peers.wait_until(lambda: client.links()[0]["encapsulation"] == "hdlc", 5, 0.1)
        for number in range(3):
            a.sock.send(hdlc_slarp(number))
            a.sock.send(hdlc_icmp(number))
            time.sleep(0.002)
        assert received(b, 3) == [hdlc_slarp(number) for number in range(3)]
        assert client.links()[0]["stats"]["a2b"]["dropped"] == {"bpf": 3}


def test_links_report_per_second_rates(service: Service) -> None:
    with service.client() as client:
        a, _ = bridge_between(client)
        deadline = time.monotonic() + 2.5
        while time.monotonic() < deadline:
            a.send([1])
            time.sleep(0.02)  # about 45 frames a second
        [link] = client.links()
    assert 20 <= link["rates"]["a2b"]["received"] <= 60, link["rates"]
    assert link["rates"]["a2b"]["forwarded"] == link["rates"]["a2b"]["received"]
    assert link["rates"]["b2a"]["received"] == 0


@tshark.required
def test_a_capture_asked_before_start_begins_with_the_bridge(service: Service) -> None:
    with service.client() as client:
        a, b = Peer(), Peer()
        ports = peers.free_udp_ports(2)
        a.connect(ports[0])
        b.connect(ports[1])
        client.request("bridge", "create", "br0")
        client.request("bridge", "add_nio_udp", "br0", str(ports[0]), "127.0.0.1", str(a.port))
        client.request("bridge", "add_packet_filter", "br0", "filter0", "frequency_drop", "2")
        client.request("bridge", "add_nio_udp", "br0", str(ports[1]), "127.0.0.1", str(b.port))
        path = service.captures / "br0.pcap"
        client.request("bridge", "start_capture", "br0", str(path))
        assert client.request("bridge", "start", "br0") == ["bridge 'br0' started"]
        a.send([1, 2, 3, 4, 5, 6])
        assert b.numbers(3) == [1, 3, 5]
        stopped = client.request("bridge", "stop_capture", "br0")[-1]
        assert stopped == f"packet capture stopped on bridge 'br0': {path} (3 frames)"
    rows = tshark.fields(str(path), ["eth.type", "frame.len"])
    assert [row["eth.type"] for row in rows] == [["0x88b5"]] * 3  # after the filters, as ubridge


@tshark.required
def test_capture_ext_writes_pcapng_at_both_points(service: Service) -> None:
    with service.client() as client:
        a, b = bridge_between(client)
        client.request("bridge", "set_packet_filter", "br0", "f", "a2b", "freq_drop", "2")
        client.request("bridge", "start_capture_ext", "br0", "both.pcapng", "auto", "both")
        a.send([1, 2, 3, 4])
        assert b.numbers(2) == [1, 3]
        client.request("bridge", "stop_capture", "br0")
    path = str(service.captures / "both.pcapng")
    rows = tshark.fields(path, ["frame.interface_name", "frame.comment"])
    names = [row["frame.interface_name"][0] for row in rows]
    assert names.count("br0 pre") == 4 and names.count("br0 post") == 2
    assert sum(row["frame.comment"] == ["dropped by freq_drop"] for row in rows) == 2


ERRORS = [
    (["nosuch", "thing"], Code.UNK_MODULE, "Unknown module 'nosuch'"),
    (["bridge", "fly"], Code.UNK_CMD, "Unknown command 'fly'"),
    (["bridge", "create"], Code.BAD_PARAM, "Bad number of parameters (0 with min/max=1/1)"),
    (["bridge", "create", "a", "b"], Code.BAD_PARAM, "(2 with min/max=1/1)"),
    (["hypervisor"], Code.PARSING, "At least a module and a command"),
    (["bridge", "start", "ghost"], Code.NOT_FOUND, "bridge 'ghost' doesn't exist"),
    (["bridge", "create", "br0"], Code.CREATE, "bridge 'br0' already exist"),
    (["bridge", "start", "br0"], Code.START, "must have 2 NIOs"),
    (["bridge", "stop", "br0"], Code.STOP, "is not running"),
    (["bridge", "add_nio_udp", "br0", "abc", "127.0.0.1", "2"], Code.CREATE, "not a number"),
    (["bridge", "start_capture", "br0", "../../etc/cron.d/x"], Code.FILE, "outside"),
    (["bridge", "start_capture", "br0", "/etc/passwd"], Code.FILE, "outside"),
    (["bridge", "start_capture", "br0", "x.pcap", "DOCSIS"], Code.INV_PARAM, "unknown link type"),
    (["bridge", "stop_capture", "br0"], Code.START, "no packet capture active"),
    (
        ["bridge", "add_packet_filter", "br0", "f", "frequency_drop", "abc"],
        Code.CREATE,
        "not an integer",
    ),
    (
        ["bridge", "add_packet_filter", "br0", "f", "packet_loss", "101"],
        Code.CREATE,
        "out of range",
    ),
    (
        ["bridge", "add_packet_filter", "br0", "filter0", "bpf", "icmp =="],
        Code.CREATE,
        "Failed to add filter 'filter0': Cannot compile filter 'icmp ==': ",
    ),
    (["bridge", "add_packet_filter", "br0", "f", "bpf"], Code.CREATE, 'bpf "EXPRESSION"'),
    (["bridge", "add_packet_filter", "br0", "f"], Code.CREATE, "no type given"),
    (["bridge", "add_packet_filter", "br0", "f", "bpf", "ip", "DOCSIS"], Code.INV_PARAM, "DOCSIS"),
    (
        ["bridge", "add_packet_filter", "br0", "f", "teleport", "1"],
        Code.CREATE,
        "unknown impairment",
    ),
    (
        ["bridge", "set_packet_filter", "br0", "f", "sideways", "delay", "1"],
        Code.INV_PARAM,
        "direction",
    ),
    (["bridge", "delete_packet_filter", "br0", "nope"], Code.CREATE, "Failed to delete filter"),
    (["bridge", "rename", "br0", "br0"], Code.RENAME, "already exist"),
    (["bridge", "add_nio_tap", "br0", "tap0", "on"], Code.BAD_PARAM, "min/max=2/2"),
    (["bridge", "add_nio_tap", "nope", "tap0"], Code.NOT_FOUND, "bridge 'nope' doesn't exist"),
    (["bridge", "add_nio_linux_raw", "br0", "a/b"], Code.CREATE, "unable to create NIO Linux raw"),
    (["bridge", "add_nio_ethernet", "br0", "x" * 16], Code.CREATE, "unable to create NIO Ethernet"),
    (["bridge", "add_nio_ethernet", "br0", "eth0@ns"], Code.CREATE, "invalid interface name"),
    (["bridge", "add_nio_tap", "br0", "-x"], Code.CREATE, "unable to create NIO TAP"),
    (["bridge", "set_pcap_filter", "br0", "not arp"], Code.CREATE, "at least one Ethernet NIO"),
    (["bridge", "set_pcap_filter", "nope"], Code.NOT_FOUND, "bridge 'nope' doesn't exist"),
    (["lab", "find", "R1", "f0/0"], Code.UNK_OBJ, "no lab is served here"),
    (["hypervisor", "cmd_list", "nosuch"], Code.UNK_MODULE, "unknown module"),
]


@pytest.mark.parametrize(("words", "code", "text"), ERRORS)
def test_errors_get_ubridges_codes(
    service: Service, words: list[str], code: int, text: str
) -> None:
    with service.client() as client:
        client.request("bridge", "create", "br0")
        with pytest.raises(ControlError) as caught:
            client.request(*words)
        assert caught.value.code == code
        assert text in caught.value.text
        assert client.request("hypervisor", "version") == ["0.9.18"]  # the connection goes on


def raw_exchange(address: str, data: bytes, replies: int) -> list[bytes]:
    host, port = parse_address(address)
    with socket.create_connection((host, port), 5) as sock:
        sock.sendall(data)
        stream = sock.makefile("rb")
        return [stream.readline() for _ in range(replies)]


def test_garbage_and_overlong_requests_leave_the_connection_usable(service: Service) -> None:
    garbage = [
        b"x" * 600 + b"\n",  # longer than a line may be
        b"y" * 5000 + b" and more\n",  # much longer, in several reads
        b"\xff\xfe\xfd\n",  # not text
        b"bridge create \x01\x02\n",  # control characters
        "bridge create a\u009b31m\n".encode(),  # a C1 control: CSI on some terminals
        b'bridge create "half\n',  # unterminated quote
        b"\n",  # nothing
    ]
    replies = raw_exchange(service.address, b"".join(garbage) + b"hypervisor version\n", 8)
    codes = [reply[:4] for reply in replies]
    assert codes == [b"200-"] * 7 + [b"100-"], replies
    assert replies[0] == b"200-Parse error: request longer than 512 bytes\r\n"
    assert raw_exchange(service.address, b"bridge list\r\n", 1) == [b"100-OK\r\n"]


def test_exactly_512_bytes_is_one_line(service: Service) -> None:
    name = "b" * (512 - len("bridge create \n"))
    assert raw_exchange(service.address, f"bridge create {name}\n".encode(), 1)[0].startswith(
        b"100-"
    )


def test_a_client_leaving_mid_command_runs_nothing(service: Service) -> None:
    host, port = parse_address(service.address)
    with socket.create_connection((host, port), 5) as sock:
        sock.sendall(b"bridge create half")  # no newline: not a request yet
    with socket.create_connection((host, port), 5) as sock:
        sock.sendall(b"bridge create gone\n")  # a request, but nobody reads the reply
    time.sleep(0.2)
    with service.client() as client:
        assert client.request("bridge", "list") == ["gone (NIOs = 0)", "OK"]


def test_many_clients_at_once(service: Service) -> None:
    errors: list[BaseException] = []

    def work(index: int) -> None:
        try:
            with service.client() as client:
                for step in range(20):
                    client.request("bridge", "create", f"b{index}-{step}")
        except BaseException as exc:  # reported below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors
    with service.client() as client:
        assert len(client.request("bridge", "list")) == 8 * 20 + 1


def test_reset_rename_delete_and_stop(service: Service) -> None:
    with service.client() as client:
        a, b = bridge_between(client)
        assert client.request("bridge", "rename", "br0", "br1") == ["bridge 'br0' renamed to 'br1'"]
        a.send([1])
        assert b.numbers(1) == [1]
        assert client.request("bridge", "stop", "br1") == ["bridge 'br1' stopped"]
        a.send([2])
        assert b.numbers(0) == []
        client.request("bridge", "start", "br1")
        a.send([3])
        assert b.numbers(1) == [3]
        client.request("hypervisor", "reset")
        assert client.request("bridge", "list") == ["OK"]
        assert client.request("hypervisor", "stop") == ["OK"]
    service.thread.join(5)
    assert not service.thread.is_alive()


LAB = """
[[link]]
a = "PC1 e0"
b = "PC2 e0"
a_endpoint = "udp:{p0}:127.0.0.1:{p1}"
b_endpoint = "udp:{p2}:127.0.0.1:{p3}"
impairments = ["a2b delay 1"]
"""


@pytest.fixture
def lab_service(tmp_path: Path) -> Iterator[tuple[Service, Peer, Peer]]:
    pc1, pc2 = Peer(), Peer()
    ours = peers.free_udp_ports(2)
    path = tmp_path / "lab.toml"
    path.write_text(LAB.format(p0=ours[0], p1=pc1.port, p2=ours[1], p3=pc2.port))
    pc1.connect(ours[0])
    pc2.connect(ours[1])
    served = Service(tmp_path / "captures", lab_file=str(path))
    yield served, pc1, pc2
    served.stop()


def test_lab_links_cannot_be_taken_apart_over_the_protocol(lab_service) -> None:
    service, pc1, pc2 = lab_service
    name = "PC1:e0--PC2:e0"
    with service.client() as client:
        for words, code in [
            (["bridge", "delete", name], Code.DELETE),
            (["bridge", "rename", name, "x"], Code.RENAME),
            (["bridge", "add_nio_udp", name, "1", "127.0.0.1", "2"], Code.CREATE),
        ]:
            with pytest.raises(ControlError) as caught:
                client.request(*words)
            assert caught.value.code == code
        client.request("hypervisor", "reset")
        assert client.request("bridge", "list") == [f"{name} (NIOs = 2)", "OK"]
        pc1.send([1])
        assert pc2.numbers(1) == [1]


def test_lab_verbs_name_devices_and_directions_as_the_device_sees_them(lab_service) -> None:
    service, pc1, pc2 = lab_service
    with service.client() as client:
        assert client.devices() == {"PC1": ["e0"], "PC2": ["e0"]}
        assert client.request("lab", "find", "PC2", "e0") == ["PC1:e0--PC2:e0 b"]
        reply = client.request("lab", "filter", "PC2", "e0", "freq_drop", "in", "2")
        assert reply == ["filter PC2:e0:in:freq_drop set: a2b freq_drop 2"]
        pc1.send([1, 2, 3, 4])
        assert pc2.numbers(2) == [1, 3]  # PC2 receives what PC1 sends: a2b
        client.request("lab", "filter", "PC2", "e0", "frequency_drop", "in", "-1")  # replaces it
        [link] = client.links()
        assert [f["impairment"] for f in link["filters"]] == ["delay 1", "freq_drop -1"]
        assert link["ends"] == ["PC1 e0", "PC2 e0"] and link["running"]
        assert link["stats"]["a2b"]["dropped"] == {"freq_drop": 2}
        pc2.send([5])
        assert pc1.numbers(1) == [5]
        client.request("lab", "filter", "PC1", "e0", "none")
        pc1.send([6])
        assert pc2.numbers(1) == [6]
        reply = client.request("lab", "capture", "PC1", "e0", "pc1.pcap", "ETH")
        assert reply == [f"capturing PC1 e0 to {service.captures / 'pc1.pcap'}"]
        with pytest.raises(ControlError, match="already active"):
            client.request("lab", "capture", "PC1", "e0", "other.pcap")
        for words in (["PC9", "e0", "x.pcap"], ["PC1", "e7", "x.pcap"]):
            with pytest.raises(ControlError) as caught:
                client.request("lab", "capture", *words)
            assert caught.value.code == Code.UNK_OBJ
        with pytest.raises(ControlError, match="in\\|out\\|both"):
            client.request("lab", "filter", "PC1", "e0", "freq_drop", "up", "2")
        assert "pc1.pcap (0 frames)" in client.request("lab", "stop_capture", "PC1", "e0")[0]


@tshark.required
def test_a_lab_capture_runs_from_the_start(tmp_path: Path) -> None:
    pc1, pc2 = Peer(), Peer()
    ours = peers.free_udp_ports(2)
    path = tmp_path / "lab.toml"
    text = LAB.format(p0=ours[0], p1=pc1.port, p2=ours[1], p3=pc2.port)
    path.write_text(text + 'capture = "start.pcapng"\ncapture_at = "both"\n')
    pc1.connect(ours[0])
    pc2.connect(ours[1])
    served = Service(tmp_path / "captures", lab_file=str(path))
    try:
        pc1.send([1, 2])
        assert pc2.numbers(2) == [1, 2]
        with served.client() as client:
            [link] = client.links()
            assert link["capture"]["format"] == "pcapng" and link["capture"]["point"] == "both"
    finally:
        served.stop()
    assert served.notes == [
        f"packet capture stopped on bridge 'PC1:e0--PC2:e0': {served.captures / 'start.pcapng'}"
        " (4 frames)"
    ]
    rows = tshark.fields(str(served.captures / "start.pcapng"), ["frame.interface_name"])
    assert sorted(row["frame.interface_name"][0] for row in rows) == [
        "PC1:e0--PC2:e0 post",
        "PC1:e0--PC2:e0 post",
        "PC1:e0--PC2:e0 pre",
        "PC1:e0--PC2:e0 pre",
    ]


def test_unknown_control_address_is_one_line() -> None:
    port = peers.free_tcp_port()
    done = subprocess.run(
        [*TUNNELSCOPE, "links", "--control", f"127.0.0.1:{port}"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2
    assert done.stderr.startswith(f"tunnelscope: error: no tunnelscope control at 127.0.0.1:{port}")
    assert len(done.stderr.strip().splitlines()) == 1


def test_hypervisor_answers_as_ubridge_and_stops_on_request(tmp_path: Path) -> None:
    tunnelscope = [*TUNNELSCOPE, "hypervisor"]
    version = subprocess.run([*tunnelscope, "-v"], capture_output=True, text=True, timeout=60)
    assert re.match(r"ubridge version 0\.9\.18 ", version.stdout)
    launcher = tmp_path / "ubridge"
    subprocess.run(
        [*tunnelscope, "--install-launcher", str(launcher), "--captures-dir", str(tmp_path)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    assert subprocess.run(
        [str(launcher), "-v"], capture_output=True, text=True, timeout=60
    ).stdout == (version.stdout)
    port = peers.free_tcp_port()
    log = tmp_path / "exchange.log"
    process = subprocess.Popen(
        [str(launcher), "-H", f"127.0.0.1:{port}", "--log", str(log)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        assert "port" in process.stdout.readline()
        with ControlClient(f"127.0.0.1:{port}") as client:
            assert client.request("hypervisor", "stop") == ["OK"]
        assert process.wait(10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)
    lines = log.read_text().splitlines()
    assert [line.split(" ", 1)[1] for line in lines] == ["<- hypervisor stop", "-> 100-OK"]
    bad = subprocess.run(
        [*tunnelscope, "-H", "127.0.0.1:nope"], capture_output=True, text=True, timeout=60
    )
    assert bad.returncode == 2 and bad.stderr.startswith("tunnelscope: error:")


def test_a_capture_name_swapped_for_a_symlink_never_leads_outside(tmp_path: Path) -> None:
    """Issue 15's race: between the check of a name and the open, another local user swaps
    the file, or a directory on its way, for a symbolic link to outside."""
    served = Service(tmp_path / "captures")
    outside = tmp_path / "outside"
    outside.mkdir()
    sub, target = served.captures / "sub", served.captures / "sub" / "x.pcap"
    sub.mkdir()
    stop, swaps = threading.Event(), [0]

    def swap() -> None:
        while not stop.is_set():
            with contextlib.suppress(OSError):
                if sub.is_symlink():
                    sub.unlink()
                    sub.mkdir()
                else:
                    target.unlink(missing_ok=True)
                    target.symlink_to(outside / "pwn.pcap")
                    target.unlink()
                    sub.rmdir()
                    sub.symlink_to(outside)
                swaps[0] += 1

    swapper = threading.Thread(target=swap, daemon=True)
    swapper.start()
    try:
        with served.client() as client:
            bridge_between(client)  # running: each start_capture opens the file at once
            deadline, attempts = time.monotonic() + 20, 0
            while attempts < 1500 and time.monotonic() < deadline:
                attempts += 1
                with contextlib.suppress(ControlError):
                    client.request("bridge", "start_capture", "br0", str(target))
                    client.request("bridge", "stop_capture", "br0")
    finally:
        stop.set()
        swapper.join(5)
        served.stop()
    assert attempts > 100 and swaps[0] > 100
    assert list(outside.iterdir()) == []


@pytest.fixture
def small_server() -> Iterator[ControlServer]:
    """A control server with short timeouts, answering every request with the words it got."""
    server = ControlServer(
        ("127.0.0.1", 0),
        lambda words: Reply(" ".join(words)),
        on_stop=lambda: None,
        line_timeout=0.5,
        evict_idle=0.3,
    ).start()
    yield server
    server.close()


def connect(server: ControlServer) -> socket.socket:
    return socket.create_connection(server.address, timeout=3)


def test_idle_clients_cannot_keep_gns3_out(small_server: ControlServer) -> None:
    squatters = [connect(small_server) for _ in range(MAX_CONNECTIONS)]
    time.sleep(0.5)  # every slot taken by a client that never asks anything
    address = f"{small_server.address[0]}:{small_server.address[1]}"
    with ControlClient(address) as gns3:
        assert gns3.request("hypervisor", "version") == ["hypervisor version"]
        time.sleep(0.5)  # GNS3 idles too; newcomers take the squatters' slots, not its own
        late = [connect(small_server) for _ in range(MAX_CONNECTIONS - 1)]
        closed = 0
        for sock in squatters:
            sock.settimeout(2)
            with contextlib.suppress(TimeoutError, socket.timeout, ConnectionResetError):
                closed += sock.recv(100) == b""
        assert closed == MAX_CONNECTIONS  # each squatter's slot went to one newcomer
        assert gns3.request("bridge", "list") == ["bridge list"]
    for sock in squatters + late:
        sock.close()


def test_busy_slots_still_refuse_a_newcomer(small_server: ControlServer) -> None:
    clients = [connect(small_server) for _ in range(MAX_CONNECTIONS)]
    refused = connect(small_server)  # at once: nobody has idled long enough to give way
    assert refused.recv(100) == b"215-too many connections\r\n"
    for sock in [*clients, refused]:
        sock.close()


def test_an_idle_client_is_not_closed_without_need(small_server: ControlServer) -> None:
    with connect(small_server) as sock:
        time.sleep(1.0)
        sock.sendall(b"hypervisor version\n")
        assert sock.recv(100) == b"100-hypervisor version\r\n"


def test_a_line_never_finished_closes_the_connection_unrun() -> None:
    seen: list[list[str]] = []
    server = ControlServer(
        ("127.0.0.1", 0),
        lambda words: seen.append(words) or Reply("ok"),
        on_stop=lambda: None,
        line_timeout=0.5,
    ).start()
    try:
        with connect(server) as sock:
            sock.sendall(b"hypervisor version\nbridge del")
            assert sock.recv(100) == b"100-ok\r\n"
            started = time.monotonic()
            assert sock.recv(100) == b""  # closed by the server
            assert 0.3 < time.monotonic() - started < 3
    finally:
        server.close()
    assert seen == [["hypervisor", "version"]]


def _launchers(tmp_path: Path) -> dict[str, Path]:
    """A hand-written launcher (as ubridge_path users write one) and an installed one, both
    without --captures-dir; the installed one is written from a directory outside projects."""
    hand = tmp_path / "by-hand"
    hand.write_text(f'#!/bin/sh\nexec {" ".join(map(shlex.quote, TUNNELSCOPE))} hypervisor "$@"\n')
    hand.chmod(0o755)
    installed = tmp_path / "installed"
    subprocess.run(
        [*TUNNELSCOPE, "hypervisor", "--install-launcher", str(installed)],
        cwd=tmp_path,
        check=True,
        capture_output=True,
        timeout=60,
    )
    assert "--captures-dir" not in installed.read_text()
    return {"by-hand": hand, "installed": installed}


@pytest.mark.parametrize("kind", ["by-hand", "installed"])
def test_captures_default_to_the_gns3_project_of_the_node(tmp_path: Path, kind: str) -> None:
    launcher = _launchers(tmp_path)[kind]
    project = tmp_path / "projects" / "p1"
    node = project / "project-files" / "vpcs" / "5f1c0c3e-node"
    other = tmp_path / "projects" / "p2" / "project-files" / "captures"
    for directory in (node, project / "project-files" / "captures", other):
        directory.mkdir(parents=True)
    port = peers.free_tcp_port()
    process = subprocess.Popen(
        [str(launcher), "-H", f"127.0.0.1:{port}"], cwd=node, stdout=subprocess.PIPE, text=True
    )
    try:
        assert process.stdout is not None
        assert "port" in process.stdout.readline()
        assert process.stdout.readline().strip() == f"Capture files go inside {project}"
        with ControlClient(f"127.0.0.1:{port}") as client:
            client.request("bridge", "create", "br0")
            inside = project / "project-files" / "captures" / "PC1_Ethernet0_PC2.pcap"
            assert client.request("bridge", "start_capture", "br0", str(inside))
            client.request("bridge", "stop_capture", "br0")
            escape = node / ".." / ".." / ".." / ".." / "x.pcap"  # PROJECT/../x.pcap
            for outside in (other / "x.pcap", tmp_path / "x.pcap", escape):
                with pytest.raises(ControlError) as caught:
                    client.request("bridge", "start_capture", "br0", str(outside))
                assert caught.value.code == Code.FILE
                assert f"outside the captures directory {project}" in caught.value.text
            client.request("hypervisor", "stop")
        assert process.wait(10) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)


def test_captures_default_to_the_working_directory_outside_gns3(tmp_path: Path) -> None:
    assert gns3_captures_dir(str(tmp_path)) == str(tmp_path.resolve())
    node = tmp_path / "p" / "project-files" / "qemu" / "n1"
    node.mkdir(parents=True)
    assert gns3_captures_dir(str(node)) == str((tmp_path / "p").resolve())
    assert gns3_captures_dir(str(node.parent.parent)) == str((tmp_path / "p").resolve())


@contextlib.contextmanager
def veth_pair() -> Iterator[tuple[str, str]]:
    """A veth pair in the host's namespace, both ends up, no addresses; deleted at exit."""
    suffix = secrets.token_hex(3)
    ends = (f"tsa{suffix}", f"tsb{suffix}")
    peers.run("ip", "link", "add", ends[0], "type", "veth", "peer", "name", ends[1])
    try:
        for end in ends:
            peers.run("ip", "link", "set", end, "up")
        yield ends
    finally:
        peers.run("ip", "link", "delete", ends[0], check=False)


@peers.needs_root
@pytest.mark.parametrize("kind", ["add_nio_ethernet", "add_nio_linux_raw"])
def test_ethernet_nios_and_set_pcap_filter_as_ubridge(service: Service, kind: str) -> None:
    """An interface NIO bridges a veth to a tunnel; set_pcap_filter (ethernet NIOs only, as in
    ubridge) keeps what the interface hands over to the frames its expression matches."""
    with veth_pair() as (ours, wire), service.client() as client:
        peer = Peer()
        port = peers.free_udp_port()
        peer.connect(port)
        client.request("bridge", "create", "br0")
        assert client.request("bridge", kind, "br0", ours) == [
            f"NIO {'Ethernet' if kind == 'add_nio_ethernet' else 'Linux raw'} added to bridge 'br0'"
        ]
        client.request("bridge", "add_nio_udp", "br0", str(port), "127.0.0.1", str(peer.port))
        client.request("bridge", "start", "br0")
        with open_endpoint(f"eth:{wire}") as sender:

            def deliver(numbers: list[int]) -> list[int]:
                frames = [
                    b"\x02" * 6 + b"\x02\x00\x00\x00\x00\x09\x88\xb5" + bytes([n]) * 50
                    for n in numbers
                ]
                assert sender.send_batch(frames) == (len(frames), 0)
                return [n for n in peer.numbers(len(numbers)) if n in numbers]

            assert deliver([1, 2]) == [1, 2]
            if kind == "add_nio_linux_raw":
                with pytest.raises(ControlError) as caught:
                    client.request("bridge", "set_pcap_filter", "br0", "ether[14] != 3")
                assert caught.value.code == Code.CREATE
                return
            reply = client.request("bridge", "set_pcap_filter", "br0", "ether[14] != 3")
            assert reply == ["filter 'ether[14] != 3' applied on bridge 'br0'"]
            assert deliver([3, 4, 3, 5]) == [4, 5]
            with pytest.raises(ControlError) as caught:
                client.request("bridge", "set_pcap_filter", "br0", "ether[")
            assert caught.value.code == Code.CREATE
            assert "unable to apply filter on bridge br0 (source NIO)" in caught.value.text
            client.request("bridge", "stop", "br0")  # the filter stays with the bridge
            client.request("bridge", "start", "br0")
            assert deliver([3, 6]) == [6]
            assert client.request("bridge", "set_pcap_filter", "br0") == [
                "filter reset on bridge 'br0'"
            ]
            assert deliver([3]) == [3]


# --- a recorded GNS3 session, replayed -------------------------------------------------------

GNS3_SESSION = Path(__file__).parent / "data" / "gns3-2.2.61-vpcs-pair.exchange"


class ReplayedUbridge:
    """One recorded ubridge process: a server of its own, fed the recorded lines verbatim."""

    def __init__(self, captures: Path, backend: str) -> None:
        self.service = Service(captures, backend)
        host, port = parse_address(self.service.address)
        self.sock = socket.create_connection((host, port), 10)
        self.stream = self.sock.makefile("rb")

    def send(self, line: str) -> str:
        """The final reply line of one request line, exactly as sent on the wire."""
        self.sock.sendall(line.encode() + b"\n")
        while True:
            raw = self.stream.readline().decode()
            assert raw.endswith("\r\n"), f"{line!r}: the connection closed"
            if raw[3:4] == "-":
                return raw[:-2]

    def close(self) -> None:
        self.stream.close()
        self.sock.close()
        self.service.stop()


def _frame(kind: str) -> bytes:
    pc1, pc2 = "00:50:79:66:68:00", "00:50:79:66:68:01"
    if kind == "arp":
        packet = peers.Ether(src=pc1, dst="ff:ff:ff:ff:ff:ff") / peers.ARP(
            psrc="10.77.0.1", pdst="10.77.0.2"
        )
    else:
        packet = peers.Ether(src=pc1, dst=pc2) / peers.IP(src="10.77.0.1", dst="10.77.0.2")
        packet = packet / peers.ICMP(type=8) / (b"x" * 56)
    return bytes(packet)


@tshark.required
@pytest.mark.parametrize("backend", available_backends())
def test_a_recorded_gns3_session_replays_step_by_step(tmp_path: Path, backend: str) -> None:
    """Every request GNS3 sent gets ubridge's reply code and text (tunnelscope may add detail
    after it), the link carries frames between the VPCS stand-ins at every step, the bpf filter
    drops echo requests while ARP passes, and the capture holds what crossed."""
    projects = tmp_path / "projects"
    pc1, pc2 = Peer(), Peer()
    free = iter(peers.free_udp_ports(4))
    ports = {"port1": pc1.port, "port5": pc2.port}
    ports.update({f"port{n}": next(free) for n in (0, 2, 3, 4)})
    pc1.connect(ports["port0"])
    pc2.connect(ports["port4"])
    ubridges: dict[str, ReplayedUbridge] = {}
    passed: list[tuple[str, list[str]]] = []  # (the step after which frames were sent, kinds)

    def crossing(kinds: list[str]) -> list[str]:
        for kind in kinds:
            pc1.sock.send(_frame(kind))
        got = []
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline and len(got) < len(kinds):
            with contextlib.suppress(TimeoutError, socket.timeout):
                got.append("arp" if pc2.sock.recv(2048)[12:14] == b"\x08\x06" else "echo")
        return got

    try:
        step = reply = ""
        for number, line in enumerate(GNS3_SESSION.read_text().splitlines(), 1):
            if line.startswith("#"):
                continue
            name, arrow, text = line.split(" ", 2)
            text = text.format(projects=projects, **ports)
            if arrow == "<-":
                if name not in ubridges:
                    ubridges[name] = ReplayedUbridge(projects, backend)
                step = text
                if "start_capture" in text:  # GNS3 makes the project's captures directory
                    Path(text.split('"')[1]).parent.mkdir(parents=True, exist_ok=True)
                reply = ubridges[name].send(text)
                continue
            assert reply[:4] == text[:4] and reply.startswith(text), f"line {number}: {step}"
            if name == "ubridge2" and step.startswith("bridge reset_packet_filters"):
                passed.append((step, crossing(["echo", "arp"])))  # both bridges up: a link
            elif "filter0 bpf" in step:
                passed.append((step, crossing(["echo", "echo", "arp"])))
            elif "filter4 bpf" in step:  # every filter at zero, bpf among them
                passed.append((step, crossing(["echo", "arp"])))
    finally:
        for ubridge in ubridges.values():
            ubridge.close()
        pc1.sock.close()
        pc2.sock.close()
    assert [kinds for _, kinds in passed] == [["echo", "arp"], ["arp"], ["arp"]], passed
    [capture] = projects.glob("*/project-files/captures/pc1-pc2.pcap")
    rows = tshark.fields(str(capture), ["arp.opcode", "icmp.type"])
    assert [("arp" if row["arp.opcode"] else "echo") for row in rows] == ["arp", "arp"]
