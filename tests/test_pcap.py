"""Classic pcap: the encoders' exact bytes, both byte orders and magics, damaged files."""

from __future__ import annotations

import io
import struct

import pytest

from tunnelscope.formats import pcap
from tunnelscope.formats.capture import read_capture
from tunnelscope.formats.linktype import LinkType
from tunnelscope.formats.packet import MAX_CAPLEN, CaptureFormatError

TS = 1_700_000_000_123_456_789
SLARP_HEAD = b"\x8f\x00\x80\x35"


def build(
    records: list[tuple[int, int, bytes]],
    endian: str = "<",
    magic: int = pcap.MAGIC_US,
    linktype: int = LinkType.C_HDLC,
    snaplen: int = 65535,
    major: int = 2,
) -> bytes:
    """A pcap file in either byte order from (seconds, fraction, data) records."""
    out = struct.pack(endian + "IHHiIII", magic, major, 4, 0, 0, snaplen, linktype)
    for sec, frac, data in records:
        out += struct.pack(endian + "IIII", sec, frac, len(data), len(data)) + data
    return out


def read_all(data: bytes) -> tuple[pcap.PcapReader, list]:
    reader = read_capture(io.BytesIO(data))
    return reader, list(reader)


def test_encoder_bytes_are_pinned() -> None:
    """The C fast path writes these bytes too: any change here must change it as well."""
    assert pcap.global_header(104).hex() == "d4c3b2a10200040000000000000000000000040068000000"
    assert (
        pcap.global_header(107, 65535, nanosecond=True).hex()
        == "4d3cb2a1020004000000000000000000ffff00006b000000"
    )
    frame = bytes.fromhex("0f008035")
    assert pcap.record(TS, frame, 60).hex() == "00f1536540e20100040000003c000000" + "0f008035"
    assert (
        pcap.record(TS, frame, nanosecond=True).hex() == "00f1536515cd5b0704000000040000000f008035"
    )


@pytest.mark.parametrize("nanosecond", [False, True])
def test_round_trip(nanosecond: bool) -> None:
    frames = [SLARP_HEAD + bytes(14), b"", b"\x0f\x00\x08\x00" + bytes(100)]
    data = pcap.global_header(LinkType.C_HDLC, 1500, nanosecond)
    data += b"".join(pcap.record(TS + i, f, 1000 + i, nanosecond) for i, f in enumerate(frames))
    reader, packets = read_all(data)
    assert reader.format == "pcap"
    assert reader.nanosecond is nanosecond
    assert reader.snaplen == 1500
    assert reader.interfaces[0].linktype == LinkType.C_HDLC
    assert reader.interfaces[0].ticks_per_second == (10**9 if nanosecond else 10**6)
    assert [p.data for p in packets] == frames  # the empty frame is a frame
    assert [p.orig_len for p in packets] == [1000, 1001, 1002]
    expected = [TS + i if nanosecond else (TS + i) // 1000 * 1000 for i in range(3)]
    assert [p.ts_ns for p in packets] == expected
    assert {p.linktype for p in packets} == {104}


@pytest.mark.parametrize("endian", ["<", ">"])
@pytest.mark.parametrize(("magic", "scale"), [(pcap.MAGIC_US, 1000), (pcap.MAGIC_NS, 1)])
def test_both_byte_orders_and_magics(endian: str, magic: int, scale: int) -> None:
    data = build([(10, 5, b"\xff\x03\xc0\x21"), (11, 7, b"\xff\x03")], endian, magic, 50)
    reader, packets = read_all(data)
    assert reader.interfaces[0].linktype == LinkType.PPP_SERIAL
    assert [(p.ts_ns, p.data) for p in packets] == [
        (10 * 10**9 + 5 * scale, b"\xff\x03\xc0\x21"),
        (11 * 10**9 + 7 * scale, b"\xff\x03"),
    ]


def test_unknown_linktype_is_readable_and_fcs_bits_are_ignored() -> None:
    assert read_all(build([(1, 0, b"x")], linktype=147))[1][0].linktype == 147
    # bits 28-31 say "FCS present", bits 0-15 are the link type
    assert read_all(build([], linktype=0x1000_0000 | 107))[0].interfaces[0].linktype == 107


def test_snaplen_zero_means_unlimited() -> None:
    assert len(read_all(build([(1, 0, bytes(70000))], snaplen=0))[1][0].data) == 70000


def damaged_files() -> list:
    """(data, message) cases, with an id; tests/test_capture.py runs them."""
    good = build([(1, 0, b"\x0f\x00\x08\x00"), (2, 0, b"\x0f\x00\x08\x00")])
    huge = build([], snaplen=0) + struct.pack("<IIII", 1, 0, MAX_CAPLEN + 1, MAX_CAPLEN + 1)
    return [
        pytest.param(b"", "empty or truncated file", id="empty"),
        pytest.param(b"\xd4\xc3", "empty or truncated file", id="short magic"),
        pytest.param(good[:20], "truncated pcap file header (16 of 20 bytes)", id="header cut"),
        pytest.param(b"GET / HTTP/1.1\r\n" + bytes(8), "not a pcap or pcapng file", id="bad magic"),
        pytest.param(build([], major=3), "unsupported pcap version 3", id="version"),
        pytest.param(
            good[: 24 + 20 + 8], "frame 2: truncated record header", id="record header cut"
        ),
        pytest.param(good[:-1], "frame 2: truncated record (3 of 4 bytes)", id="record data cut"),
        pytest.param(
            build([(1, 0, bytes(200))], snaplen=100),
            "caplen 200 above the snap",
            id="above snaplen",
        ),
        pytest.param(
            huge, f"caplen {MAX_CAPLEN + 1} above the {MAX_CAPLEN}-byte limit", id="above 256 KiB"
        ),
    ]


def test_frames_before_the_damage_are_delivered() -> None:
    reader = read_capture(io.BytesIO(build([(1, 0, b"a"), (2, 0, b"bb")])[:-1]))
    frames = iter(reader)
    assert next(frames).data == b"a"
    with pytest.raises(CaptureFormatError, match="frame 2"):
        next(frames)


def test_reader_refuses_a_foreign_magic() -> None:
    with pytest.raises(CaptureFormatError, match="bad pcap magic 0a0d0d0a"):
        pcap.PcapReader(io.BytesIO(bytes(20)), b"\x0a\x0d\x0d\x0a")
