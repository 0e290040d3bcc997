"""ubridge's iol_bridge over NETIO sockets: IOU stand-ins (tests/iou.py) joined as GNS3 joins
IOU nodes, each through its own iol_bridge and a UDP tunnel, captures with the link type
GNS3 names (or a detected one) that tshark reads, filters, counters, and bad input."""

from __future__ import annotations

import contextlib
import os
import socket
import struct
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import iou
import peers
import pytest
import tshark
from test_control import Service

from tunnelscope.datapath.engine import available_backends
from tunnelscope.lab.control import Code, ControlClient, ControlError
from tunnelscope.nio import netio

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=available_backends())
def lab(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[tuple[Service, str]]:
    directory = str(tmp_path / "netio")
    served = Service(tmp_path / "captures", request.param, netio_dir=directory)
    yield served, directory
    served.stop()


def ethernet(number: int) -> bytes:
    return b"\xff" * 6 + b"\xaa\xbb\xcc\x00\x01\x00" + b"\x88\xb5" + bytes([number]) * 46


def datagrams(peer: socket.socket, expected: int, timeout: float = 1.0) -> list[bytes]:
    """What reaches `peer` in `timeout`, looking for one more than expected."""
    got: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(got) <= expected and time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError, socket.timeout):
            got.append(peer.recv(2048))
    return got


def open_fds() -> list[str]:
    """What this process has open (the engine runs in it), by target."""
    targets = []
    for fd in os.listdir("/proc/self/fd"):
        with contextlib.suppress(OSError):  # the listing's own fd is gone by now
            targets.append(os.readlink(f"/proc/self/fd/{fd}"))
    return sorted(targets)


def linktype(path: str) -> int:
    with open(path, "rb") as stream:
        return struct.unpack("<I", stream.read(24)[20:24])[0]


def test_the_header_is_ubridges() -> None:
    """Byte for byte as hypervisor_iol_bridge.h lays it out: IDs big-endian, then the port
    (bay + 16 * unit) twice, message type 1 (data), channel 0."""
    assert netio.header(7, 519, netio.port_key(1, 2)) == bytes.fromhex("0007020721210100")
    stand_in = iou.Instance.__new__(iou.Instance)
    stand_in.iou_id, stand_in.bridge_id = 7, 519
    assert stand_in.header(1, 2) == bytes.fromhex("0207000721210100")
    with pytest.raises(ValueError):
        netio.port_key(16, 0)


def wire(
    client: ControlClient, bridge_id: int, iou_id: int, ports: list[tuple[int, int, int, int]]
) -> str:
    """GNS3's _networking(): create, add_nio_udp per port (BAY UNIT LPORT RPORT), start."""
    name = f"IOL-BRIDGE-{bridge_id}"
    with contextlib.suppress(ControlError):
        client.request("iol_bridge", "delete", name)
    assert client.request("iol_bridge", "create", name, str(bridge_id)) == [
        f"IOL bridge '{name}' created"
    ]
    for bay, unit, lport, rport in ports:
        words = [str(iou_id), str(bay), str(unit), str(lport), "127.0.0.1", str(rport)]
        client.request("iol_bridge", "add_nio_udp", name, *words)
    return name


@tshark.required
def test_two_iou_instances_exchange_frames_both_ways(
    lab: tuple[Service, str], tmp_path: Path
) -> None:
    service, directory = lab
    serial, eth = peers.free_udp_ports(2), peers.free_udp_ports(2)
    with (
        service.client() as client,
        iou.Instance(directory, 1, 513) as r1,
        iou.Instance(directory, 2, 514) as r2,
    ):
        a = wire(client, 513, 1, [(1, 0, serial[0], serial[1]), (0, 0, eth[0], eth[1])])
        b = wire(client, 514, 2, [(1, 0, serial[1], serial[0]), (0, 0, eth[1], eth[0])])
        path = str(service.captures / "r1-s1-0.pcap")
        assert client.request("iol_bridge", "start_capture", a, "1", "0", path, "C_HDLC") == [
            "packet capture started on port 1/0"
        ]
        for name in (a, b):
            assert client.request("iol_bridge", "start", name) == [f"IOL bridge '{name}' started"]
        sent = r1.keepalives(1, 0, count=10)
        assert r2.receive(10) == [(1, 0, frame) for frame in sent]
        back = r2.keepalives(1, 0, count=4)
        assert r1.receive(4) == [(1, 0, frame) for frame in back]
        for number in range(5):
            r1.send(0, 0, ethernet(number))
        assert r2.receive(5) == [(0, 0, ethernet(n)) for n in range(5)]
        assert r1.foreign == [] and r2.foreign == []
        stats = client.request("iol_bridge", "get_stats", a)
        assert sorted(stats[:-1]) == [
            "port 0/0:      IN: 0 packets OUT: 5 packets",
            "port 1/0:      IN: 4 packets OUT: 10 packets",
        ]
        listed = {link["name"]: link for link in client.links()}  # `tunnelscope links`
        assert sorted(listed) == sorted(f"{n} {p}" for n in (a, b) for p in ("0/0", "1/0"))
        serial_port = listed[f"{a} 1/0"]
        assert serial_port["running"] and serial_port["capture"]["path"] == path
        assert serial_port["encapsulation"] == "hdlc", serial_port
        assert [serial_port["stats"][d]["forwarded"] for d in ("a2b", "b2a")] == [10, 4]
        client.request("iol_bridge", "reset_stats", a)
        assert "IN: 0 packets OUT: 0 packets" in client.request("iol_bridge", "get_stats", a)[0]
        assert client.request("iol_bridge", "stop_capture", a, "1", "0") == [
            "packet capture stopped on port 1/0"
        ]
        assert client.request("iol_bridge", "list")[:-1] == [f"{a} (ports = 2)", f"{b} (ports = 2)"]
        for name in (a, b):
            client.request("iol_bridge", "delete", name)
        assert sorted(os.listdir(directory)) == ["1", "2"]  # the stand-ins' own sockets
    assert linktype(path) == 104
    rows = tshark.fields(path, ["chdlc.protocol", "slarp.ptype", "slarp.mysequence"])
    assert [row["slarp.mysequence"] for row in rows] == [
        [str(n)] for n in [*range(1, 11), *range(1, 5)]
    ]
    assert {row["chdlc.protocol"][0] for row in rows} == {"0x8035"}


@tshark.required
def test_an_iou_port_to_a_udp_peer_detects_its_link_type_and_filters(
    lab: tuple[Service, str],
) -> None:
    """IOU-to-VPCS as GNS3 wires it: the port's UDP tunnel goes straight to the peer."""
    service, directory = lab
    lport, rport = peers.free_udp_ports(2)
    peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer.bind(("127.0.0.1", rport))
    peer.connect(("127.0.0.1", lport))
    peer.settimeout(0.05)
    with (
        contextlib.closing(peer),
        service.client() as client,
        iou.Instance(directory, 9, 521) as r9,
    ):
        name = wire(client, 521, 9, [(1, 1, lport, rport)])
        path = str(service.captures / "auto.pcap")
        client.request("iol_bridge", "start_capture", name, "1", "1", path)  # no DLT: detected
        client.request("iol_bridge", "start", name)
        client.request("iol_bridge", "reset_packet_filters", name, "1", "1")
        client.request(
            "iol_bridge", "add_packet_filter", name, "1", "1", "filter0", "frequency_drop", "4"
        )
        sent = r9.keepalives(1, 1, count=40)
        got = datagrams(peer, 30)
        assert got == [frame for index, frame in enumerate(sent, 1) if index % 4]
        for number in range(3):
            peer.send(iou.slarp_keepalive(100 + number))
        assert [frame for _, _, frame in r9.receive(3)] == [
            iou.slarp_keepalive(100 + n) for n in range(3) if (41 + n) % 4
        ]
        client.request("iol_bridge", "stop_capture", name, "1", "1")
        client.request("iol_bridge", "delete", name)
    assert linktype(path) == 104
    assert len(tshark.fields(path, ["slarp.mysequence"], "slarp")) == 30 + 3


def test_bad_iol_requests_cost_one_error_and_leak_nothing(
    lab: tuple[Service, str], tmp_path: Path
) -> None:
    service, directory = lab
    lport, rport = peers.free_udp_ports(2)
    fds = open_fds()
    with service.client() as client:
        client.request("iol_bridge", "create", "B", "600")
        client.request(
            "iol_bridge", "add_nio_udp", "B", "5", "0", "0", str(lport), "127.0.0.1", str(rport)
        )
        bad = [
            (["create", "B", "601"], Code.CREATE, "IOL bridge 'B' already exist"),
            (["create", "C", "600"], Code.CREATE, "ID 600 is in use"),
            (["create", "C", "0"], Code.CREATE, "is not 1-65535"),
            (["create", "C", "65536"], Code.CREATE, "is not 1-65535"),
            (["create", "C", "x"], Code.CREATE, "is not 1-65535"),
            (["create", "C"], Code.BAD_PARAM, "min/max=2/2"),
            (["delete", "nope"], Code.NOT_FOUND, "IOL bridge 'nope' doesn't exist"),
            (["start", "nope"], Code.NOT_FOUND, "doesn't exist"),
            (["stop", "B"], Code.STOP, "is not running"),
            (["rename", "B", "B"], Code.RENAME, "already exist"),
            (
                ["add_nio_udp", "nope", "5", "0", "0", "1", "127.0.0.1", "2"],
                Code.NOT_FOUND,
                "bridge 'nope'",
            ),
            (
                ["add_nio_udp", "B", "600", "0", "0", "1", "127.0.0.1", "2"],
                Code.CREATE,
                "cannot be the same",
            ),
            (
                ["add_nio_udp", "B", "5", "16", "0", "1", "127.0.0.1", "2"],
                Code.INV_PARAM,
                "out of range",
            ),
            (
                ["add_nio_udp", "B", "5", "0", "-1", "1", "127.0.0.1", "2"],
                Code.INV_PARAM,
                "invalid port",
            ),
            (
                ["add_nio_udp", "B", "5", "1", "0", "x", "127.0.0.1", "2"],
                Code.CREATE,
                "unable to create NIO UDP",
            ),
            (["start_capture", "B", "3", "0", "x.pcap"], Code.NOT_FOUND, "port 3/0 doesn't exist"),
            (["start_capture", "B", "0", "0", "/etc/x.pcap"], Code.FILE, "outside"),
            (["start_capture", "B", "0", "0", "x.pcap", "DOCSIS"], Code.INV_PARAM, "DOCSIS"),
            (["start_capture", "B", "x.pcap", "C_HDLC"], Code.BAD_PARAM, "min/max=4/5"),
            (
                ["stop_capture", "B", "0", "0"],
                Code.NOT_FOUND,
                "no packet capture active on port 0/0",
            ),
            (
                ["add_packet_filter", "B", "0", "0", "f", "teleport"],
                Code.CREATE,
                "unknown impairment",
            ),
            (
                ["add_packet_filter", "B", "0", "0", "f", "bpf", "ip =="],
                Code.CREATE,
                "Cannot compile",
            ),
            (["delete_packet_filter", "B", "0", "0", "f"], Code.CREATE, "Failed to delete filter"),
            (["reset_packet_filters", "B", "7", "7"], Code.NOT_FOUND, "port 7/7 doesn't exist"),
            (["get_stats", "nope"], Code.NOT_FOUND, "doesn't exist"),
        ]
        for words, code, text in bad:
            with pytest.raises(ControlError) as caught:
                client.request("iol_bridge", *words)
            assert (caught.value.code, text in caught.value.text) == (code, True), (
                words,
                caught.value.text,
            )
        client.request("iol_bridge", "start", "B")
        with pytest.raises(ControlError) as caught:
            client.request("iol_bridge", "start", "B")
        assert caught.value.code == Code.START
        assert peers.udp_port_bound(lport)
        client.request("iol_bridge", "delete", "B")
        assert not peers.udp_port_bound(lport)
        assert os.listdir(directory) == []
        assert client.request("hypervisor", "version") == ["0.9.18"]
    # (the server closes its side of the connection in its own thread, soon after)
    leaked = lambda: Counter(open_fds()) - Counter(fds)  # noqa: E731
    assert peers.wait_until(lambda: not leaked(), 2), leaked()


def test_a_netio_directory_that_cannot_be_made_is_one_error(tmp_path: Path) -> None:
    served = Service(tmp_path / "captures", netio_dir=str(tmp_path / "missing" / "netio"))
    try:
        with served.client() as client:
            with pytest.raises(ControlError) as caught:
                client.request("iol_bridge", "create", "B", "513")
            assert caught.value.code == Code.CREATE
            assert caught.value.text.startswith("could not create IOL bridge 'B': ")
            assert client.request("iol_bridge", "list") == ["OK"]
    finally:
        served.stop()
