"""pcapng: one Interface Description Block per link, Enhanced Packet Blocks, statistics.

    every block       type u32, total_length u32, body, total_length u32 (padded to 4)
    SHB  0x0A0D0D0A   byte-order magic 1A2B3C4D, major 1, minor 0, section length -1
    IDB  0x00000001   linktype u16, reserved u16, snaplen u32, options
                      if_name (2), if_description (3), if_tsresol (9, one byte: 9 = ns)
    EPB  0x00000006   interface u32, ts high u32, ts low u32, caplen u32, origlen u32,
                      data padded to 4, options: epb_flags (2, u32), opt_comment (1)
    PB   0x00000002   (obsolete, read only) interface u16, drops u16, then as EPB
    SPB  0x00000003   (read only) origlen u32, data: interface 0, no timestamp
    ISB  0x00000005   interface u32, ts high u32, ts low u32, options:
                      isb_ifdrop (5, u64), opt_comment (1)
Every block this module writes uses nanosecond timestamps (if_tsresol 9).
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import BinaryIO

from tunnelscope.formats.packet import (
    CaptureFormatError,
    Direction,
    Interface,
    Packet,
    check_caplen,
    read_exact,
)

SHB = 0x0A0D0D0A
IDB = 0x00000001
EPB = 0x00000006
SPB = 0x00000003
PB = 0x00000002  # obsolete Packet Block: read only
ISB = 0x00000005
BYTE_ORDER_MAGIC = 0x1A2B3C4D

OPT_END = 0
OPT_COMMENT = 1
IF_NAME = 2
IF_DESCRIPTION = 3
IF_TSRESOL = 9
EPB_FLAGS = 2
ISB_IFDROP = 5

MAX_BLOCK = 16 * 1024 * 1024


def _pad(length: int) -> int:
    return -length % 4


def _option(code: int, value: bytes) -> bytes:
    return struct.pack("<HH", code, len(value)) + value + b"\0" * _pad(len(value))


def _options(options: list[bytes]) -> bytes:
    return b"".join(options) + struct.pack("<HH", OPT_END, 0) if options else b""


def _block(block_type: int, body: bytes) -> bytes:
    total = 12 + len(body)
    return struct.pack("<II", block_type, total) + body + struct.pack("<I", total)


def section_header() -> bytes:
    return _block(SHB, struct.pack("<IHHq", BYTE_ORDER_MAGIC, 1, 0, -1))


def interface_description(
    linktype: int, name: str, description: str = "", snaplen: int = 262144
) -> bytes:
    options = [_option(IF_NAME, name.encode())]
    if description:
        options.append(_option(IF_DESCRIPTION, description.encode()))
    options.append(_option(IF_TSRESOL, b"\x09"))
    return _block(IDB, struct.pack("<HHI", linktype, 0, snaplen) + _options(options))


def enhanced_packet(
    interface: int,
    ts_ns: int,
    data: bytes,
    orig_len: int | None = None,
    direction: Direction = Direction.UNKNOWN,
    comment: str | None = None,
) -> bytes:
    options = []
    if direction:
        options.append(_option(EPB_FLAGS, struct.pack("<I", int(direction))))
    if comment:
        options.append(_option(OPT_COMMENT, comment.encode()))
    length = len(data)
    head = struct.pack(
        "<IIIII",
        interface,
        ts_ns >> 32,
        ts_ns & 0xFFFFFFFF,
        length,
        length if orig_len is None else orig_len,
    )
    return _block(EPB, head + data + b"\0" * _pad(length) + _options(options))


def interface_statistics(interface: int, ts_ns: int, dropped: int, comment: str = "") -> bytes:
    options = [_option(ISB_IFDROP, struct.pack("<Q", dropped))]
    if comment:
        options.append(_option(OPT_COMMENT, comment.encode()))
    head = struct.pack("<III", interface, ts_ns >> 32, ts_ns & 0xFFFFFFFF)
    return _block(ISB, head + _options(options))


def _parse_options(body: bytes, endian: str) -> Iterator[tuple[int, bytes]]:
    """Yield (code, value) up to opt_endofopt; an option overrunning its block ends the list."""
    offset = 0
    while offset + 4 <= len(body):
        code, length = struct.unpack_from(endian + "HH", body, offset)
        offset += 4
        if code == OPT_END or offset + length > len(body):
            return
        yield code, body[offset : offset + length]
        offset += length + _pad(length)


def _text(value: bytes) -> str:
    """Option strings are UTF-8; some writers add a terminating NUL."""
    return value.decode(errors="replace").rstrip("\0")


def _ticks_per_second(value: bytes) -> int:
    """if_tsresol: bit 7 clear = 10^-n seconds per tick, set = 2^-n (default 10^-6)."""
    if not value:
        return 1_000_000
    exponent = value[0] & 0x7F
    return 2**exponent if value[0] & 0x80 else 10**exponent


def _tsresol_ns(value: bytes) -> int:
    """Whole nanoseconds per tick, at least 1: what decap's C scanner multiplies by."""
    return max(1, round(1_000_000_000 / _ticks_per_second(value)))


class PcapngReader:
    """Streams packets from a pcapng file or pipe, section after section, in constant memory.

    Reads EPB, SPB and the obsolete PB; IDB and ISB update `interfaces`; every other block
    type (NRB, DSB, custom...) is skipped, as the spec asks. `magic_bytes` are the 4 bytes
    the caller already read to tell pcap from pcapng.
    """

    format = "pcapng"

    def __init__(self, stream: BinaryIO, magic_bytes: bytes) -> None:
        if magic_bytes != _SHB_TYPE:
            raise CaptureFormatError(f"bad pcapng magic {magic_bytes.hex()}")
        self._stream = stream
        self.interfaces: list[Interface] = []
        self.sections = 0
        self._endian = "<"
        self._frame = 0  # frames yielded so far, for error messages
        self._read_section_header(read_exact(stream, 4, "pcapng section header"))

    def _read_section_header(self, length_bytes: bytes) -> None:
        """Read an SHB whose type and length were read; its byte-order magic sets the endian."""
        order = read_exact(self._stream, 4, "pcapng section header")
        endian = _BYTE_ORDER.get(order)
        if endian is None:
            raise CaptureFormatError(f"bad pcapng byte-order magic {order.hex()}")
        (total,) = struct.unpack(endian + "I", length_bytes)
        if total < 28 or total % 4 or total > MAX_BLOCK:
            raise CaptureFormatError(f"bad pcapng section header length {total}")
        rest = read_exact(self._stream, total - 12, "pcapng section header")
        (major,) = struct.unpack_from(endian + "H", rest)
        if major != 1:
            raise CaptureFormatError(f"unsupported pcapng version {major}")
        self._check_trailer(rest, total, endian, SHB)
        self._endian = endian
        self.interfaces = []  # interface numbers restart in every section
        self.sections += 1

    def _check_trailer(self, rest: bytes, total: int, endian: str, block_type: int) -> None:
        (trailer,) = struct.unpack_from(endian + "I", rest, len(rest) - 4)
        if trailer != total:
            raise CaptureFormatError(
                f"after frame {self._frame}: pcapng block {block_type:#x} lengths differ "
                f"({total} and {trailer})"
            )

    def _read_block(self) -> tuple[int, bytes] | None:
        """The next block's type and body (without the trailing length); None at the end."""
        head = self._stream.read(8)
        if not head:
            return None
        if len(head) < 8:
            raise CaptureFormatError(f"after frame {self._frame}: truncated pcapng block header")
        if head[:4] == _SHB_TYPE:  # a new section, maybe in the other byte order
            self._read_section_header(head[4:])
            return SHB, b""
        block_type, total = struct.unpack(self._endian + "II", head)
        if total < 12 or total % 4 or total > MAX_BLOCK:
            raise CaptureFormatError(
                f"after frame {self._frame}: bad pcapng block length {total} "
                f"(block type {block_type:#x})"
            )
        rest = read_exact(self._stream, total - 8, f"pcapng block after frame {self._frame}")
        self._check_trailer(rest, total, self._endian, block_type)
        return block_type, rest[:-4]

    def __iter__(self) -> Iterator[Packet]:
        while True:
            block = self._read_block()
            if block is None:
                return
            block_type, body = block
            if block_type in (EPB, PB):
                yield self._packet(block_type, body)
            elif block_type == SPB:
                yield self._simple_packet(body)
            elif block_type == IDB:
                self._interface(body)
            elif block_type == ISB:
                self._statistics(body)

    def _interface(self, body: bytes) -> None:
        e = self._endian
        if len(body) < 8:
            raise CaptureFormatError(f"after frame {self._frame}: truncated interface block")
        linktype, _, snaplen = struct.unpack_from(e + "HHI", body)
        iface = Interface(linktype, f"interface {len(self.interfaces)}", snaplen=snaplen)
        for code, value in _parse_options(body[8:], e):
            if code == IF_NAME:
                iface.name = _text(value)
            elif code == IF_DESCRIPTION:
                iface.description = _text(value)
            elif code == IF_TSRESOL:
                iface.ticks_per_second = _ticks_per_second(value)
        self.interfaces.append(iface)

    def _lookup(self, interface: int) -> Interface:
        if interface >= len(self.interfaces):
            raise CaptureFormatError(
                f"frame {self._frame}: interface {interface} was never described "
                f"({len(self.interfaces)} interfaces in this section)"
            )
        return self.interfaces[interface]

    def _packet(self, block_type: int, body: bytes) -> Packet:
        """EPB and the obsolete PB share a layout after their first 4 bytes (see the top)."""
        e = self._endian
        self._frame += 1
        if len(body) < 20:
            raise CaptureFormatError(f"frame {self._frame}: truncated packet block")
        if block_type == EPB:
            interface, hi, lo, caplen, orig_len = struct.unpack_from(e + "IIIII", body)
        else:
            interface, _, hi, lo, caplen, orig_len = struct.unpack_from(e + "HHIIII", body)
        iface = self._lookup(interface)
        check_caplen(caplen, iface.snaplen, self._frame)
        if 20 + caplen > len(body):
            raise CaptureFormatError(f"frame {self._frame}: caplen {caplen} overruns its block")
        packet = Packet(
            ((hi << 32) | lo) * 1_000_000_000 // iface.ticks_per_second,
            body[20 : 20 + caplen],
            iface.linktype,
            interface,
            orig_len,
        )
        comments = []
        for code, value in _parse_options(body[20 + caplen + _pad(caplen) :], e):
            if code == EPB_FLAGS and len(value) == 4:
                bits = struct.unpack(e + "I", value)[0] & 3
                packet.direction = Direction(bits if bits < 3 else 0)
            elif code == OPT_COMMENT:
                comments.append(_text(value))
        packet.comment = "; ".join(comments) or None
        return packet

    def _simple_packet(self, body: bytes) -> Packet:
        """An SPB: interface 0, no timestamp, caplen implied by the block and the snaplen."""
        self._frame += 1
        if len(body) < 4:
            raise CaptureFormatError(f"frame {self._frame}: truncated simple packet block")
        iface = self._lookup(0)
        (orig_len,) = struct.unpack_from(self._endian + "I", body)
        caplen = min(orig_len, iface.snaplen or orig_len, len(body) - 4)
        return Packet(0, body[4 : 4 + caplen], iface.linktype, 0, orig_len)

    def _statistics(self, body: bytes) -> None:
        """Keep isb_ifdrop; a statistics block for an unknown interface is ignored."""
        if len(body) < 12:
            return
        (interface,) = struct.unpack_from(self._endian + "I", body)
        if interface >= len(self.interfaces):
            return
        for code, value in _parse_options(body[12:], self._endian):
            if code == ISB_IFDROP and len(value) == 8:
                (self.interfaces[interface].dropped,) = struct.unpack(self._endian + "Q", value)


_SHB_TYPE = struct.pack("<I", SHB)  # 0A 0D 0D 0A reads the same in both byte orders
_BYTE_ORDER = {struct.pack(order + "I", BYTE_ORDER_MAGIC): order for order in "<>"}
