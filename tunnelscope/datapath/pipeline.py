"""The pure-Python data path: the readable reference of docs/pipeline.md.

It is also the fallback backend where the C extension is missing. `Loop` here and
`tunnelscope.nio._fastpath.Loop` take the same decisions for the same seed and write the same
capture bytes apart from timestamps (tests/test_bridge.py runs both).
"""

from __future__ import annotations

import contextlib
import heapq
import os
import selectors
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from tunnelscope.datapath import bpf
from tunnelscope.datapath.impairments import Kind, Stage, splitmix64
from tunnelscope.formats.capture import CaptureWriter
from tunnelscope.formats.packet import Direction

BATCH = 64
PARK_NS = 100_000_000  # a reordered frame waits at most this long
A2B, B2A = 0, 1
CAPTURE_DIRECTION = {A2B: Direction.OUTBOUND, B2A: Direction.INBOUND}  # seen from endpoint A


class Endpoint(Protocol):
    counters: dict[str, int]

    def fileno(self) -> int: ...
    def recv_batch(self, max_frames: int = BATCH) -> list[bytes]: ...
    def send_batch(self, frames: list[bytes]) -> tuple[int, int]: ...


@dataclass
class Counters:
    received: int = 0
    forwarded: int = 0
    send_errors: int = 0
    corrupted: int = 0
    duplicated: int = 0
    delayed: int = 0
    reordered: int = 0
    queued: int = 0
    dropped: dict[str, int] = field(default_factory=dict)

    def as_dict(self) -> dict[str, int | dict[str, int]]:
        return dict(self.__dict__, dropped=dict(self.dropped))


class Frame:
    """A frame waiting in a direction: its bytes, when it may leave, how many to let pass."""

    __slots__ = ("data", "ready", "hold")

    def __init__(self, data: bytes, ready: int, hold: int = 0) -> None:
        self.data = data
        self.ready = ready
        self.hold = hold


class StageState:
    """One impairment's run-time state: its generator and whatever it counts or queues."""

    def __init__(self, stage: Stage, counter: list[int], filter: bpf.Program | None) -> None:
        self.stage = stage
        self.filter = filter  # a frame it rejects skips this stage (no draw, no count)
        self.rng = stage.seed
        self.counter = counter  # freq_drop: [count], possibly shared by both directions
        self.bad = False  # burst_loss: Gilbert-Elliott state
        self.tat = 0  # rate: theoretical arrival time of the next frame
        self.departures: deque[int] = deque()  # rate: departures of frames still queued

    def u53(self) -> int:
        self.rng, out = splitmix64(self.rng)
        return out >> 11

    def hit(self, threshold: int) -> bool:
        return self.u53() < threshold


class Pipeline:
    """One direction: pre tap, impairment chain, output queue, post tap."""

    def __init__(self, direction: int) -> None:
        self.direction = direction
        self.counters = Counters()
        self.stages: list[StageState] = []
        self.queue: list[tuple[int, int, Frame]] = []  # heap on (ready, sequence)
        self.parked: deque[list] = deque()  # [frame, deadline]
        self.sequence = 0

    # --- the chain -----------------------------------------------------------------------

    def run_chain(self, frame: Frame, start: int, causes: list[str]) -> list[Frame]:
        """Take every decision for one frame now; return the frames that survive."""
        counters = self.counters
        for index in range(start, len(self.stages)):
            state = self.stages[index]
            stage = state.stage
            if state.filter is not None and not bpf.run(state.filter, frame.data):
                continue
            kind, params = stage.kind, stage.params
            dropped = False
            if kind is Kind.FREQ_DROP:
                n = params[0]
                state.counter[0] += 1
                if n == -1:
                    dropped = True
                elif n >= 1 and state.counter[0] == n:
                    state.counter[0] = 0
                    dropped = True
            elif kind is Kind.PACKET_LOSS:
                dropped = state.hit(params[0])
            elif kind is Kind.BURST_LOSS:
                u = state.u53()
                if state.bad:
                    state.bad = not u < params[1]
                else:
                    state.bad = u < params[0]
                dropped = state.hit(params[2] if state.bad else params[3])
            elif kind is Kind.DELAY:
                delay, jitter = params
                before = frame.ready
                if jitter:
                    delay += ((state.u53() * (2 * jitter + 1)) >> 53) - jitter
                frame.ready = max(before, before + delay)
                counters.delayed += 1
            elif kind is Kind.RATE:
                dropped = not self._rate(state, frame)
            elif kind is Kind.CORRUPT:
                if state.hit(params[0]) and frame.data:
                    bit = (state.u53() * len(frame.data) * 8) >> 53
                    data = bytearray(frame.data)
                    data[bit >> 3] ^= 1 << (bit & 7)
                    frame.data = bytes(data)
                    counters.corrupted += 1
            elif kind is Kind.DUPLICATE:
                if state.hit(params[0]):
                    counters.duplicated += 1
                    copy = Frame(frame.data, frame.ready, frame.hold)
                    return self.run_chain(frame, index + 1, causes) + self.run_chain(
                        copy, index + 1, causes
                    )
            elif kind is Kind.REORDER:
                if state.hit(params[0]):
                    frame.hold = params[1]
                    counters.reordered += 1
            if dropped:
                counters.dropped[stage.name] = counters.dropped.get(stage.name, 0) + 1
                causes.append(stage.name)
                return []
        return [frame]

    @staticmethod
    def _rate(state: StageState, frame: Frame) -> bool:
        """Token bucket as GCRA in integer nanoseconds; False = tail drop (queue full)."""
        kbit, tau, limit = state.stage.params
        departures = state.departures
        while departures and departures[0] <= frame.ready:
            departures.popleft()
        if len(departures) >= limit:
            return False
        cost = -(-len(frame.data) * 8_000_000 // kbit)
        departure = max(frame.ready, state.tat - tau)
        state.tat = max(departure, state.tat) + cost
        departures.append(departure)
        frame.ready = departure
        return True

    # --- the output queue ----------------------------------------------------------------

    def enqueue(self, frames: list[Frame]) -> None:
        for frame in frames:
            heapq.heappush(self.queue, (frame.ready, self.sequence, frame))
            self.sequence += 1

    def release(self, now: int) -> list[bytes]:
        """Frames due at `now`, in send order (docs/pipeline.md, "Output queue")."""
        out: list[bytes] = []
        queue = self.queue
        while queue and queue[0][0] <= now:
            frame = heapq.heappop(queue)[2]
            if frame.hold > 0:
                self.parked.append([frame, now + PARK_NS])
            else:
                self._send(frame, out)
        while self.parked and self.parked[0][1] <= now:
            self._send(self.parked.popleft()[0], out)
        return out

    def _send(self, frame: Frame, out: list[bytes]) -> None:
        out.append(frame.data)
        if not self.parked:
            return
        released = []
        for entry in self.parked:
            entry[0].hold -= 1
            if entry[0].hold == 0:
                released.append(entry)
        for entry in released:
            self.parked.remove(entry)
        for entry in released:
            self._send(entry[0], out)

    def next_deadline(self) -> int | None:
        deadlines = [self.queue[0][0]] if self.queue else []
        if self.parked:
            deadlines.append(self.parked[0][1])
        return min(deadlines) if deadlines else None

    @property
    def queued(self) -> int:
        return len(self.queue) + len(self.parked)


@dataclass
class CaptureTap:
    """Where a link's frames are recorded: the capture, its pre/post interface ids, a filter."""

    writer: CaptureWriter
    pre: int  # interface id, or -1 when that point is not captured
    post: int
    filter: bpf.Program | None = None  # None: every frame

    def admit(self, data: bytes) -> bool:
        """Does this frame go into the capture? (the filter, then the sink's limits)"""
        if self.filter is not None and not bpf.run(self.filter, data):
            return False
        return self.writer.sink.admit()


class Link:
    """Two endpoints, two pipelines, any number of captures: one bridged lab link."""

    def __init__(self, a: Endpoint, b: Endpoint) -> None:
        self.ends = (a, b)
        self.pipelines = (Pipeline(A2B), Pipeline(B2A))
        self.shared: dict[int, list[int]] = {}
        self.taps: dict[int, CaptureTap] = {}  # by id, in the order they were added
        self.next_tap = 0

    def set_chain(
        self, direction: int, stages: list[Stage], filters: list[bpf.Program | None] | None = None
    ) -> None:
        states = []
        for stage, program in zip(stages, filters or [None] * len(stages)):
            if stage.shared >= 0:
                counter = self.shared[stage.shared] = [0]
                other = self.pipelines[1 - direction].stages
                for state in other:  # the other direction keeps its half of the shared counter
                    if state.stage.shared == stage.shared:
                        state.counter = counter
            else:
                counter = [0]
            states.append(StageState(stage, counter, program))
        self.pipelines[direction].stages = states

    def receive(self, direction: int, now: int | None = None) -> None:
        """One receive batch: pre tap, chain, queue, release, post tap, send.

        `now` (None: the monotonic clock, read once the batch is in, so that no frame leaves
        before its delay) is the batch's arrival time.
        """
        pipeline = self.pipelines[direction]
        frames = self.ends[direction].recv_batch(BATCH)
        if not frames:
            return
        if now is None:
            now = time.monotonic_ns()
        pipeline.counters.received += len(frames)
        taps = [tap for tap in self.taps.values() if tap.pre >= 0]
        ts = time.time_ns()
        flag = CAPTURE_DIRECTION[direction]
        for data in frames:
            chosen = [tap for tap in taps if tap.admit(data)]
            causes: list[str] = []
            pipeline.enqueue(pipeline.run_chain(Frame(data, now), 0, causes))
            comment = "dropped by " + ", ".join(causes) if causes else None
            for tap in chosen:
                tap.writer.sink.put(tap.writer.encode(tap.pre, ts, data, flag, comment))
        for tap in taps:
            tap.writer.sink.appended()
        self.transmit(direction, now)

    def transmit(self, direction: int, now: int) -> None:
        pipeline = self.pipelines[direction]
        out = pipeline.release(now)
        if not out:
            return
        ts = time.time_ns()
        flag = CAPTURE_DIRECTION[direction]
        for tap in self.taps.values():
            if tap.post >= 0:
                for data in out:
                    if tap.admit(data):
                        tap.writer.sink.put(tap.writer.encode(tap.post, ts, data, flag))
                tap.writer.sink.appended()
        sent, errors = self.ends[1 - direction].send_batch(out)
        pipeline.counters.forwarded += sent
        pipeline.counters.send_errors += errors

    def stats(self, direction: int) -> dict[str, int | dict[str, int]]:
        pipeline = self.pipelines[direction]
        pipeline.counters.queued = pipeline.queued
        stats = pipeline.counters.as_dict()
        receiver, sender = self.ends[direction], self.ends[1 - direction]
        stats["oversize"] = receiver.counters.get("oversize", 0)
        for key in ("refused", "send_busy", "send_failed"):  # about this direction's sends
            stats[key] = sender.counters.get(key, 0)
        return stats


class Loop:
    """A selectors event loop serving many bridges (the Python twin of `_fastpath.Loop`)."""

    def __init__(self) -> None:
        self.selector = selectors.DefaultSelector()
        self.bridges: dict[int, Link] = {}
        self._next_id = 0
        self._wake_r, self._wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.selector.register(self._wake_r, selectors.EVENT_READ, None)

    def add_bridge(self, a: Endpoint, b: Endpoint) -> int:
        bridge_id = self._next_id
        self._next_id += 1
        link = self.bridges[bridge_id] = Link(a, b)
        self.selector.register(a.fileno(), selectors.EVENT_READ, (link, A2B))
        self.selector.register(b.fileno(), selectors.EVENT_READ, (link, B2A))
        return bridge_id

    def remove_bridge(self, bridge_id: int) -> None:
        bridge = self.bridges.pop(bridge_id)
        for end in bridge.ends:
            self.selector.unregister(end.fileno())

    def set_chain(
        self,
        bridge_id: int,
        direction: int,
        stages: list[Stage],
        filters: list[bpf.Program | None] | None = None,
    ) -> None:
        """`filters`: per stage, a BPF program the frame must match to be impaired, or None."""
        self.bridges[bridge_id].set_chain(direction, stages, filters)

    def add_capture(
        self,
        bridge_id: int,
        writer: CaptureWriter,
        pre_interface: int,
        post_interface: int,
        filter: bpf.Program | None = None,
    ) -> int:
        """The twin of `_fastpath.Loop.add_capture`: returns the capture's id on the bridge."""
        link = self.bridges[bridge_id]
        if any(tap.writer is writer for tap in link.taps.values()):
            raise ValueError("this capture is on the bridge already")
        tap_id = link.next_tap
        link.next_tap += 1
        link.taps[tap_id] = CaptureTap(writer, pre_interface, post_interface, filter)
        return tap_id

    def remove_capture(self, bridge_id: int, capture_id: int) -> None:
        del self.bridges[bridge_id].taps[capture_id]

    def stats(self, bridge_id: int, direction: int) -> dict[str, int | dict[str, int]]:
        return self.bridges[bridge_id].stats(direction)

    def wake(self) -> None:
        with contextlib.suppress(BlockingIOError):  # a full pipe is already awake
            os.write(self._wake_w, b"\0")

    def run(self, timeout_ms: int) -> None:
        """Pump until `timeout_ms` has passed (-1: forever) or `wake()` is called."""
        end = None if timeout_ms < 0 else time.monotonic_ns() + timeout_ms * 1_000_000
        while True:
            now = time.monotonic_ns()
            self._timers(now)
            deadline = self._next_deadline(end)
            wait = None if deadline is None else max(0.0, (deadline - now) / 1e9)
            events = []
            if wait != 0 and self._unflushed():
                events = self.selector.select(0)
                if not events:  # the busy period is over: records out now, not on the timer
                    self._flush_all()
            events = events or self.selector.select(wait)
            for key, _ in events:
                if key.data is None:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                    return
                link, direction = key.data
                link.receive(direction)  # stamped once its batch is in
            if end is not None and time.monotonic_ns() >= end:
                self._timers(time.monotonic_ns())
                return

    def _timers(self, now: int) -> None:
        wall = time.monotonic()
        for bridge in self.bridges.values():
            for direction in (A2B, B2A):
                if bridge.pipelines[direction].queue or bridge.pipelines[direction].parked:
                    bridge.transmit(direction, now)
            for tap in bridge.taps.values():
                tap.writer.sink.flush_due(wall)

    def _sinks(self) -> list:
        return [tap.writer.sink for bridge in self.bridges.values() for tap in bridge.taps.values()]

    def _unflushed(self) -> bool:
        """Do records wait for their flush timer? (flush_due writes those already due)"""
        now = time.monotonic()
        return any(sink.flush_due(now) is not None and not sink.blocked for sink in self._sinks())

    def _flush_all(self) -> None:
        for sink in self._sinks():
            if not sink.blocked:
                sink.flush()

    def _next_deadline(self, end: int | None) -> int | None:
        deadlines = [] if end is None else [end]
        for bridge in self.bridges.values():
            for pipeline in bridge.pipelines:
                deadline = pipeline.next_deadline()
                if deadline is not None:
                    deadlines.append(deadline)
            for tap in bridge.taps.values():
                flush = tap.writer.sink.flush_due(time.monotonic())
                if flush is not None:
                    deadlines.append(int(flush * 1e9))  # same clock as monotonic_ns
        return min(deadlines) if deadlines else None

    def close(self) -> None:
        self.selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
