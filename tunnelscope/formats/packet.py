"""What every capture reader yields, and the errors a damaged file raises."""

from __future__ import annotations

from dataclasses import dataclass
from enum import IntEnum
from typing import BinaryIO

MAX_CAPLEN = 262144  # 256 KiB: larger records mean a damaged file, not a frame


class CaptureFormatError(Exception):
    """The file is not a readable capture (one line, shown to the user as is)."""


class Direction(IntEnum):
    """pcapng epb_flags bits 0-1 (and frame.p2p_dir in tshark)."""

    UNKNOWN = 0
    INBOUND = 1
    OUTBOUND = 2


@dataclass
class Interface:
    linktype: int
    name: str
    description: str = ""
    snaplen: int = 0  # 0: no limit
    ticks_per_second: int = 1_000_000  # timestamp resolution (pcap us/ns, pcapng if_tsresol)
    dropped: int | None = None  # isb_ifdrop of the last statistics block, if any


@dataclass(slots=True)  # one per frame read: slots make it cheaper to build and to read
class Packet:
    ts_ns: int
    data: bytes
    linktype: int
    interface: int = 0
    orig_len: int | None = None
    direction: Direction = Direction.UNKNOWN
    comment: str | None = None


def read_exact(stream: BinaryIO, size: int, what: str) -> bytes:
    """Read `size` bytes (a pipe may deliver them in pieces; BufferedReader.read waits)."""
    data = stream.read(size)
    if len(data) < size:
        raise CaptureFormatError(f"truncated {what} ({len(data)} of {size} bytes)")
    return data


def check_caplen(caplen: int, snaplen: int, frame: int) -> None:
    """Refuse a record longer than the file's snaplen or 256 KiB: the length field is garbage.

    Reading on would allocate whatever the damaged field says and lose frame sync anyway.
    A snaplen of 0 means "not set".
    """
    if caplen > MAX_CAPLEN:
        raise CaptureFormatError(
            f"frame {frame}: caplen {caplen} above the {MAX_CAPLEN}-byte limit (damaged file?)"
        )
    if snaplen and caplen > snaplen:
        raise CaptureFormatError(
            f"frame {frame}: caplen {caplen} above the snaplen {snaplen} (damaged file?)"
        )
