"""The C hot loop: the data path of tunnelscope/datapath/pipeline.py, without Python per frame.

Semantics: docs/pipeline.md. `tunnelscope.datapath.pipeline.Loop` and
`tunnelscope.formats.capture.RecordSink` are the pure-Python twins of `Loop` and `Capture`;
tests/test_bridge.py runs both on the same vectors and compares their bytes.
"""

from typing import Union

KIND_DGRAM: int  # a datagram socket (UDP, Unix, AF_PACKET): recvmmsg/sendmmsg
KIND_FD: int  # a TAP file descriptor: read/write, one frame per call
BATCH: int  # frames per recvmmsg/sendmmsg
SLOT_SIZE: int  # bytes per receive slot (65536); a longer datagram counts as `oversize`
PARK_NS: int  # a reordered frame waits at most this long (100 ms)

# (kind, cause name, integer params, generator seed, shared counter id or -1[, filter]); the
# filter, a BPF program as in add_capture (or None), restricts the stage to the frames it
# matches: the others skip it (no draw, no count)
StageTuple = Union[
    tuple[int, str, tuple[int, ...], int, int],
    tuple[int, str, tuple[int, ...], int, int, Union[list[tuple[int, int, int, int]], None]],
]

class Capture:
    """Encodes pcap/pcapng records in C and writes them once per batch, flushed on a timer.

    The twin of capture.RecordSink: records wait while the header is pending; a failed write
    cuts a regular file back to its last whole record, sets `error` and stops the capture. A
    non-blocking fd whose reader is behind (EAGAIN) keeps the rest buffered and is retried on
    the timer; past 4 MiB buffered, `error` is "reader stalled" and the capture stops.
    Ring buffers: with file limits (set_limits) the capture ends a file at a record boundary
    ("cut") and keeps buffering; `files_done` counts the finished files, which rotate() writes
    out one by one, each following file starting with the header it is given.
    """

    error: str | None  # set when a write failed; the capture has stopped, the link has not
    frames: int
    closed: bool
    header_pending: bool
    fd: int  # -1 once closed by close_fd
    flush_ms: float | None
    files_done: int  # finished ring-buffer files waiting for rotate()
    def __init__(
        self,
        fd: int,
        pcapng: bool,
        nanosecond: bool,
        snaplen: int,
        flush_ms: float | None,
        close_fd: bool = False,
    ) -> None: ...
    def set_header(self, header: bytes) -> None: ...
    def pending(self) -> bytes: ...
    def append(self, records: bytes, count: int = 1) -> None: ...
    def flush(self) -> None: ...
    def flush_due(self, now: float) -> float | None:
        """As RecordSink.flush_due (now = time.monotonic()); a Loop does this by itself."""
    def close(self) -> None: ...
    def set_limits(self, frames: int = 0, bytes: int = 0, total: int = 0) -> None:
        """A file ends before the record that would make it hold more than `frames` records,
        or once it holds `bytes` bytes or more (so it exceeds `bytes` by less than its last
        record); `total`: records taken at most, later ones are ignored (0: no limit)."""
    def cut(self) -> None:
        """End the current file: the next record starts a new one."""
    def rotate(self, fd: int, header: bytes) -> bool:
        """Write out the oldest finished file, close its fd (close_fd), continue in fd with
        header. False (nothing done) when no file is finished or the reader is behind."""
    def discard_pending(self) -> None:
        """Forget the records kept while the header is pending (to filter them again)."""

class Loop:
    """One epoll loop serving many bridges; run() releases the GIL while it pumps.

    Every method may be called from another thread while run() pumps (a mutex guards them).
    gso=True sends runs of equal-size frames to a UDP peer as one UDP_SEGMENT send: about a
    third less relay CPU per frame on loopback; receivers still get one datagram per frame,
    but a sniffer on `lo` sees the merged super-packets, hence off by default.
    """

    def __init__(self, *, gso: bool = False) -> None: ...
    def add_bridge(
        self,
        a_fd: int,
        a_kind: int,
        b_fd: int,
        b_kind: int,
        a_peer: Union[str, bytes, None] = None,
        b_peer: Union[str, bytes, None] = None,
    ) -> int:
        """Ids count from 0 and are never reused. a_peer/b_peer: the peer path of a Unix
        datagram endpoint, connected again when a send finds it gone (as UnixEndpoint does)."""
    def remove_bridge(self, bridge: int) -> None:
        """KeyError when unknown; frames still queued are discarded."""
    def set_chain(self, bridge: int, direction: int, stages: list[StageTuple]) -> None: ...
    def add_capture(
        self,
        bridge: int,
        capture: Capture,
        pre_interface: int,
        post_interface: int,
        filter: list[tuple[int, int, int, int]] | None = None,
    ) -> int:
        """Record the bridge's frames into capture: interface ids of its pre/post points (-1
        for a point not captured), a classic BPF program (tunnelscope.datapath.bpf; None: every
        frame).
        Returns the capture's id on the bridge (from 0, never reused). Any number of captures
        per bridge, each failing alone; one Capture may serve several bridges (pcapng) but not
        twice the same bridge (ValueError). ValueError for a program that could misbehave."""
    def remove_capture(self, bridge: int, capture_id: int) -> None:
        """KeyError when unknown."""
    def run(self, timeout_ms: int) -> None:
        """Pump until timeout_ms passed (-1: no limit), wake() was called, or a signal came
        (the exception of a Python signal handler propagates)."""
    def wake(self) -> None: ...
    def stats(self, bridge: int, direction: int) -> dict[str, int | dict[str, int]]:
        """received, forwarded, send_errors, corrupted, duplicated, delayed, reordered,
        queued, dropped {cause: count > 0}, and the counters of the endpoint this direction
        receives from (as pipeline.Link.stats): refused, oversize, send_busy, send_failed."""

def send_frames(fd: int, frames: list[bytes]) -> int:
    """sendmmsg in batches of BATCH; waits up to 100 ms for room when the socket is full,
    then skips a frame. Returns the number sent; OSError only when nothing could be sent
    because the socket itself is unusable (EBADF, ENOTCONN, ...)."""

def recv_frames(fd: int, max_frames: int) -> list[bytes]:
    """One non-blocking recvmmsg of up to max_frames (at most 1024) frames; [] when none."""
