"""pcapng: the encoders' exact bytes; sections, byte orders, block types, resolutions, damage."""

from __future__ import annotations

import io
import struct

import pytest

from tunnelscope.formats import pcapng
from tunnelscope.formats.capture import read_capture
from tunnelscope.formats.linktype import LinkType
from tunnelscope.formats.packet import CaptureFormatError, Direction

TS = 1_700_000_000_123_456_789
NRB, DSB, CUSTOM = 0x00000004, 0x0000000A, 0x40000BAD


# Hand-built blocks in either byte order ("<" or ">"), independent of the module's encoders.
def block(block_type: int, body: bytes, e: str = "<") -> bytes:
    body += bytes(-len(body) % 4)
    total = 12 + len(body)
    return struct.pack(e + "II", block_type, total) + body + struct.pack(e + "I", total)


def options(*items: tuple[int, bytes], e: str = "<") -> bytes:
    out = b"".join(
        struct.pack(e + "HH", code, len(v)) + v + bytes(-len(v) % 4) for code, v in items
    )
    return out + struct.pack(e + "HH", 0, 0)


def shb(e: str = "<", major: int = 1) -> bytes:
    return block(pcapng.SHB, struct.pack(e + "IHHq", pcapng.BYTE_ORDER_MAGIC, major, 0, -1), e)


def idb(linktype: int, snaplen: int = 0, opts: bytes = b"", e: str = "<") -> bytes:
    return block(pcapng.IDB, struct.pack(e + "HHI", linktype, 0, snaplen) + opts, e)


def epb(interface: int, ticks: int, data: bytes, opts: bytes = b"", e: str = "<") -> bytes:
    head = struct.pack(e + "IIIII", interface, ticks >> 32, ticks & 0xFFFFFFFF, len(data), 999)
    return block(pcapng.EPB, head + data + bytes(-len(data) % 4) + opts, e)


def read_all(data: bytes) -> tuple[pcapng.PcapngReader, list]:
    reader = read_capture(io.BytesIO(data))
    return reader, list(reader)


def test_encoder_bytes_are_pinned() -> None:
    """The C fast path writes these bytes too: any change here must change it as well."""
    assert pcapng.section_header().hex() == (
        "0a0d0d0a1c0000004d3c2b1a01000000ffffffffffffffff1c000000"
    )
    assert pcapng.interface_description(104, "R1 s1/0", "serial").hex() == (
        "01000000380000006800000000000400020007005231207331"
        "2f30000300060073657269616c000009000100090000000000000038000000"
    )
    assert pcapng.enhanced_packet(
        1, TS, b"\xff\x03\xc0", 60, Direction.OUTBOUND, "dropped"
    ).hex() == (
        "060000003c00000001000000fe9c971715cd853d030000003c000000ff03c000020004000200000001"
        "00070064726f7070656400000000003c000000"
    )
    assert pcapng.interface_statistics(1, TS, 3, "x=3").hex() == (
        "050000003000000001000000fe9c971715cd853d05000800030000000000000001000300783d3300"
        "0000000030000000"
    )


def test_round_trip_of_the_encoders() -> None:
    data = pcapng.section_header()
    data += pcapng.interface_description(LinkType.C_HDLC, "R1 s1/0", "serial, udp 10001")
    data += pcapng.interface_description(LinkType.FRELAY, "R3 s1/2")
    data += pcapng.enhanced_packet(0, TS, b"\x8f\x00\x80\x35", None, Direction.OUTBOUND, "hi")
    data += pcapng.enhanced_packet(1, TS + 1, b"", 64, Direction.INBOUND)
    data += pcapng.enhanced_packet(1, TS + 2, b"\x00\x01\x03")
    data += pcapng.interface_statistics(1, TS + 3, 7, "packet_loss=7")
    reader, packets = read_all(data)
    assert reader.format == "pcapng"
    assert [(i.linktype, i.name, i.description) for i in reader.interfaces] == [
        (104, "R1 s1/0", "serial, udp 10001"),
        (107, "R3 s1/2", ""),
    ]
    assert [i.ticks_per_second for i in reader.interfaces] == [10**9, 10**9]
    assert [i.dropped for i in reader.interfaces] == [None, 7]
    assert [(p.interface, p.linktype, p.ts_ns, p.data, p.orig_len) for p in packets] == [
        (0, 104, TS, b"\x8f\x00\x80\x35", 4),
        (1, 107, TS + 1, b"", 64),
        (1, 107, TS + 2, b"\x00\x01\x03", 3),
    ]
    assert [p.direction for p in packets] == [Direction.OUTBOUND, Direction.INBOUND, 0]
    assert [p.comment for p in packets] == ["hi", None, None]


@pytest.mark.parametrize("e", ["<", ">"])
def test_byte_orders(e: str) -> None:
    opts = options((pcapng.IF_NAME, b"s0\0"), (pcapng.IF_TSRESOL, b"\x09"), e=e)
    flags = options((pcapng.EPB_FLAGS, struct.pack(e + "I", 2)), (1, b"note"), e=e)
    data = shb(e) + idb(104, 0, opts, e) + epb(0, TS, b"\x0f\x00", flags, e)
    reader, packets = read_all(data)
    assert reader.interfaces[0].name == "s0"  # the terminating NUL is not part of the name
    assert [(p.ts_ns, p.data, p.orig_len, p.direction, p.comment) for p in packets] == [
        (TS, b"\x0f\x00", 999, Direction.OUTBOUND, "note")
    ]


def test_sections_restart_interfaces_and_may_change_byte_order() -> None:
    first = shb() + idb(104) + idb(50) + epb(1, 1, b"ppp")
    second = shb(">") + idb(107, e=">") + epb(0, 2, b"fr", e=">")
    reader, packets = read_all(first + second + first)
    assert [(p.linktype, p.interface, p.data) for p in packets] == [
        (50, 1, b"ppp"),
        (107, 0, b"fr"),
        (50, 1, b"ppp"),
    ]
    assert reader.sections == 3
    with pytest.raises(CaptureFormatError, match="interface 1 was never described"):
        read_all(first + second[: -len(epb(0, 2, b"fr"))] + epb(1, 2, b"fr", e=">"))


def test_unknown_blocks_are_skipped() -> None:
    data = shb() + block(CUSTOM, b"\x00\x00\x7e\x1f vendor data") + idb(1)
    data += block(NRB, b"\x01\x00\x08\x00" + bytes(4) + b"\x00\x00\x00\x00") + epb(0, 5, b"eth")
    data += block(DSB, b"TLSK" + struct.pack("<I", 3) + b"key") + epb(0, 6, b"eth2")
    assert [p.data for p in read_all(data)[1]] == [b"eth", b"eth2"]


def test_simple_packet_block() -> None:
    spb = block(pcapng.SPB, struct.pack("<I", 6) + b"\x0f\x00\x08\x00\xaa\xbb")
    cut = block(pcapng.SPB, struct.pack("<I", 100) + bytes(8))  # original 100, snaplen 4
    _, packets = read_all(shb() + idb(104) + spb)
    assert [(p.ts_ns, p.data, p.orig_len, p.linktype) for p in packets] == [
        (0, b"\x0f\x00\x08\x00\xaa\xbb", 6, 104)
    ]
    assert [p.data for p in read_all(shb() + idb(104, 4) + cut)[1]] == [bytes(4)]
    with pytest.raises(CaptureFormatError, match="interface 0 was never described"):
        read_all(shb() + spb)


def test_obsolete_packet_block() -> None:
    flags = options((2, struct.pack("<I", 1)))  # pack_flags: inbound
    pb = struct.pack("<HHIIII", 0, 0, 0, 1_000_000, 3, 3) + b"abc\0" + flags
    _, packets = read_all(shb() + idb(1) + block(pcapng.PB, pb))
    assert [(p.ts_ns, p.data, p.direction) for p in packets] == [(10**9, b"abc", Direction.INBOUND)]


@pytest.mark.parametrize(
    ("tsresol", "ticks", "ts_ns"),
    [
        (None, 1_500_000, 1_500_000_000),  # no option: microseconds
        (b"\x06", 1_500_000, 1_500_000_000),
        (b"\x03", 1500, 1_500_000_000),
        (b"\x09", 1_500_000_000, 1_500_000_000),
        (b"\x0c", 1_500_000_000_123, 1_500_000_000),  # picoseconds
        (bytes([0x80 | 20]), 3 << 19, 1_500_000_000),  # 2^-20 s per tick
        (bytes([0x80 | 10]), 1, 976_562),
    ],
)
def test_timestamp_resolutions(tsresol: bytes | None, ticks: int, ts_ns: int) -> None:
    opts = options((pcapng.IF_TSRESOL, tsresol)) if tsresol else b""
    assert read_all(shb() + idb(1, 0, opts) + epb(0, ticks, b""))[1][0].ts_ns == ts_ns


@pytest.mark.parametrize(("flags", "direction"), [(0, 0), (1, 1), (2, 2), (3, 0), (0x1F2, 2)])
def test_direction_flags(flags: int, direction: int) -> None:
    opts = options((pcapng.EPB_FLAGS, struct.pack("<I", flags)))
    assert read_all(shb() + idb(1) + epb(0, 0, b"", opts))[1][0].direction == direction


def test_options_overrunning_their_block_are_ignored() -> None:
    bad = struct.pack("<HH", 1, 200) + b"short comment"
    assert read_all(shb() + idb(1) + epb(0, 0, b"x", bad))[1][0].comment is None


def test_several_comments_are_kept() -> None:
    opts = options((1, b"first"), (1, b"second"))
    assert read_all(shb() + idb(1) + epb(0, 0, b"x", opts))[1][0].comment == "first; second"


def damaged_files() -> list:
    """(data, message) cases, with an id; tests/test_capture.py runs them."""
    good = shb() + idb(104, 100) + epb(0, 1, b"abcd") + epb(0, 2, b"efgh")
    last = len(epb(0, 2, b"efgh"))
    bad_length = bytearray(good)
    bad_length[-last + 4 : -last + 8] = struct.pack("<I", 30)
    bad_trailer = bytearray(good)
    bad_trailer[-4:] = struct.pack("<I", 40)
    return [
        pytest.param(shb()[:10], "truncated pcapng section header", id="shb cut"),
        pytest.param(
            shb()[:8] + b"\x1a\x2b\x3c\x00" + shb()[12:], "bad pcapng byte-order", id="bom"
        ),
        pytest.param(shb(major=2), "unsupported pcapng version 2", id="pcapng version"),
        pytest.param(good[:-3], "truncated pcapng block after frame 1", id="block cut"),
        pytest.param(good[: -last + 5], "after frame 1: truncated pcapng block header", id="head"),
        pytest.param(bytes(bad_length), "bad pcapng block length 30", id="length"),
        pytest.param(bytes(bad_trailer), f"lengths differ ({last} and 40)", id="trailer"),
        pytest.param(shb() + epb(0, 1, b"x"), "frame 1: interface 0 was never", id="no idb"),
        pytest.param(
            shb() + idb(104, 2) + epb(0, 1, b"abc"), "frame 1: caplen 3 above the snap", id="snap"
        ),
        pytest.param(
            shb() + idb(1) + block(pcapng.EPB, struct.pack("<IIIII", 0, 0, 0, 50, 50)),
            "frame 1: caplen 50 overruns its block",
            id="overrun",
        ),
        pytest.param(
            shb() + idb(1) + block(pcapng.EPB, bytes(8)), "frame 1: truncated packet", id="epb"
        ),
        pytest.param(
            shb() + idb(1) + block(pcapng.SPB, b""), "frame 1: truncated simple", id="spb"
        ),
        pytest.param(shb() + block(pcapng.IDB, b""), "truncated interface block", id="idb"),
    ]


def test_reader_refuses_a_foreign_magic() -> None:
    with pytest.raises(CaptureFormatError, match="bad pcapng magic"):
        pcapng.PcapngReader(io.BytesIO(bytes(40)), b"\xd4\xc3\xb2\xa1")


def test_nanoseconds_per_tick_for_decap() -> None:
    """tunnelscope/analysis/decap.py hands its C scanner whole nanoseconds per tick."""
    resolutions = [b"", b"\x06", b"\x09", b"\x0c", bytes([0x80 | 10])]
    assert [pcapng._tsresol_ns(r) for r in resolutions] == [1000, 1000, 1, 1, 976_562]
