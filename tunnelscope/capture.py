"""Open any capture for reading; write pcap or pcapng with a flush policy for live readers.

Records are kept in memory and written to the file descriptor either after every frame or
when the oldest unwritten record is `flush_ms` old (the owner's event loop calls
`flush_due`). A write error (disk full, reader gone) stops the capture, cuts the file back to
its last whole record so it stays valid, and never stops the link.
"""

from __future__ import annotations

import contextlib
import os
import stat
import struct
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, Union

from tunnelscope import pcap, pcapng
from tunnelscope.linktype import LinkType
from tunnelscope.packet import CaptureFormatError, Direction, Interface

Reader = Union[pcap.PcapReader, pcapng.PcapngReader]


class CaptureError(Exception):
    """Writing a capture failed; the capture stops, the link does not."""


def read_capture(stream: BinaryIO) -> Reader:
    """Sniff the magic of a file or pipe and return a streaming reader."""
    magic = stream.read(4)
    if len(magic) < 4:
        raise CaptureFormatError("empty or truncated file (no capture header)")
    if magic == b"\x0a\x0d\x0d\x0a":
        return pcapng.PcapngReader(stream, magic)
    if magic in (
        b"\xd4\xc3\xb2\xa1",
        b"\xa1\xb2\xc3\xd4",
        b"\x4d\x3c\xb2\xa1",
        b"\xa1\xb2\x3c\x4d",
    ):
        return pcap.PcapReader(stream, magic)
    raise CaptureFormatError(f"not a pcap or pcapng file (magic {magic.hex()})")


@contextlib.contextmanager
def open_capture(path: str) -> Iterator[Reader]:
    """`path` may be '-' for standard input. Raises CaptureFormatError or OSError."""
    if path == "-":
        yield read_capture(sys.stdin.buffer)
        return
    with open(path, "rb", buffering=1 << 20) as stream:
        yield read_capture(stream)


@dataclass
class Format:
    """How a capture is written: container, timestamp precision, flush policy."""

    pcapng: bool = False
    nanosecond: bool = False  # classic pcap only; pcapng always writes nanoseconds
    flush_ms: float | None = None  # None: write after every frame
    snaplen: int = pcap.DEFAULT_SNAPLEN

    @classmethod
    def for_path(cls, path: str, pcapng_default: bool = False, **kwargs: object) -> Format:
        lower = path.lower()
        if lower.endswith((".pcapng", ".ntar")):
            use_ng = True
        elif lower.endswith((".pcap", ".cap", ".dmp")):
            use_ng = False
        else:
            use_ng = pcapng_default
        return cls(pcapng=use_ng, **kwargs)  # type: ignore[arg-type]


class RecordSink:
    """Buffers encoded records and writes them to a file descriptor with a flush policy.

    Until `set_header` is called the header is pending: records are kept (so a file never
    starts with a wrong link type) and `pending()` lets the owner look at them to detect the
    link type. A write error never raises: it stops the sink and sets `error`, so a failing
    capture cannot take a link down. `_fastpath.Capture` is the C twin of this class.
    """

    def __init__(self, fd: int, flush_ms: float | None = None, close_fd: bool = False) -> None:
        self.fd = fd
        self.flush_ms = flush_ms  # None: write after every frame
        self.error: str | None = None
        self.frames = 0
        self.closed = False
        self._close_fd = close_fd
        self._header: bytes | None = None
        self._buffer = bytearray()
        self._oldest_unflushed: float | None = None
        self._offset = 0
        self._seekable = _is_regular(fd)

    @property
    def header_pending(self) -> bool:
        return self._header is None

    def pending(self) -> bytes:
        """Records buffered while the header is pending."""
        return bytes(self._buffer) if self._header is None else b""

    def set_header(self, header: bytes) -> None:
        """Write the header (or, later, more header blocks such as a new IDB) in stream order."""
        if self._header is None:
            self._header = header
            self._buffer[:0] = header
            self.flush()
        else:
            self.append(header, 0)

    def append(self, records: bytes, count: int = 1) -> None:
        if self.closed:
            return
        self._buffer += records
        self.frames += count
        if self._oldest_unflushed is None:
            self._oldest_unflushed = time.monotonic()
        if self.flush_ms is None or len(self._buffer) >= 1 << 20:
            self.flush()

    def flush_due(self, now: float) -> float | None:
        """Flush if the oldest record waited flush_ms; return when to call again (or None)."""
        if self._oldest_unflushed is None or self.closed:
            return None
        deadline = self._oldest_unflushed + (self.flush_ms or 0) / 1000
        if now >= deadline:
            self.flush()
            return None
        return deadline

    def flush(self) -> None:
        if self.closed or self._header is None or not self._buffer:
            return
        data = bytes(self._buffer)
        self._buffer.clear()
        self._oldest_unflushed = None
        view = memoryview(data)
        try:
            while view:
                view = view[os.write(self.fd, view) :]
        except OSError as exc:
            if self._seekable:  # cut the half-written batch so the file ends on a record
                with contextlib.suppress(OSError):
                    os.ftruncate(self.fd, self._offset)
            self.error = f"capture stopped: {exc.strerror}"
            self._release()
            return
        self._offset += len(data)

    def close(self) -> None:
        if not self.closed:
            self.flush()
            self._release()

    def _release(self) -> None:
        self.closed = True
        self._buffer.clear()
        if self._close_fd:
            with contextlib.suppress(OSError):
                os.close(self.fd)


class CaptureWriter:
    """A capture file being written: its interfaces, its header, its records.

    Interfaces are declared first; one whose link type is None ("auto") holds the header back
    until `set_linktype` names it. Records go to a sink: a `RecordSink`, or the C loop's
    `Capture`, which encodes records itself byte for byte like `encode` below.
    """

    def __init__(self, sink: RecordSink, fmt: Format) -> None:
        self.sink = sink
        self.format = fmt
        self.interfaces: list[Interface] = []
        self._unknown: set[int] = set()  # interfaces whose link type is not known yet
        self._announced = 0  # interfaces whose header block went to the sink

    @classmethod
    def open(cls, path: str, fmt: Format) -> CaptureWriter:
        """Open a path for writing ('-' is standard output). Raises CaptureError."""
        if path == "-":
            return cls(RecordSink(sys.stdout.fileno(), fmt.flush_ms), fmt)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise CaptureError(f"cannot write {path}: {exc.strerror}") from None
        return cls(RecordSink(fd, fmt.flush_ms, close_fd=True), fmt)

    def add_interface(self, linktype: int | None, name: str, description: str = "") -> int:
        """Declare a link; None means "detect it", and holds the header back until known."""
        if not self.format.pcapng and self.interfaces:
            raise CaptureError("a pcap file holds one link; use pcapng for several")
        index = len(self.interfaces)
        self.interfaces.append(Interface(linktype or 0, name, description, self.format.snaplen))
        if linktype is None:
            if self._announced:
                raise CaptureError("an auto-detected link must be declared before writing starts")
            self._unknown.add(index)
        return index

    @property
    def linktype_pending(self) -> bool:
        return bool(self._unknown)

    def set_linktype(self, interface: int, linktype: int) -> None:
        self.interfaces[interface].linktype = linktype
        self._unknown.discard(interface)
        self.announce()

    def announce(self) -> None:
        """Give the sink the header blocks of interfaces it has not seen, once all are known.

        Called on the first write; the C loop's owner calls it once the interfaces are declared.
        """
        if self._unknown or self._announced == len(self.interfaces):
            return
        fmt = self.format
        new = self.interfaces[self._announced :]
        if fmt.pcapng:
            head = pcapng.section_header() if self._announced == 0 else b""
            head += b"".join(
                pcapng.interface_description(i.linktype, i.name, i.description, fmt.snaplen)
                for i in new
            )
        else:
            head = pcap.global_header(new[0].linktype, fmt.snaplen, fmt.nanosecond)
        self._announced = len(self.interfaces)
        self.sink.set_header(head)

    def encode(
        self,
        interface: int,
        ts_ns: int,
        data: bytes,
        direction: Direction = Direction.UNKNOWN,
        comment: str | None = None,
    ) -> bytes:
        fmt = self.format
        caplen = min(len(data), fmt.snaplen)
        if fmt.pcapng:
            return pcapng.enhanced_packet(
                interface, ts_ns, data[:caplen], len(data), direction, comment
            )
        return pcap.record(ts_ns, data[:caplen], len(data), fmt.nanosecond)

    def write(
        self,
        interface: int,
        ts_ns: int,
        data: bytes,
        direction: Direction = Direction.UNKNOWN,
        comment: str | None = None,
    ) -> None:
        """Write one frame; raises CaptureError once the sink has failed."""
        if self._announced < len(self.interfaces):
            self.announce()
        self.sink.append(self.encode(interface, ts_ns, data, direction, comment))
        if self.sink.error:
            raise CaptureError(self.sink.error)

    def write_statistics(self, interface: int, ts_ns: int, dropped: int, comment: str = "") -> None:
        if self.format.pcapng:
            self.sink.append(pcapng.interface_statistics(interface, ts_ns, dropped, comment), 0)

    def close(self) -> None:
        """Flush and close; an interface still "auto" is written as its best guess (Ethernet)."""
        for interface in sorted(self._unknown):
            self.set_linktype(interface, self.interfaces[interface].linktype or LinkType.ETHERNET)
        self.announce()
        self.sink.close()
        if self.sink.error:
            raise CaptureError(self.sink.error)


def _is_regular(fd: int) -> bool:
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        return False


def record_payloads(records: bytes, pcapng_records: bool) -> list[bytes]:
    """Frame bytes of encoded records (a sink's pending buffer), for link-type detection."""
    frames = []
    offset = 0
    while offset + 16 <= len(records):
        if pcapng_records:
            block_type, total = struct.unpack_from("<II", records, offset)
            if block_type == pcapng.EPB:
                caplen = struct.unpack_from("<I", records, offset + 20)[0]
                frames.append(records[offset + 28 : offset + 28 + caplen])
            offset += total
        else:
            caplen = struct.unpack_from("<I", records, offset + 8)[0]
            frames.append(records[offset + 16 : offset + 16 + caplen])
            offset += 16 + caplen
    return frames
