"""Link-type detection: streams decide, single frames never do, look-alike starts do not fool."""

from __future__ import annotations

import random
from pathlib import Path

import pytest
from scapy.layers.inet import ICMP, IP, UDP
from scapy.layers.l2 import ARP, Ether
from test_decoders_frames import (
    ACTIVE,
    chdlc,
    chdlc_frames,
    ethernet_frames,
    fr_cisco,
    fr_frames,
    fr_ietf,
    lmi,
    ping,
    ppp_frames,
    slarp_keepalive,
)

from tunnelscope.decoders.detect import (
    IMPOSSIBLE,
    MALFORMED,
    RECOGNISED,
    UNKNOWN_PAYLOAD,
    LinkTypeDetector,
    detect_linktype,
    score,
)
from tunnelscope.formats.capture import open_capture
from tunnelscope.formats.linktype import LinkType

CAPTURES = Path(__file__).resolve().parent.parent / "captures"
STREAMS = {
    LinkType.ETHERNET: ethernet_frames,
    LinkType.C_HDLC: chdlc_frames,
    LinkType.PPP_SERIAL: ppp_frames,
    LinkType.FRELAY: fr_frames,
}


def _detector(frames: list[bytes]) -> LinkTypeDetector:
    detector = LinkTypeDetector()
    for frame in frames:
        detector.feed(frame)
    return detector


@pytest.mark.parametrize("linktype", list(STREAMS), ids=lambda lt: lt.name)
def test_a_stream_of_each_type_is_detected_with_confidence(linktype: LinkType) -> None:
    result = detect_linktype(STREAMS[linktype]())
    assert result.linktype == linktype
    assert result.confidence >= 0.99
    assert result.frames == len(STREAMS[linktype]())


@pytest.mark.parametrize("linktype", list(STREAMS), ids=lambda lt: lt.name)
def test_one_or_two_frames_never_decide(linktype: LinkType) -> None:
    for frame in STREAMS[linktype]():
        assert not _detector([frame]).decided
        assert not _detector([frame, frame]).decided
    assert _detector(STREAMS[linktype]()[:3]).decided


@pytest.mark.parametrize("linktype", list(STREAMS), ids=lambda lt: lt.name)
def test_a_single_frame_is_a_guess_below_the_threshold(linktype: LinkType) -> None:
    for frame in STREAMS[linktype]():
        result = detect_linktype([frame])
        assert result.linktype == linktype
        assert result.confidence < 0.9


@pytest.mark.parametrize(
    "name",
    ["ethernet.pcap", "chdlc.pcap", "ppp.pcap", "frelay.pcap"]
    + sorted(path.name for path in CAPTURES.glob("routing-*.pcap")),
)
def test_the_reference_captures_are_detected(name: str) -> None:
    with open_capture(str(CAPTURES / name)) as reader:
        packets = list(reader)
    result = detect_linktype(packet.data for packet in packets)
    assert result.linktype == packets[0].linktype
    assert result.confidence >= 0.9


def test_scores_follow_the_table() -> None:
    broadcast_arp = ethernet_frames()[4]
    assert score(LinkType.ETHERNET, broadcast_arp) == RECOGNISED
    assert score(LinkType.PPP_SERIAL, broadcast_arp) == IMPOSSIBLE  # FF FF, not FF 03
    assert score(LinkType.C_HDLC, b"\x0f\x01\x08\x00" + ping()) == IMPOSSIBLE
    assert score(LinkType.FRELAY, bytes([0x18, 0x40, 0x01]) + ping()) == IMPOSSIBLE  # 3 bytes
    assert score(LinkType.ETHERNET, bytes(13)) == IMPOSSIBLE
    group_source = bytes(6) + b"\x01" + bytes(5) + b"\x08\x00" + ping()
    assert score(LinkType.ETHERNET, group_source) == MALFORMED
    assert score(LinkType.C_HDLC, slarp_keepalive(1, 0)[:-1]) == MALFORMED
    assert score(LinkType.C_HDLC, chdlc(0x1234, b"")) == UNKNOWN_PAYLOAD
    assert score(LinkType.FRELAY, lmi("q933", 0x75, 1, 1, 0)) == RECOGNISED


def test_ethernet_to_macs_that_start_like_hdlc_or_ppp_is_still_ethernet() -> None:
    """0F 00 and FF 03 (a multicast MAC) fit the C-HDLC and PPP headers, not their payloads."""
    rng = random.Random(5)
    frames = []
    for number in range(8):
        start = [b"\x0f\x00", b"\x8f\x00", b"\xff\x03"][number % 3]
        dst = (start + rng.randbytes(4)).hex(":")
        frames.append(bytes(Ether(dst=dst, src="02:00:00:00:00:01") / ping(seq=number)))
        assert score(LinkType.ETHERNET, frames[-1]) == RECOGNISED
        assert score(LinkType.C_HDLC if start != b"\xff\x03" else LinkType.PPP_SERIAL,
                     frames[-1]) < RECOGNISED  # fmt: skip
    result = detect_linktype(frames)
    assert (result.linktype, result.confidence >= 0.9) == (LinkType.ETHERNET, True)


def test_ethernet_to_macs_that_look_like_a_q922_address_is_still_ethernet() -> None:
    """Dynamips MACs (c4:01:...): EA clear in byte 0, set in byte 1, a plausible FR header."""
    frames = [
        bytes(Ether(src="c4:02:00:00:00:00", dst="c4:01:00:00:00:00") / ping(seq=n))
        for n in range(4)
    ]
    assert score(LinkType.FRELAY, frames[0]) == UNKNOWN_PAYLOAD
    result = detect_linktype(frames)
    assert (result.linktype, result.confidence >= 0.9) == (LinkType.ETHERNET, True)


def test_frame_relay_dlcis_whose_first_byte_is_near_0f_or_ff() -> None:
    """DLCI 63 with C/R is 0E F1, DLCI 1023 with C/R is FE F1: never taken for C-HDLC or PPP."""
    first = fr_ietf(63, 0xCC, ping(), cr=True)
    assert first[:2] == b"\x0e\xf1"
    frames = [first, fr_cisco(63, 0x0800, ping(seq=2)), fr_ietf(1023, 0xCC, ping(), cr=True)]
    assert frames[2][:2] == b"\xfe\xf1"
    assert score(LinkType.C_HDLC, first) == score(LinkType.PPP_SERIAL, first) == IMPOSSIBLE
    result = detect_linktype(frames)
    assert (result.linktype, result.confidence >= 0.9) == (LinkType.FRELAY, True)


def test_cisco_lmi_alone_is_frame_relay() -> None:
    frames = [lmi("cisco", 0x75, 1, n, n - 1) for n in range(1, 4)]
    frames.append(lmi("cisco", 0x7D, 0, 4, 3, ((100, ACTIVE),)))
    assert _detector(frames).decided
    assert detect_linktype(frames).linktype == LinkType.FRELAY


def test_headers_that_fit_with_payloads_nobody_knows_do_not_decide() -> None:
    frames = [chdlc(0x1234, bytes(40)) for _ in range(20)]
    detector = _detector(frames)
    assert detector.result().linktype == LinkType.C_HDLC
    assert not detector.decided


def test_garbage_stays_ethernet_with_low_confidence() -> None:
    rng = random.Random(9)
    result = detect_linktype(rng.randbytes(rng.randrange(20, 200)) for _ in range(32))
    assert result.linktype == LinkType.ETHERNET
    assert result.confidence < 0.9
    assert result.frames == 32


def test_empty_frames_are_counted_but_prove_nothing() -> None:
    detector = _detector([b"", b"", b"", b""])
    assert detector.result().frames == 4
    assert detector.result().linktype == LinkType.ETHERNET and not detector.decided
    detector = _detector([b"", slarp_keepalive(1, 0), b"", slarp_keepalive(2, 1)])
    assert not detector.decided  # two frames of evidence
    detector.feed(slarp_keepalive(3, 2))
    assert detector.decided and detector.result().linktype == LinkType.C_HDLC


def test_one_corrupted_frame_does_not_derail_a_stream() -> None:
    frames = [slarp_keepalive(n, n - 1) for n in range(1, 9)]
    frames[2] = b"\x4f" + frames[2][1:]  # address byte hit by a bit flip
    result = detect_linktype(frames)
    assert (result.linktype, result.confidence >= 0.9) == (LinkType.C_HDLC, True)


def test_ppp_that_carries_only_ip_is_ppp() -> None:
    frames = [b"\xff\x03\x00\x21" + ping(seq=n) for n in range(3)]
    assert detect_linktype(frames).linktype == LinkType.PPP_SERIAL
    assert _detector(frames).decided


def test_vpcs_like_ethernet_arp_and_udp() -> None:
    vpcs = "00:50:79:66:68:00"
    frames = [
        bytes(Ether(src=vpcs, dst="ff:ff:ff:ff:ff:ff") / ARP(psrc="10.0.0.1", pdst="10.0.0.2")),
        bytes(Ether(src=vpcs, dst="00:50:79:66:68:01") / IP() / UDP(sport=1, dport=2)),
        bytes(Ether(src=vpcs, dst="00:50:79:66:68:01") / IP() / ICMP()),
    ]
    assert _detector(frames).decided
    assert detect_linktype(frames).linktype == LinkType.ETHERNET


def test_max_frames_bounds_what_is_read() -> None:
    frames = iter([slarp_keepalive(n, n) for n in range(100)])
    assert detect_linktype(frames, max_frames=5).frames == 5
    assert len(list(frames)) == 95  # the rest is left in the iterator
