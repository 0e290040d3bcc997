"""`tunnelscope decap`: host captures of UDP tunnels in, one interface (or pcap) per link out.

Host captures are built with scapy (Ethernet, Linux SLL and SLL2, raw IP; IPv4 and IPv6)
around tunnels of the four link types, with DNS/NTP/TCP noise; tshark judges the output.
The C scanner and its pure-Python twin must write the same bytes.
"""

from __future__ import annotations

import json
import os
import random
import struct
import subprocess
import sys
from collections import Counter
from itertools import zip_longest
from pathlib import Path

import pytest
import tshark
from click.testing import CliRunner, Result
from command import TUNNELSCOPE
from scapy.layers.dns import DNS, DNSQR
from scapy.layers.inet import ICMP, IP, TCP, UDP, fragment
from scapy.layers.inet6 import (
    IPv6,
    IPv6ExtHdrDestOpt,
    IPv6ExtHdrFragment,
    IPv6ExtHdrHopByHop,
    fragment6,
)
from scapy.layers.l2 import ARP, CookedLinux, CookedLinuxV2, Dot1Q, Ether
from scapy.layers.ntp import NTP
from scapy.packet import Raw

from tunnelscope.analysis import decap as decap_module
from tunnelscope.analysis.decap import NOT_UDP, Options, Summary, decap, locate_udp
from tunnelscope.analysis.reassembly import Fragment
from tunnelscope.cli import cli
from tunnelscope.formats import pcap, pcapng
from tunnelscope.formats.capture import open_capture
from tunnelscope.formats.linktype import LinkType

C_BUILT = decap_module.c_scanner_available()
needs_c = pytest.mark.skipif(not C_BUILT, reason="tunnelscope.analysis._scan is not built")
BACKENDS = [pytest.param(True, marks=needs_c, id="c"), pytest.param(False, id="python")]

# the four lab links of every test capture: kind -> (lower port, higher port)
LINKS = {"ethernet": (10001, 10002), "hdlc": (10003, 10004), "ppp": (10005, 10006)}
LINKS["fr"] = (10007, 10008)
LINKTYPES = {
    "ethernet": LinkType.ETHERNET,
    "hdlc": LinkType.C_HDLC,
    "ppp": LinkType.PPP_SERIAL,
    "fr": LinkType.FRELAY,
}
ROUNDS = 6  # frames per link and direction
V4 = ("192.0.2.1", "192.0.2.2")
V6 = ("2001:db8::1", "2001:db8::2")


def inner(kind: str, seq: int) -> bytes:
    """One L2 frame as a lab link carries it (ICMP echo inside, distinct per seq)."""
    ip = IP(src="10.0.0.1", dst="10.0.0.2", id=seq) / ICMP(seq=seq) / Raw(b"tunnelscope")
    if kind == "ethernet":
        eth = Ether(src="00:00:5e:00:53:01", dst="00:00:5e:00:53:02")
        return bytes(eth / Dot1Q(vlan=42) / ip)
    head = {"hdlc": "0f000800", "ppp": "ff030021", "fr": "184103cc"}[kind]  # fr: DLCI 100, IETF
    return bytes.fromhex(head) + bytes(ip)


def outer(kind: str, src: str, dst: str, sport: int, dport: int, payload: bytes) -> bytes:
    """A UDP datagram as the host capture holds it, for each outer link type."""
    udp = UDP(sport=sport, dport=dport) / Raw(payload)
    ip = IPv6(src=src, dst=dst) / udp if ":" in src else IP(src=src, dst=dst) / udp
    if kind == "ether":
        return bytes(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / ip)
    if kind == "sll":
        return bytes(
            CookedLinux(pkttype=0, lladdrtype=772, proto=0x86DD if ":" in src else 0x800) / ip
        )
    if kind == "sll2":
        return bytes(CookedLinuxV2(proto=0x86DD if ":" in src else 0x800) / ip)
    return bytes(ip)  # raw


OUTER_LINKTYPES = {"ether": 1, "sll": 113, "sll2": 276, "raw": 101}


def host_frames(kind: str = "ether", addresses: tuple[str, str] = V4) -> list[bytes]:
    """Four tunnels, both directions, interleaved with DNS, NTP, TCP, ARP and a non-tunnel
    high-port UDP flow (text payloads)."""
    a, b = addresses
    frames = []
    for seq in range(ROUNDS):
        for link, (low, high) in LINKS.items():
            frames.append(outer(kind, a, b, low, high, inner(link, seq)))
            frames.append(outer(kind, b, a, high, low, inner(link, 100 + seq)))
        dns = bytes(DNS(id=seq, rd=1, qd=DNSQR(qname="example.com")))
        frames.append(outer(kind, a, b, 40000 + seq, 53, dns))
        frames.append(outer(kind, a, b, 123, 123, bytes(NTP())))
        frames.append(outer(kind, a, b, 33333, 44444, b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"))
        tcp = IP(src="10.9.9.9", dst="10.9.9.8") / TCP(sport=1234, dport=80)
        if kind == "raw":
            frames.append(bytes(tcp))
        elif kind == "ether":
            frames.append(bytes(Ether() / ARP()))
    return frames


def write_pcap(path: Path, linktype: int, frames: list[bytes], start_ns: int = 10**18) -> str:
    """Frames 100 us apart, microsecond pcap."""
    data = pcap.global_header(linktype)
    data += b"".join(pcap.record(start_ns + n * 100_000, f) for n, f in enumerate(frames))
    path.write_bytes(data)
    return str(path)


def read_interfaces(path: str) -> list[tuple[int, str, str]]:
    with open_capture(path) as reader:
        for _ in reader:
            pass
        return [(i.linktype, i.name, i.description) for i in reader.interfaces]


def read_frames(path: str) -> list:
    with open_capture(path) as reader:
        return list(reader)


def run(*args: str, stdin: bytes | None = None) -> Result:
    """`tunnelscope decap ARGS` in process; any escaping exception fails the test."""
    result = CliRunner().invoke(cli, ["decap", *args], input=stdin)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert "Traceback" not in result.stderr
    return result


def run_json(*args: str) -> dict:
    result = run(*args, "--json")
    assert result.exit_code == 0, result.stderr
    return json.loads(result.stdout)


def run_process(*args: str, **kwargs: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*TUNNELSCOPE, "decap", *args],
        capture_output=True,
        timeout=120,
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param:
        monkeypatch.delenv("TUNNELSCOPE_NO_C", raising=False)
    else:
        monkeypatch.setenv("TUNNELSCOPE_NO_C", "1")
    return "c" if request.param else "python"


# What tshark sees ------------------------------------------------------------------------


@tshark.required
@pytest.mark.parametrize(
    "kind,addresses",
    [("ether", V4), ("ether", V6), ("sll", V4), ("sll2", V6), ("raw", V4), ("raw", V6)],
)
def test_each_link_gets_its_interface_linktype_and_directions(
    tmp_path: Path, backend: str, kind: str, addresses: tuple[str, str]
) -> None:
    source = write_pcap(tmp_path / "host.pcap", OUTER_LINKTYPES[kind], host_frames(kind, addresses))
    out = str(tmp_path / "lab.pcapng")
    summary = run_json(source, "-w", out)
    assert summary["backend"] == backend
    assert [link["name"] for link in summary["links"]] == [
        f"udp {low}<->{high} {kind}" for kind, (low, high) in LINKS.items()
    ]
    assert summary["written"] == 4 * 2 * ROUNDS
    assert summary["not_tunnel"] == 3 * ROUNDS  # DNS, NTP, the text flow
    assert summary["not_udp"] == (ROUNDS if kind in ("ether", "raw") else 0)
    interfaces = read_interfaces(out)
    assert [(lt, name) for lt, name, _ in interfaces] == [
        (LINKTYPES[kind], f"udp {low}<->{high} {kind}") for kind, (low, high) in LINKS.items()
    ]
    a, b = addresses
    first = f"[{a}]:10001" if ":" in a else f"{a}:10001"
    assert interfaces[0][2].startswith(first + " <-> ")

    names = ["frame.interface_name", "frame.p2p_dir", "icmp.seq", "chdlc.protocol"]
    names += ["fr.dlci", "vlan.id", "ppp.protocol", "frame.interface_description"]
    rows = tshark.fields(out, names)
    assert len(rows) == 4 * 2 * ROUNDS
    per_link = Counter((row["frame.interface_name"][0], row["frame.p2p_dir"][0]) for row in rows)
    for link, (low, high) in LINKS.items():
        # sent from the lower end: outbound, tshark's p2p_dir 0; the other way: 1
        assert per_link[(f"udp {low}<->{high} {link}", "0")] == ROUNDS
        assert per_link[(f"udp {low}<->{high} {link}", "1")] == ROUNDS
    for row in rows:
        link = row["frame.interface_name"][0].split()[-1]
        seq = tshark.value(row["icmp.seq"][0])
        assert seq % 100 < ROUNDS  # every frame decodes down to its ICMP echo
        assert (seq >= 100) == (row["frame.p2p_dir"] == ["1"])
        expected = {
            "ethernet": ("vlan.id", 42),
            "hdlc": ("chdlc.protocol", 0x0800),
            "ppp": ("ppp.protocol", 0x0021),
            "fr": ("fr.dlci", 100),
        }[link]
        assert [tshark.value(v) for v in row[expected[0]]] == [expected[1]]


@tshark.required
def test_pcapng_input_with_late_interfaces_and_two_link_types(tmp_path: Path, backend: str):
    """Interface 1 (SLL2) is declared after frames of interface 0 (Ethernet)."""
    ether, sll2 = host_frames("ether"), host_frames("sll2", V6)
    data = pcapng.section_header() + pcapng.interface_description(1, "eth0")
    data += b"".join(pcapng.enhanced_packet(0, 10**18 + n, f) for n, f in enumerate(ether[:10]))
    data += pcapng.interface_description(276, "any")
    pairs = zip_longest([(0, frame) for frame in ether[10:]], [(1, frame) for frame in sll2])
    later = [item for pair in pairs for item in pair if item]  # the two interfaces alternate
    for n, (iface, frame) in enumerate(later):
        data += pcapng.enhanced_packet(iface, 10**18 + 10 + n, frame)
    source = tmp_path / "host.pcapng"
    source.write_bytes(data)
    out = str(tmp_path / "lab.pcapng")
    summary = run_json(str(source), "-w", out)
    assert summary["frames"] == len(ether) + len(sll2)
    assert len(summary["links"]) == 8  # four links over IPv4, four over IPv6
    assert summary["written"] == 8 * 2 * ROUNDS
    rows = tshark.fields(out, ["frame.interface_name", "icmp.seq"])
    assert len(rows) == 8 * 2 * ROUNDS and all(row["icmp.seq"] for row in rows)


@tshark.required
def test_split_writes_one_pcap_per_link_with_its_linktype(tmp_path: Path, backend: str):
    source = write_pcap(tmp_path / "host.pcap", 1, host_frames())
    summary = run_json(source, "--split", str(tmp_path / "links"))
    files = sorted(os.listdir(tmp_path / "links"))
    assert files == sorted(f"udp-{lo}-{hi}-{kind}.pcap" for kind, (lo, hi) in LINKS.items())
    for kind, (low, high) in LINKS.items():
        path = str(tmp_path / "links" / f"udp-{low}-{high}-{kind}.pcap")
        assert any(link["file"] == path for link in summary["links"])
        with open_capture(path) as reader:
            assert reader.format == "pcap"
            assert reader.interfaces[0].linktype == LINKTYPES[kind]
            assert len(list(reader)) == 2 * ROUNDS
        rows = tshark.fields(path, ["icmp.seq"])
        assert sorted(tshark.value(row["icmp.seq"][0]) for row in rows) == sorted(
            [*range(ROUNDS), *range(100, 100 + ROUNDS)]
        )


# Options ---------------------------------------------------------------------------------


def test_ports_keep_only_the_listed_tunnels_and_take_them_as_tunnels(tmp_path: Path, backend):
    source = write_pcap(tmp_path / "host.pcap", 1, host_frames())
    summary = run_json(source, "-w", str(tmp_path / "a.pcapng"), "--ports", "10004,44444")
    assert [link["name"] for link in summary["links"]] == [
        "udp 10003<->10004 hdlc",
        "udp 33333<->44444 ethernet",  # listed: a tunnel even though it carries text
    ]
    assert summary["written"] == 2 * ROUNDS + ROUNDS
    summary = run_json(source, "-w", str(tmp_path / "b.pcapng"), "--ports", "10005-10008")
    assert [link["linktype"] for link in summary["links"]] == ["ppp", "fr"]


def test_linktype_overrides_detection(tmp_path: Path, backend: str):
    source = write_pcap(tmp_path / "host.pcap", 1, host_frames())
    out = str(tmp_path / "lab.pcapng")
    summary = run_json(source, "-w", out, "--linktype", "hdlc")
    assert {link["linktype_number"] for link in summary["links"]} == {104}
    assert len(summary["links"]) == 4  # which flows are tunnels is still detected
    assert {lt for lt, _, _ in read_interfaces(out)} == {LinkType.C_HDLC}
    assert all(link["how"] == "--linktype" for link in summary["links"])


def relayed_twice(copies_apart_ns: int = 30_000) -> list[tuple[int, bytes]]:
    """GNS3 2.x on loopback: node A (10001) -> ubridge (10002), ubridge (10003) -> node B
    (10004), and back; every frame shows up twice, on two tunnels."""
    frames = []
    ts = 10**18
    for seq in range(ROUNDS):
        there, back = inner("hdlc", seq), inner("hdlc", 100 + seq)
        for payload, hops in ((there, ((10001, 10002), (10003, 10004))),
                              (back, ((10004, 10003), (10002, 10001)))):  # fmt: skip
            for n, (sport, dport) in enumerate(hops):
                frame = outer("ether", "127.0.0.1", "127.0.0.1", sport, dport, payload)
                frames.append((ts + n * copies_apart_ns, frame))
            ts += 1_000_000
    return frames


def write_timed(path: Path, frames: list[tuple[int, bytes]]) -> str:
    path.write_bytes(pcap.global_header(1) + b"".join(pcap.record(t, f) for t, f in frames))
    return str(path)


def test_dedupe_drops_the_second_copy_of_a_relayed_frame(tmp_path: Path, backend: str):
    source = write_timed(tmp_path / "loopback.pcap", relayed_twice())
    plain = run_json(source, "-w", str(tmp_path / "plain.pcapng"))
    assert plain["written"] == 4 * ROUNDS and plain["duplicates"] == 0
    summary = run_json(source, "-w", str(tmp_path / "dedup.pcapng"), "--dedupe")
    assert summary["written"] == 2 * ROUNDS
    assert summary["duplicates"] == 2 * ROUNDS
    links = {link["name"]: (link["outbound"], link["inbound"]) for link in summary["links"]}
    # each direction is kept where it is first seen: leaving its node
    assert links == {"udp 10001<->10002 hdlc": (ROUNDS, 0), "udp 10003<->10004 hdlc": (0, ROUNDS)}
    seqs = [f.data[-15:] for f in read_frames(str(tmp_path / "dedup.pcapng"))]
    assert len(seqs) == len(set(seqs)) == 2 * ROUNDS  # one copy of every frame


def test_dedupe_keeps_repeats_on_one_flow_and_copies_outside_the_window(tmp_path, backend):
    far = write_timed(tmp_path / "far.pcap", relayed_twice(copies_apart_ns=60_000_000))
    assert run_json(far, "-w", str(tmp_path / "a.pcapng"), "--dedupe")["duplicates"] == 0
    same_flow = [(10**18 + n * 1000, outer("ether", "127.0.0.1", "127.0.0.1", 10001, 10002,
                                            inner("ppp", 1))) for n in range(ROUNDS)]  # fmt: skip
    source = write_timed(tmp_path / "same.pcap", same_flow)
    summary = run_json(source, "-w", str(tmp_path / "b.pcapng"), "--dedupe")
    assert summary["duplicates"] == 0 and summary["written"] == ROUNDS


def test_dedupe_compares_times_past_2_to_the_63_ns_as_numbers(tmp_path: Path, backend: str):
    """pcapng times are 64 bits: two copies 2^64 - 2 us apart are no duplicates, though a
    signed 64-bit difference of their times says -2 us."""
    blocks = pcapng.section_header() + pcapng.interface_description(1, "lo")
    for ts, sport, dport in [(1000, 10001, 10002), (2**64 - 1000, 10003, 10004)]:
        frame = outer("ether", "127.0.0.1", "127.0.0.1", sport, dport, inner("hdlc", 7))
        blocks += pcapng.enhanced_packet(0, ts, frame, len(frame))
    (tmp_path / "far.pcapng").write_bytes(blocks)
    summary = run_json(str(tmp_path / "far.pcapng"), "-w", str(tmp_path / "d.pcapng"), "--dedupe")
    assert (summary["written"], summary["duplicates"]) == (2, 0)


@tshark.required
def test_split_writes_a_time_past_2106_as_the_last_one_pcap_holds(tmp_path: Path, backend: str):
    """ts_sec = ts_usec = 0xFFFFFFFF (tshark reads it) goes to a classic pcap --split file
    as 2106-02-07 06:28:15.999999, the latest time the format holds; pcapng keeps it."""
    frame = outer("ether", *V4, 10001, 10002, inner("ethernet", 1))
    data = pcap.global_header(1) + struct.pack("<IIII", 0xFFFFFFFF, 0xFFFFFFFF, len(frame),
                                               len(frame)) + frame  # fmt: skip
    (tmp_path / "late.pcap").write_bytes(data)
    summary = run_json(str(tmp_path / "late.pcap"), "--split", str(tmp_path / "links"))
    [link] = summary["links"]
    with open_capture(link["file"]) as reader:
        [packet] = list(reader)
    assert packet.ts_ns == 0xFFFFFFFF * 10**9 + 999_999_000
    assert tshark.fields(link["file"], ["frame.time_epoch"])[0]["frame.time_epoch"] == [
        "4294967295.999999000"
    ]
    run_json(str(tmp_path / "late.pcap"), "-w", str(tmp_path / "late.pcapng"))
    with open_capture(str(tmp_path / "late.pcapng")) as reader:
        assert [p.ts_ns for p in reader] == [0xFFFFFFFF * 10**9 + 0xFFFFFFFF * 1000]


# Edge cases of the outer layers ------------------------------------------------------------


def test_locate_udp_handles_padding_snaplen_extension_headers_and_fragments():
    small = outer("ether", *V4, 10001, 10002, b"\x0f\x00\x80\x35")  # 46 bytes, padded to 60
    padded = small + bytes(60 - len(small))
    key, off, caplen, orig_len = locate_udp(padded, 1)  # type: ignore[misc]
    assert (padded[off : off + caplen], orig_len) == (b"\x0f\x00\x80\x35", 4)
    assert key[0] == 4 and key[33:] == bytes.fromhex("27112712")
    cut = outer("ether", *V4, 10001, 10002, bytes(100))[:60]  # snaplen 60
    assert locate_udp(cut, 1)[2:] == (60 - 42, 100)  # type: ignore[index]
    hop = bytes(IPv6(src=V6[0], dst=V6[1]) / IPv6ExtHdrHopByHop() / UDP(sport=1, dport=2) / b"xy")
    assert locate_udp(hop, 101)[2:] == (2, 2)  # type: ignore[index]
    frag6 = IPv6(src=V6[0], dst=V6[1]) / IPv6ExtHdrFragment(m=1, id=7) / UDP() / Raw(bytes(64))
    first = locate_udp(bytes(frag6), 229)
    assert isinstance(first, Fragment)
    assert (first.offset, first.length, first.more, first.next_header) == (0, 72, True, 17)
    assert first.key[0] == 6 and first.key[33:37] == (7).to_bytes(4, "big")
    head = locate_udp(bytes(IP(flags="MF", id=9) / UDP() / Raw(bytes(64))), 228)
    assert isinstance(head, Fragment) and (head.offset, head.more) == (0, True)
    tail = locate_udp(bytes(IP(frag=10, proto=17, id=9) / Raw(bytes(64))), 101)
    assert isinstance(tail, Fragment)
    assert (tail.offset, tail.more, len(tail.data)) == (80, False, 64)
    assert tail.key == head.key  # one datagram: addresses, identification, protocol
    atomic = IPv6(src=V6[0], dst=V6[1]) / IPv6ExtHdrFragment(m=0, offset=0) / UDP() / b"xyz"
    assert locate_udp(bytes(atomic), 229)[2:] == (3, 3)  # type: ignore[index]
    assert locate_udp(bytes(IP() / TCP()), 101) == NOT_UDP
    assert locate_udp(bytes(Ether() / ARP()), 1) == NOT_UDP
    assert locate_udp(bytes(IP() / UDP())[:25], 101) == NOT_UDP  # UDP header cut


ETHER = Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")


def big_frame(seq: int) -> bytes:
    """An Ethernet lab frame too big for one 1500-byte packet once tunnelled."""
    return inner("ethernet", seq) + seq.to_bytes(2, "big") * 1500


def fragmented(seq: int, family: int = 4, size: int = 1400, **ip: object) -> list[bytes]:
    """The tunnel datagram of big_frame(seq) as Ethernet-framed IP fragments, in order."""
    udp = UDP(sport=10001, dport=10002) / Raw(big_frame(seq))
    if family == 4:
        return [bytes(ETHER / f) for f in fragment(IP(src=V4[0], dst=V4[1], id=seq) / udp, size)]
    head = IPv6(src=V6[0], dst=V6[1]) / IPv6ExtHdrFragment(id=seq)
    return [bytes(ETHER / f) for f in fragment6(head / udp, size + 48)]


def ours(path: str) -> list[bytes]:
    return [bytes(packet.data) for packet in read_frames(path)]


@tshark.required
@pytest.mark.parametrize("order", ["shuffled", "reversed"])
@pytest.mark.parametrize("family", [4, 6])
def test_fragments_in_any_order_are_reassembled(tmp_path: Path, backend: str, family, order):
    """Ten 3000-byte frames in 3 fragments each, interleaved with the unfragmented tunnels;
    each comes out whole, in the record of the fragment that completed it."""
    rng = random.Random(11)
    frames = host_frames("ether", V4 if family == 4 else V6)
    for seq in range(10):
        pieces = fragmented(seq, family)
        assert len(pieces) == 3
        rng.shuffle(pieces) if order == "shuffled" else pieces.reverse()
        at = rng.randrange(len(frames))
        frames[at:at] = pieces
    source = write_pcap(tmp_path / "host.pcap", 1, frames)
    out = str(tmp_path / "lab.pcapng")
    summary = run_json(source, "-w", out)
    assert (summary["fragments"], summary["reassembled"]) == (30, 10)
    assert sum(summary["lost"].values()) == 0
    assert summary["written"] == 4 * 2 * ROUNDS + 10
    written = ours(out)
    assert sorted(f for f in written if len(f) > 1500) == sorted(big_frame(s) for s in range(10))
    # tshark reassembles the input the same way
    assert len(tshark.fields(source, ["udp.length"], "udp.length > 1500")) == 10
    assert len(tshark.fields(out, ["icmp.seq"], "frame.len > 1500")) == 10


def test_ipv6_extension_headers_around_the_fragment_header(tmp_path: Path, backend: str):
    """Hop-by-hop before the fragment header (unfragmentable), destination options after it
    (fragmentable: they come back with the reassembled datagram and are walked then)."""
    frames = host_frames("ether", V6)
    udp = UDP(sport=10001, dport=10002) / Raw(big_frame(3))
    packet = IPv6(src=V6[0], dst=V6[1]) / IPv6ExtHdrHopByHop() / IPv6ExtHdrFragment(id=3)
    pieces = [bytes(ETHER / f) for f in fragment6(packet / IPv6ExtHdrDestOpt() / udp, 1400)]
    assert len(pieces) == 3
    frames += pieces[::-1]
    source = write_pcap(tmp_path / "host.pcap", 1, frames)
    out = str(tmp_path / "lab.pcapng")
    summary = run_json(source, "-w", out)
    assert (summary["reassembled"], summary["written"]) == (1, 4 * 2 * ROUNDS + 1)
    assert ours(out)[-1] == big_frame(3)


def test_an_atomic_fragment_is_a_whole_datagram(tmp_path: Path, backend: str):
    """IPv6 offset 0, M 0 (RFC 6946): a complete datagram, not a fragment to wait for."""
    frames = host_frames("ether", V6)
    udp = UDP(sport=10001, dport=10002) / Raw(inner("ethernet", 77))
    frames.append(bytes(ETHER / IPv6(src=V6[0], dst=V6[1]) / IPv6ExtHdrFragment(id=1) / udp))
    summary = run_json(write_pcap(tmp_path / "h.pcap", 1, frames), "-w", str(tmp_path / "o"))
    assert (summary["fragments"], summary["written"]) == (0, 4 * 2 * ROUNDS + 1)
    assert ours(str(tmp_path / "o"))[-1] == inner("ethernet", 77)


def test_duplicate_fragments_are_ignored(tmp_path: Path, backend: str):
    """A capture on `any` sees each fragment twice (veth and bridge): one frame each, no loss,
    even for copies arriving after their datagram completed."""
    frames = host_frames()
    for seq in range(4):
        frames += [piece for piece in fragmented(seq) for _ in range(2)]
    summary = run_json(write_pcap(tmp_path / "h.pcap", 1, frames), "-w", str(tmp_path / "o"))
    assert (summary["reassembled"], summary["duplicate_fragments"]) == (4, 12)
    assert summary["written"] == 4 * 2 * ROUNDS + 4 and sum(summary["lost"].values()) == 0


def test_overlapping_fragments_lose_their_datagram_once(tmp_path: Path, backend: str):
    """Linux (RFC 5722) discards a datagram with overlapping fragments; so does decap, and
    the fragments after the overlap do not count a second loss."""
    first, second, third = fragmented(5)
    shifted = IP(second[14:])  # the second fragment, 8 bytes earlier
    shifted.frag -= 1
    del shifted.chksum
    overlapping = bytes(ETHER / shifted)
    frames = [*host_frames(), first, overlapping, second, third, *fragmented(6)]
    source = write_pcap(tmp_path / "h.pcap", 1, frames)
    result = run(source, "-w", str(tmp_path / "o"), "--json")
    summary = json.loads(result.stdout)
    assert summary["lost"]["overlap"] == 1 and summary["reassembled"] == 1  # frame 6 only
    assert ours(str(tmp_path / "o"))[-1] == big_frame(6)


def test_lost_frames_are_counted_and_reported(tmp_path: Path, backend: str):
    """A datagram missing a fragment is a lost frame: given up 30 s of capture time after
    its first fragment (timeout) or at the end of the capture (incomplete)."""
    missing_late = fragmented(1)[:2]  # never gets its last fragment
    missing_head = fragmented(2)[1:]
    frames = [(10**18, f) for f in [*missing_late, *missing_head]]
    frames += [(10**18 + 31 * 10**9 + n, f) for n, f in enumerate([*host_frames(), *fragmented(3)])]
    frames += [(10**18 + 32 * 10**9, fragmented(4)[0])]  # at the end, still waiting
    source = write_timed(tmp_path / "host.pcap", frames)
    result = run(source, "-w", str(tmp_path / "lab.pcapng"))
    assert result.exit_code == 0
    line = result.stderr.splitlines()[-1]
    assert line.startswith("decap: ") and "skipped" not in line
    assert "1 reassembled from 8 fragments" in line
    assert line.endswith("; lost: 3 frames in incomplete datagrams (3 missing a fragment)")
    summary = run_json(source, "-w", str(tmp_path / "lab2.pcapng"))
    assert summary["lost"] == {"timeout": 2, "incomplete": 1, "evicted": 0, "overlap": 0,
                               "malformed": 0, "snaplen": 0}  # fmt: skip
    assert summary["written"] == 4 * 2 * ROUNDS + 1


def test_a_fragment_cut_by_the_snaplen_loses_its_datagram(tmp_path: Path, backend: str):
    first, second, third = fragmented(8)
    frames = [*host_frames(), first, second[:200], third, *fragmented(9)]
    data = pcap.global_header(1, snaplen=200)
    data += b"".join(pcap.record(10**18 + n, f, orig_len=1500) for n, f in enumerate(frames))
    (tmp_path / "cut.pcap").write_bytes(data)
    summary = run_json(str(tmp_path / "cut.pcap"), "-w", str(tmp_path / "o"))
    assert summary["lost"]["snaplen"] == 1 and summary["reassembled"] == 1
    assert sum(summary["lost"].values()) == 1


def test_malformed_fragments_lose_their_datagram(tmp_path: Path, backend: str):
    odd = fragmented(1)
    longer = IP(odd[0][14:] + b"x")  # a non-last fragment of 1401 bytes: not a multiple of 8
    longer.len += 1
    odd[0] = bytes(ETHER / longer)
    frames = [*host_frames(), *odd, *fragmented(2)]
    summary = run_json(write_pcap(tmp_path / "h.pcap", 1, frames), "-w", str(tmp_path / "o"))
    assert summary["lost"]["malformed"] == 1 and summary["reassembled"] == 1


def test_an_identification_used_again_later_is_a_new_datagram(tmp_path: Path, backend: str):
    """IPv4's 16-bit identification wraps: the same id 2 s after a datagram completed starts
    another one instead of passing for copies of the first."""
    frames = [(10**18 + n, f) for n, f in enumerate(fragmented(7))]
    again = [bytes(ETHER / f) for f in fragment(
        IP(src=V4[0], dst=V4[1], id=7) / UDP(sport=10001, dport=10002) / Raw(big_frame(8)), 1400
    )]  # fmt: skip
    frames += [(10**18 + 2 * 10**9 + n, f) for n, f in enumerate(again)]
    summary = run_json(write_timed(tmp_path / "h.pcap", frames), "-w", str(tmp_path / "o"))
    assert summary["reassembled"] == 2 and ours(str(tmp_path / "o")) == [big_frame(7), big_frame(8)]


def test_a_reassembly_flood_is_bounded_and_counted(tmp_path: Path, backend: str):
    """20000 datagrams that never complete (their first fragment only): the oldest are given
    up beyond 4 MiB or 4096 datagrams, each counted once; the tunnels still come through."""
    frames = host_frames()
    for ident in range(20000):
        udp = UDP(sport=10001, dport=10002) / Raw(bytes(1400))
        packet = IP(src="198.51.100.1", dst=V4[1], id=ident % 65536, flags="MF") / udp
        frames.append(bytes(ETHER / packet))
    frames += [*fragmented(1), *host_frames()]
    source = write_pcap(tmp_path / "flood.pcap", 1, frames)
    result = run(source, "-w", str(tmp_path / "o"), "--json")
    summary = json.loads(result.stdout)
    lost = summary["lost"]
    assert lost["evicted"] + lost["incomplete"] == 20000 and lost["evicted"] > 15000
    assert summary["reassembled"] == 1 and summary["written"] == 2 * 4 * 2 * ROUNDS + 1
    assert "over the reassembly limits" in Summary(**{**summary, "links": []}).line()


def test_snaplen_cut_input_keeps_the_original_length(tmp_path: Path, backend: str):
    frames = [f[:80] for f in host_frames()]
    data = pcap.global_header(1, snaplen=80)
    data += b"".join(pcap.record(10**18 + n * 1000, f, orig_len=200) for n, f in enumerate(frames))
    (tmp_path / "cut.pcap").write_bytes(data)
    out = str(tmp_path / "lab.pcapng")
    summary = run_json(str(tmp_path / "cut.pcap"), "-w", out)
    assert summary["written"] == 4 * 2 * ROUNDS
    for packet in read_frames(out):
        assert len(packet.data) <= 80 - 42 and packet.orig_len > len(packet.data)


def test_no_tunnel_at_all_still_writes_a_valid_pcapng(tmp_path: Path, backend: str):
    tunnel_ports = {port for ports in LINKS.values() for port in ports}
    frames = [f for f in host_frames() if int.from_bytes(f[34:36], "big") not in tunnel_ports]
    source = write_pcap(tmp_path / "noise.pcap", 1, frames)
    out = str(tmp_path / "empty.pcapng")
    assert run_json(source, "-w", out)["links"] == []
    assert read_frames(out) == []


def test_output_keeps_input_order_while_links_are_being_detected(tmp_path, backend, monkeypatch):
    """A quiet link whose first frame waits for a decision holds the frames behind it;
    a tiny HOLD_BYTES forces the decision early, and order still holds."""
    monkeypatch.setattr(decap_module, "HOLD_BYTES", 300)
    frames = host_frames()
    frames.insert(3, outer("ether", *V4, 20001, 20002, inner("fr", 7)))  # one frame, ever
    source = write_pcap(tmp_path / "host.pcap", 1, frames)
    out = str(tmp_path / "lab.pcapng")
    summary = run_json(source, "-w", out)
    assert "udp 20001<->20002 fr" in [link["name"] for link in summary["links"]]
    stamps = [packet.ts_ns for packet in read_frames(out)]
    assert stamps == sorted(stamps) and len(stamps) == 4 * 2 * ROUNDS + 1


# C and Python write the same bytes ----------------------------------------------------------


@needs_c
@pytest.mark.parametrize(
    "scenario", ["ether4", "sll2v6", "raw", "pcapng", "split", "dedupe", "fragments"]
)
def test_c_and_python_scanners_write_identical_bytes(tmp_path: Path, scenario: str):
    if scenario == "pcapng":  # two sections, the second with simple packet blocks
        frames = host_frames("sll", V4)
        data = pcapng.section_header() + pcapng.interface_description(113, "any")
        data += b"".join(pcapng.enhanced_packet(0, 10**18 + n, f) for n, f in enumerate(frames))
        data += pcapng.section_header() + pcapng.interface_description(1, "eth0")
        for frame in host_frames("ether", V6):
            padded = frame + bytes(-len(frame) % 4)
            data += struct.pack("<III", pcapng.SPB, 16 + len(padded), len(frame)) + padded
            data += struct.pack("<I", 16 + len(padded))
        (tmp_path / "in").write_bytes(data)
        source = str(tmp_path / "in")
    elif scenario == "dedupe":
        source = write_timed(tmp_path / "in", relayed_twice())
    elif scenario == "sll2v6":
        source = write_pcap(tmp_path / "in", 276, host_frames("sll2", V6))
    elif scenario == "raw":
        source = write_pcap(tmp_path / "in", 101, host_frames("raw"))
    elif scenario == "fragments":  # shuffled, repeated, missing, overlapping, both families
        rng = random.Random(5)
        frames = host_frames() + host_frames("ether", V6)
        for seq in range(40):
            pieces = fragmented(seq, 4 if seq % 2 else 6, rng.choice((64, 512, 1400)))
            rng.shuffle(pieces)
            if seq % 5 == 0:
                pieces.append(pieces[0])
            if seq % 7 == 0:
                pieces.pop()
            at = rng.randrange(len(frames))
            frames[at:at] = pieces
        source = write_pcap(tmp_path / "in", 1, frames)
    else:
        source = write_pcap(tmp_path / "in", 1, host_frames() * 3)
    outputs = []
    for use_c in (True, False):
        options = Options(use_c=use_c, dedupe=scenario == "dedupe")
        if scenario == "split":
            target = tmp_path / f"split-{use_c}"
            decap(source, split_dir=str(target), options=options)
            outputs.append({name: (target / name).read_bytes() for name in os.listdir(target)})
        else:
            target = tmp_path / f"out-{use_c}"
            summary = decap(source, str(target), options=options)
            counts = (summary.reassembled, summary.lost, summary.duplicate_fragments)
            outputs.append((target.read_bytes(), summary.written, summary.not_tunnel, *counts))
    assert outputs[0] == outputs[1]
    if scenario == "fragments":
        assert outputs[0][3] > 20 and sum(outputs[0][4].values()) > 3
    if scenario == "pcapng":
        assert outputs[0][1] == 2 * 4 * 2 * ROUNDS  # both sections, EPBs and SPBs


@needs_c
def test_forgotten_flows_and_time_limited_decisions_give_the_same_bytes(tmp_path, monkeypatch):
    """Many short non-tunnel flows, decided by the 2 s limit and forgotten 10 at a time, come
    back later; a quiet tunnel sends one frame only. C and Python agree throughout."""
    monkeypatch.setattr(decap_module, "MAX_IGNORED_FLOWS", 10)
    text = b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"
    frames = [(-1, outer("ether", *V4, 20001, 20002, inner("hdlc", 5)))]  # the quiet tunnel
    for step in range(120):  # one every 100 ms, each noise flow twice, 6 s apart
        ts = step * 100_000_000
        low, high = LINKS["ppp"]
        frames.append((ts, outer("ether", *V4, low, high, inner("ppp", step))))
        frames.append((ts + 1, outer("ether", *V4, 30000 + step % 60, 40000, text)))
    source = write_timed(tmp_path / "in.pcap", [(10**18 + ts, f) for ts, f in sorted(frames)])
    results = []
    for use_c in (True, False):
        summary = decap(source, str(tmp_path / f"o{use_c}"), options=Options(use_c=use_c))
        results.append((tmp_path / f"o{use_c}").read_bytes())
        # interfaces in order of decision: the quiet link after its 2 s
        names = [link.name for link in summary.links]
        assert names == ["udp 10005<->10006 ppp", "udp 20001<->20002 hdlc"]
        assert (summary.written, summary.not_tunnel) == (121, 120)
    assert results[0] == results[1]
    written = read_frames(str(tmp_path / "oTrue"))
    assert written[0].interface == 1  # the quiet link's frame still comes first
    assert [p.ts_ns for p in written] == sorted(p.ts_ns for p in written)


@needs_c
def test_big_endian_nanosecond_pcap_reads_the_same_in_both(tmp_path: Path):
    frames = host_frames()
    data = b"\xa1\xb2\x3c\x4d" + (2).to_bytes(2, "big") + (4).to_bytes(2, "big") + bytes(8)
    data += (65535).to_bytes(4, "big") + (1).to_bytes(4, "big")
    for n, frame in enumerate(frames):
        head = [1_700_000_000, n * 1001, len(frame), len(frame)]
        data += b"".join(v.to_bytes(4, "big") for v in head) + frame
    (tmp_path / "be.pcap").write_bytes(data)
    results = [
        (tmp_path / f"o{c}").read_bytes()
        for c in (True, False)
        if decap(str(tmp_path / "be.pcap"), str(tmp_path / f"o{c}"), options=Options(use_c=c))
    ]
    assert results[0] == results[1]
    assert read_frames(str(tmp_path / "oTrue"))[1].ts_ns == 1_700_000_000 * 10**9 + 1001


# Errors: one line, exit status 2 ----------------------------------------------------------------


def test_bad_inputs_and_outputs_fail_in_one_line(tmp_path: Path):
    good = write_pcap(tmp_path / "host.pcap", 1, host_frames())
    (tmp_path / "text.pcap").write_text("hello, not a capture\n")
    last = outer("ether", *V4, 10001, 10002, inner("ethernet", 99))
    whole = Path(write_pcap(tmp_path / "whole.pcap", 1, [*host_frames(), last])).read_bytes()
    (tmp_path / "cut.pcap").write_bytes(whole[: len(whole) - 10])  # cut inside `last`
    wrong = write_pcap(tmp_path / "hdlc.pcap", 104, [inner("hdlc", 1)])
    cases = {
        "missing": ([str(tmp_path / "nope.pcap"), "-w", str(tmp_path / "o1.pcapng")], "nope.pcap"),
        "not a capture": ([str(tmp_path / "text.pcap"), "-w", str(tmp_path / "o2.pcapng")],
                          "not a pcap or pcapng file"),
        "truncated": ([str(tmp_path / "cut.pcap"), "-w", str(tmp_path / "o3.pcapng")],
                      "truncated record"),
        "unwritable": ([good, "-w", str(tmp_path / "no" / "dir" / "o.pcapng")],
                       "cannot write"),
        "bad split dir": ([good, "--split", str(Path(good) / "sub")], "cannot create"),
        "not a host capture": ([wrong, "-w", str(tmp_path / "o4.pcapng")], "link type 104"),
    }  # fmt: skip
    for name, (args, words) in cases.items():
        done = run_process(*args, text=True)
        assert done.returncode == 2, (name, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("tunnelscope: error: "), (name, lines)
        assert words in lines[0], (name, lines)
    # the truncated input still left a valid file with every whole frame before the cut
    written = read_frames(str(tmp_path / "o3.pcapng"))
    assert len(written) == 4 * 2 * ROUNDS


def test_usage_errors():
    assert run("x.pcap").exit_code == 2  # neither -w nor --split
    assert run("x.pcap", "-w", "a", "--split", "b").exit_code == 2
    assert run("x.pcap", "-w", "-", "--json").exit_code == 2
    assert "--ports" in run("x.pcap", "-w", "a", "--ports", "7-3").stderr
    assert "--linktype" in run("x.pcap", "-w", "a", "--linktype", "sll").stderr


@tshark.required
def test_pipes_in_and_out(tmp_path: Path):
    source = write_pcap(tmp_path / "host.pcap", 1, host_frames())
    decapped = run_process("-", "-w", "-", input=Path(source).read_bytes())
    assert decapped.returncode == 0, decapped.stderr
    assert decapped.stderr.decode().startswith("udp 10001<->10002 ethernet")
    (tmp_path / "piped.pcapng").write_bytes(decapped.stdout)
    assert len(tshark.fields(str(tmp_path / "piped.pcapng"), ["frame.number"])) == 8 * ROUNDS


# Memory ---------------------------------------------------------------------------------------


BENCHMARK = Path(__file__).resolve().parent.parent / "benchmarks" / "decap.py"


def _peak_rss_mb(args: list[str]) -> float:
    """Peak RSS of `tunnelscope decap ARGS`, measured by the benchmark's wrapper: a small fresh
    process whose RUSAGE_CHILDREN holds that run alone (a child forked from this big test
    process would report this process's size)."""
    command = [*TUNNELSCOPE, "decap", *args]
    done = subprocess.run(
        [sys.executable, str(BENCHMARK), "--measure", json.dumps(command)],
        capture_output=True,
        text=True,
        check=True,
    )
    return json.loads(done.stdout)["rss_mb"]


def test_memory_does_not_grow_with_the_input(tmp_path: Path):
    """200k frames (about 100 MB) decap in the same memory as 20k frames."""
    sys.path.insert(0, str(BENCHMARK.parent))
    try:
        from decap import build_capture  # benchmarks/decap.py
    finally:
        sys.path.pop(0)
    build_capture(str(tmp_path / "small.pcap"), 20_000)
    build_capture(str(tmp_path / "big.pcap"), 200_000)
    small = _peak_rss_mb([str(tmp_path / "small.pcap"), "-w", str(tmp_path / "s.pcapng")])
    big = _peak_rss_mb([str(tmp_path / "big.pcap"), "-w", str(tmp_path / "b.pcapng")])
    assert big < 100 and big - small < 15, (small, big)
    split = _peak_rss_mb([str(tmp_path / "big.pcap"), "--split", str(tmp_path / "links")])
    assert split < 100, split
