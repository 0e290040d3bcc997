"""`sniff`: its TPACKET_V3 ring and kernel filter, against decap, tcpdump and the bridge.

Blocks built in memory (tests/fuzz.py's `tpacket3_block`) run through both scanners and must
give what decap gives for the same frames in a file; on loopback and in namespaces of our own,
sniff must write what decap makes of tcpdump's capture of the same traffic, stop at -c, size
its ring by -B, report what the kernel dropped, see behind VLAN tags and keep fragments.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import asdict
from pathlib import Path
from typing import ContextManager

import peers
import pytest
import tshark
from command import TUNNELSCOPE
from fuzz import TPACKET3_MAC, host_records, seed_frames, tpacket3_block, tpacket3_blocks

from tunnelscope.analysis import decap as decap_module
from tunnelscope.analysis.decap import Decap, Options, decap
from tunnelscope.analysis.sniff import PacketRing, capture_program
from tunnelscope.datapath import bpf
from tunnelscope.datapath.engine import Engine
from tunnelscope.formats import pcap
from tunnelscope.formats.capture import open_capture
from tunnelscope.formats.linktype import LinkType

pytestmark = pytest.mark.timeout(120)
needs_tcpdump = pytest.mark.skipif(shutil.which("tcpdump") is None, reason="no tcpdump")
needs_c = pytest.mark.skipif(not decap_module.c_scanner_available(), reason="no C scanner")
BACKENDS = [pytest.param(True, marks=needs_c, id="c"), pytest.param(False, id="python")]
TUNNEL_PORTS = frozenset((10001, 10002))  # what fuzz.host_records sends between


def frames_by_direction(path: Path, interface: int = 0) -> dict[int, list[bytes]]:
    found: dict[int, list[bytes]] = {}
    with open_capture(str(path)) as reader:
        for packet in reader:
            if packet.interface == interface:
                found.setdefault(int(packet.direction), []).append(bytes(packet.data))
    return found


def ring_decap(blocks: list[bytes], out: Path, options: Options, count: int | None = None) -> dict:
    summary = Decap(str(out), None, options).run_blocks(blocks, LinkType.ETHERNET, count)  # type: ignore[arg-type]
    result = asdict(summary)
    result.pop("backend")
    return result


# Blocks in memory --------------------------------------------------------------------------


@pytest.mark.parametrize("use_c", BACKENDS)
@pytest.mark.parametrize("case", ["ipv4", "ipv6", "fragments", "dedupe"])
def test_ring_blocks_give_what_decap_gives_for_the_same_frames(tmp_path: Path, use_c, case):
    rng = random.Random(case)
    frames = [frame for frame in seed_frames() for _ in range(2)]  # copies both ways: dedupe
    records = host_records(frames, case == "ipv6", rng if case == "fragments" else None)
    options = Options(dedupe=case == "dedupe", use_c=use_c)
    file = tmp_path / "host.pcap"
    file.write_bytes(
        pcap.global_header(1, nanosecond=True)
        + b"".join(pcap.record(t, f, nanosecond=True) for t, f in records)
    )
    expected = asdict(decap(str(file), str(tmp_path / "file.pcapng"), options=options))
    expected.pop("backend")
    for per_block in (1, 7, len(records)):
        got = ring_decap(tpacket3_blocks(records, per_block), tmp_path / "ring.pcapng", options)
        assert got == expected
        assert (tmp_path / "ring.pcapng").read_bytes() == (tmp_path / "file.pcapng").read_bytes()
    assert expected["written"] >= len(frames) // 2
    assert expected["reassembled"] > 0 if case == "fragments" else not expected["fragments"]
    assert expected["duplicates"] > 0 if case == "dedupe" else not expected["duplicates"]


def damaged_blocks() -> dict[str, bytes]:
    good = tpacket3_block(host_records(seed_frames()[:6], False))
    second = struct.unpack_from("=I", good, 48)[0] + 48  # offset of packet 2

    def patched(at: int, value: int, size: str = "I") -> bytes:
        block = bytearray(good)
        struct.pack_into("=" + size, block, at, value)
        return bytes(block)

    return {
        "empty": tpacket3_block([]),
        "cut descriptor": good[:40],
        "cut in a header": good[: second + 20],
        "cut in a frame": good[: second + TPACKET3_MAC + 10],
        "count too high": patched(12, 7),
        "count huge": patched(12, 0xFFFFFFFF),
        "first packet past the end": patched(16, len(good)),
        "next offset 0": patched(48, 0),
        "next offset past the end": patched(48, 0xFFFFFFF0),
        "tp_mac past the end": patched(second + 24, 0xFFFF, "H"),
        "snaplen huge": patched(second + 12, 0xFFFFFFFF),
        "snaplen over the limit": patched(second + 12, 300_000) + bytes(300_000),
    }


@needs_c
@pytest.mark.parametrize("name", list(damaged_blocks()))
def test_both_scanners_reject_a_damaged_block_alike_and_keep_what_came_before(
    tmp_path: Path, name: str
):
    good = tpacket3_block(host_records(seed_frames()[6:9], False))
    results = []
    for use_c in (True, False):
        out = tmp_path / f"{use_c}.pcapng"
        options = Options(ports=TUNNEL_PORTS, use_c=use_c)
        try:
            result: object = ring_decap([good, damaged_blocks()[name]], out, options)
        except decap_module.CaptureFormatError as exc:
            result = str(exc)
        results.append((result, out.read_bytes()))
        with open_capture(str(out)) as reader:  # closed valid, the frames before it kept
            assert len(list(reader)) >= 3
    assert results[0] == results[1]
    error = results[0][0]
    if name != "empty":
        assert isinstance(error, str) and ("TPACKET_V3" in error or "caplen" in error), error


@pytest.mark.parametrize("use_c", BACKENDS)
@pytest.mark.parametrize("count", [1, 5, 13])
@pytest.mark.parametrize("linktype", [LinkType.ETHERNET, None], ids=["given", "detected"])
def test_a_count_stops_at_the_frame_that_makes_it(
    tmp_path: Path, use_c: bool, count: int, linktype: LinkType | None
):
    """Also when the link's type is detected: the frames held meanwhile stop at the count."""
    records = host_records(seed_frames()[:12] * 2, False)
    blocks = tpacket3_blocks(records, 10)  # the count falls inside a block
    options = Options(ports=TUNNEL_PORTS, linktype=linktype, use_c=use_c)
    summary = ring_decap(blocks, tmp_path / "out.pcapng", options, count)
    assert summary["written"] == count
    with open_capture(str(tmp_path / "out.pcapng")) as reader:
        written = [bytes(packet.data) for packet in reader]
    assert written == [frame[42:] for _, frame in records[:count]]


def test_the_kernel_filter_keeps_tunnels_fragments_and_vlans_only():
    from scapy.layers.inet import IP, TCP, UDP
    from scapy.layers.inet6 import IPv6, IPv6ExtHdrFragment, IPv6ExtHdrHopByHop
    from scapy.layers.l2 import Dot1AD, Dot1Q, Ether

    try:
        program = capture_program(frozenset({10001, 10002, 10003, 20000}), LinkType.ETHERNET)
    except bpf.FilterError:
        pytest.skip("libpcap is missing")
    assert program is not None
    tunnel = IP() / UDP(sport=10003, dport=30000)
    cases = {
        "tunnel": (Ether() / tunnel, True),
        "other UDP": (Ether() / IP() / UDP(sport=30000, dport=30001), False),
        "TCP on a tunnel port": (Ether() / IP() / TCP(sport=10001, dport=10002), False),
        "IPv4 later fragment": (Ether() / IP(frag=185, proto=17), True),
        "IPv4 first fragment": (Ether() / IP(flags="MF", proto=17) / UDP(sport=1, dport=2), True),
        "IPv6 tunnel": (Ether() / IPv6() / UDP(sport=1, dport=20000), True),
        "IPv6 fragment": (Ether() / IPv6() / IPv6ExtHdrFragment(offset=100), True),
        "IPv6 hop-by-hop": (Ether() / IPv6() / IPv6ExtHdrHopByHop() / UDP(dport=9), True),
        "802.1Q tunnel": (Ether() / Dot1Q(vlan=5) / tunnel, True),
        "802.1Q other": (Ether() / Dot1Q(vlan=5) / IP() / UDP(sport=5, dport=6), False),
        "QinQ tunnel": (Ether() / Dot1AD(vlan=5) / Dot1Q(vlan=6) / tunnel, True),
        "QinQ fragment": (Ether() / Dot1AD(vlan=5) / Dot1Q(vlan=6) / IP(frag=9), True),
    }
    for name, (frame, kept) in cases.items():
        assert bool(bpf.run(program, bytes(frame))) == kept, name
    raw = capture_program(frozenset({10003}), LinkType.RAW)
    assert raw is not None and bpf.run(raw, bytes(tunnel))
    assert not bpf.run(raw, bytes(IP() / UDP(sport=1, dport=2)))
    disjoint = capture_program(frozenset(range(10000, 30000, 2)), LinkType.ETHERNET)
    assert disjoint is not None and bpf.run(disjoint, bytes(Ether() / IP() / UDP(dport=7)))


# Live ------------------------------------------------------------------------------------------


def started(command: list[str], log: Path, words: str) -> ContextManager[subprocess.Popen]:
    """The process once `words` show in its stderr (peers.started)."""
    return peers.started(command, log, lambda: words in log.read_text())


def send_tunnels(links: list[tuple[int, int, list[bytes]]], rounds: int, pause: float) -> int:
    """Each link's frames both ways between its two ports on loopback, `rounds` times; the
    receiving sockets are never read. Returns the datagrams sent."""
    sent = 0
    with contextlib.ExitStack() as stack:
        ends = []
        for low, high, frames in links:
            pair = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))]
            pair.append(stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM)))
            for sock, port, peer in ((pair[0], low, high), (pair[1], high, low)):
                sock.bind(("127.0.0.1", port))
                sock.connect(("127.0.0.1", peer))
            ends.append((pair, frames))
        for number in range(rounds):
            for pair, frames in ends:
                frame = frames[number % len(frames)]
                pair[number % 2].send(frame)
                sent += 1
            time.sleep(pause)
    return sent


def tshark_frames(path: Path) -> list[tuple[str, ...]]:
    names = ["frame.interface_name", "frame.encap_type", "frame.len", "frame.cap_len"]
    names += ["frame.packet_flags_direction", "_ws.col.Protocol", "_ws.col.Info"]
    return [tuple("/".join(row[n]) for n in names) for row in tshark.fields(str(path), names)]


@peers.needs_root
@tshark.required
@needs_tcpdump
@pytest.mark.timeout(180)
def test_sniff_writes_what_decap_makes_of_tcpdumps_capture(tmp_path: Path):
    """Both backends of sniff and tcpdump on the same loopback traffic (four link types, a
    65,000-byte frame among them): the same frames, link types, directions and times."""
    ports = peers.free_udp_ports(8)
    by_type: dict[int, list[bytes]] = {}
    for linktype, frame in seed_frames():
        by_type.setdefault(linktype, []).append(frame)
    by_type[1].append(by_type[1][0][:14] + bytes(65000))
    links = [(ports[2 * n], ports[2 * n + 1], frames) for n, frames in enumerate(by_type.values())]
    listed = ",".join(map(str, ports))
    expression = " or ".join(f"udp port {port}" for port in ports[::2])
    commands = {"tcpdump": ["tcpdump", "-i", "lo", "-U", "-w", str(tmp_path / "lo.pcap")]}
    commands["tcpdump"] += [expression]
    for backend in ("c", "python"):
        command = [*TUNNELSCOPE, "sniff", "--ports", listed, "--json", "--duration", "120"]
        if backend == "python":
            command = ["env", "TUNNELSCOPE_NO_C=1", *command]
        commands[backend] = [*command, "-w", str(tmp_path / f"{backend}.pcapng")]
    with contextlib.ExitStack() as stack:
        running = {
            name: stack.enter_context(
                started(
                    command,
                    tmp_path / f"{name}.err",
                    "listening" if name == "tcpdump" else "sniffing",
                )
            )
            for name, command in commands.items()
        }
        sent = send_tunnels(links, rounds=800, pause=0.001)
        time.sleep(0.5)
        stack.close()
    summaries = {}
    for backend in ("c", "python"):
        out = running[backend].stdout.read()  # type: ignore[union-attr]
        assert running[backend].returncode == 0, (tmp_path / f"{backend}.err").read_text()
        assert "kernel dropped" not in (tmp_path / f"{backend}.err").read_text()
        summaries[backend] = json.loads(out)
    assert f"{sent} packets captured" in (tmp_path / "tcpdump.err").read_text()
    offline = [*TUNNELSCOPE, "decap", str(tmp_path / "lo.pcap"), "--ports", listed, "--json"]
    done = subprocess.run(
        [*offline, "-w", str(tmp_path / "decap.pcapng")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    reference = json.loads(done.stdout)
    assert reference["written"] == sent and len(reference["links"]) == 4
    expected = tshark_frames(tmp_path / "decap.pcapng")
    linktypes = [link["linktype"] for link in reference["links"]]
    assert sorted(linktypes) == ["ethernet", "fr", "hdlc", "ppp"]
    assert len({row[1] for row in expected}) == 4, linktypes  # as tshark reads them
    reference_frames = read_frames(tmp_path / "decap.pcapng")
    for backend, summary in summaries.items():
        for key in ("written", "links", "not_tunnel", "lost", "fragments"):
            assert summary[key] == reference[key], (backend, key)
        assert tshark_frames(tmp_path / f"{backend}.pcapng") == expected, backend
        ours = read_frames(tmp_path / f"{backend}.pcapng")
        assert [(ts // 1000 * 1000, rest) for ts, rest in ours] == reference_frames  # tcpdump: us


def read_frames(path: Path) -> list[tuple[int, tuple[object, ...]]]:
    with open_capture(str(path)) as reader:
        return [(p.ts_ns, (p.interface, p.direction, p.orig_len, p.data)) for p in reader]


def ring_packets(block: memoryview) -> int:
    return struct.unpack_from("=I", block, 12)[0]


def mapped_kib(sock: socket.socket) -> list[int]:
    """Sizes of this process's mappings of `sock` (its packet ring), from /proc/self/maps."""
    name = f"socket:[{os.fstat(sock.fileno()).st_ino}]"
    sizes = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            if line.rstrip().endswith(name):
                low, high = (int(x, 16) for x in line.split()[0].split("-"))
                sizes.append((high - low) >> 10)
    return sizes


@peers.needs_root
def test_the_buffer_size_sets_the_ring_and_what_does_not_fit_is_counted_as_dropped():
    """Nobody reads the ring while 20,000 packets arrive: it keeps what its -B KiB hold, and
    the kernel's count of the rest makes up the difference exactly."""
    port, other = peers.free_udp_ports(2)
    for kib, blocks in ((512, 2), (1000, 4), (100, 2)):
        ring = PacketRing("lo", kib, frozenset({port}))
        assert mapped_kib(ring.sock) == [blocks * 256] and ring.size_kib == blocks * 256
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sender:
            sender.bind(("127.0.0.1", other))
            for _ in range(20_000):
                sender.sendto(bytes(100), ("127.0.0.1", port))
        ring.stop()
        with contextlib.closing(ring.blocks()) as ready:
            kept = sum(ring_packets(block) for block in ready)
        ring.close()
        assert ring.kernel_drops > 0 and ring.ring_full > 0
        assert kept + ring.kernel_drops == 20_000
        assert kept <= blocks * (256 << 10) // (TPACKET3_MAC + 142)  # 142: the frame on lo


@peers.needs_root
def test_sniff_reports_what_the_kernel_dropped_while_it_was_stopped(tmp_path: Path):
    port, other = peers.free_udp_ports(2)
    command = [*TUNNELSCOPE, "sniff", "-B", "512", "--ports", str(port), "--linktype", "ethernet"]
    command += ["-w", str(tmp_path / "out.pcapng"), "--json"]
    with started(command, tmp_path / "err", "sniffing on") as sniffer:
        sniffer.send_signal(signal.SIGSTOP)
        try:
            sent = send_tunnels([(other, port, [bytes(100)])], rounds=20_000, pause=0)
        finally:
            sniffer.send_signal(signal.SIGCONT)
        time.sleep(0.5)
    summary = json.loads(sniffer.stdout.read())  # type: ignore[union-attr]
    err = (tmp_path / "err").read_text()
    assert "512 KiB ring was full" in err, err
    dropped = int(err.split("the kernel dropped ")[1].split()[0])
    assert dropped > 0 and summary["written"] + dropped == sent


@peers.needs_root
@tshark.required
def test_count_ends_sniff_after_exactly_that_many_frames(tmp_path: Path):
    low, high = peers.free_udp_ports(2)
    out = tmp_path / "out.pcapng"
    command = [*TUNNELSCOPE, "sniff", "--ports", f"{low},{high}", "--linktype", "ethernet"]
    command += ["-c", "25", "-w", str(out), "--json", "--duration", "60"]
    with started(command, tmp_path / "err", "sniffing on") as sniffer:
        head = bytes.fromhex("020000000002020000000001 0800".replace(" ", "")) + bytes(42)
        frames = [head + struct.pack(">I", number) for number in range(200)]
        send_tunnels([(low, high, frames)], rounds=200, pause=0)  # within a block or two
        sniffer.wait(20)
    assert sniffer.returncode == 0
    assert json.loads(sniffer.stdout.read())["written"] == 25  # type: ignore[union-attr]
    assert len(tshark.fields(str(out), ["frame.number"])) == 25
    with open_capture(str(out)) as reader:
        assert [packet.data for packet in reader] == frames[:25]


@peers.needs_root
@pytest.mark.timeout(120)
def test_sniff_sees_tunnels_behind_one_or_two_vlan_tags(tmp_path: Path):
    """Tagged tunnel frames sent raw on the loopback of a namespace of our own: the kernel
    takes the outer tag off before a packet socket sees a frame, an inner one stays in it
    (QinQ), and only the filter's VLAN part lets that one in."""
    from scapy.layers.inet import IP, UDP
    from scapy.layers.l2 import Dot1AD, Dot1Q, Ether

    payloads = [bytes(14) + struct.pack(">I", number) for number in range(20)]
    frames = []
    for number, payload in enumerate(payloads):
        tags = Dot1Q(vlan=7) if number % 2 else Dot1AD(vlan=10) / Dot1Q(vlan=20)
        udp = IP(src="127.0.0.1", dst="127.0.0.1") / UDP(sport=20001, dport=20000) / payload
        frames.append(bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / tags / udp))
    sender = (
        "import socket, sys, time\n"
        "s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)\n"
        "s.bind(('lo', 0))\n"
        "for frame in sys.argv[1:]:\n"
        "    s.send(bytes.fromhex(frame)); time.sleep(0.01)\n"
    )
    out = tmp_path / "vlan.pcapng"
    with peers.netns() as ns:
        sniff = ["ip", "netns", "exec", ns.name, *TUNNELSCOPE, "sniff", "--ports", "20000"]
        sniff += ["--linktype", "ethernet", "-w", str(out), "--json"]
        with started(sniff, tmp_path / "err", "sniffing on") as sniffer:
            ns.exec(sys.executable, "-c", sender, *(frame.hex() for frame in frames), timeout=30)
            time.sleep(0.5)
        summary = json.loads(sniffer.stdout.read())  # type: ignore[union-attr]
    assert summary["written"] == 20, (tmp_path / "err").read_text()
    with open_capture(str(out)) as reader:
        assert [packet.data for packet in reader] == payloads


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
    bad: list[list[str]] = [["-w", "x.pcapng", "--ports", "70000"], ["-w", "x", "-B", "0"]]
    bad.append(["-i", "nosuch0", "-w", "/dev/null"])
    for args in bad:
        done = subprocess.run(
            [*TUNNELSCOPE, "sniff", *args],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert done.returncode == 2, done.stderr
        assert "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) <= 3, done.stderr  # usage + error
