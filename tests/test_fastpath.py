"""The C hot loop (`tunnelscope.nio._fastpath`) driven directly with real sockets on 127.0.0.1.

Every test builds a rig: source <-> [endpoint A | bridge | endpoint B] <-> receiver, and checks
what comes out against docs/pipeline.md. Expected random decisions are computed here from the
spec (`impairments.splitmix64`, `stream_seed`), never from the C code.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import threading
import time

import pytest

from tunnelscope.datapath.impairments import chains, parse_impairment, splitmix64, stream_seed
from tunnelscope.formats import pcap, pcapng
from tunnelscope.formats.capture import CaptureWriter, Format, open_capture
from tunnelscope.formats.packet import Direction

fp = pytest.importorskip("tunnelscope.nio._fastpath", reason="C fast path not built")

TSHARK = shutil.which("tshark")
SO_RCVBUFFORCE, SO_SNDBUFFORCE = 33, 32
SO_TIMESTAMPNS = 35  # Linux; the socket module does not name it
A2B, B2A = 0, 1


# --- helpers ------------------------------------------------------------------------------


def big_buffers(sock: socket.socket, size: int = 16 << 20) -> None:
    for force, plain in ((SO_RCVBUFFORCE, socket.SO_RCVBUF), (SO_SNDBUFFORCE, socket.SO_SNDBUF)):
        try:
            sock.setsockopt(socket.SOL_SOCKET, force, size)
        except OSError:  # not root: capped by net.core.[rw]mem_max
            sock.setsockopt(socket.SOL_SOCKET, plain, size)


def udp_pair() -> tuple[socket.socket, socket.socket]:
    """Two UDP sockets on 127.0.0.1 connected to each other, non-blocking."""
    x = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    y = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    for s in (x, y):
        s.bind(("127.0.0.1", 0))
        big_buffers(s)
    x.connect(y.getsockname())
    y.connect(x.getsockname())
    x.setblocking(False)
    y.setblocking(False)
    return x, y


def stages(*texts: str, seed: int = 1) -> tuple[list, list]:
    """Compile impairments the way the engine does; (a2b tuples, b2a tuples)."""
    compiled = chains([parse_impairment(t) for t in texts], seed)
    return [s.as_tuple() for s in compiled["a2b"]], [s.as_tuple() for s in compiled["b2a"]]


def reconciles(st: dict) -> bool:
    return st["received"] + st["duplicated"] == (
        st["forwarded"] + st["send_errors"] + sum(st["dropped"].values()) + st["queued"]
    )


def drain(sock: socket.socket) -> list[bytes]:
    out = []
    while True:
        try:
            out.append(sock.recv(70000))
        except BlockingIOError:
            return out


class Rig:
    """src <-> A ==bridge== B <-> dst; the loop is pumped from the test's thread."""

    def __init__(self, loop: fp.Loop | None = None) -> None:
        self.src, self.a = udp_pair()
        self.b, self.dst = udp_pair()
        self.loop = loop or fp.Loop()
        self.id = self.loop.add_bridge(
            self.a.fileno(), fp.KIND_DGRAM, self.b.fileno(), fp.KIND_DGRAM
        )

    def chain(self, *texts: str, seed: int = 1) -> None:
        a2b, b2a = stages(*texts, seed=seed)
        self.loop.set_chain(self.id, A2B, a2b)
        self.loop.set_chain(self.id, B2A, b2a)

    def stats(self, direction: int = A2B) -> dict:
        return self.loop.stats(self.id, direction)

    def collect(self, sock: socket.socket, count: int, timeout: float = 3.0, extra: float = 0.03):
        """Pump until `count` frames arrived at `sock` (then `extra` s more) or the timeout."""
        got: list[bytes] = []
        end = time.monotonic() + timeout
        while len(got) < count and time.monotonic() < end:
            self.loop.run(5)
            got += drain(sock)
        end = time.monotonic() + extra
        while time.monotonic() < end:
            self.loop.run(5)
            got += drain(sock)
        return got

    def close(self) -> None:
        for s in (self.src, self.a, self.b, self.dst):
            s.close()


@pytest.fixture
def rig():
    r = Rig()
    yield r
    r.close()


def numbered(n: int, size: int = 32) -> list[bytes]:
    return [i.to_bytes(4, "big") + bytes(size - 4) for i in range(n)]


def number(frame: bytes) -> int:
    return int.from_bytes(frame[:4], "big")


class LoopThread:
    """Runs loop.run(-1) in a thread (run releases the GIL) until stopped."""

    def __init__(self, loop: fp.Loop) -> None:
        self.loop = loop
        self.stop = False
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while not self.stop:
            self.loop.run(-1)

    def join(self) -> None:
        self.stop = True
        self.loop.wake()
        self.thread.join(5)
        assert not self.thread.is_alive()


# --- module and basic forwarding -----------------------------------------------------------


def test_constants():
    assert (fp.KIND_DGRAM, fp.KIND_FD, fp.BATCH) == (0, 1, 64)


def test_forwards_both_directions(rig):
    frames = numbered(20)
    for f in frames:
        rig.src.send(f)
        rig.dst.send(f[::-1])
    assert rig.collect(rig.dst, 20) == frames
    assert rig.collect(rig.src, 20) == [f[::-1] for f in frames]
    for direction in (A2B, B2A):
        st = rig.stats(direction)
        assert st["received"] == st["forwarded"] == 20
        assert st["dropped"] == {} and st["queued"] == 0 and reconciles(st)


@pytest.mark.parametrize("size", [0, 1, 14, 1500, 65507])
def test_frame_sizes(rig, size):
    frame = bytes(range(256)) * (size // 256) + bytes(size % 256)
    rig.src.send(frame)
    rig.dst.send(frame)
    assert rig.collect(rig.dst, 1) == [frame]
    assert rig.collect(rig.src, 1) == [frame]


def test_oversize_datagram_is_counted_not_forwarded():
    """A Unix datagram longer than a receive slot (65536) is cut by the kernel: not sent on."""
    src, a = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    b, dst = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    for s in (src, a, b, dst):
        big_buffers(s, 1 << 20)
        s.setblocking(False)
    loop = fp.Loop()
    bridge = loop.add_bridge(a.fileno(), fp.KIND_DGRAM, b.fileno(), fp.KIND_DGRAM)
    src.send(b"x" * 70000)
    src.send(b"small")
    loop.run(20)
    assert drain(dst) == [b"small"]
    st = loop.stats(bridge, A2B)
    assert st["oversize"] == 1 and st["received"] == 1 and st["forwarded"] == 1
    for s in (src, a, b, dst):
        s.close()


def test_kind_fd_read_write_one_frame_per_call():
    """KIND_FD (a TAP in real life) reads and writes one frame per call: a socketpair here."""
    tap_peer, tap = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    b, dst = udp_pair()
    loop = fp.Loop()
    bridge = loop.add_bridge(tap.fileno(), fp.KIND_FD, b.fileno(), fp.KIND_DGRAM)
    frames = [bytes([i]) * (14 + i) for i in range(100)]
    for f in frames:
        tap_peer.send(f)
    got: list[bytes] = []
    for _ in range(100):
        loop.run(5)
        got += drain(dst)
        if len(got) == 100:
            break
    assert got == frames
    dst.send(b"back to the tap")
    loop.run(20)
    assert tap_peer.recv(100) == b"back to the tap"
    assert loop.stats(bridge, B2A)["forwarded"] == 1
    for s in (tap_peer, tap, b, dst):
        s.close()


# --- impairments ---------------------------------------------------------------------------


def test_freq_drop_drops_every_third_frame(rig):
    rig.chain("a2b freq_drop 3")
    frames = [b"frame %d" % i for i in range(1, 13)]
    for f in frames:
        rig.src.send(f)
    got = rig.collect(rig.dst, 8)
    assert got == [f for i, f in enumerate(frames, 1) if i % 3]
    assert rig.stats()["dropped"] == {"freq_drop": 4}
    # b2a has no impairment
    rig.dst.send(b"untouched")
    assert rig.collect(rig.src, 1) == [b"untouched"]
    # a new configuration restarts the counter: frames 1, 2 pass, 3 drops again
    rig.chain("a2b freq_drop 3")
    for f in frames[:4]:
        rig.src.send(f)
    assert rig.collect(rig.dst, 3) == [frames[0], frames[1], frames[3]]


def test_freq_drop_both_shares_one_counter(rig):
    """`both freq_drop 3`: one counter for the two directions (dynamips' BOTH slot)."""
    rig.chain("both freq_drop 3")
    passed = []
    for i in range(1, 13):  # alternate directions, one frame at a time
        sock, out = (rig.src, rig.dst) if i % 2 else (rig.dst, rig.src)
        sock.send(b"%d" % i)
        passed += rig.collect(out, 1, timeout=0.2, extra=0)
    assert sorted(int(x) for x in passed) == [i for i in range(1, 13) if i % 3]
    total = sum(rig.stats(d)["dropped"].get("freq_drop", 0) for d in (A2B, B2A))
    assert total == 4
    # setting one direction's chain resets the shared counter for both
    a2b, b2a = stages("both freq_drop 3")
    rig.loop.set_chain(rig.id, B2A, b2a)
    rig.src.send(b"x1")
    rig.dst.send(b"x2")
    rig.collect(rig.dst, 1, timeout=0.2, extra=0)
    rig.collect(rig.src, 1, timeout=0.2, extra=0)
    rig.src.send(b"x3")  # third frame since the reset: dropped
    assert rig.collect(rig.dst, 1, timeout=0.1, extra=0) == []


def test_freq_drop_minus_one_drops_all_and_zero_passes_all(rig):
    rig.loop.set_chain(rig.id, A2B, [(1, "freq_drop", (-1,), 0, -1)])
    rig.loop.set_chain(rig.id, B2A, [(1, "freq_drop", (0,), 0, -1)])
    for i in range(5):
        rig.src.send(b"a%d" % i)
        rig.dst.send(b"b%d" % i)
    assert rig.collect(rig.src, 5) == [b"b%d" % i for i in range(5)]
    assert drain(rig.dst) == []
    assert rig.stats(A2B)["dropped"] == {"freq_drop": 5}


def reference_hits(seed: int, direction: int, position: int, percent: float, n: int):
    """hit(T) for n frames, from docs/pipeline.md: T = round(P/100 * 2^53), u53 < T."""
    state = stream_seed(seed, direction, position)
    threshold = round(percent / 100 * 2**53)
    hits = []
    for _ in range(n):
        state, out = splitmix64(state)
        hits.append((out >> 11) < threshold)
    return hits


def test_packet_loss_matches_the_reference_generator(rig):
    seed, n = 12345, 400
    rig.chain("packet_loss 10", "a2b packet_loss 30", seed=seed)  # positions 0 and 1
    frames = numbered(n)
    for f in frames:
        rig.src.send(f)
    first = reference_hits(seed, A2B, 0, 10, n)
    survivors = [i for i in range(n) if not first[i]]
    second = reference_hits(seed, A2B, 1, 30, len(survivors))  # drawn only for survivors
    expected = [i for i, lost in zip(survivors, second) if not lost]
    got = rig.collect(rig.dst, len(expected))
    assert [number(f) for f in got] == expected
    st = rig.stats()
    assert st["dropped"] == {"packet_loss": n - len(expected)} and reconciles(st)
    # b2a has its own generator: direction 1, position 0
    for f in frames[:100]:
        rig.dst.send(f)
    hits = reference_hits(seed, B2A, 0, 10, 100)
    got = rig.collect(rig.src, 100 - sum(hits))
    assert [number(f) for f in got] == [i for i in range(100) if not hits[i]]


def test_burst_loss_matches_the_reference_model(rig):
    seed, n = 99, 500
    rig.chain("a2b burst_loss 5 30 90 1", seed=seed)
    state = stream_seed(seed, A2B, 0)
    t = [round(p / 100 * 2**53) for p in (5, 30, 90, 1)]
    bad, expected = False, []
    for i in range(n):
        state, out = splitmix64(state)
        u = out >> 11
        bad = (not u < t[1]) if bad else u < t[0]
        state, out = splitmix64(state)
        if not (out >> 11) < (t[2] if bad else t[3]):
            expected.append(i)
    for f in numbered(n):
        rig.src.send(f)
    got = rig.collect(rig.dst, len(expected))
    assert [number(f) for f in got] == expected
    assert rig.stats()["dropped"] == {"burst_loss": n - len(expected)}


def test_corrupt_flips_exactly_one_bit(rig):
    rig.chain("a2b corrupt 100")
    frames = [os.urandom(20 + i) for i in range(50)] + [b""]
    for f in frames:
        rig.src.send(f)
    got = rig.collect(rig.dst, len(frames))
    assert len(got) == len(frames)
    for sent, received in zip(frames, got):
        assert len(sent) == len(received)
        flipped = sum(bin(x ^ y).count("1") for x, y in zip(sent, received))
        assert flipped == (1 if sent else 0)
    st = rig.stats()
    assert st["corrupted"] == 50  # the empty frame cannot be corrupted
    # the bit is the one the spec picks: (u53 * len * 8) >> 53 after the hit draw
    state = stream_seed(1, A2B, 0)
    for sent, received in zip(frames[:5], got[:5]):
        state, _ = splitmix64(state)  # hit(T) with T = 2^53 always hits
        state, out = splitmix64(state)
        bit = ((out >> 11) * len(sent) * 8) >> 53
        expected = bytearray(sent)
        expected[bit >> 3] ^= 1 << (bit & 7)
        assert received == bytes(expected)


def test_duplicate_counts_and_order(rig):
    rig.chain("a2b duplicate 100")
    frames = numbered(30)
    for f in frames:
        rig.src.send(f)
    got = rig.collect(rig.dst, 60)
    assert got == [f for f in frames for _ in (0, 1)]  # the original, then its copy
    st = rig.stats()
    assert st["duplicated"] == 30 and st["forwarded"] == 60 and reconciles(st)


def test_duplicate_then_drop_comment_and_counters(rig):
    """A duplicate dropped further on counts in dropped; the invariant holds."""
    rig.chain("a2b duplicate 50", "a2b packet_loss 50", seed=7)
    for f in numbered(300):
        rig.src.send(f)
    rig.collect(rig.dst, 10**6, timeout=0.3)
    st = rig.stats()
    assert st["duplicated"] > 100 and st["dropped"]["packet_loss"] > 100
    assert reconciles(st) and st["queued"] == 0


def test_reorder_swaps_frames(rig):
    seed, n = 3, 200
    rig.chain("a2b reorder 20", seed=seed)
    for f in numbered(n):
        rig.src.send(f)
    got = [number(f) for f in rig.collect(rig.dst, n)]
    hits = reference_hits(seed, A2B, 0, 20, n)
    assert sorted(got) == list(range(n))
    assert rig.stats()["reordered"] == sum(hits)
    # gap 1: a held frame leaves after the next frame sent (held runs leave together, FIFO)
    for i in range(n - 1):
        if hits[i] and not hits[i + 1]:
            assert got.index(i) > got.index(i + 1)
        if not hits[i]:
            assert all(got.index(j) > got.index(i) for j in range(i + 1, min(n, i + 3)))
    assert got != list(range(n))


def test_reorder_never_stalls_a_quiet_link(rig):
    """A frame held for a gap that never comes is sent anyway after 100 ms."""
    rig.chain("a2b reorder 100 5")
    t0 = time.monotonic()
    rig.src.send(b"lonely")
    assert rig.collect(rig.dst, 1, timeout=1.0, extra=0) == [b"lonely"]
    assert 0.09 <= time.monotonic() - t0 < 0.5
    assert rig.stats()["queued"] == 0


def arrival_delays(rig: Rig, count: int, spacing: float) -> list[float]:
    """Send `count` frames (src -> dst) while the loop runs in a thread; per-frame latency
    from the send to the kernel's arrival timestamp at dst (SO_TIMESTAMPNS)."""
    rig.dst.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
    runner = LoopThread(rig.loop)
    sent = {}
    try:
        for i in range(count):
            sent[i] = time.time_ns()
            rig.src.send(i.to_bytes(4, "big"))
            time.sleep(spacing)
        end = time.monotonic() + 2
        arrived: dict[int, int] = {}
        while len(arrived) < count and time.monotonic() < end:
            try:
                data, ancillary, _, _ = rig.dst.recvmsg(100, 64)
            except BlockingIOError:
                time.sleep(0.001)
                continue
            for level, kind, value in ancillary:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS:
                    sec, nsec = struct.unpack("qq", value[:16])
                    arrived[number(data)] = sec * 10**9 + nsec
    finally:
        runner.join()
    return [(arrived[i] - sent[i]) / 1e9 for i in range(count)]


def test_delay_10ms(rig):
    rig.chain("a2b delay 10")
    delays = arrival_delays(rig, 20, 0.003)  # several frames wait at once
    # never early; 10 +- 1 ms apart from rare scheduling hiccups on a busy 2-core machine
    assert all(d >= 0.010 for d in delays), delays
    assert sorted(delays)[len(delays) // 2] <= 0.0105, delays
    assert sum(d <= 0.011 for d in delays) >= 0.8 * len(delays), delays
    assert rig.stats()["delayed"] == 20


def test_delay_with_jitter_stays_in_range(rig):
    rig.chain("a2b delay 20 5", seed=11)
    delays = arrival_delays(rig, 30, 0.001)
    assert all(d >= 0.015 for d in delays), delays
    assert sum(d <= 0.026 for d in delays) >= 0.8 * len(delays), delays
    assert max(delays) - min(delays) > 0.003  # the jitter is there


def test_rate_limits_throughput(rig):
    """rate 8000 kbit = 1 MB/s: 100 frames of 1000 bytes take ~(100000 - 3000 burst) us."""
    rig.chain("a2b rate 8000")
    t0 = time.monotonic()
    for f in numbered(100, 1000):
        rig.src.send(f)
    got = rig.collect(rig.dst, 100, timeout=2, extra=0)
    elapsed = time.monotonic() - t0
    assert len(got) == 100 and [number(f) for f in got] == list(range(100))
    assert 0.090 <= elapsed <= 0.200, elapsed  # never faster than the rate; stalls allowed
    assert rig.stats()["dropped"] == {}


def test_rate_limit_drops_when_its_queue_is_full(rig):
    rig.chain("a2b rate 8000 3000 10")  # 1 ms per 1000-byte frame, 10 frames may wait
    for f in numbered(100, 1000):
        rig.src.send(f)
    got = rig.collect(rig.dst, 100, timeout=0.3)
    st = rig.stats()
    # the first ~4 leave at once (3000-byte burst), 10 more wait, the rest is dropped
    assert 12 <= len(got) <= 40 and st["dropped"]["rate"] == 100 - len(got)
    assert [number(f) for f in got] == sorted(number(f) for f in got)
    assert reconciles(st) and st["queued"] == 0


def test_counters_reconcile_while_frames_wait(rig):
    rig.chain("a2b delay 50", "a2b duplicate 30", "a2b packet_loss 20", "a2b reorder 10")
    for f in numbered(500):
        rig.src.send(f)
    rig.loop.run(10)
    st = rig.stats()
    assert st["queued"] > 0 and reconciles(st)
    rig.collect(rig.dst, 10**6, timeout=0.5)
    st = rig.stats()
    assert st["queued"] == 0 and reconciles(st) and st["received"] == 500


def test_set_chain_keeps_queued_frames(rig):
    rig.chain("a2b delay 30")
    for f in numbered(10):
        rig.src.send(f)
    rig.loop.run(5)
    assert rig.stats()["queued"] == 10
    rig.loop.set_chain(rig.id, A2B, [])
    assert rig.stats()["queued"] == 10
    assert len(rig.collect(rig.dst, 10)) == 10


def test_burst_of_10000_frames_through_a_delay(rig):
    """Far more than a batch, all waiting at once (each copied), then all released."""
    rig.chain("a2b delay 20")
    runner = LoopThread(rig.loop)
    try:
        for f in numbered(10000, 64):
            rig.src.send(f)
        end = time.monotonic() + 5
        while rig.stats()["forwarded"] < 10000 and time.monotonic() < end:
            time.sleep(0.01)
    finally:
        runner.join()
    got = drain(rig.dst)
    assert [number(f) for f in got] == list(range(10000))
    st = rig.stats()
    assert st["received"] == st["forwarded"] == 10000 and reconciles(st)


@pytest.mark.skipif(
    "libasan" in os.environ.get("LD_PRELOAD", ""),
    reason="ASan quarantines freed memory instead of reusing it (make asan)",
)
def test_memory_stays_flat():
    """200k frames through a delay (every frame copied and freed): resident memory does not
    grow beyond noise (the pool keeps a bounded number of descriptors)."""
    r = Rig()
    r.chain("a2b delay 1")
    runner = LoopThread(r.loop)
    frames = numbered(64, 200)

    def pump(n: int) -> None:
        for _ in range(n // 64):
            fp.send_frames(r.src.fileno(), frames)
            drain(r.dst)
        time.sleep(0.05)
        drain(r.dst)

    try:
        pump(50_000)
        before = pages_in_memory()
        pump(200_000)
        after = pages_in_memory()
    finally:
        runner.join()
        r.close()
    assert (after - before) * os.sysconf("SC_PAGE_SIZE") < 4 << 20, (before, after)


def test_remove_bridge_discards_queued_frames():
    r = Rig()
    r.chain("a2b delay 1000")
    for f in numbered(50):
        r.src.send(f)
    r.loop.run(10)
    assert r.stats()["queued"] == 50
    r.loop.remove_bridge(r.id)
    with pytest.raises(KeyError):
        r.loop.stats(r.id, A2B)
    with pytest.raises(KeyError):
        r.loop.remove_bridge(r.id)
    r.loop.run(10)
    r.close()


def pages_in_memory() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1])


def read_file(path: str) -> bytes:
    with open(path, "rb") as fh:
        return fh.read()


def test_many_bridges_share_one_receive_buffer():
    """Bridges cost no receive buffer each: 500 of them add well under 4 MB each."""
    loop = fp.Loop()
    socks = []
    before = pages_in_memory()
    for _ in range(500):
        x, y = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        socks += [x, y]
        loop.add_bridge(x.fileno(), fp.KIND_DGRAM, y.fileno(), fp.KIND_DGRAM)
    rig = Rig(loop)
    rig.src.send(b"through bridge 501")
    assert rig.collect(rig.dst, 1) == [b"through bridge 501"]
    assert (pages_in_memory() - before) * os.sysconf("SC_PAGE_SIZE") < 64 << 20
    for s in socks:
        s.close()
    rig.close()


def test_bad_stages_are_refused(rig):
    with pytest.raises(ValueError):
        rig.loop.set_chain(rig.id, A2B, [(42, "nope", (1,), 0, -1)])
    with pytest.raises(ValueError):
        rig.loop.set_chain(rig.id, A2B, [(2, "packet_loss", (1, 2), 0, -1)])
    with pytest.raises(ValueError):
        rig.loop.set_chain(rig.id, A2B, [(5, "rate", (0, 1, 1), 0, -1)])
    with pytest.raises(ValueError):
        rig.loop.set_chain(rig.id, 2, [])
    with pytest.raises(KeyError):
        rig.loop.set_chain(9999, A2B, [])


# --- endpoints weather ---------------------------------------------------------------------


def test_send_errors_and_refused_never_stop_the_link(rig):
    """The receiver is gone: its ICMP errors are counted, the link goes on."""
    rig.dst.close()
    for f in numbered(50):
        rig.src.send(f)
        rig.loop.run(1)
    rig.loop.run(20)
    st = rig.stats(A2B)
    assert st["received"] == 50 and st["forwarded"] + st["send_errors"] == 50
    assert reconciles(st)
    # each ICMP port unreachable is reported once on endpoint B, to a send (a send error) or
    # to a receive (ignored): both count as `refused` in a2b, whose sends B's peer refused
    assert st["refused"] > 0
    assert st["refused"] >= st["send_errors"]
    rig.src.send(b"still alive")
    rig.loop.run(10)
    assert rig.stats(A2B)["received"] == 51


def test_unix_peer_reconnects_when_it_appears(tmp_path):
    """A Unix datagram endpoint with a peer path: refused until the peer binds, then it flows."""
    src, a = udp_pair()
    local, remote = str(tmp_path / "local.sock"), str(tmp_path / "remote.sock")
    b = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    b.bind(local)
    b.setblocking(False)
    loop = fp.Loop()
    bridge = loop.add_bridge(a.fileno(), fp.KIND_DGRAM, b.fileno(), fp.KIND_DGRAM, b_peer=remote)
    src.send(b"too early")
    loop.run(10)
    st = loop.stats(bridge, A2B)  # a2b's sends go out of endpoint B
    assert st["refused"] == 1 and st["send_errors"] == 1
    dst = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    dst.bind(remote)
    src.send(b"on time")
    loop.run(10)
    assert dst.recv(100) == b"on time"
    dst.connect(local)
    dst.send(b"reply")
    loop.run(10)
    assert src.recv(100) == b"reply"
    for s in (src, a, b, dst):
        s.close()


# --- run(), wake(), signals ----------------------------------------------------------------


def test_run_returns_after_its_timeout():
    loop = fp.Loop()
    t0 = time.monotonic()
    loop.run(50)
    assert 0.049 <= time.monotonic() - t0 < 0.5


def test_wake_makes_run_return_promptly():
    loop = fp.Loop()
    threading.Timer(0.05, loop.wake).start()
    t0 = time.monotonic()
    loop.run(5000)
    assert time.monotonic() - t0 < 0.5


def test_a_signal_makes_run_return():
    loop = fp.Loop()

    class Interrupted(Exception):
        pass

    def handler(signum, frame):
        raise Interrupted

    old = signal.signal(signal.SIGALRM, handler)
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.05)
        t0 = time.monotonic()
        with pytest.raises(Interrupted):
            loop.run(5000)
        assert time.monotonic() - t0 < 0.5
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)


def test_methods_are_safe_while_run_pumps_in_another_thread(rig):
    runner = LoopThread(rig.loop)
    try:
        for i in range(200):
            rig.src.send(b"%d" % i)
            if i % 20 == 0:
                rig.chain("a2b delay 1") if i % 40 else rig.chain()
                rig.stats()
        time.sleep(0.1)
        with pytest.raises(RuntimeError):
            rig.loop.run(0)  # one pump at a time
    finally:
        runner.join()
    st = rig.stats()
    assert st["forwarded"] == 200 and reconciles(st)


# --- helpers for the traffic tools ---------------------------------------------------------


def test_send_frames_and_recv_frames():
    x, y = udp_pair()
    frames = numbered(300, 100)
    assert fp.send_frames(x.fileno(), frames) == 300
    got: list[bytes] = []
    while len(got) < 300:
        batch = fp.recv_frames(y.fileno(), 64)
        assert batch and len(batch) <= 64
        got += batch
    assert got == frames
    assert fp.recv_frames(y.fileno(), 64) == []
    assert fp.send_frames(x.fileno(), [b"", bytearray(b"b"), memoryview(b"cd")]) == 3
    assert fp.recv_frames(y.fileno(), 10) == [b"", b"b", b"cd"]
    with pytest.raises(ValueError):
        fp.recv_frames(y.fileno(), 0)
    x.close()
    y.close()


# --- captures ------------------------------------------------------------------------------


def attach_capture(rig: Rig, path: str, fmt: Format, points: str):
    """Set up a capture the way engine.Link.start_capture does with the C loop."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    sink = fp.Capture(fd, fmt.pcapng, fmt.nanosecond, fmt.snaplen, fmt.flush_ms, True)
    writer = CaptureWriter(sink, fmt)
    pre = post = -1
    if points in ("pre", "both"):
        pre = writer.add_interface(1, "lnk pre" if points == "both" else "lnk")
    if points in ("post", "both"):
        post = writer.add_interface(1, "lnk post" if points == "both" else "lnk")
    writer.announce()
    return writer, rig.loop.add_capture(rig.id, sink, pre, post)


def read_back(path: str):
    with open_capture(path) as reader:
        return list(reader), reader.interfaces


def tshark_fields(path: str, *fields: str) -> list[list[str]]:
    args = [TSHARK, "-r", path, "-T", "fields", "-E", "separator=|"]
    for f in fields:
        args += ["-e", f]
    out = subprocess.run(args, capture_output=True, text=True, timeout=20)
    assert out.returncode == 0, out.stderr
    return [line.split("|") for line in out.stdout.splitlines()]


def test_pcapng_capture_pre_and_post_with_drop_comments(rig, tmp_path):
    path = str(tmp_path / "both.pcapng")
    writer, tap = attach_capture(rig, path, Format(pcapng=True, flush_ms=5), "both")
    rig.chain("freq_drop 2")  # `both`: one counter for the two directions
    frames = [b"\x02" * 12 + b"\x08\x00" + bytes([i]) * 30 for i in range(8)]
    for f in frames:
        rig.src.send(f)
    rig.collect(rig.dst, 4)
    rig.dst.send(b"\x04" * 14 + b"reply")
    rig.collect(rig.src, 1)
    t_end = time.time_ns()
    rig.loop.remove_capture(rig.id, tap)
    writer.close()
    packets, interfaces = read_back(path)
    assert [i.name for i in interfaces] == ["lnk pre", "lnk post"]
    pre = [p for p in packets if p.interface == 0]
    post = [p for p in packets if p.interface == 1]
    assert [p.data for p in pre[:8]] == frames
    assert [p.comment for p in pre[:8]] == [None, "dropped by freq_drop"] * 4
    assert all(p.direction == Direction.OUTBOUND for p in pre[:8] + post[:4])
    assert [p.data for p in post[:4]] == frames[::2]
    # the 9th frame overall (b2a) is odd: it passes, seen inbound at both points
    assert pre[8].data == post[4].data == b"\x04" * 14 + b"reply"
    assert pre[8].direction == post[4].direction == Direction.INBOUND
    assert all(t_end - 5 * 10**9 < p.ts_ns <= t_end for p in packets)
    if TSHARK:
        rows = tshark_fields(path, "frame.interface_name", "frame.p2p_dir", "frame.comment")
        assert len(rows) == 14
        assert rows[1] == ["lnk pre", "0", "dropped by freq_drop"]
        assert rows[-1] == ["lnk post", "1", ""]


def test_pcapng_records_are_byte_identical_to_capture_writer(rig, tmp_path):
    """Every record equals CaptureWriter.encode (pcapng.py) of the same frame and timestamp."""
    path = str(tmp_path / "exact.pcapng")
    fmt = Format(pcapng=True, flush_ms=None)
    writer, tap = attach_capture(rig, path, fmt, "both")
    rig.chain("a2b duplicate 50", "a2b packet_loss 40", seed=5)
    frames = [os.urandom(n) for n in (0, 1, 2, 3, 14, 61, 62, 63, 64, 1500, 9000)]
    for f in frames:
        rig.src.send(f)
    rig.collect(rig.dst, 10**6, timeout=0.2)
    rig.loop.remove_capture(rig.id, tap)
    writer.close()
    packets, _ = read_back(path)
    header = pcapng.section_header() + b"".join(
        pcapng.interface_description(1, name, "", fmt.snaplen) for name in ("lnk pre", "lnk post")
    )
    expected = header + b"".join(
        writer.encode(p.interface, p.ts_ns, p.data, p.direction, p.comment) for p in packets
    )
    assert read_file(path) == expected
    assert any(p.comment for p in packets)


@pytest.mark.parametrize("pcapng_format, points", [(True, "both"), (False, "pre"), (False, "post")])
def test_large_frames_are_recorded_as_received_and_as_sent(rig, tmp_path, pcapng_format, points):
    """Frames of 2048 bytes or more go to a file straight from their slots (one writev per
    batch): records byte-identical to CaptureWriter.encode, snaplen honoured, and the pre record
    holds the frame as received although corrupt flips a bit of it in its slot afterwards."""
    path = str(tmp_path / ("big.pcapng" if pcapng_format else "big.pcap"))
    fmt = Format(pcapng=pcapng_format, nanosecond=True, snaplen=4001, flush_ms=None)
    writer, tap = attach_capture(rig, path, fmt, points)
    rig.chain("a2b corrupt 100", "b2a freq_drop 2")
    a2b = [os.urandom(n) for n in (2047, 2048, 2049, 4001, 4002, 9000, 65507, 100, 3001)]
    b2a = [os.urandom(n) for n in (9000, 9001, 2050, 2051)]
    for f in a2b:
        rig.src.send(f)
    sent = rig.collect(rig.dst, len(a2b))
    for f in b2a:
        rig.dst.send(f)
    returned = rig.collect(rig.src, 2)
    rig.loop.remove_capture(rig.id, tap)
    writer.close()
    assert len(sent) == len(a2b) and all(s != f for s, f in zip(sent, a2b))  # one bit each
    assert returned == b2a[::2]
    frames = {"pre": a2b + b2a, "post": sent + returned}  # per interface, before snaplen
    names = ["pre", "post"] if points == "both" else [points]
    packets, _ = read_back(path)
    for interface, name in enumerate(names):
        records = [p for p in packets if p.interface == interface]
        assert [p.data for p in records] == [f[:4001] for f in frames[name]]
        assert [p.orig_len for p in records] == [len(f) for f in frames[name]]
    if points == "both":
        comments = [p.comment for p in packets if p.interface == 0]
        assert comments[-4:] == [None, "dropped by freq_drop"] * 2
    whole = {i: iter(frames[name]) for i, name in enumerate(names)}
    records = b"".join(
        writer.encode(p.interface, p.ts_ns, next(whole[p.interface]), p.direction, p.comment)
        for p in packets
    )
    if pcapng_format:
        header = pcapng.section_header() + b"".join(
            pcapng.interface_description(1, f"lnk {name}", "", 4001) for name in names
        )
    else:
        header = pcap.global_header(1, 4001, True)
    assert read_file(path) == header + records
    if TSHARK:
        rows = tshark_fields(path, "frame.len", "frame.cap_len")
        assert rows == [[str(p.orig_len), str(len(p.data))] for p in packets]


def test_a_release_of_more_large_frames_than_one_writev_takes(rig, tmp_path):
    """300 frames of 2,100 bytes due at once (a delay, the loop paused): one send of 300, more
    than one write takes from where the frames lie (128); the rest are copied, in order."""
    path = str(tmp_path / "release.pcapng")
    writer, tap = attach_capture(rig, path, Format(pcapng=True, flush_ms=None), "post")
    rig.chain("a2b delay 300")
    frames = numbered(300, 2100)
    for start in range(0, 300, 50):
        for f in frames[start : start + 50]:
            rig.src.send(f)
        rig.loop.run(5)
    for _ in range(100):
        if rig.stats()["queued"] == 300:
            break
        rig.loop.run(5)
    assert rig.stats()["queued"] == 300 and drain(rig.dst) == []
    time.sleep(0.35)  # all due while the loop does not run: released together
    assert rig.collect(rig.dst, 300) == frames
    rig.loop.remove_capture(rig.id, tap)
    writer.close()
    packets, _ = read_back(path)
    assert [p.data for p in packets] == frames
    if TSHARK:
        assert tshark_fields(path, "frame.len") == [["2100"]] * 300


@pytest.mark.parametrize("nanosecond", [False, True])
def test_classic_pcap_capture(rig, tmp_path, nanosecond):
    path = str(tmp_path / "pre.pcap")
    fmt = Format(pcapng=False, nanosecond=nanosecond, snaplen=20, flush_ms=None)
    writer, tap = attach_capture(rig, path, fmt, "pre")
    rig.chain("a2b freq_drop 2")
    frames = [bytes([i]) * (10 + 5 * i) for i in range(6)]
    before = time.time_ns()
    for f in frames:
        rig.src.send(f)
    rig.collect(rig.dst, 3)
    # flush_ms None: the records are in the file after the batch, before any close
    with open(path, "rb") as fh:
        assert len(fh.read()) == 24 + sum(16 + min(len(f), 20) for f in frames)
    rig.loop.remove_capture(rig.id, tap)
    writer.close()
    packets, _ = read_back(path)
    assert [p.data for p in packets] == [f[:20] for f in frames]  # dropped ones too (pre)
    assert [p.orig_len for p in packets] == [len(f) for f in frames]
    resolution = 1 if nanosecond else 1000
    assert all(before - resolution <= p.ts_ns <= time.time_ns() for p in packets)
    raw = read_file(path)
    expected = raw[:24] + b"".join(writer.encode(0, p.ts_ns, f) for p, f in zip(packets, frames))
    assert raw == expected
    if TSHARK:
        rows = tshark_fields(path, "frame.len", "frame.cap_len")
        assert rows == [[str(len(f)), str(min(len(f), 20))] for f in frames]


def test_capture_flushes_when_the_loop_goes_idle(rig, tmp_path):
    """The end of a busy period writes the records at once; flush_ms is only the upper bound."""
    path = str(tmp_path / "idle.pcapng")
    writer, tap = attach_capture(rig, path, Format(pcapng=True, flush_ms=60_000), "pre")
    header_size = os.path.getsize(path)
    rig.src.send(b"one frame")
    rig.loop.run(50)
    assert os.path.getsize(path) > header_size
    assert writer.sink.frames == 1
    rig.loop.remove_capture(rig.id, tap)
    writer.close()


def test_capture_header_pending_keeps_records():
    """Until set_header the records wait (link-type detection looks at them via pending())."""
    r, w = os.pipe()
    sink = fp.Capture(w, False, False, 65535, None, True)
    assert sink.header_pending
    sink.append(b"record-1", 1)
    sink.append(b"record-2", 1)
    assert sink.pending() == b"record-1record-2" and sink.frames == 2
    sink.set_header(b"HEADER")
    assert not sink.header_pending and sink.pending() == b""
    assert os.read(r, 100) == b"HEADERrecord-1record-2"
    sink.set_header(b"+IDB")  # a later header block is written in stream order
    assert os.read(r, 100) == b"+IDB"
    sink.close()
    assert sink.closed and sink.error is None
    os.close(r)


def test_capture_to_dev_full_fails_but_the_link_forwards(rig):
    fd = os.open("/dev/full", os.O_WRONLY)
    sink = fp.Capture(fd, False, False, 65535, None, True)
    rig.loop.add_capture(rig.id, sink, 0, -1)
    sink.set_header(b"\0" * 24)
    for f in numbered(5):
        rig.src.send(f)
    assert len(rig.collect(rig.dst, 5)) == 5
    assert sink.error == "capture stopped: No space left on device" and sink.closed


def test_capture_to_a_pipe_whose_reader_left(rig):
    r, w = os.pipe()
    sink = fp.Capture(w, True, False, 65535, None, True)
    writer = CaptureWriter(sink, Format(pcapng=True))
    rig.loop.add_capture(rig.id, sink, writer.add_interface(1, "lnk"), -1)
    writer.announce()
    rig.src.send(b"first")
    assert rig.collect(rig.dst, 1) == [b"first"]
    assert sink.error is None and sink.frames == 1
    os.close(r)  # the reader goes away (Python ignores SIGPIPE: write gets EPIPE)
    for f in numbered(10):
        rig.src.send(f)
    assert len(rig.collect(rig.dst, 10)) == 10
    assert sink.error == "capture stopped: Broken pipe" and sink.closed
    rig.src.send(b"after")
    assert rig.collect(rig.dst, 1) == [b"after"]
    assert rig.stats()["forwarded"] == 12


FSIZE_SCRIPT = r"""
import os, resource, signal, socket, sys, time
sys.path.insert(0, sys.argv[2])
from test_fastpath import Rig, numbered
from tunnelscope.formats.capture import CaptureWriter, Format
from tunnelscope.nio import _fastpath as fp
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
fd = os.open(sys.argv[1], os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
size = int(sys.argv[3])  # a batch of 10 records; the 2nd batch crosses the limit halfway
resource.setrlimit(resource.RLIMIT_FSIZE, (24 + 15 * (size + 16), resource.RLIM_INFINITY))
rig = Rig()
sink = fp.Capture(fd, False, False, 65535, None, True)
writer = CaptureWriter(sink, Format())
rig.loop.add_capture(rig.id, sink, writer.add_interface(1, "lnk"), -1)
writer.announce()
for _ in range(20):
    for f in numbered(10, size):
        rig.src.send(f)
    rig.collect(rig.dst, 10, timeout=1, extra=0)
print(sink.error, rig.stats()["forwarded"])
"""


@pytest.mark.parametrize("size", [1000, 5000])  # copied into the buffer; written from slots
def test_failed_write_truncates_a_file_to_its_last_whole_record(tmp_path, size):
    path = str(tmp_path / "limited.pcap")
    here = os.path.dirname(os.path.abspath(__file__))
    out = subprocess.run(
        [sys.executable, "-c", FSIZE_SCRIPT, path, here, str(size)],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, out.stderr
    error, forwarded = out.stdout.split("\n")[0].rsplit(" ", 1)
    assert error == "capture stopped: File too large" and forwarded == "200"
    assert os.path.getsize(path) == 24 + 10 * (size + 16)  # the half-written batch was cut
    packets, _ = read_back(path)
    assert [p.data for p in packets] == numbered(10, size)
    if TSHARK:
        assert tshark_fields(path, "frame.len") == [[str(size)]] * 10


# --- GSO (UDP_SEGMENT), opt-in --------------------------------------------------------------


def test_gso_delivers_one_datagram_per_frame():
    """Loop(gso=True): runs of equal-size frames leave in one send, arrive one by one."""
    r = Rig(fp.Loop(gso=True))
    sizes = [100] * 150 + [1, 1, 0, 0, 14] + [1400] * 70 + [60000, 60000, 5000] + [64] * 10
    frames = [i.to_bytes(4, "big")[: min(4, n)] + bytes(max(0, n - 4)) for i, n in enumerate(sizes)]
    for f in frames:
        r.src.send(f)
    assert r.collect(r.dst, len(frames)) == frames
    st = r.stats()
    assert st["forwarded"] == len(frames) and st["send_errors"] == 0
    r.close()


def test_gso_falls_back_when_the_kernel_refuses_it():
    """SO_NO_CHECK makes UDP_SEGMENT fail with EINVAL: the frames go out one by one."""
    r = Rig(fp.Loop(gso=True))
    r.b.setsockopt(socket.SOL_SOCKET, 11, 1)  # SO_NO_CHECK
    frames = numbered(200, 300)
    for f in frames:
        r.src.send(f)
    assert r.collect(r.dst, 200) == frames
    assert r.stats()["send_errors"] == 0
    r.close()


# --- UDP GSO through the Engine and the CLI; the arrival stamp ----------------------------


def test_engine_gso_needs_the_c_backend():
    from tunnelscope.datapath.engine import Engine

    with pytest.raises(ValueError, match="gso needs the C backend"):
        Engine("python", gso=True)
    Engine("python").close()  # gso off: fine


def test_bridge_gso_flag():
    from click.testing import CliRunner

    from tunnelscope.cli.bridge import bridge

    runner = CliRunner()
    text = " ".join(runner.invoke(bridge, ["--help"]).output.split())
    assert "--gso" in text and "super-packets" in text
    result = runner.invoke(
        bridge,
        ["udp:0:127.0.0.1:9", "udp:0:127.0.0.1:9", "--gso", "--backend", "python"],
    )
    assert result.exit_code != 0
    assert "gso needs the C backend" in result.output


def test_python_twin_stamps_a_batch_once_its_receive_returned(monkeypatch):
    """pipeline.Loop calls Link.receive(direction) without a time: the batch is stamped after
    recv_batch returns (as handle_event does in C), so no frame leaves before its delay."""
    from tunnelscope.datapath import pipeline

    clock = [1_000_000_000]
    monkeypatch.setattr(pipeline.time, "monotonic_ns", lambda: clock[0])

    class SlowReceive:
        sent: list[bytes] = []

        def fileno(self) -> int:
            return -1

        def recv_batch(self, max_frames: int = 64) -> list[bytes]:
            clock[0] += 300_000  # the receive call itself takes 0.3 ms
            return [b"frame"]

        def send_batch(self, frames: list[bytes]) -> tuple[int, int]:
            self.sent = self.sent + frames
            return len(frames), 0

    a, b = SlowReceive(), SlowReceive()
    link = pipeline.Link(a, b)
    link.set_chain(A2B, chains([parse_impairment("a2b delay 1")], 1)["a2b"])
    link.receive(A2B)
    link.transmit(A2B, 1_000_000_000 + 1_000_000 + 299_999)  # 1 ms after the call began
    assert b.sent == []
    link.transmit(A2B, 1_000_000_000 + 1_000_000 + 300_000)  # 1 ms after the batch was in
    assert b.sent == [b"frame"]
