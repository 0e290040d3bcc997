"""Live captures to pipes, FIFOs and sockets: readers come and go, the link never notices."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

import pytest
from command import TUNNELSCOPE
from test_bridge import lab, numbered
from test_cli_bridge import assert_one_line_error, peer, run_cli, wait_until_bound

from tunnelscope.datapath.engine import available_backends
from tunnelscope.demo import free_udp_ports
from tunnelscope.formats.capture import Format
from tunnelscope.formats.linktype import LinkType

pytestmark = pytest.mark.timeout(120)
BACKENDS = pytest.mark.parametrize("backend", available_backends())
NEEDS_TSHARK = pytest.mark.skipif(shutil.which("tshark") is None, reason="needs tshark")
CHDLC_IP = bytes.fromhex("0f000800450000140000000040000000") + bytes([10, 0, 0, 1, 10, 0, 0, 2])


@BACKENDS
def test_a_stalled_socket_reader_stops_its_capture_not_the_link(backend: str) -> None:
    ours, theirs = socket.socketpair()  # nobody ever reads `theirs`
    ours.setblocking(False)
    with lab(backend) as t:
        state = t.link.attach_fd(os.dup(ours.fileno()), Format(), "pre", None, LinkType.ETHERNET)
        frames = numbered(6000, size=1200)
        assert len(t.transfer(frames, 6000)) == 6000
        t.settle(6000)
        deadline = time.monotonic() + 3
        while t.link.captures and time.monotonic() < deadline:
            time.sleep(0.05)
        assert state.error == "reader stalled" and not t.link.captures
    ours.close()
    theirs.close()


@BACKENDS
def test_several_captures_fail_alone(backend: str, tmp_path: Path) -> None:
    r, w = os.pipe()
    with lab(backend) as t:
        gone = t.link.attach_fd(w, Format(flush_ms=None), "pre", None, LinkType.ETHERNET)
        kept = t.link.start_capture(str(tmp_path / "k.pcap"), LinkType.ETHERNET)
        os.close(r)  # the pipe's reader goes away: EPIPE
        assert len(t.transfer(numbered(100), 100)) == 100
        t.settle(100)
        deadline = time.monotonic() + 3
        while len(t.link.captures) > 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert gone.error == "capture stopped: Broken pipe"
        assert t.link.captures == [kept] and t.link.capture is kept
        assert t.link.stop_capture() is kept and kept.frames == 100 and kept.error is None


@NEEDS_TSHARK
def test_stdout_reader_that_leaves_ends_the_capture_not_the_link() -> None:
    pa, la, lb, pb = free_udp_ports(4)
    command = [*TUNNELSCOPE, "bridge", f"udp:{la}:127.0.0.1:{pa}", f"udp:{lb}:127.0.0.1:{pb}"]
    command += ["-w", "-", "--linktype", "hdlc", "--pcapng", "--flush-ms", "0", "--json"]
    bridge = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        wait_until_bound(la, lb)
        head = os.read(bridge.stdout.fileno(), 4)  # a reader that reads 4 bytes and goes
        bridge.stdout.close()
        with peer(pa, la) as sender, peer(pb, lb) as receiver:
            for _ in range(20):
                sender.send(CHDLC_IP)
                receiver.recv(2048)
        bridge.terminate()
        err = bridge.communicate(timeout=10)[1].decode()
    finally:
        if bridge.poll() is None:
            bridge.kill()
    assert head == b"\n\r\r\n"
    assert bridge.returncode == 0, err
    assert "Broken pipe; the link keeps forwarding" in err
    assert '"forwarded": 20' in err  # the JSON summary goes to stderr with -w -


@NEEDS_TSHARK
def test_each_fifo_reader_gets_its_own_header(tmp_path: Path) -> None:
    fifo = tmp_path / "live"
    os.mkfifo(fifo)
    pa, la, lb, pb = free_udp_ports(4)
    command = [*TUNNELSCOPE, "bridge", f"udp:{la}:127.0.0.1:{pa}", f"udp:{lb}:127.0.0.1:{pb}"]
    command += ["-w", str(fifo), "--linktype", "hdlc", "--flush-ms", "1"]
    bridge = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_bound(la, lb)
        with peer(pa, la) as sender:
            for _ in range(2):  # two readers in a row
                reader = subprocess.Popen(
                    ["tshark", "-r", str(fifo), "-c", "5", "-T", "fields", "-e", "ip.dst"],
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    text=True,
                )
                while reader.poll() is None:
                    sender.send(CHDLC_IP)
                    time.sleep(0.02)
                out, err = reader.communicate()
                assert reader.returncode == 0, err
                assert out.split() == ["10.0.0.2"] * 5
                time.sleep(0.3)  # no traffic: the writer notices the reader left (POLLERR)
        bridge.terminate()
        bridge.communicate(timeout=10)
    finally:
        if bridge.poll() is None:
            bridge.kill()
    assert bridge.returncode == 0


def test_wireshark_missing_is_one_line_exit_2(tmp_path: Path) -> None:
    if shutil.which("wireshark"):
        pytest.skip("wireshark is installed here")
    assert_one_line_error(
        run_cli("bridge", "udp:41001:127.0.0.1:41002", "udp:41003:127.0.0.1:41004", "--wireshark"),
        "wireshark is not installed",
    )


@NEEDS_TSHARK
def test_tshark_watches_live() -> None:
    pa, la, lb, pb = free_udp_ports(4)
    command = [*TUNNELSCOPE, "bridge", f"udp:{la}:127.0.0.1:{pa}", f"udp:{lb}:127.0.0.1:{pb}"]
    command += ["--tshark", "--linktype", "hdlc", "--duration", "6"]
    bridge = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        wait_until_bound(la, lb)
        time.sleep(2)  # tshark starts
        with peer(pa, la) as sender:
            for _ in range(5):
                sender.send(CHDLC_IP)
        out, err = bridge.communicate(timeout=30)
    finally:
        if bridge.poll() is None:
            bridge.kill()
    assert bridge.returncode == 0, err
    assert out.count("10.0.0.1 → 10.0.0.2") == 5, out
