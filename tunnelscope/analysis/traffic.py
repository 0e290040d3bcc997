"""Sequence-numbered test traffic: frames, a paced blaster, loss accounting, probe statistics.

Every test frame tunnelscope sends (`blast`, `probe`, benchmarks/relay.py) is built here. It is
an L2 frame, exactly as a lab node would put it in a tunnel, whose payload starts with the
probe header (big-endian):

    offset  size  field
    0       4     magic 0x54535031 ("TSP1")
    4       4     stream id: random per run, so runs and senders never mix
    8       8     sequence number, from 0
    16      8     send time, ns since the epoch (CLOCK_REALTIME: both ends share the host clock)
    24      4     CRC-32 (zlib) of the padding, continued over bytes 0..23
    28      ...   padding up to the frame size: bytes 0, 1, ... 255, 0, 1, ...

The CRC covers the padding first so that a sender adds only 24 bytes of work per frame to a
per-size constant. It covers the probe payload only: L2 and IP headers change on routed paths.

Framings (`Framing.kind`): "ethernet" (raw, local-experimental ethertype 0x88B5, for switched
paths), "ipv4" (IPv4/UDP over Ethernet, for routed paths), and IPv4/UDP over "hdlc" (Cisco
HDLC), "ppp" (PPP in HDLC-like framing) or "fr" (Frame Relay, Cisco encapsulation, one DLCI)
for serial paths. The IPv4/UDP headers are built with scapy once per run; the UDP checksum is
0 (allowed for IPv4; per-frame checksums would cost more than the frame).

Accounting (`SequenceTracker`, one definition for sink and probe), per received frame:
  duplicated  its sequence number had arrived before
  reordered   not a duplicate, and lower than the highest sequence number seen before it (a
              frame the bridge's `reorder` held arrives after a later one: the two counts agree)
  lost        a sequence number that never arrived; runs of them are the loss bursts
  corrupted   a probe of this stream whose CRC fails (its sequence number cannot be trusted,
              so it also counts as lost); a single flipped bit in the magic or stream id still
              marks the frame as ours
  foreign     anything else (lab chatter such as ARP or CDP, other streams)
"""

from __future__ import annotations

import gc
import ipaddress
import math
import os
import re
import select
import struct
import threading
import time
import zlib
from array import array
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from statistics import NormalDist
from typing import Any

from tunnelscope.decoders import decode
from tunnelscope.decoders.base import Decoded
from tunnelscope.decoders.wireshark import DissectError, Dissectors, headline, protocol_column
from tunnelscope.formats.capture import open_capture
from tunnelscope.formats.linktype import LinkType
from tunnelscope.nio import KIND_DGRAM, Endpoint

try:
    from tunnelscope.nio import _fastpath
except ImportError:  # no compiler at install time: the endpoints' own batch methods
    _fastpath = None  # type: ignore[assignment]

MAGIC = 0x54535031
ETHERTYPE_PROBE = 0x88B5  # IEEE 802 local experimental ethertype 1
ETHERTYPE_IPV4 = 0x0800
PPP_IPV4 = 0x0021
HEADER = struct.Struct("!IIQQI")
_FIELDS = struct.Struct("!IIQQ")  # the part the CRC covers
_PATTERN = bytes(range(256)) * 257  # longer than any UDP payload
MAX_FRAME = 65507  # the largest UDP payload over IPv4
BATCH = 64  # frames per send or receive call
FRAMINGS = ("ethernet", "ipv4", "hdlc", "ppp", "fr")


# --- frames ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Framing:
    """What surrounds the probe payload: the link layer and, except raw Ethernet, IPv4/UDP."""

    kind: str = "ethernet"
    src_mac: str = "02:00:00:00:00:01"
    dst_mac: str = "02:00:00:00:00:02"
    src_ip: str = "10.0.0.1"
    dst_ip: str = "10.0.0.2"
    sport: int = 40000
    dport: int = 40000
    ttl: int = 64
    dlci: int = 100

    def __post_init__(self) -> None:
        if self.kind not in FRAMINGS:
            raise ValueError(f"unknown framing {self.kind!r} (use one of {', '.join(FRAMINGS)})")
        for name in ("src_mac", "dst_mac"):
            _mac_bytes(getattr(self, name), name.replace("_", " "))
        for name in ("src_ip", "dst_ip"):
            try:
                ipaddress.IPv4Address(getattr(self, name))
            except ValueError:
                what = name.replace("_", " ")
                raise ValueError(f"{what} {getattr(self, name)!r} is not an IPv4 address") from None
        for name in ("sport", "dport"):
            if not 0 <= getattr(self, name) <= 65535:
                raise ValueError(f"{name} {getattr(self, name)} is out of range 0..65535")
        if not 1 <= self.ttl <= 255:
            raise ValueError(f"ttl {self.ttl} is out of range 1..255")
        if not 0 <= self.dlci <= 1023:
            raise ValueError(f"dlci {self.dlci} is out of range 0..1023")

    @property
    def linktype(self) -> LinkType:
        return {"hdlc": LinkType.C_HDLC, "ppp": LinkType.PPP_SERIAL, "fr": LinkType.FRELAY}.get(
            self.kind, LinkType.ETHERNET
        )

    @property
    def offset(self) -> int:
        """Where the probe header starts in the frame."""
        return len(self._link_header()) + (0 if self.kind == "ethernet" else 28)

    @property
    def min_size(self) -> int:
        return self.offset + HEADER.size

    def prefix(self, size: int) -> bytes:
        """Everything before the probe header in a frame of `size` bytes."""
        if self.kind == "ethernet":
            return self._link_header()
        from scapy.layers.inet import IP, UDP  # slow to import; only IPv4 framings need it

        length = size - len(self._link_header())
        packet = IP(src=self.src_ip, dst=self.dst_ip, ttl=self.ttl, id=0, flags="DF") / UDP(
            sport=self.sport, dport=self.dport, chksum=0
        )
        packet = packet / bytes(length - 28)
        return self._link_header() + bytes(packet)[:28]

    def _link_header(self) -> bytes:
        if self.kind in ("ethernet", "ipv4"):
            ethertype = ETHERTYPE_PROBE if self.kind == "ethernet" else ETHERTYPE_IPV4
            return (
                _mac_bytes(self.dst_mac, "dst mac")
                + _mac_bytes(self.src_mac, "src mac")
                + ethertype.to_bytes(2, "big")
            )
        if self.kind == "hdlc":
            return bytes((0x0F, 0x00)) + ETHERTYPE_IPV4.to_bytes(2, "big")
        if self.kind == "ppp":
            return bytes((0xFF, 0x03)) + PPP_IPV4.to_bytes(2, "big")
        # Q.922 address (C/R 0, FECN/BECN/DE 0), then Cisco encapsulation's ethertype
        address = bytes(((self.dlci >> 4) << 2, ((self.dlci & 0x0F) << 4) | 0x01))
        return address + ETHERTYPE_IPV4.to_bytes(2, "big")


def _mac_bytes(text: str, what: str) -> bytes:
    parts = text.replace("-", ":").split(":")
    if len(parts) != 6 or not all(re.fullmatch(r"[0-9A-Fa-f]{1,2}", p) for p in parts):
        raise ValueError(f"{what} {text!r} is not a MAC address (aa:bb:cc:dd:ee:ff)")
    return bytes(int(p, 16) for p in parts)


def new_stream_id() -> int:
    return int.from_bytes(os.urandom(4), "big")


class FrameFactory:
    """One stream's frames of one size: a constant prefix and padding, a patched header."""

    def __init__(self, framing: Framing, size: int | None = None, stream: int | None = None):
        size = max(64, framing.min_size) if size is None else size
        if not framing.min_size <= size <= MAX_FRAME:
            raise ValueError(
                f"frame size {size} is out of range {framing.min_size}..{MAX_FRAME} for "
                f"{framing.kind} framing"
            )
        self.framing = framing
        self.size = size
        self.stream = new_stream_id() if stream is None else stream
        self.prefix = framing.prefix(size)
        self.padding = _PATTERN[: size - len(self.prefix) - HEADER.size]
        self._padding_crc = zlib.crc32(self.padding)

    def frames(self, first: int, count: int, send_ns: int) -> list[bytes]:
        """Frames `first` .. `first + count - 1`, all stamped `send_ns` (one batch)."""
        pack, crc32, start = _FIELDS.pack, zlib.crc32, self._padding_crc
        prefix, padding, stream = self.prefix, self.padding, self.stream
        out = []
        for seq in range(first, first + count):
            fields = pack(MAGIC, stream, seq, send_ns)
            out.append(b"".join((prefix, fields, crc32(fields, start).to_bytes(4, "big"), padding)))
        return out


class FrameDecoder:
    """Sorts received frames into intact probes, corrupted probes and foreign frames.

    `offset` None finds the header at any framing's offset and `stream` None follows the first
    intact probe's stream (how `sink` needs no framing options).
    """

    def __init__(self, offset: int | None = None, stream: int | None = None) -> None:
        self.offset = offset
        self.stream = stream
        self.corrupted = 0
        self.foreign = 0
        self._paddings: dict[int, tuple[bytes, int]] = {}

    def decode(self, frames: Iterable[bytes]) -> list[tuple[int, int]]:
        """(sequence number, send time ns) of every intact probe of the stream."""
        out = []
        offset, stream, unpack = self.offset, self.stream, HEADER.unpack_from
        for frame in frames:
            if offset is None or stream is None:
                if not self._lock(frame):
                    self.foreign += 1
                    continue
                offset, stream = self.offset, self.stream
            try:
                magic, got_stream, seq, send_ns, crc = unpack(frame, offset)
            except struct.error:
                self.foreign += 1
                continue
            if magic != MAGIC or got_stream != stream:
                if _bits(magic ^ MAGIC) + _bits(got_stream ^ stream) == 1:
                    self.corrupted += 1  # one flipped bit: ours, damaged
                else:
                    self.foreign += 1
            elif self._intact(frame, offset, crc):
                out.append((seq, send_ns))
            else:
                self.corrupted += 1
        return out

    def _intact(self, frame: bytes, offset: int, crc: int) -> bool:
        length = len(frame) - offset - HEADER.size
        known = self._paddings.get(length)
        if known is None:
            padding = _PATTERN[:length]
            known = self._paddings[length] = (padding, zlib.crc32(padding))
        if not frame.endswith(known[0]):
            return False
        return zlib.crc32(frame[offset : offset + _FIELDS.size], known[1]) == crc

    def _lock(self, frame: bytes) -> bool:
        offsets = [self.offset] if self.offset is not None else _OFFSETS
        for offset in offsets:
            if len(frame) < offset + HEADER.size:
                continue
            magic, stream, _, _, crc = HEADER.unpack_from(frame, offset)
            if (
                magic == MAGIC
                and self.stream in (None, stream)
                and self._intact(frame, offset, crc)
            ):
                self.offset, self.stream = offset, stream
                return True
        return False


def _bits(value: int) -> int:
    return bin(value).count("1")


_OFFSETS = sorted({Framing(kind).offset for kind in FRAMINGS})


# --- accounting --------------------------------------------------------------------------


class Arrival(IntEnum):
    IN_ORDER = 0  # higher than every sequence number before it
    REORDERED = 1
    DUPLICATE = 2
    LATE = 3  # older than the window: cannot tell, counted as lost


class SequenceTracker:
    """Loss, loss bursts, duplicates and reordering from sequence numbers in O(window) memory.

    A ring of `window` bytes remembers which of the last `window` sequence numbers arrived;
    a number leaves the ring (retires) when one `window` higher opens, and only then is it
    known lost for good. Probes size the window to the whole run, so nothing is ever late.
    """

    def __init__(self, window: int = 1 << 20) -> None:
        if window < 1 or window & (window - 1):
            raise ValueError("window must be a power of two")
        self.window = window
        self._mask = window - 1
        self._seen = bytearray(b"\x01") * window  # the slots of numbers below 0: "arrived"
        self.highest = -1
        self.received = self.duplicated = self.reordered = self.late = 0
        self.bursts: Counter[int] = Counter()  # loss-burst length -> how many
        self._run = 0  # lost numbers retired in a row so far

    def add(self, seq: int) -> Arrival:
        self.received += 1
        highest = self.highest
        if seq > highest:
            if seq == highest + 1:  # the common case, per frame
                slot = seq & self._mask
                if self._seen[slot]:
                    if self._run:
                        self.bursts[self._run] += 1
                        self._run = 0
                else:
                    self._run += 1
                self._seen[slot] = 1
            else:
                self._open(highest + 1, seq)
            self.highest = seq
            return Arrival.IN_ORDER
        if seq <= highest - self.window:
            self.late += 1
            return Arrival.LATE
        slot = seq & self._mask
        if self._seen[slot]:
            self.duplicated += 1
            return Arrival.DUPLICATE
        self._seen[slot] = 1
        self.reordered += 1
        return Arrival.REORDERED

    def _open(self, first: int, seq: int) -> None:
        """Open numbers first..seq (seq arrived), retiring the ones `window` below them."""
        count = seq - first + 1
        if count > self.window:
            self._retire(self._slots(first - self.window, self.window))
            self._run += count - self.window  # never entered the ring: lost
            self._seen[:] = bytes(self.window)
        else:
            self._retire(self._slots(first - self.window, count))
            self._set_slots(first, count, 0)
        self._seen[seq & self._mask] = 1

    def _slots(self, first: int, count: int) -> bytes:
        """The ring's bytes for numbers first..first+count-1, in number order."""
        start = first & self._mask
        end = start + count
        if end <= self.window:
            return bytes(self._seen[start:end])
        return bytes(self._seen[start:]) + bytes(self._seen[: end - self.window])

    def _set_slots(self, first: int, count: int, value: int) -> None:
        start = first & self._mask
        end = start + count
        fill = bytes([value])
        if end <= self.window:
            self._seen[start:end] = fill * count
        else:
            self._seen[start:] = fill * (self.window - start)
            self._seen[: end - self.window] = fill * (end - self.window)

    def _retire(self, states: bytes) -> None:
        parts = states.split(b"\x01")
        self._run += len(parts[0])
        for part in parts[1:]:
            if self._run:
                self.bursts[self._run] += 1
            self._run = len(part)

    def finish(self, expected: int | None = None) -> None:
        """Retire everything; `expected` (frames sent) makes a lost tail count as well."""
        self._retire(self._slots(self.highest + 1 - self.window, self.window))
        if expected is not None and expected > self.highest + 1:
            self._run += expected - self.highest - 1
        if self._run:
            self.bursts[self._run] += 1
            self._run = 0

    @property
    def lost(self) -> int:
        return sum(length * n for length, n in self.bursts.items())

    @property
    def unique(self) -> int:
        return self.received - self.duplicated - self.late


# --- endpoint I/O ------------------------------------------------------------------------


def send_frames(endpoint: Endpoint, frames: list[bytes]) -> int:
    """Send a batch (sendmmsg when the C helpers are built); how many the kernel took."""
    if _fastpath is not None and endpoint.kind == KIND_DGRAM:
        return _fastpath.send_frames(endpoint.fileno(), frames)
    return endpoint.send_batch(frames)[0]


def recv_frames(endpoint: Endpoint, max_frames: int = BATCH) -> list[bytes]:
    """Whatever is waiting, up to `max_frames`, without blocking (recvmmsg when built)."""
    if _fastpath is not None and endpoint.kind == KIND_DGRAM:
        return _fastpath.recv_frames(endpoint.fileno(), max_frames)
    return endpoint.recv_batch(max_frames)


class Pacer:
    """Frames due after `elapsed_ns` at `rate` frames/s; None sends flat out."""

    def __init__(self, rate: float | None) -> None:
        if rate is not None and not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"rate {rate} must be a positive number of frames per second")
        self.rate = rate

    def due(self, elapsed_ns: int, sent: int) -> int:
        if self.rate is None:
            return BATCH
        return max(0, min(BATCH, int(elapsed_ns * self.rate // 1e9) + 1 - sent))

    def wait_ns(self, elapsed_ns: int, sent: int) -> int:
        """How long until frame `sent` is due."""
        if self.rate is None:
            return 0
        return max(0, math.ceil(sent * 1e9 / self.rate) - elapsed_ns)


def _stopped(stop: threading.Event | None) -> bool:
    return stop is not None and stop.is_set()


# --- blast -------------------------------------------------------------------------------


@dataclass
class BlastResult:
    stream: int
    size: int
    sent: int  # frames the kernel accepted
    send_errors: int  # frames it refused (peer not listening, no room): sequence numbers skipped
    seconds: float

    def as_dict(self) -> dict[str, Any]:
        rate = self.sent / self.seconds if self.seconds else 0.0
        return {
            "stream": self.stream,
            "size": self.size,
            "sent": self.sent,
            "send_errors": self.send_errors,
            "seconds": round(self.seconds, 6),
            "frames_per_second": round(rate, 1),
            "mbit_per_second": round(rate * self.size * 8 / 1e6, 3),
        }


def blast(
    endpoint: Endpoint,
    factory: FrameFactory,
    rate: float | None = None,
    count: int | None = None,
    duration: float | None = None,
    stop: threading.Event | None = None,
) -> BlastResult:
    """Send numbered frames at `rate` (None: flat out) until `count`, `duration` or `stop`."""
    pacer = Pacer(rate)
    start = time.monotonic_ns()
    end = None if duration is None else start + int(duration * 1e9)
    seq = accepted = 0
    while (count is None or seq < count) and not _stopped(stop):
        now = time.monotonic_ns()
        if end is not None and now >= end:
            break
        n = pacer.due(now - start, seq)
        if count is not None:
            n = min(n, count - seq)
        if n == 0:
            wait = pacer.wait_ns(now - start, seq)
            time.sleep(min(wait, end - now if end is not None else wait) / 1e9)
            continue
        accepted += send_frames(endpoint, factory.frames(seq, n, time.time_ns()))
        seq += n
    seconds = (time.monotonic_ns() - start) / 1e9
    return BlastResult(factory.stream, factory.size, accepted, seq - accepted, seconds)


# --- sink --------------------------------------------------------------------------------


@dataclass
class SinkResult:
    tracker: SequenceTracker
    decoder: FrameDecoder
    bytes: int = 0
    first_ns: int | None = None  # monotonic, first and last probe frame
    last_ns: int | None = None

    def as_dict(self) -> dict[str, Any]:
        t, d = self.tracker, self.decoder
        expected = t.highest + 1
        seconds = (self.last_ns - self.first_ns) / 1e9 if self.first_ns is not None else 0.0
        return {
            "stream": d.stream,
            "received": t.received,
            "expected": expected,
            "lost": t.lost,
            "loss_percent": round(100 * t.lost / expected, 4) if expected else 0.0,
            "duplicated": t.duplicated,
            "reordered": t.reordered,
            "late": t.late,
            "corrupted": d.corrupted,
            "foreign": d.foreign,
            "loss_bursts": _histogram(t.bursts),
            "seconds": round(seconds, 6),
            "frames_per_second": round(t.received / seconds, 1) if seconds else 0.0,
            "mbit_per_second": round(self.bytes * 8 / seconds / 1e6, 3) if seconds else 0.0,
        }


def sink(
    endpoint: Endpoint,
    count: int | None = None,
    duration: float | None = None,
    idle: float | None = None,
    stream: int | None = None,
    stop: threading.Event | None = None,
    window: int = 1 << 20,
) -> SinkResult:
    """Receive and account until `count` probe frames, `duration`, `idle` seconds after the
    last frame (once one arrived), or `stop`; the tracker is finished on return."""
    result = SinkResult(SequenceTracker(window), FrameDecoder(stream=stream))
    tracker, decoder = result.tracker, result.decoder
    poller = select.poll()
    poller.register(endpoint.fileno(), select.POLLIN)
    end = None if duration is None else time.monotonic_ns() + int(duration * 1e9)
    while not _stopped(stop) and (count is None or tracker.received < count):
        now = time.monotonic_ns()
        deadline = end
        if idle is not None and result.last_ns is not None:
            quiet_end = result.last_ns + int(idle * 1e9)
            deadline = quiet_end if deadline is None else min(deadline, quiet_end)
        if deadline is not None and now >= deadline:
            break
        wait = 200_000_000 if deadline is None else min(200_000_000, deadline - now)
        if not poller.poll(math.ceil(wait / 1e6)):
            continue  # (and look at `stop` again)
        frames = recv_frames(endpoint, BATCH)
        probes = decoder.decode(frames)
        if count is not None:
            probes = probes[: count - tracker.received]
        if probes:
            result.last_ns = time.monotonic_ns()
            result.first_ns = result.first_ns or result.last_ns
            result.bytes += sum(map(len, frames))
        for seq, _ in probes:
            tracker.add(seq)
    tracker.finish()
    return result


def _histogram(bursts: Counter[int]) -> dict[str, int]:
    return {str(length): bursts[length] for length in sorted(bursts)}


# --- probe -------------------------------------------------------------------------------


@dataclass
class ProbeRun:
    """What one probe run saw, kept raw; `probe_report` turns it into statistics."""

    factory: FrameFactory
    rate: float
    send_ns: array = field(default_factory=lambda: array("q"))  # per sequence number
    seqs: array = field(default_factory=lambda: array("Q"))  # intact arrivals, in order
    delays: array = field(default_factory=lambda: array("q"))  # their one-way delay, ns
    accepted: int = 0  # frames the kernel took (the rest were send errors)
    corrupted: int = 0
    foreign: int = 0

    @property
    def sent(self) -> int:
        return len(self.send_ns)


def run_probe(
    source: Endpoint,
    target: Endpoint,
    factory: FrameFactory,
    rate: float,
    count: int,
    wait: float = 0.5,
    stop: threading.Event | None = None,
) -> ProbeRun:
    """Send `count` probes into `source` at `rate`/s, receiving at `target` as they come.

    One thread: probes due go out (in batches at least every millisecond), then the loop
    sleeps in poll() on `target` until the next is due. After the last probe it waits up to
    `wait` seconds for stragglers, or 50 ms once every probe has arrived (for duplicates).
    The garbage collector is off meanwhile: a full collection in a big process stalls every
    thread for milliseconds, which would show up as delay (the loop makes no cycles).
    """
    collecting = gc.isenabled()
    gc.disable()
    try:
        return _probe_loop(source, target, factory, rate, count, wait, stop)
    finally:
        if collecting:
            gc.enable()


def _probe_loop(
    source: Endpoint,
    target: Endpoint,
    factory: FrameFactory,
    rate: float,
    count: int,
    wait: float,
    stop: threading.Event | None,
) -> ProbeRun:
    pacer = Pacer(rate)
    run = ProbeRun(factory, rate)
    decoder = FrameDecoder(factory.framing.offset, factory.stream)
    arrived = bytearray(count)
    missing = count
    poller = select.poll()
    poller.register(target.fileno(), select.POLLIN)
    start = time.monotonic_ns()
    end = None
    while True:
        now = time.monotonic_ns()
        sending = run.sent < count and not _stopped(stop)
        if sending:
            n = min(pacer.due(now - start, run.sent), count - run.sent)
            if n:
                send_ns = time.time_ns()
                run.accepted += send_frames(source, factory.frames(run.sent, n, send_ns))
                run.send_ns.extend([send_ns] * n)
            timeout = pacer.wait_ns(time.monotonic_ns() - start, run.sent)
        else:
            if end is None:
                end = now + int(wait * 1e9)
            if missing == 0:
                end = min(end, now + 50_000_000)
            if now >= end:
                break
            timeout = end - now
        if not poller.poll(math.ceil(timeout / 1e6)):
            continue
        frames = recv_frames(target, BATCH)
        received_ns = time.time_ns()
        for seq, send_ns in decoder.decode(frames):
            if seq < count:
                run.seqs.append(seq)
                run.delays.append(received_ns - send_ns)
                if not arrived[seq]:
                    arrived[seq] = 1
                    missing -= 1
    run.corrupted, run.foreign = decoder.corrupted, decoder.foreign
    return run


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
    """Wilson score interval of a proportion: honest near 0 % and with few trials."""
    if trials == 0:
        return 0.0, 1.0
    z = NormalDist().inv_cdf(0.5 + confidence / 2)
    p = successes / trials
    denominator = 1 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def percentile(ordered: list[int], q: float) -> float:
    """The q-quantile (0..1) of sorted values, interpolated linearly between ranks."""
    if not ordered:
        return math.nan
    position = q * (len(ordered) - 1)
    low = int(position)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (position - low)


DELAY_QUANTILES = (("min", 0.0), ("p5", 0.05), ("p25", 0.25), ("p50", 0.5), ("p75", 0.75),
                   ("p95", 0.95), ("p99", 0.99), ("max", 1.0))  # fmt: skip
_INTERVALS = (0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 300.0, 3600.0)


def probe_report(
    run: ProbeRun, confidence: float = 0.95, interval: float | None = None
) -> dict[str, Any]:
    """The statistics of a run; `interval` (seconds per time-series point) defaults to the
    smallest round value giving at most 100 points."""
    sent = run.sent
    tracker = SequenceTracker(1 << max(0, sent).bit_length())
    first_seqs: list[int] = []
    first_delays: list[int] = []
    for seq, delay in zip(run.seqs, run.delays):
        if tracker.add(seq) in (Arrival.IN_ORDER, Arrival.REORDERED):
            first_seqs.append(seq)
            first_delays.append(delay)
    tracker.finish(sent)
    low, high = wilson_interval(tracker.lost, sent, confidence)
    ordered = sorted(first_delays)
    steps = [abs(b - a) for a, b in zip(first_delays, first_delays[1:])]
    bursts = tracker.bursts
    burst_count = sum(bursts.values())
    span = (run.send_ns[-1] - run.send_ns[0]) / 1e9 if sent else 0.0
    if interval is None:
        interval = next((i for i in _INTERVALS if span / i <= 100), _INTERVALS[-1])
    return {
        "framing": run.factory.framing.kind,
        "size": run.factory.size,
        "rate": run.rate,
        "stream": run.factory.stream,
        "seconds": round(span, 6),
        "sent": sent,
        "send_errors": sent - run.accepted,
        "received": len(run.seqs),
        "lost": tracker.lost,
        "loss_percent": _pct(tracker.lost, sent),
        "loss_ci_percent": [round(100 * low, 4), round(100 * high, 4)],
        "confidence": confidence,
        "loss_bursts": _histogram(bursts),
        "loss_burst_mean": round(tracker.lost / burst_count, 4) if burst_count else 0.0,
        "reordered": tracker.reordered,
        "duplicated": tracker.duplicated,
        "corrupted": run.corrupted,
        "foreign": run.foreign,
        "delay_ms": {name: _ms(percentile(ordered, q)) for name, q in DELAY_QUANTILES}
        | {"mean": _ms(sum(ordered) / len(ordered) if ordered else math.nan)},
        "jitter_ms": _ms(sum(steps) / len(steps) if steps else math.nan),
        "interval": interval,
        "series": _series(run, first_seqs, first_delays, interval),
    }


def _series(
    run: ProbeRun, seqs: list[int], delays: list[int], interval: float
) -> list[dict[str, Any]]:
    """Per `interval` of send time: probes sent, lost, and the delay of those that arrived."""
    if not run.sent:
        return []
    start, step = run.send_ns[0], int(interval * 1e9)
    bins = [(t - start) // step for t in run.send_ns]
    sent: Counter[int] = Counter(bins)
    arrived: Counter[int] = Counter(bins[seq] for seq in seqs)
    delays_by_bin: dict[int, list[int]] = {}
    for seq, delay in zip(seqs, delays):
        delays_by_bin.setdefault(bins[seq], []).append(delay)
    points = []
    for index in range(bins[-1] + 1):
        ordered = sorted(delays_by_bin.get(index, []))
        lost = sent[index] - arrived[index]
        points.append(
            {
                "t": round(index * interval, 6),
                "sent": sent[index],
                "lost": lost,
                "loss_percent": _pct(lost, sent[index]),
                "delay_p50_ms": _ms(percentile(ordered, 0.5)),
                "delay_max_ms": _ms(ordered[-1] if ordered else math.nan),
            }
        )
    return points


def _pct(part: int, whole: int) -> float:
    return round(100 * part / whole, 4) if whole else 0.0


def _ms(ns: float) -> float | None:
    return None if math.isnan(ns) else round(ns / 1e6, 4)


def attach_bridge(
    report: dict[str, Any], link_stats: dict[str, Any], direction: str = "a2b"
) -> dict[str, Any]:
    """Set the bridge's counters for the probed direction (`Link.stats()`) beside the probe's.

    The seam for cause attribution: the bridge's drops by cause, and the loss it does not
    explain (the rest of the path, socket buffers). Per-probe causes need a control plane.
    """
    stats = link_stats[direction]
    dropped = dict(stats["dropped"])
    report["bridge"] = {
        "direction": direction,
        **{key: stats[key] for key in ("received", "forwarded", "send_errors", "queued")},
        "dropped": dropped,
        **{key: stats[key] for key in ("duplicated", "reordered", "corrupted", "delayed")},
        "loss_unexplained": report["lost"] - sum(dropped.values()),
    }
    return report


BEFORE_TUNNELSCOPE = "never reached tunnelscope"
AFTER_TUNNELSCOPE = "lost after tunnelscope"


def attribute_losses(
    run: ProbeRun, capture: str, limit: int = 100, dissector: str = "builtin"
) -> dict[str, Any]:
    """Which impairment dropped each lost probe, from the bridge's pcapng of the same run.

    The bridge must capture at its *pre* point (`--capture-at pre|both`, pcapng), where every
    frame an impairment dropped carries `dropped by <name>`. A lost probe found there with
    such a comment died in that impairment; found without one, it passed tunnelscope and was
    lost beyond it (peer, kernel buffer, emulator); not found, it never reached tunnelscope.
    Every frame marked dropped (probes, and whatever else the link carried: OSPF, BGP) is
    counted per protocol, and the first `limit` lost probes found are named, with
    Wireshark's dissectors (`dissector` "wireshark") or the built-in decoders.
    Raises CaptureFormatError or OSError for an unreadable capture, DissectError when
    tshark stops early.
    """
    received = set(run.seqs)
    lost = {seq for seq in range(run.sent) if seq not in received}
    causes: dict[int, str] = {}
    by_protocol: Counter[str] = Counter()
    frames: dict[int, str] = {}

    def dissected(tag: object, decoded: Decoded) -> None:
        counted, seq = tag  # type: ignore[misc]
        if counted:
            by_protocol[protocol_column(decoded)] += 1
        if seq is not None:
            frames[seq] = headline(decoded.fields, decoded.summary)

    wireshark = Dissectors(dissected) if dissector == "wireshark" else None
    decoder = FrameDecoder(run.factory.framing.offset, run.factory.stream)
    try:
        with open_capture(capture) as reader:
            for packet in reader:
                name = reader.interfaces[packet.interface].name
                if len(reader.interfaces) > 1 and not name.endswith(" pre"):
                    continue
                comment = packet.comment or ""
                dropped = comment.startswith("dropped by ")
                named = None
                for seq, _ in decoder.decode([packet.data]):
                    if seq in lost and seq not in causes:
                        causes[seq] = (
                            comment[len("dropped by ") :] if dropped else AFTER_TUNNELSCOPE
                        )
                        named = seq if len(causes) <= limit else None
                if not dropped and named is None:
                    continue
                if wireshark is not None:
                    wireshark.submit(packet.linktype, packet.data, (dropped, named))
                else:
                    dissected((dropped, named), decode(packet.linktype, packet.data))
    finally:
        failure = wireshark.close() if wireshark is not None else None
    if failure:
        raise DissectError(failure)
    per_probe = {seq: causes.get(seq, BEFORE_TUNNELSCOPE) for seq in sorted(lost)}
    return {
        "capture": capture,
        "by_cause": dict(Counter(per_probe.values()).most_common()),
        "dropped_by_protocol": dict(by_protocol.most_common()),
        "probes": {str(seq): cause for seq, cause in list(per_probe.items())[:limit]},
        "frames": {str(seq): frames[seq] for seq in sorted(frames)},
    }


def plot_report(report: dict[str, Any], path: str) -> None:
    """Loss and delay over time as a PNG; ImportError when matplotlib is not installed."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    series = report["series"]
    t = [p["t"] for p in series]
    figure, (loss, delay) = pyplot.subplots(2, 1, sharex=True, figsize=(9, 5.5))
    loss.bar(t, [p["loss_percent"] for p in series], width=report["interval"], align="edge")
    loss.set_ylabel("loss %")
    low, high = report["loss_ci_percent"]
    loss.set_title(
        f"{report['sent']} probes, {report['framing']} {report['size']} B at {report['rate']:g}/s:"
        f" loss {report['loss_percent']:.2f} % ({low:.2f}..{high:.2f})"
    )
    for key, label in (("delay_p50_ms", "median"), ("delay_max_ms", "max")):
        values = [math.nan if p[key] is None else p[key] for p in series]
        delay.plot(t, values, label=label, drawstyle="steps-post")
    delay.set_ylabel("one-way delay (ms)")
    delay.set_xlabel(f"send time (s), {report['interval']:g} s per point")
    delay.legend()
    figure.tight_layout()
    figure.savefig(path)
    pyplot.close(figure)


def wait_until_bound(ports: Iterable[int], timeout: float = 5.0) -> bool:
    """True once every UDP port is bound by someone (a relay subprocess that is up).

    Reads /proc/net/udp (Linux): probing with bind() could take a port from under the relay.
    """
    wanted = set(ports)
    deadline = time.monotonic() + timeout
    while True:
        with open("/proc/net/udp") as table:
            next(table)  # the header line
            bound = {int(line.split()[1].rsplit(":", 1)[1], 16) for line in table}
        if wanted <= bound:
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.02)
