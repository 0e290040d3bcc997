"""The pure-Python data path: the readable reference of docs/pipeline.md.

It is also the fallback backend where the C extension is missing. `Loop` here and
`tunnelscope.nio._fastpath.Loop` take the same decisions for the same seed and write the same
capture bytes apart from timestamps (tests/test_parity.py).
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

from tunnelscope.capture import CaptureWriter
from tunnelscope.impairments import Kind, Stage, splitmix64
from tunnelscope.packet import Direction

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

    def __init__(self, stage: Stage, counter: list[int]) -> None:
        self.stage = stage
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
    """Where a link's frames are recorded: the capture and its pre/post interface ids."""

    writer: CaptureWriter
    pre: int  # interface id, or -1 when that point is not captured
    post: int


class Link:
    """Two endpoints, two pipelines, an optional capture: one bridged lab link."""

    def __init__(self, a: Endpoint, b: Endpoint) -> None:
        self.ends = (a, b)
        self.pipelines = (Pipeline(A2B), Pipeline(B2A))
        self.shared: dict[int, list[int]] = {}
        self.capture: CaptureTap | None = None

    def set_chain(self, direction: int, stages: list[Stage]) -> None:
        states = []
        for stage in stages:
            if stage.shared >= 0:
                counter = self.shared[stage.shared] = [0]
                other = self.pipelines[1 - direction].stages
                for state in other:  # the other direction keeps its half of the shared counter
                    if state.stage.shared == stage.shared:
                        state.counter = counter
            else:
                counter = [0]
            states.append(StageState(stage, counter))
        self.pipelines[direction].stages = states

    def receive(self, direction: int, now: int) -> None:
        """One receive batch: pre tap, chain, queue, release, post tap, send."""
        pipeline = self.pipelines[direction]
        frames = self.ends[direction].recv_batch(BATCH)
        if not frames:
            return
        pipeline.counters.received += len(frames)
        tap = self.capture if self.capture and self.capture.pre >= 0 else None
        records = []
        ts = time.time_ns()
        for data in frames:
            causes: list[str] = []
            pipeline.enqueue(pipeline.run_chain(Frame(data, now), 0, causes))
            if tap:
                comment = "dropped by " + ", ".join(causes) if causes else None
                flag = CAPTURE_DIRECTION[direction]
                records.append(tap.writer.encode(tap.pre, ts, data, flag, comment))
        if tap:
            tap.writer.sink.append(b"".join(records), len(records))
        self.transmit(direction, now)

    def transmit(self, direction: int, now: int) -> None:
        pipeline = self.pipelines[direction]
        out = pipeline.release(now)
        if not out:
            return
        capture = self.capture
        if capture and capture.post >= 0:
            ts = time.time_ns()
            flag = CAPTURE_DIRECTION[direction]
            records = [capture.writer.encode(capture.post, ts, data, flag) for data in out]
            capture.writer.sink.append(b"".join(records), len(records))
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

    def set_chain(self, bridge_id: int, direction: int, stages: list[Stage]) -> None:
        self.bridges[bridge_id].set_chain(direction, stages)

    def set_capture(self, bridge_id: int, capture: CaptureTap | None) -> None:
        self.bridges[bridge_id].capture = capture

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
            for key, _ in self.selector.select(wait):
                if key.data is None:
                    with contextlib.suppress(BlockingIOError):
                        os.read(self._wake_r, 4096)
                    return
                link, direction = key.data
                link.receive(direction, time.monotonic_ns())
            if end is not None and time.monotonic_ns() >= end:
                self._timers(time.monotonic_ns())
                return

    def _timers(self, now: int) -> None:
        wall = time.monotonic()
        for bridge in self.bridges.values():
            for direction in (A2B, B2A):
                if bridge.pipelines[direction].queue or bridge.pipelines[direction].parked:
                    bridge.transmit(direction, now)
            if bridge.capture:
                bridge.capture.writer.sink.flush_due(wall)

    def _next_deadline(self, end: int | None) -> int | None:
        deadlines = [] if end is None else [end]
        for bridge in self.bridges.values():
            for pipeline in bridge.pipelines:
                deadline = pipeline.next_deadline()
                if deadline is not None:
                    deadlines.append(deadline)
            if bridge.capture:
                flush = bridge.capture.writer.sink.flush_due(time.monotonic())
                if flush is not None:
                    deadlines.append(int(flush * 1e9))  # same clock as monotonic_ns
        return min(deadlines) if deadlines else None

    def close(self) -> None:
        self.selector.close()
        os.close(self._wake_r)
        os.close(self._wake_w)
