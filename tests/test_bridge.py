"""The bridge through real UDP sockets on loopback, on every backend built here.

Each test runs once per backend (C fast path and Python reference) with the same vectors;
tests/test_pipeline.py is the frame-by-frame reference these must agree with.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import pytest

from tunnelscope.capture import CaptureError, Format, open_capture
from tunnelscope.demo import free_udp_ports
from tunnelscope.engine import Engine, Link, available_backends
from tunnelscope.impairments import chains, parse_impairment
from tunnelscope.linktype import LinkType
from tunnelscope.pipeline import A2B
from tunnelscope.pipeline import Link as ReferenceLink

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(params=available_backends())
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


class Lab:
    """Peer A <-> [link] <-> peer B, each peer a connected UDP socket on 127.0.0.1."""

    def __init__(self, engine: Engine, link: Link, peer_a: socket.socket, peer_b: socket.socket):
        self.engine = engine
        self.link = link
        self.peer_a = peer_a
        self.peer_b = peer_b

    def send(self, peer: socket.socket, frames: list[bytes], pace: int = 32) -> None:
        """Send, pausing every `pace` frames so socket buffers never overflow."""
        for i, frame in enumerate(frames, 1):
            peer.send(frame)
            if i % pace == 0:
                time.sleep(0.001)

    def receive(self, peer: socket.socket, count: int, timeout: float = 3.0) -> list[bytes]:
        frames: list[bytes] = []
        deadline = time.monotonic() + timeout
        peer.settimeout(0.05)
        while len(frames) < count and time.monotonic() < deadline:
            try:
                frames.append(peer.recv(65535))
            except (TimeoutError, socket.timeout):
                continue
        return frames

    def settle(self, expected_a2b: int, timeout: float = 3.0) -> dict:
        """Wait until the link has received `expected_a2b` frames from A and queued none."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            stats = self.link.stats()["a2b"]
            if stats["received"] >= expected_a2b and stats["queued"] == 0:
                return stats
            time.sleep(0.01)
        return self.link.stats()["a2b"]


@contextmanager
def lab(backend: str, *impairments: str, seed: int = 7) -> Iterator[Lab]:
    pa, la, lb, pb = free_udp_ports(4)
    peer_a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer_a.bind(("127.0.0.1", pa))
    peer_a.connect(("127.0.0.1", la))
    peer_b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer_b.bind(("127.0.0.1", pb))
    peer_b.connect(("127.0.0.1", lb))
    for peer in (peer_a, peer_b):
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    engine = Engine(backend)
    link = engine.add_link("link", f"udp:{la}:127.0.0.1:{pa}", f"udp:{lb}:127.0.0.1:{pb}", seed)
    link.set_impairments([parse_impairment(text) for text in impairments])
    thread = threading.Thread(target=engine.run, daemon=True)
    thread.start()
    try:
        yield Lab(engine, link, peer_a, peer_b)
    finally:
        engine.stop()
        thread.join(5)
        engine.close()
        peer_a.close()
        peer_b.close()
    assert not thread.is_alive()


def numbered(count: int, size: int = 64, start: int = 1) -> list[bytes]:
    return [n.to_bytes(4, "big") + bytes(size - 4) for n in range(start, start + count)]


def numbers(frames: list[bytes]) -> list[int]:
    return [int.from_bytes(frame[:4], "big") for frame in frames]


def reference_survivors(impairment: str, count: int, seed: int) -> list[int]:
    """What the frame-by-frame reference forwards for the same vector."""

    class Memory:
        counters: dict = {}

        def __init__(self) -> None:
            self.inbox, self.sent = [], []

        def recv_batch(self, n: int = 64) -> list[bytes]:
            batch, self.inbox = self.inbox[:n], self.inbox[n:]
            return batch

        def send_batch(self, frames: list[bytes]) -> tuple[int, int]:
            self.sent += frames
            return len(frames), 0

    a, b = Memory(), Memory()
    link = ReferenceLink(a, b)
    link.set_chain(A2B, chains([parse_impairment(impairment)], seed)["a2b"])
    a.inbox = numbered(count)
    while a.inbox:
        link.receive(A2B, 0)
    return numbers(b.sent)


def test_forwards_both_directions_any_size(backend: str) -> None:
    sizes = [0, 1, 14, 60, 1514, 9000, 65507]
    with lab(backend) as t:
        frames = [bytes([n % 256]) * size for n, size in enumerate(sizes)]
        t.send(t.peer_a, frames)
        assert t.receive(t.peer_b, len(frames)) == frames
        t.send(t.peer_b, frames[::-1])
        assert t.receive(t.peer_a, len(frames)) == frames[::-1]
        stats = t.link.stats()
    assert stats["a2b"]["forwarded"] == stats["b2a"]["forwarded"] == len(sizes)


def test_freq_drop_drops_every_third_frame(backend: str) -> None:
    with lab(backend, "a2b freq_drop 3") as t:
        t.send(t.peer_a, numbered(30))
        got = numbers(t.receive(t.peer_b, 20))
        t.send(t.peer_b, numbered(5))
        back = t.receive(t.peer_a, 5)
        stats = t.settle(30)
    assert got == [n for n in range(1, 31) if n % 3]
    assert len(back) == 5  # b2a untouched
    assert stats["dropped"] == {"freq_drop": 10}


def test_seeded_loss_matches_the_reference_frame_for_frame(backend: str) -> None:
    expected = reference_survivors("a2b packet_loss 20", 2000, seed=42)
    with lab(backend, "a2b packet_loss 20", seed=42) as t:
        t.send(t.peer_a, numbered(2000))
        got = numbers(t.receive(t.peer_b, len(expected)))
        t.settle(2000)
    assert got == expected


def test_burst_larger_than_a_batch_is_all_accounted_for(backend: str) -> None:
    with lab(backend, "a2b duplicate 10", "a2b packet_loss 10", seed=3) as t:
        t.send(t.peer_a, numbered(10000), pace=256)
        stats = t.settle(10000, timeout=10)
        t.receive(t.peer_b, 20000, timeout=0.5)
    left = stats["received"] + stats["duplicated"]
    right = stats["forwarded"] + stats["send_errors"] + sum(stats["dropped"].values())
    assert stats["received"] == 10000
    assert left == right + stats["queued"]


def test_delay_adds_ten_milliseconds(backend: str) -> None:
    with lab(backend, "a2b delay 10") as t:
        t.peer_b.settimeout(1)
        latencies = []
        for frame in numbered(20):
            start = time.monotonic()
            t.peer_a.send(frame)
            t.peer_b.recv(65535)
            latencies.append(time.monotonic() - start)
    latencies.sort()
    median = latencies[len(latencies) // 2]
    assert 0.009 <= median <= 0.011
    assert latencies[0] >= 0.0095


def test_delay_does_not_serialise_frames(backend: str) -> None:
    """1000 frames sent in 50 ms all arrive about 10 ms later: a queue, not a sleep."""
    with lab(backend, "a2b delay 10") as t:
        start = time.monotonic()
        t.send(t.peer_a, numbered(1000))
        got = t.receive(t.peer_b, 1000, timeout=2)
        elapsed = time.monotonic() - start
    assert numbers(got) == list(range(1, 1001))
    assert elapsed < 0.5  # ubridge's sleeping delay would take 10 s


def test_capture_pre_and_post_with_drop_comments(backend: str, tmp_path) -> None:
    path = tmp_path / "link.pcapng"
    with lab(backend, "a2b freq_drop 2") as t:
        t.link.start_capture(str(path), LinkType.ETHERNET, "both")
        t.send(t.peer_a, numbered(6))
        t.receive(t.peer_b, 3)
        t.send(t.peer_b, numbered(2, start=100))
        t.receive(t.peer_a, 2)
        t.settle(6)
        state = t.link.stop_capture()
    assert state is not None and state.error is None
    with open_capture(str(path)) as reader:
        packets = list(reader)
        names = [i.name for i in reader.interfaces]
    assert names == ["link pre", "link post"]
    pre = [(numbers([p.data])[0], int(p.direction), p.comment) for p in packets if p.interface == 0]
    assert pre == [
        (1, 2, None),
        (2, 2, "dropped by freq_drop"),
        (3, 2, None),
        (4, 2, "dropped by freq_drop"),
        (5, 2, None),
        (6, 2, "dropped by freq_drop"),
        (100, 1, None),
        (101, 1, None),
    ]
    post = [numbers([p.data])[0] for p in packets if p.interface == 1]
    assert post == [1, 3, 5, 100, 101]


def test_capture_that_fails_never_stops_the_link(backend: str) -> None:
    with lab(backend) as t:
        t.link.start_capture("/dev/full", LinkType.ETHERNET, "pre", Format(flush_ms=None))
        t.send(t.peer_a, numbered(10))
        assert len(t.receive(t.peer_b, 10)) == 10
        deadline = time.monotonic() + 3
        while t.link.capture is not None and time.monotonic() < deadline:
            time.sleep(0.02)  # the engine notices between loop runs
        assert t.link.capture is None  # stopped and reported
        t.send(t.peer_a, numbered(10, start=11))
        assert numbers(t.receive(t.peer_b, 10)) == list(range(11, 21))


def test_capture_into_unwritable_path_is_refused(backend: str, tmp_path) -> None:
    with lab(backend) as t, pytest.raises(CaptureError, match="cannot write"):
        t.link.start_capture(str(tmp_path / "no" / "such" / "dir.pcap"))
