"""`tunnelscope bridge` as a user runs it: a subprocess, signals, files, bad input."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import time

import pytest
from command import TUNNELSCOPE

from tunnelscope.demo import free_udp_ports

pytestmark = pytest.mark.timeout(120)


def run_cli(*args: str, timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*TUNNELSCOPE, *args], capture_output=True, text=True, timeout=timeout, check=False
    )


def assert_one_line_error(done: subprocess.CompletedProcess, *fragments: str) -> None:
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1, done.stderr
    assert lines[0].startswith("tunnelscope: error: ")
    assert "Traceback" not in done.stderr
    for fragment in fragments:
        assert fragment in lines[0]


@pytest.mark.parametrize(
    ("args", "fragment"),
    [
        (["udp:abc:127.0.0.1:2", "udp:3:127.0.0.1:4"], "abc"),
        (["udp:70000:127.0.0.1:2", "udp:3:127.0.0.1:4"], "70000"),
        (["bogus:1", "udp:3:127.0.0.1:4"], "bogus"),
        (["udp:5001:127.0.0.1:5002", "udp:5003:127.0.0.1:5004", "-I", "a2b drop_all"], "drop_all"),
        (["udp:5001:127.0.0.1:5002", "udp:5003:127.0.0.1:5004", "-I", "packet_loss 150"], "150"),
        (["udp:5001:127.0.0.1:5002", "udp:5003:127.0.0.1:5004", "-I", "freq_drop abc"], "abc"),
        (["udp:5001:127.0.0.1:5002", "udp:5003:127.0.0.1:5004", "-I", "delay -5"], "-5"),
        (["udp:5001:127.0.0.1:5002", "udp:5003:127.0.0.1:5004", "--linktype", "atm"], "atm"),
    ],
)
def test_bad_input_is_one_line_and_exit_2(args: list[str], fragment: str) -> None:
    assert_one_line_error(run_cli("bridge", *args, "--duration", "1"), fragment)


def test_port_in_use_is_refused_and_nothing_is_left_open() -> None:
    busy, free, peer1, peer2 = free_udp_ports(4)
    holder = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    holder.bind(("127.0.0.1", busy))
    try:
        done = run_cli("bridge", f"udp:{free}:127.0.0.1:{peer1}", f"udp:{busy}:127.0.0.1:{peer2}")
    finally:
        holder.close()
    assert_one_line_error(done, str(busy))
    probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    probe.bind(("127.0.0.1", free))  # the first endpoint was closed again
    probe.close()


def test_capture_at_both_needs_pcapng(tmp_path) -> None:
    a, b, c, d = free_udp_ports(4)
    done = run_cli(
        "bridge",
        f"udp:{a}:127.0.0.1:{b}",
        f"udp:{c}:127.0.0.1:{d}",
        "-w",
        str(tmp_path / "x.pcap"),
        "--capture-at",
        "both",
    )
    assert_one_line_error(done, "pcapng")


def wait_until_bound(*ports: int, timeout: float = 15) -> None:
    """The bridge is up once it holds its UDP ports (binding them ourselves fails)."""
    deadline = time.monotonic() + timeout
    for port in ports:
        while time.monotonic() < deadline:
            probe = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                probe.bind(("127.0.0.1", port))
            except OSError:
                break
            finally:
                probe.close()
            time.sleep(0.05)
        else:
            raise AssertionError(f"nothing bound udp port {port}")


def peer(local: int, remote: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sock.bind(("127.0.0.1", local))
    sock.connect(("127.0.0.1", remote))
    sock.settimeout(2)
    return sock


@pytest.mark.skipif(shutil.which("tshark") is None, reason="needs tshark")
@pytest.mark.parametrize("stop", [signal.SIGTERM, signal.SIGINT])
def test_signal_stops_cleanly_with_a_valid_capture_and_summary(stop: int, tmp_path) -> None:
    pa, la, lb, pb = free_udp_ports(4)
    path = tmp_path / "link.pcapng"
    command = [*TUNNELSCOPE, "bridge", f"udp:{la}:127.0.0.1:{pa}", f"udp:{lb}:127.0.0.1:{pb}"]
    command += ["-w", str(path), "--capture-at", "both", "-I", "a2b freq_drop 4", "--json"]
    bridge = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_bound(la, lb)
        with peer(pa, la) as sender, peer(pb, lb) as receiver:
            for n in range(1, 41):
                sender.send(n.to_bytes(4, "big") + bytes(60))
            received = [receiver.recv(2048) for _ in range(30)]
        bridge.send_signal(stop)
        out, err = bridge.communicate(timeout=10)
    finally:
        if bridge.poll() is None:
            bridge.kill()
    assert bridge.returncode == 0, err
    assert [int.from_bytes(f[:4], "big") for f in received] == [n for n in range(1, 41) if n % 4]
    a2b = json.loads(out)["a2b"]
    assert (a2b["received"], a2b["forwarded"], a2b["dropped"]) == (40, 30, {"freq_drop": 10})
    interfaces = subprocess.run(
        ["tshark", "-r", str(path), "-T", "fields", "-e", "frame.interface_name"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split("\n")
    assert interfaces.count("link pre") == 40
    assert interfaces.count("link post") == 30
    assert json.loads(out)["capture"]["frames"] == 70


@pytest.mark.skipif(shutil.which("tshark") is None, reason="needs tshark")
def test_capture_to_stdout_feeds_tshark() -> None:
    pa, la, lb, pb = free_udp_ports(4)
    command = [*TUNNELSCOPE, "bridge", f"udp:{la}:127.0.0.1:{pa}", f"udp:{lb}:127.0.0.1:{pb}"]
    command += ["-w", "-", "--linktype", "hdlc", "--duration", "3"]
    bridge = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    tshark = subprocess.Popen(
        ["tshark", "-r", "-", "-T", "fields", "-e", "chdlc.address", "-e", "ip.dst"],
        stdin=bridge.stdout,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    bridge.stdout.close()
    wait_until_bound(la, lb)
    ip = bytes.fromhex("450000140000000040000000") + socket.inet_aton("10.0.0.1")
    ip += socket.inet_aton("10.0.0.2")
    with peer(pa, la) as sender:
        for _ in range(5):
            sender.send(bytes.fromhex("0f000800") + ip)
    out, _ = tshark.communicate(timeout=20)
    assert bridge.wait(10) == 0
    assert out.split("\n")[:6] == ["0x0f\t10.0.0.2"] * 5 + [""]


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("setpriv") is None, reason="needs root")
def test_tap_without_privilege_is_a_clear_error() -> None:
    a, b = free_udp_ports(2)
    done = subprocess.run(
        [
            "setpriv",  # root without CAP_NET_ADMIN and CAP_NET_RAW
            "--bounding-set=-net_admin,-net_raw",
            "--inh-caps=-net_admin,-net_raw",
            *TUNNELSCOPE,
            "bridge",
            "tap:tstest0",
            f"udp:{a}:127.0.0.1:{b}",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert_one_line_error(done, "tap")


@pytest.mark.skipif(shutil.which("tshark") is None, reason="needs tshark")
def test_a_running_bridge_streams_its_link_to_a_tcp_client(tmp_path) -> None:
    pa, la, lb, pb = free_udp_ports(4)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [*TUNNELSCOPE, "bridge", f"udp:{la}:127.0.0.1:{pa}", f"udp:{lb}:127.0.0.1:{pb}"]
    command += ["--linktype", "hdlc", "--stream", f"127.0.0.1:{port}", "--duration", "20"]
    bridge = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert bridge.stderr.readline().strip() == f"tunnelscope: stream on 127.0.0.1:{port}"
        wait_until_bound(la, lb)
        client = socket.create_connection(("127.0.0.1", port), timeout=5)
        client.sendall(b"CAPTURE link\n")
        path = tmp_path / "stream.pcap"
        ip = bytes.fromhex("450000140000000040000000") + socket.inet_aton("10.0.0.1")
        ip += socket.inet_aton("10.0.0.2")
        received = b""
        with peer(pa, la) as sender, client:
            deadline = time.monotonic() + 10
            while received.count(bytes.fromhex("0f000800")) < 5 and time.monotonic() < deadline:
                sender.send(bytes.fromhex("0f000800") + ip)
                client.settimeout(0.2)
                with contextlib.suppress(TimeoutError, socket.timeout):
                    received += client.recv(65536)
        path.write_bytes(received)
    finally:
        bridge.send_signal(signal.SIGTERM)
        bridge.communicate(timeout=10)
    fields = subprocess.run(
        ["tshark", "-r", str(path), "-T", "fields", "-e", "chdlc.address", "-e", "ip.dst"],
        capture_output=True,
        text=True,
        check=False,
    ).stdout.split("\n")
    assert fields.count("0x0f\t10.0.0.2") >= 5
