"""Open any capture for reading; write pcap or pcapng with a flush policy for live readers.

Records are kept in memory and written to the file descriptor either after every frame or
when the oldest unwritten record is `flush_ms` old (the owner's event loop calls
`flush_due`). A write error (disk full, reader gone) stops the capture, cuts the file back to
its last whole record so it stays valid, and never stops the link. A non-blocking reader that
falls behind (EAGAIN) gets the rest later, up to STALL_BYTES buffered ("reader stalled").
Ring buffers: a sink given file limits ends a file at a record boundary ("cut") and carries on
buffering; its owner opens the next file and calls `rotate` between loop runs.
"""

from __future__ import annotations

import contextlib
import errno
import math
import os
import stat
import struct
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO, Union

from tunnelscope.formats import pcap, pcapng
from tunnelscope.formats.linktype import LinkType
from tunnelscope.formats.packet import CaptureFormatError, Direction, Interface

Reader = Union[pcap.PcapReader, pcapng.PcapngReader]
STALL_BYTES = 4 << 20  # a non-blocking reader this far behind has stalled
RETRY_S = 0.010  # a blocked (EAGAIN) sink is retried this often
FLUSH_BYTES = 1 << 20
_RING_KEYS = ("filesize", "duration", "files", "packets")


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


@dataclass
class Ring:
    """dumpcap's ring buffer (-b) and autostop (-a, -c) conditions; 0 means "no limit".

    Sizes are in kB of 1000 bytes, as dumpcap counts them.
    """

    filesize_kb: int = 0
    duration: float = 0
    files: int = 0  # keep this many files, deleting the oldest
    packets: int = 0
    stop_frames: int = 0
    stop_duration: float = 0
    stop_filesize_kb: int = 0
    stop_files: int = 0

    @classmethod
    def parse(cls, ring: tuple[str, ...], autostop: tuple[str, ...], count: int = 0) -> Ring:
        """dumpcap's `-b KEY:VALUE` (filesize, duration, files, packets), `-a KEY:VALUE`
        (duration, filesize, files, packets) and `-c N`. Raises ValueError."""
        result = cls(stop_frames=count)
        for options, prefix, flag in ((ring, "", "-b"), (autostop, "stop_", "-a")):
            for option in options:
                key, _, value = option.partition(":")
                name = prefix + {"filesize": "filesize_kb", "packets": "packets"}.get(key, key)
                if name == "stop_packets":
                    name = "stop_frames"
                kind = float if key == "duration" else int
                if name not in cls.__dataclass_fields__ or key not in _RING_KEYS:
                    raise ValueError(f"{flag} {option}: use {'|'.join(_RING_KEYS)}:VALUE")
                try:
                    number = kind(value)
                except ValueError:
                    number = -1
                if not (number > 0 and math.isfinite(number)):  # nan passes `<= 0`
                    raise ValueError(f"{flag} {option}: the value must be a number > 0")
                setattr(result, name, number)
        if result.stop_frames < 0:
            raise ValueError("-c: the count must be > 0")
        return result

    @property
    def splits(self) -> bool:
        """Does the capture go to several files?"""
        return bool(self.filesize_kb or self.duration or self.packets)

    def limits(self) -> tuple[int, int, int]:
        """A sink's (frames, bytes, total) limits."""
        sizes = [kb * 1000 for kb in (self.filesize_kb, self.stop_filesize_kb) if kb]
        return self.packets, min(sizes, default=0), self.stop_frames


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
        self.blocked = False  # the last write met EAGAIN
        self._close_fd = close_fd
        self._header: bytes | None = None
        self._buffer = bytearray()
        self._oldest_unflushed: float | None = None
        self._offset = 0
        self._seekable = _is_regular(fd)
        self._limits = (0, 0, 0)  # frames per file, bytes per file, frames in all (0: none)
        self._file_frames = 0  # records in the open (last) file
        self._written = 0  # bytes of the current file already written
        self._cuts: list[int] = []  # offsets in the buffer where a finished file ends
        self._cut_frames: list[int] = []  # `frames` when each of those files ended
        self._frames_out = 0  # frames whose records are all written: what a write error leaves

    @property
    def header_pending(self) -> bool:
        return self._header is None

    @property
    def files_done(self) -> int:
        """Full files waiting for `rotate`."""
        return len(self._cuts)

    def pending(self) -> bytes:
        """Records buffered while the header is pending."""
        return bytes(self._buffer) if self._header is None else b""

    def discard_pending(self) -> None:
        if self._header is None and not self.closed:
            self.frames -= min(self._file_frames, self.frames)
            self._buffer.clear()
            self._cuts.clear()
            self._cut_frames.clear()
            self._file_frames = 0
            self._oldest_unflushed = None

    def set_header(self, header: bytes) -> None:
        """Write the header (or, later, more header blocks such as a new IDB) in stream order."""
        if self._header is None:
            self._header = header
            self._buffer[:0] = header
            self._cuts = [cut + len(header) for cut in self._cuts]
            self.flush()
        else:
            self.append(header, 0)

    def set_limits(self, frames: int = 0, bytes: int = 0, total: int = 0) -> None:
        """Ring-buffer limits of each file and the autostop frame count (0: no limit)."""
        self._limits = (frames, bytes, total)

    def cut(self) -> None:
        """End the current file here: the next record starts a new one."""
        if not self.closed:
            self._cuts.append(len(self._buffer))
            self._cut_frames.append(self.frames)
            self._file_frames = 0

    def admit(self) -> bool:
        """May one more record be taken? Ends a full file first. The loop calls it per record."""
        frames, size, total = self._limits
        if self.closed or (total and self.frames >= total):
            return False
        if (frames and self._file_frames >= frames) or (
            size and self._file_frames and self._file_bytes() >= size
        ):
            self.cut()
        self._file_frames += 1
        self.frames += 1
        return True

    def _file_bytes(self) -> int:
        if self._cuts:
            return len(self._header or b"") + len(self._buffer) - self._cuts[-1]
        return self._written + len(self._buffer)

    def put(self, record: bytes) -> None:
        """Buffer a record `admit` let in."""
        self._buffer += record

    def append(self, records: bytes, count: int = 1) -> None:
        if self.closed:
            return
        self._buffer += records
        self.frames += count
        self.appended()

    def appended(self) -> None:
        """After a batch: the flush policy."""
        if self.closed:
            return
        if self._oldest_unflushed is None:
            self._oldest_unflushed = time.monotonic()
        if (self.flush_ms is None and not self.blocked) or self._head() >= FLUSH_BYTES:
            self.flush()

    def _head(self) -> int:
        return self._cuts[0] if self._cuts else len(self._buffer)

    def flush_due(self, now: float) -> float | None:
        """Flush if the oldest record waited flush_ms; return when to call again (or None)."""
        if self._oldest_unflushed is None or self.closed or not self._head():
            return None
        delay = (self.flush_ms or 0) / 1000
        deadline = self._oldest_unflushed + (max(delay, RETRY_S) if self.blocked else delay)
        if now >= deadline:
            self.flush()
            return None
        return deadline

    def flush(self) -> None:
        head = self._head()
        if self.closed or self._header is None or not head:
            return
        done = 0
        self.blocked = False
        try:
            with memoryview(self._buffer) as view:
                while done < head:
                    done += os.write(self.fd, view[done:head])
        except BlockingIOError:
            self.blocked = True
        except OSError as exc:
            if self._seekable:  # cut the half-written batch so the file ends on a record
                with contextlib.suppress(OSError):
                    os.ftruncate(self.fd, self._offset)
            self.error = f"capture stopped: {exc.strerror}"
            self.frames = self._frames_out  # what the file holds, not what was offered
            self._release()
            return
        if done == head:
            self._frames_out = self._cut_frames[0] if self._cut_frames else self.frames
        self._offset += done
        self._written += done
        del self._buffer[:done]
        self._cuts = [cut - done for cut in self._cuts]
        if self.blocked and len(self._buffer) > STALL_BYTES:
            self.error = "reader stalled"
            self.frames = self._frames_out
            self._release()
            return
        self._oldest_unflushed = time.monotonic() if self._buffer else None

    def rotate(self, fd: int, header: bytes) -> bool:
        """Finish the oldest full file and go on in `fd`, which starts with `header`."""
        if self.closed or self._header is None or not self._cuts:
            return False
        self.flush()
        if self.closed or self.blocked:
            return False
        if self._close_fd:
            with contextlib.suppress(OSError):
                os.close(self.fd)
        self.fd = fd
        self._seekable = _is_regular(fd)
        self._offset = self._written = 0
        self._cuts.pop(0)
        self._cut_frames.pop(0)
        self._buffer[:0] = header
        self._cuts = [cut + len(header) for cut in self._cuts]
        self.appended()
        return True

    def close(self) -> None:
        if not self.closed:
            self.flush()
            self._release()

    def _release(self) -> None:
        self.closed = True
        self._buffer.clear()
        self._cuts.clear()
        self._cut_frames.clear()
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
        head = self._header_blocks(self._announced)
        self._announced = len(self.interfaces)
        self.sink.set_header(head)

    def header(self) -> bytes:
        """The whole header again, for the next file of a ring buffer."""
        return self._header_blocks(0)

    def _header_blocks(self, first: int) -> bytes:
        fmt = self.format
        new = self.interfaces[first:]
        if not fmt.pcapng:
            return pcap.global_header(new[0].linktype, fmt.snaplen, fmt.nanosecond)
        head = pcapng.section_header() if first == 0 else b""
        return head + b"".join(
            pcapng.interface_description(i.linktype, i.name, i.description, fmt.snaplen)
            for i in new
        )

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


def open_beneath(root: str, path: str) -> int:
    """Create or truncate capture file `path` without leaving directory `root`, for writing.

    A name checked first and opened later can be swapped for a symbolic link in between, so
    the file is opened relative to a descriptor of `root`, one component at a time, following
    no symbolic link (O_NOFOLLOW) and refusing `..`; then what was opened is checked: a
    regular file with no other hard link, truncated only after that check. O_NONBLOCK keeps a
    FIFO planted under the name from blocking the open. Raises CaptureError.
    """
    parts = os.path.relpath(path, root).split(os.sep)
    if parts[0] in ("", ".", "..") or ".." in parts:
        raise CaptureError(f"cannot write {path}: outside {root}")
    directory = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    part = parts[0]
    try:
        for part in parts[:-1]:
            step = os.open(part, _BENEATH_DIR, dir_fd=directory)
            os.close(directory)
            directory = step
        part = parts[-1]
        fd = os.open(part, _BENEATH_FILE, 0o644, dir_fd=directory)
    except OSError as exc:
        reason = _NOT_OWN_FILE if exc.errno == errno.ENXIO else exc.strerror  # a FIFO
        with contextlib.suppress(OSError):
            if stat.S_ISLNK(os.stat(part, dir_fd=directory, follow_symlinks=False).st_mode):
                reason = "symbolic links are not followed"
        raise CaptureError(f"cannot write {path}: {reason}") from None
    finally:
        os.close(directory)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        raise CaptureError(f"cannot write {path}: {_NOT_OWN_FILE}")
    os.ftruncate(fd, 0)
    return fd


_NOT_OWN_FILE = "not a regular file of its own"
_BENEATH_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
_BENEATH_FILE = os.O_WRONLY | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


def _is_regular(fd: int) -> bool:
    try:
        return stat.S_ISREG(os.fstat(fd).st_mode)
    except OSError:
        return False


def split_records(records: bytes, pcapng_records: bool) -> list[tuple[bytes, bytes]]:
    """(record, frame bytes) of encoded records (a sink's pending buffer); pcapng blocks other
    than packets are skipped."""
    out = []
    offset = 0
    while offset + 16 <= len(records):
        if pcapng_records:
            block_type, total = struct.unpack_from("<II", records, offset)
            if block_type == pcapng.EPB:
                caplen = struct.unpack_from("<I", records, offset + 20)[0]
                data = records[offset + 28 : offset + 28 + caplen]
                out.append((records[offset : offset + total], data))
            offset += total
        else:
            caplen = struct.unpack_from("<I", records, offset + 8)[0]
            end = offset + 16 + caplen
            out.append((records[offset:end], records[offset + 16 : end]))
            offset = end
    return out


def record_payloads(records: bytes, pcapng_records: bool) -> list[bytes]:
    """Frame bytes of encoded records (a sink's pending buffer), for link-type detection."""
    return [data for _, data in split_records(records, pcapng_records)]
