"""No bytes make a decoder raise: random, truncated and bit-flipped frames (fixed seeds)."""

from __future__ import annotations

import random
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from test_decoders_frames import chdlc_frames, ethernet_frames, fr_frames, ppp_frames

from tunnelscope.decoders import Decoded, decode
from tunnelscope.formats.capture import open_capture
from tunnelscope.formats.linktype import LinkType

CAPTURES = Path(__file__).resolve().parent.parent / "captures"


def _routing_frames(linktype: LinkType) -> list[bytes]:
    """The frames of captures/routing-*.pcap of this link type (OSPF, BGP, IS-IS, LMI, ...)."""
    frames = []
    for path in sorted(CAPTURES.glob("routing-*.pcap")):
        with open_capture(str(path)) as reader:
            frames += [packet.data for packet in reader if packet.linktype == linktype]
    return frames


LINKTYPES = [
    LinkType.ETHERNET,
    LinkType.C_HDLC,
    LinkType.PPP_SERIAL,
    LinkType.PPP,
    LinkType.FRELAY,
    LinkType.PPP_WITH_DIR,
    LinkType.C_HDLC_WITH_DIR,
    LinkType.FRELAY_WITH_DIR,
]
VALID = {
    LinkType.ETHERNET: ethernet_frames() + _routing_frames(LinkType.ETHERNET),
    LinkType.C_HDLC: chdlc_frames() + _routing_frames(LinkType.C_HDLC),
    LinkType.PPP_SERIAL: ppp_frames() + _routing_frames(LinkType.PPP_SERIAL),
    LinkType.FRELAY: fr_frames() + _routing_frames(LinkType.FRELAY),
}
# Starts that steer random tails into every branch: link headers with each protocol number.
PREFIXES = [
    b"\x0f\x00\x08\x00",
    b"\x0f\x00\x80\x35",
    b"\x8f\x00\x20\x00",
    b"\x0f\x00\x86\xdd",
    b"\xff\x03\xc0\x21\x01",
    b"\xff\x03\xc0\x23\x01",
    b"\xff\x03\xc2\x23\x01",
    b"\xff\x03\x80\x21\x01",
    b"\xff\x03\x00\x21\x45",
    b"\x00\x01\x03\x08\x00\x7d\x95",
    b"\x00\x01\x03\x08\x00\x7d\x51",
    b"\xfc\xf1\x03\x09\x00\x7d",
    b"\x18\x41\x03\xcc\x45",
    b"\x18\x41\x03\x80\x00\x00\x00\x08\x06",
    b"\x18\x41\x03\x80\x00\x80\xc2\x00\x07",
    b"\x18\x41\x08\x00\x45",
    bytes(12) + b"\x81\x00\x00\x64\x08\x00\x45",
    bytes(12) + b"\x88\xa8\x00\x0a\x81\x00",
    bytes(12) + b"\x86\xdd\x60\x00\x00\x00",
    bytes(12) + b"\x88\x47\x00\x01\x01\x40\x45",
    bytes(12) + b"\x00\x30\xaa\xaa\x03\x00\x00\x0c\x20\x00",
    bytes(12) + b"\x00\x30\xfe\xfe\x03\x83",
    b"\x8f\x00\xfe\xfe\x83",
    b"\xff\x03\x00\x23\x83",
    b"\x18\x61\x03\x83",
    b"\x18\x61\xfe\xfe\x83",
]
TYPES = (int, bool, str)


def _check(decoded: Decoded, linktype: int) -> None:
    """The result is well-typed whatever the input: what consumers (CLI, JSON) rely on."""
    assert decoded.linktype == linktype
    assert isinstance(decoded.summary, str) and "\n" not in decoded.summary
    assert all(isinstance(p, str) for p in decoded.protocols)
    for name, value in decoded.fields.items():
        values = value if isinstance(value, list) else [value]
        assert all(isinstance(v, TYPES) for v in values), name
    assert decoded.malformed == ("[malformed:" in decoded.summary)


@pytest.mark.parametrize("linktype", LINKTYPES, ids=lambda lt: lt.name)
def test_random_bytes_never_raise(linktype: LinkType) -> None:
    rng = random.Random(linktype)
    for _ in range(1500):
        head = rng.choice(PREFIXES) if rng.random() < 0.7 else b""
        direction = bytes([rng.randrange(2)]) if linktype.has_direction_byte else b""
        data = direction + head + rng.randbytes(rng.randrange(0, 80))
        _check(decode(linktype, data), linktype)


@pytest.mark.parametrize("linktype", list(VALID), ids=lambda lt: lt.name)
def test_every_prefix_and_bit_flip_of_valid_frames_never_raises(linktype: LinkType) -> None:
    rng = random.Random(int(linktype) + 1)
    for frame in VALID[linktype]:
        for size in range(len(frame)):
            _check(decode(linktype, frame[:size]), linktype)
        for _ in range(100):
            damaged = bytearray(frame)
            for _ in range(rng.randrange(1, 4)):
                damaged[rng.randrange(len(damaged))] ^= 1 << rng.randrange(8)
            _check(decode(linktype, bytes(damaged)), linktype)


@pytest.mark.parametrize("linktype", LINKTYPES, ids=lambda lt: lt.name)
def test_zero_length_frame_is_malformed(linktype: LinkType) -> None:
    decoded = decode(linktype, b"")
    assert decoded.malformed
    _check(decoded, linktype)


def _length_covers_all(decoded: Decoded) -> bool:
    """Frames where some header gives the length of everything after it (no padding)."""
    covered = {"ip", "ipv6", "lcp", "ipcp", "pap", "chap"} & set(decoded.protocols)
    return bool(covered) or "slarp.mysequence" in decoded.fields  # a keepalive's fixed size


@pytest.mark.parametrize("linktype", list(VALID), ids=lambda lt: lt.name)
def test_truncated_frames_are_reported_malformed(linktype: LinkType) -> None:
    """Cut anywhere, a frame whose lengths cover it all is malformed, and keeps its start."""
    checked = 0
    for frame in VALID[linktype]:
        whole = decode(linktype, frame)
        if not _length_covers_all(whole):
            continue
        for size in range(len(frame)):
            cut = decode(linktype, frame[:size])
            assert cut.malformed, (size, whole.summary, cut.summary)
            assert cut.protocols == whole.protocols[: len(cut.protocols)], (size, whole.summary)
        checked += 1
    assert checked >= 3


def test_an_ipv6_fragment_header_followed_by_options_is_malformed_not_a_crash() -> None:
    """Found by `make fuzz`: dpkt's IPv6 parser raises AttributeError on this chain."""
    fragment = struct.pack("!BBHI", 0, 0, (1 << 3) | 1, 7)  # next: hop-by-hop, offset 8, M
    hop_by_hop = bytes([59, 0]) + bytes(6)  # next: none
    header = struct.pack("!IHBB", 6 << 28, len(fragment + hop_by_hop), 44, 64) + bytes(32)
    frame = b"\x02" * 6 + b"\x04" * 6 + b"\x86\xdd" + header + fragment + hop_by_hop
    decoded = decode(LinkType.ETHERNET, frame)
    _check(decoded, LinkType.ETHERNET)
    assert decoded.malformed and decoded.protocols[-1] == "ipv6"


# Routing payloads behind headers whose lengths are right, so that random bytes reach the
# routing decoders rather than stopping at an IP length check: (protocol reached, wrapper).
_CHDLC_IP = b"\x0f\x00\x08\x00"
ROUTING_WRAPPERS: dict[str, tuple[str, Callable[[bytes], bytes]]] = {
    "ospf": ("ospf", lambda p: _CHDLC_IP + bytes(IP(proto=89) / p)),
    "ospfv3": ("ospf", lambda p: b"\x0f\x00\x86\xdd" + bytes(IPv6(nh=89) / p)),
    "eigrp": ("eigrp", lambda p: _CHDLC_IP + bytes(IP(proto=88) / p)),
    "bgp": ("bgp", lambda p: _CHDLC_IP + bytes(IP() / TCP(sport=179, dport=40000) / p)),
    "ldp-tcp": ("ldp", lambda p: _CHDLC_IP + bytes(IP() / TCP(sport=40001, dport=646) / p)),
    "ldp-udp": ("ldp", lambda p: _CHDLC_IP + bytes(IP() / UDP(sport=646, dport=646) / p)),
    "rip": ("rip", lambda p: _CHDLC_IP + bytes(IP() / UDP(sport=520, dport=520) / p)),
    "isis": ("isis", lambda p: b"\x8f\x00\xfe\xfe\x83" + p),
}
# First bytes of well-formed payloads: version and type fields, a BGP marker, an IS-IS header.
ROUTING_STARTS = {
    "ospf": [b"\x02\x01", b"\x02\x04", b"\x02\x02", b"\x02\x05"],
    "ospfv3": [b"\x03\x01", b"\x03\x04"],
    "eigrp": [b"\x02\x05", b"\x02\x01" + bytes(18) + b"\x01\x02\x00\x1c"],
    "bgp": [b"\xff" * 16 + b"\x00", b"\xff" * 16 + b"\x00\x17\x02"],
    "ldp-tcp": [b"\x00\x01\x00"],
    "ldp-udp": [b"\x00\x01\x00\x16" + bytes(6) + b"\x01\x00"],
    "rip": [b"\x02\x02\x00\x00", b"\x01\x01\x00\x00"],
    "isis": [b"\x14\x01\x00\x11", b"\x1b\x01\x00\x14", b"\x21\x01\x00\x18", b"\x11\x01\x00\x1a"],
}


@pytest.mark.parametrize("name", list(ROUTING_WRAPPERS))
def test_random_routing_payloads_never_raise(name: str) -> None:
    protocol, wrap = ROUTING_WRAPPERS[name]
    rng = random.Random(name)
    reached = 0
    for _ in range(1000):
        head = rng.choice(ROUTING_STARTS[name]) if rng.random() < 0.8 else b""
        decoded = decode(LinkType.C_HDLC, wrap(head + rng.randbytes(rng.randrange(0, 120))))
        _check(decoded, LinkType.C_HDLC)
        reached += protocol in decoded.protocols
    assert reached >= 900, f"only {reached} of 1000 payloads reached {protocol}"
