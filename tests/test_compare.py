"""`tunnelscope compare`: real pre/post captures of a bridged VPCS ping, crafted VLAN, serial
and Frame Relay paths, damaged and unrelated inputs, and memory that does not grow.

Expected results are built from the frames themselves (which ones were removed, copied,
moved), never from compare's own output.
"""

from __future__ import annotations

import json
import subprocess
import sys
from contextlib import ExitStack
from pathlib import Path

import peers
import pytest
import tshark
from click.testing import CliRunner, Result
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, Dot1Q, Ether
from scapy.packet import Raw
from test_bridge import lab, late_frames, numbered
from test_bridge_peers import running

from tunnelscope.analysis.compare import (
    CompareError,
    Report,
    Selection,
    compare,
    normaliser,
    parse_ignore,
)
from tunnelscope.cli import cli
from tunnelscope.datapath.engine import available_backends
from tunnelscope.datapath.impairments import parse_impairment
from tunnelscope.decoders import decode
from tunnelscope.formats import pcap, pcapng
from tunnelscope.formats.capture import open_capture
from tunnelscope.formats.linktype import LinkType
from tunnelscope.formats.packet import Direction

pytestmark = pytest.mark.timeout(120)

MS = 1_000_000
T0 = 1_700_000_000 * 10**9
MAC_A, MAC_B = "02:00:00:00:00:0a", "02:00:00:00:00:0b"


def run(*args: str, stdin: bytes | None = None) -> Result:
    """`tunnelscope compare ARGS` in process; any escaping exception fails the test."""
    result = CliRunner().invoke(cli, ["compare", *args], input=stdin)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert "Traceback" not in result.output + result.stderr
    return result


def write_pcap(path: Path, linktype: int, records: list[tuple[int, bytes]]) -> str:
    data = pcap.global_header(linktype, nanosecond=True)
    data += b"".join(pcap.record(ts, frame, nanosecond=True) for ts, frame in records)
    path.write_bytes(data)
    return str(path)


def write_pcapng(
    path: Path,
    interfaces: list[str],
    records: list[tuple[int, int, bytes, Direction]],
    linktype: int = 1,
) -> str:
    """Records are (interface, ts, frame, direction)."""
    data = pcapng.section_header()
    data += b"".join(pcapng.interface_description(linktype, name) for name in interfaces)
    data += b"".join(
        pcapng.enhanced_packet(iface, ts, frame, None, direction)
        for iface, ts, frame, direction in records
    )
    path.write_bytes(data)
    return str(path)


def ping(seq: int, src: str = "10.0.0.1", dst: str = "10.0.0.2", ttl: int = 64) -> IP:
    return IP(src=src, dst=dst, ttl=ttl, id=seq) / ICMP(id=7, seq=seq) / Raw(b"x" * 24)


def missing_numbers(report: Report, stream: int = 0) -> list[int]:
    return [frame.number for frame in report.streams[stream].missing.frames]


# A real bridged path: VPCS <-> tunnelscope link (a2b freq_drop 3) <-> VPCS --------------


@peers.needs_vpcs
@tshark.required
@pytest.mark.parametrize("backend", available_backends())
def test_vpcs_ping_with_freq_drop_missing_frames_are_exactly_the_commented_ones(
    backend: str, tmp_path: Path
) -> None:
    p1, l1, l2, p2 = peers.free_udp_ports(4)
    path = tmp_path / "vpcs.pcapng"
    with ExitStack() as stack:
        link = stack.enter_context(
            running(backend, f"udp:{l1}:127.0.0.1:{p1}", f"udp:{l2}:127.0.0.1:{p2}")
        )
        pc1 = stack.enter_context(peers.VPCS(p1, l1, mac_offset=1))
        pc2 = stack.enter_context(peers.VPCS(p2, l2, mac_offset=2))
        pc1.set_ip("10.0.0.1/24")
        pc2.set_ip("10.0.0.2/24")
        link.set_impairments([parse_impairment("a2b freq_drop 3")])
        link.start_capture(str(path), LinkType.ETHERNET, "both")
        results = pc1.ping("10.0.0.2", count=10, interval_ms=100)
        link.stop_capture()

    # tshark numbers the frames the capture marks dropped; compare must list exactly those
    commented = tshark.fields(str(path), ["frame.number"], 'frame.comment contains "dropped by"')
    dropped = [int(row["frame.number"][0]) for row in commented]
    assert dropped, "freq_drop 3 on 10+ frames must drop some"
    lost_seqs = {seq for seq, answered in results if not answered}

    report = compare(Selection(str(path)))
    assert report.tunnelscope_pair and not report.warnings()
    out, back = report.streams
    assert (out.name, back.name) == ("out", "in")
    assert [frame.number for frame in out.missing.frames] == dropped
    assert {frame.cause for frame in out.missing.frames} == {"freq_drop"}
    assert out.commented == out.commented_missing == len(dropped)
    assert out.matched == out.a_frames - len(dropped) == out.b_frames
    echo_seqs = {
        frame.fields["icmp.seq"]
        for frame in out.missing.frames
        if frame.fields.get("icmp.type") == 8
    }
    assert echo_seqs == lost_seqs, pc1.transcript
    assert out.groups[("icmp", "10.0.0.1 > 10.0.0.2")] == len(echo_seqs)
    assert back.missing.count == back.only_b.count == 0 and back.matched == back.a_frames
    assert out.only_b.count == out.duplicates.count == out.reordered.count == 0
    assert 0 <= out.delays.minimum <= out.delays.maximum < 100 * MS
    assert report.a.statistics_dropped == len(dropped)

    result = run(str(path), "--json")  # the command says the same
    assert result.exit_code == 0, result.stderr
    directions = json.loads(result.stdout)["directions"]
    assert [f["number"] for f in directions[0]["missing"]["frames"]] == dropped
    assert directions[0]["missing"]["by_cause"] == {"freq_drop": len(dropped)}
    text = run(str(path)).stdout
    assert f"out (a2b): {out.a_frames} frames at A" in text
    assert f"missing at B by cause: freq_drop {len(dropped)}" in text


@pytest.mark.parametrize("backend", available_backends())
def test_a_bridged_link_with_loss_copies_and_reordering_agrees_with_its_counters(
    backend: str, tmp_path: Path
) -> None:
    """Loss before duplication, so a frame marked dropped never reaches B in any copy."""
    path = tmp_path / "link.pcapng"
    impairments = ("a2b packet_loss 10", "a2b duplicate 5", "a2b reorder 5")
    with lab(backend, *impairments) as t:
        t.link.start_capture(str(path), LinkType.ETHERNET, "both")
        t.send(t.peer_a, numbered(2000, size=80))
        stats = t.settle(2000)
        t.link.stop_capture()
    with open_capture(str(path)) as reader:  # what B was sent, in order: count the late ones
        sent = [int.from_bytes(p.data[:4], "big") for p in reader if p.interface == 1]
    first_copies = list(dict.fromkeys(sent))

    report = compare(Selection(str(path)))
    (out,) = report.streams
    dropped = stats["dropped"]["packet_loss"]
    assert out.a_frames == stats["received"] == 2000 and out.b_frames == len(sent)
    assert out.missing.count == out.commented == out.commented_missing == dropped > 0
    assert out.causes == {"packet_loss": dropped} and out.only_b.count == 0
    assert out.matched == 2000 - dropped == len(first_copies)
    assert out.duplicates.count == stats["duplicated"] == len(sent) - len(first_copies)
    assert out.reordered.count == late_frames(first_copies) > 0
    assert out.delays.minimum >= 0 and out.delays.maximum < 500 * MS  # parked: 100 ms at most


# A VLAN-tagging path (crafted): A untagged, B tagged by a switch that loses, copies and
# reorders ------------------------------------------------------------------------------

ARP_REQUEST = bytes(
    Ether(src=MAC_A, dst="ff:ff:ff:ff:ff:ff") / ARP(psrc="10.0.0.1", pdst="10.0.0.2")
)


def untagged_frames() -> list[bytes]:
    """Pings and UDP, with the same unpadded 42-byte ARP request (as a Linux TAP sends it)
    at the start and again in the middle: identical frames that legitimately repeat."""
    frames = [ARP_REQUEST]
    for seq in range(1, 13):
        if seq == 6:
            frames.append(ARP_REQUEST)
        packet = ping(seq) if seq % 3 else IP(src="10.0.0.1", dst="10.0.0.3") / UDP(dport=seq)
        frames.append(bytes(Ether(src=MAC_A, dst=MAC_B) / packet))
    return frames


def tagged(frame: bytes, vid: int = 100) -> bytes:
    """What a switch sends on a trunk: an 802.1Q tag, padded to 60 bytes."""
    ether = Ether(frame)
    tagged = Ether(src=ether.src, dst=ether.dst) / Dot1Q(vlan=vid) / ether.payload
    return bytes(tagged).ljust(60, b"\0")


def test_vlan_path_matches_despite_the_tag_and_finds_each_change(tmp_path: Path) -> None:
    frames = untagged_frames()
    a_path = write_pcap(
        tmp_path / "a.pcap", 1, [(T0 + i * 10 * MS, f) for i, f in enumerate(frames)]
    )
    removed = {3, 4, 10}  # a burst of two, then one
    b_times = {i: T0 + i * 10 * MS + 2 * MS for i in range(len(frames)) if i not in removed}
    b_times[8] = T0 + 92 * MS + 500_000  # A #9 (ping seq 7) arrives behind A #10
    b_records = [(ts, tagged(frames[i])) for i, ts in b_times.items()]
    b_records.append((T0 + 52 * MS + 100_000, tagged(frames[5])))  # a copy of A #6
    stranger = tagged(bytes(Ether(src=MAC_B, dst=MAC_A) / ping(99, "10.0.0.9", "10.0.0.1")))
    b_records.append((T0 + 35 * MS, stranger))
    b_records.sort()
    b_path = write_pcap(tmp_path / "b.pcap", 1, b_records)
    b_numbers = {frame: n for n, (_, frame) in enumerate(b_records, 1)}

    report = compare(Selection(a_path), Selection(b_path), ignore=frozenset({"vlan"}))
    assert not report.warnings()
    (stream,) = report.streams
    assert stream.name == "all" and (stream.a_frames, stream.b_frames) == (14, 13)
    assert missing_numbers(report) == [i + 1 for i in sorted(removed)]  # Wireshark numbers
    assert stream.matched == 11
    assert dict(stream.bursts) == {2: 1, 1: 1} and stream.longest_burst_at == 4
    assert [f.number for f in stream.only_b.frames] == [b_numbers[stranger]]
    assert "10.0.0.9 > 10.0.0.1" in stream.only_b.frames[0].summary
    (copy,) = stream.duplicates.frames
    assert copy.original == 6 and copy.fields["vlan.id"] == [100]
    (late,) = stream.reordered.frames
    assert (late.fields["icmp.seq"], late.original, late.behind) == (7, 9, 10)
    assert stream.groups == {
        ("udp", "10.0.0.1:53 > 10.0.0.3:3"): 1,
        ("icmp", "10.0.0.1 > 10.0.0.2"): 1,
        ("udp", "10.0.0.1:53 > 10.0.0.3:9"): 1,
    }
    assert {f.cause for f in stream.missing.frames} == {None}  # not a tunnelscope capture
    assert (stream.delays.minimum, stream.delays.maximum) == (2 * MS, 12 * MS + 500_000)

    # Without --ignore vlan nothing matches: the command says so plainly, exit status 1
    result = run(a_path, b_path)
    assert result.exit_code == 1
    assert "no frame of A appears at B" in result.stderr and "--ignore" in result.stderr
    result = run("-", b_path, "--ignore", "vlan", "--json", stdin=Path(a_path).read_bytes())
    assert result.exit_code == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["directions"][0]["missing"]["count"] == 3 and data["ignore"] == ["vlan"]
    assert data["a"]["capture"] == "stdin" and not result.stderr  # no progress bar off a tty


def test_repeated_identical_frames_match_first_in_first_out(tmp_path: Path) -> None:
    """ARP every second; B loses the third. A window shorter than the spacing pins it."""
    a = [(T0 + i * 1000 * MS, ARP_REQUEST) for i in range(5)]
    b = [(ts + MS, frame) for n, (ts, frame) in enumerate(a) if n != 2]
    a_path, b_path = write_pcap(tmp_path / "a.pcap", 1, a), write_pcap(tmp_path / "b.pcap", 1, b)
    report = compare(Selection(a_path), Selection(b_path), window=0.5)
    assert missing_numbers(report) == [3] and report.streams[0].matched == 4
    assert report.streams[0].duplicates.count == report.streams[0].only_b.count == 0


def test_a_clock_behind_b_still_matches_with_negative_delays(tmp_path: Path) -> None:
    """B's clock 3 ms behind A's: unique frames still match (repeated ones would be taken
    for duplicates: a frame B has again, before A has it again, looks like a copy)."""
    frames = [frame for frame in untagged_frames() if frame != ARP_REQUEST]
    a = [(T0 + i * 10 * MS, frame) for i, frame in enumerate(frames)]
    b = [(ts - 3 * MS, frame) for ts, frame in a]
    report = compare(
        Selection(write_pcap(tmp_path / "a.pcap", 1, a)),
        Selection(write_pcap(tmp_path / "b.pcap", 1, b)),
    )
    (stream,) = report.streams
    assert stream.matched == len(frames) and stream.missing.count == stream.only_b.count == 0
    assert stream.delays.minimum == stream.delays.maximum == -3 * MS


# Directions ----------------------------------------------------------------------------


def test_each_direction_is_compared_on_its_own(tmp_path: Path) -> None:
    """The same bytes in both directions: a frame sent a2b never matches one sent b2a."""
    frame = bytes(Ether(src=MAC_A, dst=MAC_B) / ping(1))
    other = bytes(Ether(src=MAC_B, dst=MAC_A) / ping(2, "10.0.0.2", "10.0.0.1"))
    out, inb = Direction.OUTBOUND, Direction.INBOUND
    a_path = write_pcapng(
        tmp_path / "a.pcapng", ["r1"], [(0, T0, frame, out), (0, T0 + MS, other, inb)]
    )
    b_path = write_pcapng(
        tmp_path / "b.pcapng", ["r2"], [(0, T0 + 2 * MS, frame, inb), (0, T0 + 3 * MS, other, inb)]
    )
    report = compare(Selection(a_path), Selection(b_path))
    out_stream, in_stream = report.streams
    assert (out_stream.name, in_stream.name) == ("out", "in")
    assert missing_numbers(report, 0) == [1] and out_stream.only_b.count == 0
    assert in_stream.matched == 1 and [f.number for f in in_stream.only_b.frames] == [1]

    # @in on A applies to B as well; a selection by number works too
    report = compare(Selection.parse(f"{a_path}#0@in"), Selection.parse(b_path))
    (stream,) = report.streams
    assert stream.name == "in" and stream.matched == 1 and stream.only_b.count == 1


def test_selection_syntax(tmp_path: Path) -> None:
    path = tmp_path / "lab.pcapng"
    odd = tmp_path / "run#2@out.pcap"  # a file whose name looks like a selection
    path.touch()
    odd.touch()
    out, inb = Direction.OUTBOUND, Direction.INBOUND
    cases = {
        f"{path}": Selection(str(path)),
        f"{path}#pre": Selection(str(path), "pre"),
        f"{path}#r1-r2 post@in": Selection(str(path), "r1-r2 post", inb),
        f"{path}@a2b": Selection(str(path), None, out),
        f"{path}#r1@lab pre": Selection(str(path), "r1@lab pre"),  # not a direction: a name
        f"{odd}": Selection(str(odd)),
        f"{odd}#1@b2a": Selection(str(odd), "1", inb),
        "-#0@out": Selection("-", "0", out),
    }
    for text, selection in cases.items():
        assert Selection.parse(text) == selection, text
    with pytest.raises(CompareError, match="unknown direction 'up'"):
        Selection.parse(f"{path}@up")


def test_pre_and_post_of_one_capture_by_name_and_by_the_single_argument(tmp_path: Path) -> None:
    frames = untagged_frames()
    records = []
    for i, frame in enumerate(frames):
        records.append((0, T0 + i * MS, frame, Direction.OUTBOUND))
        if i != 4:
            records.append((1, T0 + i * MS + 500, frame, Direction.OUTBOUND))
    path = write_pcapng(tmp_path / "x.pcapng", ["r1-r2 pre", "r1-r2 post"], records)
    numbers = [i + 1 for i, record in enumerate(records) if record[0] == 0]
    for a, b in ((path, None), (f"{path}#r1-r2", None), (f"{path}#pre", f"{path}#post")):
        report = compare(Selection.parse(a), Selection.parse(b) if b else None)
        assert missing_numbers(report) == [numbers[4]], (a, b)
        assert report.tunnelscope_pair and report.streams[0].missing.frames[0].cause == (
            "no drop recorded"
        )
    # the same file given twice as A and B with the same interface: everything matches
    report = compare(Selection.parse(f"{path}#pre"), Selection.parse(f"{path}#pre"))
    assert report.matched == len(frames) and report.streams[0].delays.maximum == 0


# Normalisation: across link types, Frame Relay switches, QinQ, IPv6 -------------------

SERIAL_HEADS = {  # link type -> what comes before an IPv4 packet
    LinkType.C_HDLC: bytes.fromhex("0f000800"),
    LinkType.PPP_SERIAL: bytes.fromhex("ff030021"),
    LinkType.FRELAY: bytes.fromhex("184103cc"),  # DLCI 100, IETF, NLPID IPv4
}


@pytest.mark.parametrize("linktype", list(SERIAL_HEADS), ids=lambda lt: lt.short_name)
def test_ethernet_and_a_routed_serial_link_match_from_l3_with_ttl_ignored(
    linktype: LinkType, tmp_path: Path
) -> None:
    """A router forwards pings from Ethernet to a serial link: new L2, TTL - 1, new checksum,
    and the Ethernet padding of these short packets is gone."""
    packets = [IP(src="10.0.0.1", dst="10.9.0.1", ttl=64, id=n) / ICMP(seq=n) for n in range(8)]
    a = [
        (T0 + n * MS, bytes(Ether(src=MAC_A, dst=MAC_B) / p).ljust(60, b"\0"))
        for n, p in enumerate(packets)
    ]
    routed = [IP(bytes(p)) for p in packets]
    for packet in routed:
        packet.ttl -= 1
        del packet.chksum
    b = [
        (T0 + n * MS + 300_000, SERIAL_HEADS[linktype] + bytes(p))
        for n, p in enumerate(routed)
        if n != 5
    ]
    a_path = write_pcap(tmp_path / "eth.pcap", 1, a)
    b_path = write_pcap(tmp_path / "serial.pcap", int(linktype), b)
    assert len(a[0][1]) == 60 and len(b[0][1]) == len(SERIAL_HEADS[linktype]) + 28

    report = compare(Selection(a_path), Selection(b_path), ignore=frozenset({"l2", "ttl"}))
    assert missing_numbers(report) == [6] and report.matched == 7
    assert report.b.as_dict()["linktype"] == linktype.short_name
    assert compare(Selection(a_path), Selection(b_path), ignore=frozenset({"l2"})).unrelated

    result = run(a_path, b_path)  # different link types, nothing ignored: cannot compare
    assert result.exit_code == 2
    assert result.stderr.startswith("tunnelscope: error: A is ethernet and B is")
    assert "--ignore l2" in result.stderr and len(result.stderr.splitlines()) == 1


def test_a_frame_relay_switch_rewriting_dlcis_matches_with_fr_address_ignored(
    tmp_path: Path,
) -> None:
    payloads = [bytes(ping(n)) for n in range(6)]
    a = [(T0 + n * MS, bytes.fromhex("184103cc") + p) for n, p in enumerate(payloads)]
    b = [(ts + 100_000, bytes.fromhex("308103cc") + f[4:]) for ts, f in a]  # DLCI 100 -> 200
    assert decode(107, b[0][1]).fields["fr.dlci"] == 200
    a_path = write_pcap(tmp_path / "a.pcap", 107, a)
    b_path = write_pcap(tmp_path / "b.pcap", 107, b[:2] + b[3:])
    assert compare(Selection(a_path), Selection(b_path)).unrelated
    for words in (["fr-address"], ["dlci"], ["ttl, dlci"]):
        report = compare(Selection(a_path), Selection(b_path), ignore=parse_ignore(words))
        assert missing_numbers(report) == [3] and report.matched == 5


def test_normalisers_strip_qinq_tags_and_padding_and_the_ipv6_hop_limit() -> None:
    inner = IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1, dport=2)
    plain = bytes(Ether(src=MAC_A, dst=MAC_B) / inner)
    qinq = bytes(
        Ether(src=MAC_A, dst=MAC_B, type=0x88A8)
        / Dot1Q(vlan=10, type=0x8100)
        / Dot1Q(vlan=20)
        / inner
    ).ljust(64, b"\0")
    vlan = normaliser(1, frozenset({"vlan"}))
    assert vlan is not None and vlan(qinq) == vlan(plain) == plain
    six = bytes(Ether(src=MAC_A, dst=MAC_B) / IPv6(src="fe80::1", dst="fe80::2", hlim=64) / UDP())
    hop = normaliser(1, frozenset({"ttl"}))
    assert hop is not None
    assert hop(six) == hop(
        six.replace(bytes([64]) + bytes.fromhex("fe80"), bytes([63]) + bytes.fromhex("fe80"), 1)
    )
    assert hop(six) != hop(six[:-1] + b"\1")  # everything else still counts
    assert normaliser(1, frozenset()) is None and normaliser(107, frozenset({"vlan"})) is None
    with pytest.raises(CompareError, match="cannot ignore 'tos'"):
        parse_ignore(["ttl,tos"])


def test_a_direction_byte_link_type_is_matched_against_pcapng_flags(tmp_path: Path) -> None:
    """Link type 205 (C-HDLC with a direction byte) against C-HDLC in a flagged pcapng."""
    keepalive = bytes.fromhex("8f008035") + bytes(14)
    ip = SERIAL_HEADS[LinkType.C_HDLC] + bytes(ping(1))
    a = [(T0, b"\x01" + ip), (T0 + MS, b"\x00" + keepalive), (T0 + 2 * MS, b"\x01" + keepalive)]
    a_path = write_pcap(tmp_path / "dir.pcap", 205, a)
    out, inb = Direction.OUTBOUND, Direction.INBOUND
    b_path = write_pcapng(
        tmp_path / "b.pcapng",
        ["serial"],
        [(0, T0 + 10, ip, out), (0, T0 + MS + 10, keepalive, inb)],
        linktype=104,
    )
    report = compare(Selection(a_path), Selection(b_path))
    out_stream, in_stream = report.streams
    assert missing_numbers(report, 0) == [3] and out_stream.matched == 1
    assert in_stream.matched == 1 and in_stream.missing.count == 0


# Damaged, unrelated and wrongly selected input: clear messages, no tracebacks ------------


def pings(count: int, start: int = 0) -> list[tuple[int, bytes]]:
    return [
        (T0 + n * 10 * MS, bytes(Ether(src=MAC_A, dst=MAC_B) / ping(n)))
        for n in range(start, count)
    ]


@pytest.mark.parametrize("damaged", ["A", "B"])
def test_a_truncated_capture_is_compared_up_to_the_damage(damaged: str, tmp_path: Path) -> None:
    a = pings(20)
    b = [(ts + MS, frame) for ts, frame in a if ts != T0 + 30 * MS]  # A #4 lost
    a_path = write_pcap(tmp_path / "a.pcap", 1, a)
    b_path = write_pcap(tmp_path / "b.pcap", 1, b)
    cut = Path(a_path if damaged == "A" else b_path)
    cut.write_bytes(cut.read_bytes()[: 24 + 9 * (16 + len(a[0][1])) + 20])  # 9 records and a bit

    report = compare(Selection(a_path), Selection(b_path))
    (stream,) = report.streams
    assert missing_numbers(report) == [4] and stream.only_b.count == 0
    assert stream.matched == (8 if damaged == "A" else 9)  # up to the last whole record
    assert stream.a_frames == (9 if damaged == "A" else 10) and stream.b_frames == stream.matched
    damaged_side = report.a if damaged == "A" else report.b
    assert damaged_side.truncated and "truncated record" in damaged_side.truncated

    result = run(a_path, b_path)
    assert result.exit_code == 1
    assert "missing at B, by flow and protocol:" in result.stdout
    (warning,) = result.stderr.splitlines()
    assert warning.startswith(f"tunnelscope: warning: {damaged} (") and "compared up to" in warning


def test_a_capture_damaged_in_its_first_record_compares_nothing(tmp_path: Path) -> None:
    a_path = Path(write_pcap(tmp_path / "a.pcap", 1, pings(5)))
    a_path.write_bytes(a_path.read_bytes()[:30])
    b_path = write_pcap(tmp_path / "b.pcap", 1, pings(5))
    result = run(str(a_path), b_path, "--json")
    assert result.exit_code == 1 and "truncated record header" in result.stderr
    assert json.loads(result.stdout)["directions"] == []  # no B frame is "only at B"


def test_a_truncated_pre_post_capture_stops_both_points(tmp_path: Path) -> None:
    records = []
    for ts, frame in pings(10):
        records += [(0, ts, frame, Direction.OUTBOUND), (1, ts + 1000, frame, Direction.OUTBOUND)]
    path = Path(write_pcapng(tmp_path / "x.pcapng", ["l pre", "l post"], records))
    path.write_bytes(path.read_bytes()[:-10])
    result = run(str(path), "--json")
    assert result.exit_code == 1 and "truncated" in result.stderr
    (stream,) = json.loads(result.stdout)["directions"]
    assert stream["matched"] == 9 and stream["missing"]["count"] == 1  # the last one's post is cut
    assert stream["missing"]["frames"][0]["cause"] == "after B stopped"


def test_unreadable_inputs_and_bad_selections_fail_in_one_line(tmp_path: Path) -> None:
    good = write_pcap(tmp_path / "good.pcap", 1, pings(3))
    (tmp_path / "text.pcap").write_text("hello, this is not a capture\n")
    (tmp_path / "empty.pcap").write_bytes(b"")
    two = write_pcapng(tmp_path / "two.pcapng", ["r1 pre", "r1 post"], [])
    cases = {
        (str(tmp_path / "nope.pcap"), good): "nope.pcap): No such file or directory",
        (f"{tmp_path}/nope.pcapng#pre", good): "nope.pcapng#pre): No such file or directory",
        (good, str(tmp_path / "text.pcap")): "not a pcap or pcapng file",
        (good, str(tmp_path / "empty.pcap")): "empty or truncated file",
        (two, good): "2 interfaces ('r1 pre', 'r1 post'); pick one, e.g.",
        (f"{two}#middle", good): "no interface 'middle'",
        (f"{good}@out", good): "records no directions",
        (f"{good}@sideways", good): "unknown direction 'sideways'",
        (good, None): "no '<link> pre' and '<link> post' interfaces",
        ("-", "-"): "only one of A and B can be standard input",
    }
    for (a, b), message in cases.items():
        result = run(a, *([b] if b else []))
        assert result.exit_code == 2, (a, b, result.output)
        assert result.stderr.startswith("tunnelscope: error: ") and message in result.stderr
        assert len(result.stderr.splitlines()) == 1
    result = run(good, good, "--ignore", "mpls")
    assert result.exit_code == 2 and "cannot ignore 'mpls'" in result.stderr


def test_unrelated_and_empty_captures_are_said_plainly(tmp_path: Path) -> None:
    a_path = write_pcap(tmp_path / "a.pcap", 1, pings(5))
    b_path = write_pcap(tmp_path / "b.pcap", 1, pings(10, start=5))
    result = run(a_path, b_path)
    assert result.exit_code == 1
    assert "all: 5 frames at A, 5 at B: 0 matched, 5 missing at B, 5 only at B" in result.stdout
    assert "no frame of A appears at B: the captures are unrelated" in result.stderr
    empty = write_pcap(tmp_path / "empty.pcap", 1, [])
    result = run(a_path, empty)
    assert result.exit_code == 1 and "B (" in result.stderr and "holds no frames" in result.stderr


# Memory does not grow with the captures ------------------------------------------------


def test_memory_is_bounded_by_the_window_not_by_the_capture(tmp_path: Path) -> None:
    """benchmarks/compare.py at two sizes, same rate: same peak RSS, exact counts."""
    script = Path(__file__).resolve().parent.parent / "benchmarks" / "compare.py"
    figures = []
    for frames in (10_000, 100_000):
        done = subprocess.run(
            [sys.executable, str(script), "--frames", str(frames), "--rate", "2000"]
            + ["--dir", str(tmp_path), "--json"],
            capture_output=True,
            text=True,
            timeout=100,
            check=True,
        )
        results = json.loads(done.stdout)["results"]
        assert all(result["correct"] for result in results.values()), results
        figures.append(max(result["rss_mb"] for result in results.values()))
    assert figures[1] - figures[0] < 4, figures  # 90,000 more frames per capture: no growth
