"""The Python reference data path, driven frame by frame with in-memory endpoints.

These pin the semantics of docs/pipeline.md; tests/test_bridge.py runs the same behaviours
through real sockets on both backends.
"""

from __future__ import annotations

import math
import os

import pytest

from tunnelscope.datapath.impairments import chains, parse_impairment
from tunnelscope.datapath.pipeline import A2B, B2A, PARK_NS, CaptureTap, Link
from tunnelscope.formats.capture import CaptureWriter, Format, RecordSink, read_capture


class MemoryEndpoint:
    """Frames to deliver on the next receive; frames the link sent."""

    def __init__(self) -> None:
        self.inbox: list[bytes] = []
        self.sent: list[bytes] = []
        self.counters: dict[str, int] = {}

    def fileno(self) -> int:
        return -1

    def recv_batch(self, max_frames: int = 64) -> list[bytes]:
        batch, self.inbox = self.inbox[:max_frames], self.inbox[max_frames:]
        return batch

    def send_batch(self, frames: list[bytes]) -> tuple[int, int]:
        self.sent.extend(frames)
        return len(frames), 0


def make_link(*impairments: str, seed: int = 7) -> tuple[Link, MemoryEndpoint, MemoryEndpoint]:
    a, b = MemoryEndpoint(), MemoryEndpoint()
    link = Link(a, b)
    compiled = chains([parse_impairment(text) for text in impairments], seed)
    link.set_chain(A2B, compiled["a2b"])
    link.set_chain(B2A, compiled["b2a"])
    return link, a, b


def numbered(count: int, start: int = 1) -> list[bytes]:
    return [n.to_bytes(4, "big") + b"\0" * 56 for n in range(start, start + count)]


def numbers(frames: list[bytes]) -> list[int]:
    return [int.from_bytes(frame[:4], "big") for frame in frames]


def push(link: Link, end: MemoryEndpoint, direction: int, frames: list[bytes], now: int = 0):
    """Deliver frames one receive batch at a time (64 per batch, as the loop does)."""
    end.inbox.extend(frames)
    while end.inbox:
        link.receive(direction, now)


def reconciles(stats: dict) -> bool:
    left = stats["received"] + stats["duplicated"]
    right = stats["forwarded"] + stats["send_errors"] + sum(stats["dropped"].values())
    return left == right + stats["queued"]


@pytest.mark.parametrize(
    ("n", "dropped"),
    [(3, [3, 6, 9]), (1, list(range(1, 11))), (-1, list(range(1, 11))), (0, []), (4, [4, 8])],
)
def test_freq_drop_follows_dynamips(n: int, dropped: list[int]) -> None:
    link, a, b = make_link(f"a2b freq_drop {n}")
    push(link, a, A2B, numbered(10))
    assert numbers(b.sent) == [i for i in range(1, 11) if i not in dropped]
    assert link.stats(A2B)["dropped"] == ({"freq_drop": len(dropped)} if dropped else {})


def test_freq_drop_both_shares_one_counter_across_directions() -> None:
    link, a, b = make_link("both freq_drop 2")
    for i in range(1, 7):  # a2b, b2a, a2b, ... : every 2nd frame overall dies
        end, direction = (a, A2B) if i % 2 else (b, B2A)
        push(link, end, direction, numbered(1, i))
    assert numbers(b.sent) == [1, 3, 5]  # frames 2, 4, 6 went b2a and were dropped
    assert numbers(a.sent) == []


def test_reconfiguring_restarts_the_freq_drop_counter() -> None:
    link, a, b = make_link("a2b freq_drop 3")
    push(link, a, A2B, numbered(2))
    compiled = chains([parse_impairment("a2b freq_drop 3")], 7)
    link.set_chain(A2B, compiled["a2b"])
    push(link, a, A2B, numbered(3, 3))
    assert numbers(b.sent) == [1, 2, 3, 4]  # frame 5 is the 3rd since reconfiguration


@pytest.mark.parametrize("percent", [5.0, 0.5, 37.5])
def test_packet_loss_rate_is_exact_within_four_sigma(percent: float) -> None:
    link, a, b = make_link(f"a2b packet_loss {percent}", seed=11)
    total = 20000
    push(link, a, A2B, numbered(total))
    lost = total - len(b.sent)
    p = percent / 100
    assert abs(lost - total * p) <= 4 * math.sqrt(total * p * (1 - p))
    assert reconciles(link.stats(A2B))


def test_same_seed_same_drops_other_seed_other_drops() -> None:
    runs = []
    for seed in (1, 1, 2):
        link, a, b = make_link("a2b packet_loss 10", seed=seed)
        push(link, a, A2B, numbered(2000))
        runs.append(numbers(b.sent))
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]


def test_directions_draw_from_independent_generators() -> None:
    link, a, b = make_link("both packet_loss 50", seed=3)
    push(link, a, A2B, numbered(500))
    push(link, b, B2A, numbered(500))
    assert numbers(b.sent) != numbers(a.sent)


def test_burst_loss_mean_burst_length_is_one_over_r() -> None:
    link, a, b = make_link("a2b burst_loss 2 25", seed=5)  # mean burst 1 / 0.25 = 4 frames
    total = 20000
    push(link, a, A2B, numbered(total))
    survived = set(numbers(b.sent))
    bursts, run = [], 0
    for i in range(1, total + 1):
        if i in survived:
            if run:
                bursts.append(run)
            run = 0
        else:
            run += 1
    mean = sum(bursts) / len(bursts)
    # burst lengths are geometric(r): sd = sqrt(1-r)/r = 3.46; 4 sigma of the mean
    assert abs(mean - 4) <= 4 * 3.46 / math.sqrt(len(bursts))
    # stationary loss = p / (p + r) = 2 / 27
    p = 2 / 27
    assert abs((total - len(survived)) / total - p) < 0.02


def test_delay_holds_frames_until_due_and_keeps_order() -> None:
    link, a, b = make_link("a2b delay 10")
    push(link, a, A2B, numbered(5), now=0)
    assert b.sent == []
    assert link.pipelines[A2B].next_deadline() == 10_000_000
    link.transmit(A2B, 9_999_999)
    assert b.sent == []
    link.transmit(A2B, 10_000_000)
    assert numbers(b.sent) == [1, 2, 3, 4, 5]
    assert link.stats(A2B)["delayed"] == 5


def test_delay_jitter_stays_within_bounds() -> None:
    link, a, b = make_link("a2b delay 10 4", seed=9)
    push(link, a, A2B, numbered(200), now=0)
    readies = [entry[0] for entry in link.pipelines[A2B].queue]
    assert min(readies) >= 6_000_000 and max(readies) <= 14_000_000
    assert len(set(readies)) > 50  # really jittered


def test_rate_spaces_departures_by_frame_cost() -> None:
    link, a, b = make_link("a2b rate 800 100")  # 800 kbit/s: a 100-byte frame costs 1 ms
    push(link, a, A2B, [bytes(100)] * 5, now=0)
    # the 100-byte burst lets the 1st and 2nd go at once, then one per millisecond
    assert len(b.sent) == 2
    assert sorted(entry[0] for entry in link.pipelines[A2B].queue) == [
        1_000_000,
        2_000_000,
        3_000_000,
    ]


def test_rate_tail_drops_beyond_the_queue_limit() -> None:
    link, a, b = make_link("a2b rate 8 100 3")  # 1 kB/s, 100-byte burst, queue of 3 frames
    push(link, a, A2B, [bytes(100)] * 10, now=0)
    stats = link.stats(A2B)
    assert len(b.sent) == 2  # the burst lets two leave at once
    assert stats["queued"] == 3
    assert stats["dropped"] == {"rate": 5}
    assert reconciles(stats)


def test_corrupt_flips_exactly_one_bit() -> None:
    link, a, b = make_link("a2b corrupt 100")
    frames = numbered(50)
    push(link, a, A2B, frames)
    for before, after in zip(frames, b.sent):
        diff = int.from_bytes(before, "big") ^ int.from_bytes(after, "big")
        assert bin(diff).count("1") == 1
    assert link.stats(A2B)["corrupted"] == 50


def test_zero_length_frames_pass_corrupt() -> None:
    link, a, b = make_link("a2b corrupt 100")
    push(link, a, A2B, [b""] * 3)
    assert b.sent == [b""] * 3
    assert link.stats(A2B)["corrupted"] == 0


def test_duplicate_sends_the_copy_right_after_the_original() -> None:
    link, a, b = make_link("a2b duplicate 100")
    push(link, a, A2B, numbered(3))
    assert numbers(b.sent) == [1, 1, 2, 2, 3, 3]
    stats = link.stats(A2B)
    assert stats["duplicated"] == 3 and reconciles(stats)


def test_reorder_lets_gap_frames_pass_first() -> None:
    link, a, b = make_link("a2b reorder 30 2", seed=4)
    total = 1000
    push(link, a, A2B, numbered(total))
    link.transmit(A2B, PARK_NS)  # the last parked frames leave on their timer
    sent = numbers(b.sent)
    assert sorted(sent) == list(range(1, total + 1))
    late, highest = 0, 0
    for n in sent:
        late += n < highest
        highest = max(highest, n)
    reordered = link.stats(A2B)["reordered"]
    # every held frame is overtaken, except held ones at the very end released by the timer
    assert 0 <= reordered - late <= 3
    assert abs(reordered - total * 0.3) <= 4 * math.sqrt(total * 0.3 * 0.7)
    assert reconciles(link.stats(A2B))


def test_reorder_gap_one_swaps_neighbours() -> None:
    link, a, b = make_link("a2b reorder 100 1")
    push(link, a, A2B, numbered(1))
    assert b.sent == []  # held: nothing overtook it yet
    compiled = chains([], 0)
    link.set_chain(A2B, compiled["a2b"])
    push(link, a, A2B, numbered(1, 2))
    assert numbers(b.sent) == [2, 1]


def test_chain_order_matters_and_causes_are_named() -> None:
    link, a, b = make_link("a2b duplicate 100", "a2b freq_drop 2")
    push(link, a, A2B, numbered(3))
    # each frame becomes two; the shared-by-position freq_drop kills every second copy
    assert numbers(b.sent) == [1, 2, 3]
    assert link.stats(A2B)["dropped"] == {"freq_drop": 3}


def test_pre_capture_names_the_impairment_that_dropped_a_frame(tmp_path) -> None:
    link, a, b = make_link("a2b freq_drop 3", "b2a packet_loss 100")
    path = tmp_path / "pre.pcapng"
    fmt = Format(pcapng=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT)
    writer = CaptureWriter(RecordSink(fd, None, close_fd=True), fmt)
    pre = writer.add_interface(1, "link pre")
    post = writer.add_interface(1, "link post")
    writer.announce()
    link.taps[0] = CaptureTap(writer, pre, post)
    push(link, a, A2B, numbered(6))
    push(link, b, B2A, numbered(2, 100))
    writer.sink.close()
    with path.open("rb") as stream:
        packets = list(read_capture(stream))
    pre_records = [(numbers([p.data])[0], p.comment) for p in packets if p.interface == pre]
    assert pre_records == [
        (1, None),
        (2, None),
        (3, "dropped by freq_drop"),
        (4, None),
        (5, None),
        (6, "dropped by freq_drop"),
        (100, "dropped by packet_loss"),
        (101, "dropped by packet_loss"),
    ]
    assert [numbers([p.data])[0] for p in packets if p.interface == post] == [1, 2, 4, 5]
