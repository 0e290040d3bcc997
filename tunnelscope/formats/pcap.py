"""Classic libpcap files: 24-byte global header, then 16-byte record headers.

global header (little-endian as written here; both byte orders read)
  magic u32   A1B2C3D4 (microseconds) or A1B23C4D (nanoseconds)
  major u16 = 2, minor u16 = 4, thiszone i32 = 0, sigfigs u32 = 0
  snaplen u32, linktype u32
record header
  ts_sec u32, ts_frac u32 (us or ns), caplen u32, origlen u32, then caplen bytes
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from typing import BinaryIO

from tunnelscope.formats.packet import (
    MAX_CAPLEN,
    CaptureFormatError,
    Interface,
    Packet,
    check_caplen,
    read_exact,
)

MAGIC_US = 0xA1B2C3D4
MAGIC_NS = 0xA1B23C4D
DEFAULT_SNAPLEN = 262144

_GLOBAL = struct.Struct("<IHHiIII")
_RECORD = struct.Struct("<IIII")
_LAST_TIME = (0xFFFFFFFF, 999_999_999)  # the latest (seconds, nanoseconds) a record holds


def global_header(linktype: int, snaplen: int = DEFAULT_SNAPLEN, nanosecond: bool = False) -> bytes:
    return _GLOBAL.pack(MAGIC_NS if nanosecond else MAGIC_US, 2, 4, 0, 0, snaplen, linktype)


def record(ts_ns: int, data: bytes, orig_len: int | None = None, nanosecond: bool = False) -> bytes:
    """A record; a time past the classic format's last second (2106-02-07 06:28:15 UTC) is
    written as that second's end, as decap's C scanner writes it (pcapng holds it exactly)."""
    sec, frac = min(divmod(ts_ns, 1_000_000_000), _LAST_TIME)
    if not nanosecond:
        frac //= 1000
    length = len(data)
    return _RECORD.pack(sec, frac, length, length if orig_len is None else orig_len) + data


class PcapReader:
    """Streams records from a classic pcap file or pipe in constant memory.

    `magic_bytes` are the 4 bytes the caller already read to tell pcap from pcapng.
    """

    format = "pcap"

    def __init__(self, stream: BinaryIO, magic_bytes: bytes) -> None:
        self._stream = stream
        endian = _MAGIC_ENDIAN.get(magic_bytes)
        if endian is None:
            raise CaptureFormatError(f"bad pcap magic {magic_bytes.hex()}")
        head = magic_bytes + read_exact(stream, _GLOBAL.size - 4, "pcap file header")
        magic, major, _, _, _, self.snaplen, linktype = struct.unpack(endian + "IHHiIII", head)
        if major != 2:
            raise CaptureFormatError(f"unsupported pcap version {major}")
        self.nanosecond = magic == MAGIC_NS
        self._record = struct.Struct(endian + "IIII")
        ticks = 1_000_000_000 if self.nanosecond else 1_000_000
        # the upper 16 bits hold FCS length flags, not the link type
        self.interfaces = [Interface(linktype & 0xFFFF, "", "", self.snaplen, ticks)]

    def __iter__(self) -> Iterator[Packet]:
        unpack = self._record.unpack
        read = self._stream.read
        scale = 1 if self.nanosecond else 1000
        linktype = self.interfaces[0].linktype
        longest = min(self.snaplen or MAX_CAPLEN, MAX_CAPLEN)  # what check_caplen accepts
        frame = 0
        while True:
            header = read(_RECORD.size)
            if not header:
                return
            frame += 1
            if len(header) < _RECORD.size:
                raise CaptureFormatError(
                    f"frame {frame}: truncated record header ({len(header)} of 16 bytes)"
                )
            sec, frac, caplen, orig_len = unpack(header)
            if caplen > longest:
                check_caplen(caplen, self.snaplen, frame)
            data = read(caplen)
            if len(data) < caplen:
                raise CaptureFormatError(
                    f"frame {frame}: truncated record ({len(data)} of {caplen} bytes)"
                )
            yield Packet(sec * 1_000_000_000 + frac * scale, data, linktype, 0, orig_len)


_MAGIC_ENDIAN = {
    struct.pack(order + "I", magic): order for order in "<>" for magic in (MAGIC_US, MAGIC_NS)
}
