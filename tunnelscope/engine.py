"""Links on one event loop: the library API under `tunnelscope bridge` (and lab mode).

An `Engine` owns one loop (the C fast path when it is built, else the Python reference) and
any number of `Link`s. A link is two endpoints, its impairments, and at most one capture.
Everything per frame happens inside the loop; the engine only does per-link chores between
loop runs: committing an auto-detected link type, reporting a failed capture.
"""

from __future__ import annotations

import functools
import os
import sys
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, TypeVar

from tunnelscope import pipeline
from tunnelscope.capture import CaptureError, CaptureWriter, Format, RecordSink, record_payloads
from tunnelscope.detect import LinkTypeDetector
from tunnelscope.impairments import Impairment, chains
from tunnelscope.linktype import LinkType
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

    def set_chain(self, bridge: int, direction: int, stages: list) -> None:
        self.loop.set_chain(bridge, direction, stages)

    def new_sink(self, fd: int, fmt: Format) -> RecordSink:
        return RecordSink(fd, fmt.flush_ms, close_fd=True)

    def set_capture(self, bridge: int, writer: CaptureWriter | None, pre: int, post: int) -> None:
        tap = pipeline.CaptureTap(writer, pre, post) if writer else None
        self.loop.set_capture(bridge, tap)

    def __getattr__(self, name: str) -> Any:  # run, wake, stats, remove_bridge
        return getattr(self.loop, name)


class _CLoop:
    """Adapts `_fastpath.Loop`, which takes file descriptors and plain tuples."""

    def __init__(self) -> None:
        self.loop = _fastpath.Loop()

    def add(self, a: Endpoint, b: Endpoint) -> int:
        peers = {  # a Unix datagram peer that restarts is reconnected by the C loop
            "a_peer": getattr(a, "remote_path", None),
            "b_peer": getattr(b, "remote_path", None),
        }
        return self.loop.add_bridge(a.fileno(), a.kind, b.fileno(), b.kind, **peers)

    def set_chain(self, bridge: int, direction: int, stages: list) -> None:
        self.loop.set_chain(bridge, direction, [stage.as_tuple() for stage in stages])

    def new_sink(self, fd: int, fmt: Format) -> Any:
        return _fastpath.Capture(fd, fmt.pcapng, fmt.nanosecond, fmt.snaplen, fmt.flush_ms, True)

    def set_capture(self, bridge: int, writer: CaptureWriter | None, pre: int, post: int) -> None:
        self.loop.set_capture(bridge, writer.sink if writer else None, pre, post)

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
    detector: LinkTypeDetector | None = None  # while the link type is being detected
    error: str | None = None


def on_loop_thread(method: Callable[..., T]) -> Callable[..., T]:
    """Run a Link method on the thread that pumps the loop (the C loop has no locks)."""

    @functools.wraps(method)
    def call(self: Link, *args: Any, **kwargs: Any) -> T:
        return self.engine.call(method, self, *args, **kwargs)

    return call


class Link:
    """A bridged lab link: endpoints a and b, impairments per direction, one capture."""

    def __init__(self, engine: Engine, name: str, a: Endpoint, b: Endpoint, seed: int) -> None:
        self.engine = engine
        self.name = name
        self.ends = (a, b)
        self.seed = seed
        self.impairments: list[Impairment] = []
        self.capture: CaptureState | None = None
        self.linktype: LinkType | None = None  # the encapsulation, when known
        self.id = engine.call(engine.loop.add, a, b)

    @on_loop_thread
    def set_impairments(self, impairments: list[Impairment]) -> None:
        """Replace every impairment; counters (freq_drop's) restart at 0, as in dynamips."""
        compiled = chains(impairments, self.seed)
        self.engine.loop.set_chain(self.id, pipeline.A2B, compiled["a2b"])
        self.engine.loop.set_chain(self.id, pipeline.B2A, compiled["b2a"])
        self.impairments = list(impairments)

    @on_loop_thread
    def start_capture(
        self,
        path: str,
        linktype: LinkType | None = None,
        points: str = "pre",
        fmt: Format | None = None,
    ) -> None:
        """Capture to `path` ('-': stdout); linktype None detects it from the first frames."""
        if self.capture:
            raise CaptureError(f"{self.name}: already capturing to {self.capture.path}")
        if points not in CAPTURE_POINTS:
            raise CaptureError(f"capture point must be one of {', '.join(CAPTURE_POINTS)}")
        fmt = fmt or Format.for_path(path, flush_ms=10)
        if points == "both" and not fmt.pcapng:
            raise CaptureError("capturing at both points needs pcapng (a .pcapng file or --pcapng)")
        fd = _open_output(path)
        writer = CaptureWriter(self.engine.loop.new_sink(fd, fmt), fmt)
        linktype = linktype or self.linktype
        description = f"{self.ends[0].spec} <-> {self.ends[1].spec}"
        pre = post = -1
        if points in ("pre", "both"):
            label = f"{self.name} pre" if points == "both" else self.name
            pre = writer.add_interface(linktype, label, description)
        if points in ("post", "both"):
            label = f"{self.name} post" if points == "both" else self.name
            post = writer.add_interface(linktype, label, description)
        writer.announce()
        detector = LinkTypeDetector() if linktype is None else None
        self.capture = CaptureState(path, writer, points, time.monotonic(), detector)
        self.engine.loop.set_capture(self.id, writer, pre, post)

    @on_loop_thread
    def stop_capture(self) -> CaptureState | None:
        """Close the capture (statistics blocks with drop counts included); the link goes on."""
        state = self.capture
        if state is None:
            return None
        self.engine.loop.set_capture(self.id, None, -1, -1)
        self.capture = None
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
        if self.capture:
            result["capture"] = {
                "path": self.capture.path,
                "frames": self.capture.writer.sink.frames,
            }
        return result

    def _dropped_by_cause(self) -> dict[str, int]:
        total: dict[str, int] = {}
        for direction in (pipeline.A2B, pipeline.B2A):
            for cause, n in self.engine.loop.stats(self.id, direction)["dropped"].items():
                total[cause] = total.get(cause, 0) + n
        return total

    def chores(self) -> str | None:
        """Between loop runs: detect the link type, notice a failed capture. Returns news."""
        state = self.capture
        if state is None:
            return None
        if state.detector:
            self._commit_linktype(state)
        if state.writer.sink.error:
            self.stop_capture()
            state.error = state.writer.sink.error
            return f"{self.name}: {state.error}; the link keeps forwarding"
        return None

    def _commit_linktype(self, state: CaptureState, final: bool = False) -> None:
        detector = state.detector
        assert detector is not None
        frames = record_payloads(state.writer.sink.pending(), state.writer.format.pcapng)
        for data in frames[detector.result().frames :]:
            detector.feed(data)
        waited = time.monotonic() - state.started
        result = detector.result()
        enough = detector.decided or result.frames >= DETECT_MAX_FRAMES
        if final or enough or (result.frames and waited > DETECT_MAX_SECONDS):
            self.linktype = result.linktype
            for index in range(len(state.writer.interfaces)):
                state.writer.set_linktype(index, result.linktype)
            state.detector = None

    @on_loop_thread
    def close(self) -> None:
        self.stop_capture()
        self.engine.loop.remove_bridge(self.id)
        for end in self.ends:
            end.close()


class Engine:
    """One event loop and its links."""

    def __init__(self, backend: str = "auto") -> None:
        self.backend = choose_backend(backend)
        self.loop: Any = _CLoop() if self.backend == "c" else _PythonLoop()
        self.links: dict[str, Link] = {}
        self.stopping = False
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

    def add_link(self, name: str, a_spec: str, b_spec: str, seed: int | None = None) -> Link:
        """Open both endpoints (EndpointError on failure, nothing left open) and bridge them."""
        if name in self.links:
            raise ValueError(f"a link named {name!r} exists already")
        a = open_endpoint(a_spec)
        try:
            b = open_endpoint(b_spec)
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
            waits = [0.1 if self._detecting() else 1.0]
            if duration is not None:
                waits.append(start + duration - now)
            if next_tick is not None:
                waits.append(next_tick - now)
            self.loop.run(max(0, int(min(waits) * 1000)))
            self._run_calls()
            for link in list(self.links.values()):
                news = link.chores()
                if news and on_news:
                    on_news(news)
            if every and next_tick is not None and time.monotonic() >= next_tick:
                next_tick += every
                if on_tick:
                    on_tick()

    def _detecting(self) -> bool:
        return any(link.capture and link.capture.detector for link in self.links.values())

    def stop(self) -> None:
        """Safe from a signal handler or another thread."""
        self.stopping = True
        self.loop.wake()

    def close(self) -> None:
        for link in list(self.links.values()):
            link.close()
        self.links.clear()
        self.loop.close()


def _open_output(path: str) -> int:
    if path == "-":
        return os.dup(sys.stdout.fileno())
    try:
        return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
    except OSError as exc:
        raise CaptureError(f"cannot write {path}: {exc.strerror}") from None
