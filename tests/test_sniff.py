"""`sniff` on loopback sees exactly what the bridge captures for the same VPCS traffic."""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
from pathlib import Path

import peers
import pytest
from command import TUNNELSCOPE

from tunnelscope.analysis.sniff import PacketSource
from tunnelscope.datapath.engine import Engine
from tunnelscope.formats.capture import open_capture
from tunnelscope.formats.linktype import LinkType

pytestmark = pytest.mark.timeout(120)


def frames_by_direction(path: Path, interface: int = 0) -> dict[int, list[bytes]]:
    found: dict[int, list[bytes]] = {}
    with open_capture(str(path)) as reader:
        for packet in reader:
            if packet.interface == interface:
                found.setdefault(int(packet.direction), []).append(bytes(packet.data))
    return found


@peers.needs_root
@peers.needs_vpcs
def test_sniff_on_lo_reproduces_the_bridge_capture(tmp_path: Path) -> None:
    p1, l1, l2, p2 = peers.free_udp_ports(4)
    engine = Engine()
    link = engine.add_link("link", f"udp:{l1}:127.0.0.1:{p1}", f"udp:{l2}:127.0.0.1:{p2}")
    thread = threading.Thread(target=engine.run, daemon=True)
    thread.start()
    bridged, sniffed = tmp_path / "bridge.pcapng", tmp_path / "sniff.pcapng"
    command = [*TUNNELSCOPE, "sniff", "--ports", f"{p1},{l1}"]
    command += ["-w", str(sniffed), "--duration", "60", "--json"]
    sniffer = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        assert sniffer.stderr is not None
        assert sniffer.stderr.readline().startswith("sniffing on lo")
        link.start_capture(str(bridged), LinkType.ETHERNET, "pre")
        with peers.VPCS(p1, l1, mac_offset=1) as pc1, peers.VPCS(p2, l2, mac_offset=2) as pc2:
            pc1.set_ip("10.0.0.1/24")
            pc2.set_ip("10.0.0.2/24")
            assert pc1.ping("10.0.0.2", count=3, interval_ms=100) == [
                (seq, True) for seq in range(1, 4)
            ], pc1.transcript
        link.stop_capture()
        sniffer.send_signal(signal.SIGINT)
        out, err = sniffer.communicate(timeout=20)
    finally:
        if sniffer.poll() is None:
            sniffer.kill()
            sniffer.wait()
        engine.stop()
        thread.join(5)
        engine.close()
    assert sniffer.returncode == 0, err
    assert "kernel dropped" not in err  # else the comparison below is meaningless
    summary = json.loads(out)
    assert [lk["linktype"] for lk in summary["links"]] == ["ethernet"]
    # the sniffed link's lower port end is "outbound"; the bridge's A (VPCS 1) sends a2b
    from_pc1, to_pc1 = (2, 1) if p1 < l1 else (1, 2)
    ours = frames_by_direction(bridged)
    theirs = frames_by_direction(sniffed)
    assert ours[2] and ours[1]
    assert theirs[from_pc1] == ours[2]  # what VPCS 1 sent, same bytes, same order
    assert theirs[to_pc1] == ours[1]  # what the bridge relayed to it from VPCS 2
    with open_capture(str(sniffed)) as reader:
        assert {packet.linktype for packet in reader} == {LinkType.ETHERNET}


def test_sniff_bad_input_is_one_line() -> None:
    for args in (["-w", "x.pcapng", "--ports", "70000"], ["-i", "nosuch0", "-w", "/dev/null"]):
        done = subprocess.run(
            [*TUNNELSCOPE, "sniff", *args],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr


@peers.needs_root
def test_packets_the_kernel_dropped_are_counted() -> None:
    """A socket buffer that overflows loses packets; sniff must know how many (tcpdump does)."""
    source = PacketSource("lo")
    source.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # about 2 packets
    port, other = peers.free_udp_ports(2)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
        sender.bind(("127.0.0.1", other))
        for _ in range(200):  # nobody reads the packet socket meanwhile
            sender.sendto(bytes(100), ("127.0.0.1", port))
    source.close()
    assert source.kernel_drops >= 150
