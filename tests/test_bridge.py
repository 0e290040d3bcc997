"""The bridge through real UDP sockets on loopback, on every backend built here.

Each test runs once per backend (C fast path and Python reference) with the same vectors;
tests/test_pipeline.py is the frame-by-frame reference these must agree with.
"""

from __future__ import annotations

import math
import os
import socket
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import tshark

from tunnelscope.datapath.engine import Engine, Link, available_backends
from tunnelscope.datapath.impairments import chains, parse_impairment
from tunnelscope.datapath.pipeline import A2B, PARK_NS
from tunnelscope.datapath.pipeline import Link as ReferenceLink
from tunnelscope.demo import free_udp_ports
from tunnelscope.formats import pcapng
from tunnelscope.formats.capture import CaptureError, Format, open_capture
from tunnelscope.formats.linktype import LinkType

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

    def transfer(
        self, frames: list[bytes], expected: int, timeout: float = 15.0, pace: int = 128
    ) -> list[bytes]:
        """Send A -> B from a thread while receiving at B, so no socket buffer overflows."""
        sender = threading.Thread(target=self.send, args=(self.peer_a, frames, pace))
        sender.start()
        try:
            return self.receive(self.peer_b, expected, timeout)
        finally:
            sender.join()

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
def lab(backend: str, *impairments: str, seed: int = 7, gso: bool = False) -> Iterator[Lab]:
    pa, la, lb, pb = free_udp_ports(4)
    peer_a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer_a.bind(("127.0.0.1", pa))
    peer_a.connect(("127.0.0.1", la))
    peer_b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    peer_b.bind(("127.0.0.1", pb))
    peer_b.connect(("127.0.0.1", lb))
    for peer in (peer_a, peer_b):
        peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    engine = Engine(backend, gso=gso)
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


def reference_output(impairments: list[str], frames: list[bytes], seed: int) -> list[bytes]:
    """What the frame-by-frame reference sends B for the same vector (timers run out)."""

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
    link.set_chain(A2B, chains([parse_impairment(text) for text in impairments], seed)["a2b"])
    a.inbox = list(frames)
    while a.inbox:
        link.receive(A2B, 0)
    link.transmit(A2B, PARK_NS)
    return b.sent


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


def sigma4(count: int, percent: float) -> float:
    p = percent / 100
    return 4 * math.sqrt(count * p * (1 - p))


def late_frames(sequence: list[int]) -> int:
    """Frames that arrive after a frame sent later than them (the reorder counter's view)."""
    late, highest = 0, 0
    for n in sequence:
        late += n < highest
        highest = max(highest, n)
    return late


RANDOM_CASES = {
    "a2b packet_loss 5": lambda sent, got: (
        abs((len(sent) - len(got)) - len(sent) * 0.05) <= sigma4(len(sent), 5)
    ),
    "a2b duplicate 3": lambda sent, got: (
        abs((len(got) - len(sent)) - len(sent) * 0.03) <= sigma4(len(sent), 3)
    ),
    "a2b corrupt 2": lambda sent, got: (
        abs(sum(1 for x, y in zip(sent, got) if x != y) - len(sent) * 0.02) <= sigma4(len(sent), 2)
    ),
    "a2b reorder 4 2": lambda sent, got: (
        abs(late_frames(numbers(got)) - len(sent) * 0.04) <= sigma4(len(sent), 4) + 2
    ),
    # Gilbert-Elliott p=1 % r=20 %: stationary loss p / (p + r) = 4.76 %
    "a2b burst_loss 1 20": lambda sent, got: (
        abs((len(sent) - len(got)) / len(sent) - 1 / 21) < 0.015
    ),
}


@pytest.mark.parametrize("impairment", list(RANDOM_CASES))
def test_random_impairments_hit_their_rate_and_match_the_reference(
    backend: str, impairment: str
) -> None:
    """20,000 seeded frames: the configured rate within 4 sigma, and the exact same frames
    as the reference (so a seed gives the same drops twice, on either backend)."""
    frames = numbered(20000)
    expected = reference_output([impairment], frames, seed=42)
    assert RANDOM_CASES[impairment](frames, expected)
    with lab(backend, impairment, seed=42) as t:
        got = t.transfer(frames, len(expected))
        stats = t.settle(len(frames))
    assert stats["received"] == len(frames)
    assert len(got) == len(expected)
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


@tshark.required
def test_jumbo_and_largest_frames_cross_whole_with_capture_on(backend: str, tmp_path) -> None:
    """9000-byte (QEMU jumbo) and 65,507-byte frames, both ways, captured at both points: the
    frames and their records whole. 20 of the largest outgrow the capture buffer (1 MiB)."""
    path = tmp_path / "big.pcapng"
    a2b = [os.urandom(9000), os.urandom(65507)] + [os.urandom(65507) for _ in range(20)]
    b2a = [os.urandom(65507), os.urandom(9000)]
    with lab(backend) as t:
        t.link.start_capture(str(path), LinkType.ETHERNET, "both")
        t.send(t.peer_a, a2b, pace=4)
        assert t.receive(t.peer_b, len(a2b)) == a2b
        t.send(t.peer_b, b2a)
        assert t.receive(t.peer_a, len(b2a)) == b2a
        t.settle(len(a2b))
        state = t.link.stop_capture()
    assert state is not None and state.error is None
    with open_capture(str(path)) as reader:
        records = [(p.interface, p.data) for p in reader]
    for interface in (0, 1):  # pre, post
        assert [data for i, data in records if i == interface] == a2b + b2a
    rows = tshark.fields(str(path), ["frame.len", "frame.cap_len"])
    assert [(r["frame.len"], r["frame.cap_len"]) for r in rows] == [
        ([str(len(data))], [str(len(data))]) for _, data in records
    ]


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


def records_without_timestamps(path) -> dict[int, list[bytes]]:
    """Every pcapng block of a capture, timestamps zeroed, grouped by interface (EPB, ISB)."""
    data = path.read_bytes()
    blocks: dict[int, list[bytes]] = {-1: []}
    offset = 0
    while offset < len(data):
        block_type, length = struct.unpack_from("<II", data, offset)
        block = bytearray(data[offset : offset + length])
        if block_type in (pcapng.EPB, pcapng.ISB):
            block[12:20] = bytes(8)
            blocks.setdefault(struct.unpack_from("<I", block, 8)[0], []).append(bytes(block))
        else:
            blocks[-1].append(bytes(block))
        offset += length
    return blocks


@pytest.mark.skipif(len(available_backends()) < 2, reason="needs both backends")
@pytest.mark.parametrize("size", [100, 3000])  # C: copied into the buffer; written from slots
def test_both_backends_write_the_same_capture_bytes(tmp_path, size: int) -> None:
    impairments = ("a2b freq_drop 5", "a2b corrupt 10", "a2b duplicate 10", "b2a packet_loss 30")
    frames = numbered(3000, size=size)
    expected = len(reference_output([i for i in impairments if i.startswith("a2b")], frames, 99))
    captures = {}
    for backend in available_backends():
        path = captures[backend] = tmp_path / f"{backend}.pcapng"
        with lab(backend, *impairments, seed=99) as t:
            t.link.start_capture(str(path), LinkType.ETHERNET, "both")
            pace = 128 if size < 1000 else 16  # B's socket buffer holds fewer large frames
            assert len(t.transfer(frames, expected, pace=pace)) == expected
            t.send(t.peer_b, numbered(500, size=size, start=5000))
            t.receive(t.peer_a, 500, timeout=1)
            t.settle(3000)
            t.link.stop_capture()
    c, python = (records_without_timestamps(captures[name]) for name in ("c", "python"))
    assert sorted(c) == [-1, 0, 1]
    assert len(c[0]) == 3000 + 500 + 1  # every frame at pre, then the statistics block
    # the headers differ only in the ports of the interface description
    assert c[0] == python[0]
    assert c[1] == python[1]


@pytest.mark.skipif("c" not in available_backends(), reason="GSO is the C backend's")
def test_gso_still_delivers_one_datagram_per_frame_in_order() -> None:
    frames = numbered(2000, size=200)
    with lab("c", gso=True) as t:
        assert t.engine.gso
        got = t.transfer(frames, len(frames))  # recv(65535): a super-packet would show
        stats = t.settle(len(frames))
    assert got == frames
    assert stats["forwarded"] == len(frames)


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 KiB tmpfs: a disk that fills up after a few hundred frames (root only)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], check=True)
    try:
        yield disk
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=False)


@pytest.mark.parametrize("fmt", [Format(flush_ms=10), Format(pcapng=True, flush_ms=None)])
def test_a_full_disk_reports_the_frames_the_file_holds(
    backend: str, small_disk: Path, fmt: Format
) -> None:
    path = small_disk / ("full.pcapng" if fmt.pcapng else "full.pcap")
    with lab(backend) as t:
        state = t.link.start_capture(str(path), LinkType.ETHERNET, "pre", fmt)
        sent = 0
        while sent < 1000:  # 300 kB: the disk fills a fifth of the way
            t.send(t.peer_a, numbered(50, size=300, start=sent + 1))
            sent += 50
            assert len(t.receive(t.peer_b, 50)) == 50  # the link goes on meanwhile
        deadline = time.monotonic() + 3
        while t.link.capture is not None and time.monotonic() < deadline:
            time.sleep(0.02)  # the engine notices between loop runs
        assert t.link.capture is None and "No space left" in (state.error or "")
    with open_capture(str(path)) as reader:  # valid: it ends on a whole record
        in_file = [numbers([p.data])[0] for p in reader]
    assert 50 < len(in_file) < sent
    assert state.frames == len(in_file)
    assert in_file == list(range(1, len(in_file) + 1))
