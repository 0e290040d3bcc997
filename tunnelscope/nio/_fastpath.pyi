"""The C hot loop: the same data path as tunnelscope/pipeline.py, without Python per frame.

Semantics: docs/pipeline.md. `tunnelscope.pipeline.Loop` and `tunnelscope.capture.RecordSink`
are the pure-Python twins of `Loop` and `Capture`; tests/test_parity.py holds them equal.
"""

from typing import Union

KIND_DGRAM: int  # a datagram socket (UDP, Unix, AF_PACKET): recvmmsg/sendmmsg
KIND_FD: int  # a TAP file descriptor: read/write, one frame per call
BATCH: int  # frames per recvmmsg/sendmmsg
SLOT_SIZE: int  # bytes per receive slot (65536); a longer datagram counts as `oversize`
PARK_NS: int  # a reordered frame waits at most this long (100 ms)

# (kind, cause name, integer params, generator seed, shared counter id or -1)
StageTuple = tuple[int, str, tuple[int, ...], int, int]

class Capture:
    """Encodes pcap/pcapng records in C and writes them once per batch, flushed on a timer.

    The twin of capture.RecordSink: records wait while the header is pending; a failed write
    cuts a regular file back to its last whole record, sets `error` and stops the capture.
    """

    error: str | None  # set when a write failed; the capture has stopped, the link has not
    frames: int
    closed: bool
    header_pending: bool
    fd: int  # -1 once closed by close_fd
    flush_ms: float | None
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
    def set_capture(
        self, bridge: int, capture: Capture | None, pre_interface: int, post_interface: int
    ) -> None:
        """Interface ids of the capture's pre/post points; -1 for a point not captured."""
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
