"""Links on one event loop: the library API under `tunnelscope bridge` (and lab mode).

An `Engine` owns one loop (the C fast path when it is built, else the Python reference) and
any number of `Link`s. A link is two endpoints, its impairments, and any number of captures
(a file, live streams to remote readers, ...), each with its own format, filter and fate.
Everything per frame happens inside the loop; the engine only does per-link chores between
loop runs: committing an auto-detected link type (and compiling the filters that need it),
rotating ring-buffer files, autostop, reporting a failed capture.
"""

from __future__ import annotations

import contextlib
import errno
import functools
import os
import select
import stat
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, TypeVar

from tunnelscope.datapath import bpf, pipeline
from tunnelscope.datapath.impairments import Impairment, ImpairmentError, chains, parse_impairment
from tunnelscope.decoders.detect import LinkTypeDetector
from tunnelscope.formats.capture import (
    CaptureError,
    CaptureWriter,
    Format,
    RecordSink,
    Ring,
    open_beneath,
    record_payloads,
    split_records,
)
from tunnelscope.formats.linktype import LinkType
from tunnelscope.nio import Endpoint, open_endpoint

try:
    from tunnelscope.nio import _fastpath
except ImportError:  # no compiler at install time, or not Linux
    _fastpath = None  # type: ignore[assignment]

CAPTURE_POINTS = ("pre", "post", "both")
CALL_TIMEOUT = 10.0
T = TypeVar("T")
DETECT_MAX_FRAMES = 32  # commit the best guess after this many frames
DETECT_MAX_SECONDS = 2.0


def available_backends() -> list[str]:
    return (["c"] if _fastpath is not None else []) + ["python"]


def choose_backend(requested: str = "auto") -> str:
    """'auto' (or $TUNNELSCOPE_BACKEND) picks C when built; asking for a missing one is an error."""
    if requested == "auto":
        requested = os.environ.get("TUNNELSCOPE_BACKEND", "auto")
    if requested == "auto":
        return available_backends()[0]
    if requested not in ("c", "python"):
        raise ValueError(f"unknown backend {requested!r} (use c or python)")
    if requested not in available_backends():
        raise ValueError("the C backend is not built here (no compiler at install time?)")
    return requested


class _PythonLoop:
    """Adapts the reference loop to the engine's calls."""

    def __init__(self) -> None:
        self.loop = pipeline.Loop()

    def add(self, a: Endpoint, b: Endpoint) -> int:
        return self.loop.add_bridge(a, b)

    def set_chain(self, bridge: int, direction: int, stages: list, filters: list) -> None:
        self.loop.set_chain(bridge, direction, stages, filters)

    def new_sink(self, fd: int, fmt: Format) -> RecordSink:
        return RecordSink(fd, fmt.flush_ms, close_fd=True)

    def add_capture(
        self, bridge: int, writer: CaptureWriter, pre: int, post: int, program: bpf.Program | None
    ) -> int:
        return self.loop.add_capture(bridge, writer, pre, post, program)

    def __getattr__(self, name: str) -> Any:  # run, wake, stats, remove_bridge, remove_capture
        return getattr(self.loop, name)


class _CLoop:
    """Adapts `_fastpath.Loop`, which takes file descriptors and plain tuples."""

    def __init__(self, gso: bool = False) -> None:
        self.loop = _fastpath.Loop(gso=gso)

    def add(self, a: Endpoint, b: Endpoint) -> int:
        peers = {  # a Unix datagram peer that restarts is reconnected by the C loop
            "a_peer": getattr(a, "remote_path", None),
            "b_peer": getattr(b, "remote_path", None),
        }
        return self.loop.add_bridge(a.fileno(), a.kind, b.fileno(), b.kind, **peers)

    def set_chain(self, bridge: int, direction: int, stages: list, filters: list) -> None:
        tuples = [(*s.as_tuple(), program) for s, program in zip(stages, filters)]
        self.loop.set_chain(bridge, direction, tuples)

    def new_sink(self, fd: int, fmt: Format) -> Any:
        return _fastpath.Capture(fd, fmt.pcapng, fmt.nanosecond, fmt.snaplen, fmt.flush_ms, True)

    def add_capture(
        self, bridge: int, writer: CaptureWriter, pre: int, post: int, program: bpf.Program | None
    ) -> int:
        return self.loop.add_capture(bridge, writer.sink, pre, post, program)

    def close(self) -> None:
        pass

    def __getattr__(self, name: str) -> Any:
        return getattr(self.loop, name)


@dataclass
class CaptureState:
    path: str
    writer: CaptureWriter
    points: str
    started: float
    id: int = 0
    detector: LinkTypeDetector | None = None  # while the link type is being detected
    error: str | None = None
    filter: str | None = None
    ring: Ring | None = None
    tap: int = -1  # the loop's id of this capture on the bridge
    files: list[str] = field(default_factory=list)  # ring buffer: files kept, oldest first
    file_started: float = 0.0
    file_index: int = 1
    autostopped: bool = False
    fifo: bool = False  # a named pipe: each new reader gets a fresh header
    beneath: str | None = None  # the directory every file of this capture must stay in
    program: bpf.Program | None = None

    @property
    def frames(self) -> int:
        return self.writer.sink.frames


_DETACHED = CaptureWriter(RecordSink(-1), Format())  # a CaptureState's writer until plugged


def on_loop_thread(method: Callable[..., T]) -> Callable[..., T]:
    """Run a Link method on the thread that pumps the loop (the C loop has no locks)."""

    @functools.wraps(method)
    def call(self: Link, *args: Any, **kwargs: Any) -> T:
        return self.engine.call(method, self, *args, **kwargs)

    return call


class Link:
    """A bridged lab link: endpoints a and b, impairments per direction, its captures."""

    def __init__(self, engine: Engine, name: str, a: Endpoint, b: Endpoint, seed: int) -> None:
        self.engine = engine
        self.name = name
        self.ends = (a, b)
        self.seed = seed
        self.impairments: list[Impairment] = []
        self.conditions: list[str | None] = []  # per impairment: "if EXPR", or None
        self.captures: list[CaptureState] = []
        self.primary: CaptureState | None = None  # the file capture start_capture made first
        self.finished: CaptureState | None = None  # the last primary capture, once stopped
        self.linktype: LinkType | None = None  # the encapsulation, when known
        self.compiled_for: LinkType | None = None  # what the impairments' filters assume
        self._next_capture = 0
        self.id = engine.call(engine.loop.add, a, b)

    @property
    def capture(self) -> CaptureState | None:
        """The primary file capture (what `stop_capture()` without argument stops)."""
        return self.primary

    @on_loop_thread
    def set_impairments(
        self,
        impairments: list[Impairment],
        conditions: list[str | None] | None = None,
        assume: LinkType | None = None,
    ) -> None:
        """Replace every impairment; counters (freq_drop's) restart at 0, as in dynamips.

        `conditions`: per impairment, a tcpdump expression a frame must match to be impaired
        (None: every frame). Conditions and `bpf` expressions are compiled for the link type;
        while it is unknown, for `assume` (else it is an error), and again once a capture has
        detected it.
        """
        conditions = conditions or [None] * len(impairments)
        linktype = self.linktype or assume
        programs = [self._condition(i, text, linktype) for i, text in zip(impairments, conditions)]
        compiled = chains(impairments, self.seed)
        for direction, key in ((pipeline.A2B, "a2b"), (pipeline.B2A, "b2a")):
            filters = [
                program
                for impairment, program in zip(impairments, programs)
                if impairment.direction in (key, "both")
            ]
            self.engine.loop.set_chain(self.id, direction, compiled[key], filters)
        self.impairments = list(impairments)
        self.conditions = list(conditions)
        self.compiled_for = linktype if any(p is not None for p in programs) else None

    def _condition(
        self, impairment: Impairment, condition: str | None, linktype: LinkType | None
    ) -> bpf.Program | None:
        parts = [text for text in (impairment.expression, condition) if text is not None]
        if not parts:
            return None
        expression = " and ".join(f"({text})" for text in parts) if len(parts) > 1 else parts[0]
        if linktype is None:
            raise ImpairmentError(f"{expression!r} needs the link type (give --linktype)")
        try:
            return bpf.compile_filter(expression, int(linktype))
        except bpf.FilterError as exc:
            raise ImpairmentError(str(exc)) from None

    @on_loop_thread
    def start_capture(
        self,
        path: str,
        linktype: LinkType | None = None,
        points: str = "pre",
        fmt: Format | None = None,
        filter: str | None = None,
        ring: Ring | None = None,
        beneath: str | None = None,
    ) -> CaptureState:
        """Capture to `path` ('-': stdout); linktype None detects it from the first frames.

        `filter` is a tcpdump expression (compiled for the link type); `ring` splits the
        capture into files named like dumpcap's and stops it by dumpcap's autostop rules.
        `beneath` confines every file to that directory (a path a remote client named): see
        `open_beneath`; FIFOs are then refused like any other non-regular file.
        """
        if self.primary:
            raise CaptureError(f"{self.name}: already capturing to {self.primary.path}")
        fmt = fmt or Format.for_path(path, flush_ms=10)
        ring = ring if ring and (ring.splits or ring.limits() != (0, 0, 0)) else None
        first = _ring_path(path, 1) if ring and ring.splits else path
        fifo = beneath is None and _is_fifo(path)
        fd = _open_fifo(path) if fifo else _open_output(first, beneath)
        state = self._attach(first, fd, fmt, points, filter, linktype, ring)
        state.path, state.fifo, state.beneath = path, fifo, beneath
        if ring and ring.splits:
            state.files.append(first)
        self.primary = state
        return state

    @on_loop_thread
    def attach_fd(
        self,
        fd: int,
        fmt: Format,
        points: str = "pre",
        filter: str | None = None,
        linktype: LinkType | None = None,
    ) -> CaptureState:
        """Capture to an open fd (a client socket, a FIFO, a pipe), closed when it stops.

        A non-blocking fd whose reader falls behind keeps up to 4 MiB buffered, then the
        capture stops with error "reader stalled"; the link never waits for it.
        """
        try:
            return self._attach(f"fd:{fd}", fd, fmt, points, filter, linktype, None)
        except Exception:
            os.close(fd)
            raise

    def _attach(
        self,
        path: str,
        fd: int,
        fmt: Format,
        points: str,
        filter: str | None,
        linktype: LinkType | None,
        ring: Ring | None,
    ) -> CaptureState:
        """A new capture on this link, writing to fd (closed on error or when it stops)."""
        try:
            if points not in CAPTURE_POINTS:
                raise CaptureError(f"capture point must be one of {', '.join(CAPTURE_POINTS)}")
            if points == "both" and not fmt.pcapng:
                raise CaptureError(
                    "capturing at both points needs pcapng (a .pcapng file or --pcapng)"
                )
            linktype = linktype or self.linktype
            program = None if filter is None or linktype is None else _compile(filter, linktype)
        except CaptureError:
            os.close(fd)
            raise
        now = time.monotonic()
        detector = LinkTypeDetector() if linktype is None else None
        state = CaptureState(path, _DETACHED, points, now, self._next_capture, detector)
        state.filter, state.ring, state.file_started, state.program = filter, ring, now, program
        self._plug(state, fd, fmt, linktype)
        self._next_capture += 1
        self.captures.append(state)
        return state

    def _plug(self, state: CaptureState, fd: int, fmt: Format, linktype: LinkType | None) -> None:
        """Give a capture a new writer on fd (with its own header) and put it on the loop."""
        sink = self.engine.loop.new_sink(fd, fmt)
        if state.ring:
            sink.set_limits(*state.ring.limits())
        writer = CaptureWriter(sink, fmt)
        description = f"{self.ends[0].spec} <-> {self.ends[1].spec}"
        pre = post = -1
        if state.points in ("pre", "both"):
            label = f"{self.name} pre" if state.points == "both" else self.name
            pre = writer.add_interface(linktype, label, description)
        if state.points in ("post", "both"):
            label = f"{self.name} post" if state.points == "both" else self.name
            post = writer.add_interface(linktype, label, description)
        writer.announce()
        state.writer = writer
        state.tap = self.engine.loop.add_capture(self.id, writer, pre, post, state.program)

    def _next_reader(self, state: CaptureState) -> None:
        """A FIFO's reader left: when another one opens it, start over with a fresh header."""
        try:
            fd = os.open(state.path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except OSError:  # ENXIO: nobody reads yet; tried again after the next loop run
            return
        self.engine.loop.remove_capture(self.id, state.tap)
        linktype = None if state.detector else LinkType(state.writer.interfaces[0].linktype)
        self._plug(state, fd, state.writer.format, linktype)

    @on_loop_thread
    def stop_capture(self, state: CaptureState | None = None) -> CaptureState | None:
        """Close a capture (None: the primary one) with its statistics blocks; the link goes on."""
        state = state or self.primary
        if state is None or state not in self.captures:
            return None
        self._rotate(state)  # files already full go out complete
        self.engine.loop.remove_capture(self.id, state.tap)
        self.captures.remove(state)
        if state is self.primary:
            self.primary, self.finished = None, state
        if state.detector:
            self._commit_linktype(state, final=True)
        dropped = self._dropped_by_cause()
        comment = " ".join(f"{cause}={n}" for cause, n in sorted(dropped.items()))
        now = time.time_ns()
        for index in range(len(state.writer.interfaces)):
            state.writer.write_statistics(index, now, sum(dropped.values()), comment)
        try:
            state.writer.close()
        except CaptureError as exc:
            state.error = state.error or str(exc)
        return state

    @on_loop_thread
    def stats(self) -> dict[str, Any]:
        result: dict[str, Any] = {
            "a2b": self.engine.loop.stats(self.id, pipeline.A2B),
            "b2a": self.engine.loop.stats(self.id, pipeline.B2A),
        }
        if self.primary:
            result["capture"] = {"path": self.primary.path, "frames": self.primary.frames}
        result["captures"] = [
            {"id": c.id, "path": c.path, "frames": c.frames, "error": c.error}
            for c in self.captures
        ]
        return result

    def _dropped_by_cause(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for direction in (pipeline.A2B, pipeline.B2A):
            for cause, n in self.engine.loop.stats(self.id, direction)["dropped"].items():
                total[cause] = total.get(cause, 0) + n
        return total

    def chores(self) -> list[str]:
        """Between loop runs: detect the link type, rotate files, autostop, notice a failed
        capture. Returns news for the user."""
        news = []
        for state in list(self.captures):
            if state.detector:
                self._commit_linktype(state)
            if state.ring and not state.writer.sink.error:
                self._ring_chores(state)
            sink = state.writer.sink
            if state.fifo and (sink.closed or _reader_left(sink.fd)):
                sink.close()  # (its reader is gone: nothing more to write)
                self._next_reader(state)
            elif state.autostopped:
                self.stop_capture(state)
                self.engine.stopping = self.engine.stopping or self.engine.stop_on_autostop
                news.append(f"{self.name}: capture {state.path} done ({state.frames} frames)")
            elif state.writer.sink.error:
                state.error = state.writer.sink.error
                self.stop_capture(state)
                news.append(f"{self.name}: {state.error}; the link keeps forwarding")
        return news

    def _ring_chores(self, state: CaptureState) -> None:
        ring = state.ring
        assert ring is not None
        now = time.monotonic()
        if ring.duration and now - state.file_started >= ring.duration:
            state.writer.sink.cut()
            state.file_started = now
        self._rotate(state)
        stop_frames = ring.stop_frames and state.frames >= ring.stop_frames
        stop_time = ring.stop_duration and now - state.started >= ring.stop_duration
        if stop_frames or stop_time:
            state.autostopped = True

    def _rotate(self, state: CaptureState) -> None:
        """Finish the files the sink has cut: open the next one, delete beyond `files:N`."""
        ring, sink = state.ring, state.writer.sink
        while ring and sink.files_done and not state.autostopped:
            finished = state.files[-1] if state.files else state.path
            sink.flush()  # the finished file goes out whole
            if (
                ring.stop_files
                and len(state.files) >= ring.stop_files
                or (ring.stop_filesize_kb and _size(finished) >= ring.stop_filesize_kb * 1000)
            ):
                state.autostopped = True
                return
            state.file_index += 1
            path = _ring_path(state.path, state.file_index)
            fd = _open_output(path, state.beneath)
            if not sink.rotate(fd, state.writer.header()):
                os.close(fd)
                os.unlink(path)
                return
            state.files.append(path)
            while ring.files and len(state.files) > ring.files:
                with contextlib.suppress(OSError):
                    os.unlink(state.files.pop(0))

    def _commit_linktype(self, state: CaptureState, final: bool = False) -> None:
        detector = state.detector
        assert detector is not None
        writer = state.writer
        frames = record_payloads(writer.sink.pending(), writer.format.pcapng)
        for data in frames[detector.result().frames :]:
            detector.feed(data)
        waited = time.monotonic() - state.started
        result = detector.result()
        enough = detector.decided or result.frames >= DETECT_MAX_FRAMES
        if final or enough or (result.frames and waited > DETECT_MAX_SECONDS):
            self.linktype = result.linktype
            if self.compiled_for not in (None, self.linktype):  # filters assumed another type
                self.set_impairments(self.impairments, self.conditions)
            if state.filter is not None:
                self._filter_late(state, result.linktype)
            for index in range(len(writer.interfaces)):
                writer.set_linktype(index, result.linktype)
            state.detector = None

    def _filter_late(self, state: CaptureState, linktype: LinkType) -> None:
        """The link type is known: filter what waited for it, and what comes next."""
        assert state.filter is not None
        program = _compile(state.filter, linktype)
        writer, sink = state.writer, state.writer.sink
        kept = [
            record
            for record, data in split_records(sink.pending(), writer.format.pcapng)
            if bpf.run(program, data)
        ]
        sink.discard_pending()
        self.engine.loop.remove_capture(self.id, state.tap)
        pre = 0 if state.points in ("pre", "both") else -1
        post = (1 if pre == 0 else 0) if state.points in ("post", "both") else -1
        state.tap = self.engine.loop.add_capture(self.id, writer, pre, post, program)
        if kept:
            sink.append(b"".join(kept), len(kept))

    @on_loop_thread
    def close(self) -> None:
        for state in list(self.captures):
            self.stop_capture(state)
        self.engine.loop.remove_bridge(self.id)
        for end in self.ends:
            end.close()


class Engine:
    """One event loop and its links."""

    def __init__(self, backend: str = "auto", gso: bool = False) -> None:
        """`gso`: send runs of equal-size UDP frames as one UDP_SEGMENT send (C backend only:
        ValueError with the Python one). Up to a third less CPU per frame; receivers still get
        one datagram per frame, but a sniffer on `lo` sees the merged super-packets."""
        self.backend = choose_backend(backend)
        if gso and self.backend != "c":
            raise ValueError("gso needs the C backend (the python backend has no UDP GSO)")
        self.gso = gso
        self.loop: Any = _CLoop(gso) if self.backend == "c" else _PythonLoop()
        self.links: dict[str, Link] = {}
        self.stopping = False
        self.stop_on_autostop = False  # `tunnelscope bridge -c/-a`: the bridge ends with them
        self._runner: int | None = None  # thread id of run(), while it runs
        self._calls: deque[tuple[Callable[..., Any], tuple, dict, Future]] = deque()

    def call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Call fn on the loop's thread: at once if that is us or nobody runs the loop."""
        if self._runner is None or self._runner == threading.get_ident():
            return fn(*args, **kwargs)
        future: Future = Future()
        self._calls.append((fn, args, kwargs, future))
        self.loop.wake()
        return future.result(CALL_TIMEOUT)

    def _run_calls(self) -> None:
        while self._calls:
            fn, args, kwargs, future = self._calls.popleft()
            try:
                future.set_result(fn(*args, **kwargs))
            except Exception as exc:  # handed to the caller's thread
                future.set_exception(exc)

    def add_link(
        self, name: str, a_spec: str | Endpoint, b_spec: str | Endpoint, seed: int | None = None
    ) -> Link:
        """Open both endpoints (EndpointError on failure, nothing left open) and bridge them;
        an Endpoint given open is the link's from then on (it closes it)."""
        if name in self.links:
            raise ValueError(f"a link named {name!r} exists already")
        a = a_spec if isinstance(a_spec, Endpoint) else open_endpoint(a_spec)
        try:
            b = b_spec if isinstance(b_spec, Endpoint) else open_endpoint(b_spec)
        except Exception:
            a.close()
            raise
        seed = int.from_bytes(os.urandom(4), "little") if seed is None else seed
        link = self.links[name] = Link(self, name, a, b, seed)
        return link

    def remove_link(self, name: str) -> None:
        """Close a link's capture and endpoints and take it off the loop."""
        self.links.pop(name).close()

    def rename_link(self, name: str, new: str) -> None:
        if new in self.links:
            raise ValueError(f"a link named {new!r} exists already")
        link = self.links[new] = self.links.pop(name)
        link.name = new

    def run(
        self,
        duration: float | None = None,
        every: float | None = None,
        on_tick: Callable[[], None] | None = None,
        on_news: Callable[[str], None] | None = None,
    ) -> None:
        """Pump until stop() (or `duration` seconds); call on_tick every `every` seconds."""
        start = time.monotonic()
        next_tick = start + every if every else None
        self._runner = threading.get_ident()
        try:
            self._pump(start, duration, every, next_tick, on_tick, on_news)
        finally:
            self._runner = None
            self._run_calls()

    def _pump(
        self,
        start: float,
        duration: float | None,
        every: float | None,
        next_tick: float | None,
        on_tick: Callable[[], None] | None,
        on_news: Callable[[str], None] | None,
    ) -> None:
        while not self.stopping:
            now = time.monotonic()
            if duration is not None and now - start >= duration:
                break
            waits = [0.1 if self._busy() else 1.0]
            if duration is not None:
                waits.append(start + duration - now)
            if next_tick is not None:
                waits.append(next_tick - now)
            self.loop.run(max(0, int(min(waits) * 1000)))
            self._run_calls()
            for link in list(self.links.values()):
                for news in link.chores():
                    if on_news:
                        on_news(news)
            if every and next_tick is not None and time.monotonic() >= next_tick:
                next_tick += every
                if on_tick:
                    on_tick()

    def _busy(self) -> bool:
        """Detecting a link type, a ring buffer or a FIFO to watch: chores every 100 ms."""
        return any(
            state.detector or state.ring or state.fifo
            for link in self.links.values()
            for state in link.captures
        )

    def stop(self) -> None:
        """Safe from a signal handler or another thread."""
        self.stopping = True
        self.loop.wake()

    def close(self) -> None:
        for link in list(self.links.values()):
            link.close()
        self.links.clear()
        self.loop.close()


def _open_output(path: str, beneath: str | None = None) -> int:
    if path == "-":
        return os.dup(sys.stdout.fileno())
    if beneath is not None:
        return open_beneath(beneath, path)
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise CaptureError(f"cannot write {path}: {exc.strerror}") from None


def _compile(expression: str, linktype: LinkType) -> bpf.Program:
    try:
        return bpf.compile_filter(expression, int(linktype))
    except bpf.FilterError as exc:
        raise CaptureError(str(exc)) from None


def _ring_path(path: str, index: int) -> str:
    """dumpcap's ring-buffer names: r.pcapng -> r_00001_20261122093000.pcapng."""
    base, ext = os.path.splitext(path)
    return f"{base}_{index:05d}_{time.strftime('%Y%m%d%H%M%S')}{ext}"


def _size(path: str) -> int:
    try:
        return os.path.getsize(path)
    except OSError:
        return 0


def _is_fifo(path: str) -> bool:
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode)
    except OSError:
        return False


def _reader_left(fd: int) -> bool:
    """A pipe's write end whose readers all closed (POLLERR), noticed without writing."""
    if fd < 0:
        return False
    poller = select.poll()
    poller.register(fd, 0)
    return any(events & select.POLLERR for _, events in poller.poll(0))


def _open_fifo(path: str) -> int:
    """A FIFO opened without waiting: with no reader yet, a pipe nobody reads, so the first
    write fails and the capture waits for a reader as when one leaves."""
    try:
        return os.open(path, os.O_WRONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno != errno.ENXIO:
            raise CaptureError(f"cannot write {path}: {exc.strerror}") from None
    read_end, write_end = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    os.close(read_end)
    return write_end


def parse_conditional(text: str) -> tuple[Impairment, str | None]:
    """An impairment with an optional condition: "a2b packet_loss 100 if icmp"."""
    words = text.split()
    if "if" not in words:
        return parse_impairment(text), None
    at = words.index("if")
    if at == len(words) - 1:
        raise ImpairmentError(f"{text!r}: a filter expression must follow 'if'")
    return parse_impairment(" ".join(words[:at])), " ".join(words[at + 1 :])
