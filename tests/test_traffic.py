"""Test frames, loss accounting, blast and sink: the pieces `probe` and the benchmark stand on.

The framings are judged by tshark; the accounting by a brute-force reference on random
sequences; blast and sink by real UDP sockets on 127.0.0.1 (C helpers and Python fallback).
"""

from __future__ import annotations

import json
import random
import shutil
import subprocess
import threading
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager

import pytest
from click.testing import CliRunner
from command import TUNNELSCOPE

from tunnelscope.analysis import traffic
from tunnelscope.analysis.traffic import (
    FRAMINGS,
    HEADER,
    MAGIC,
    FrameDecoder,
    FrameFactory,
    Framing,
    SequenceTracker,
    percentile,
    wilson_interval,
)
from tunnelscope.cli import cli
from tunnelscope.demo import free_udp_ports
from tunnelscope.formats import pcap
from tunnelscope.nio import open_endpoint

pytestmark = pytest.mark.timeout(60)


# --- frames ------------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("tshark") is None, reason="needs tshark")
@pytest.mark.parametrize("kind", FRAMINGS)
def test_tshark_reads_every_framing(kind: str, tmp_path) -> None:
    framing = Framing(kind, src_ip="192.0.2.1", dst_ip="198.51.100.7", sport=1234, dlci=321)
    factory = FrameFactory(framing, 200, stream=5)
    path = tmp_path / "frames.pcap"
    frames = factory.frames(0, 2, 10**18)
    path.write_bytes(
        pcap.global_header(framing.linktype) + b"".join(pcap.record(0, f) for f in frames)
    )
    fields = ["frame.len", "eth.type", "ip.src", "ip.dst", "ip.len", "ip.checksum.status"]
    fields += ["udp.srcport", "udp.length", "fr.dlci", "chdlc.protocol", "ppp.protocol"]
    out = subprocess.run(
        ["tshark", "-r", str(path), "-o", "ip.check_checksum:TRUE", "-T", "fields"]
        + [arg for f in fields for arg in ("-e", f)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    row = dict(zip(fields, out.splitlines()[0].split("\t")))
    assert row["frame.len"] == "200"
    if kind == "ethernet":
        assert row["eth.type"] == "0x88b5"
        return
    assert (row["ip.src"], row["ip.dst"], row["udp.srcport"]) == (
        "192.0.2.1",
        "198.51.100.7",
        "1234",
    )
    assert int(row["ip.len"]) == 200 - framing.offset + 28
    assert int(row["udp.length"]) == int(row["ip.len"]) - 20
    assert row["ip.checksum.status"] == "1"  # good
    expected = {"ipv4": ("eth.type", "0x0800"), "hdlc": ("chdlc.protocol", "0x0800")}
    expected |= {"ppp": ("ppp.protocol", "0x0021"), "fr": ("fr.dlci", "321")}
    key, value = expected[kind]
    assert row[key] == value


def test_frames_carry_the_documented_header() -> None:
    factory = FrameFactory(Framing(), 100, stream=0xABCD)
    frame = factory.frames(41, 1, 123456789)[0]
    magic, stream, seq, send_ns, _ = HEADER.unpack_from(frame, 14)
    assert (len(frame), magic, stream, seq, send_ns) == (100, MAGIC, 0xABCD, 41, 123456789)
    assert frame[14 + HEADER.size :] == bytes(range(100 - 14 - HEADER.size))


def test_sizes_below_the_header_or_above_udp_are_refused() -> None:
    assert FrameFactory(Framing("ipv4")).size == 70  # default 64 would not hold IPv4/UDP
    assert FrameFactory(Framing()).size == 64
    with pytest.raises(ValueError, match="out of range 42..65507"):
        FrameFactory(Framing(), 41)
    with pytest.raises(ValueError, match="out of range"):
        FrameFactory(Framing("hdlc"), 65508)
    with pytest.raises(ValueError, match="not a MAC address"):
        Framing(src_mac="00:11:22")
    with pytest.raises(ValueError, match="not an IPv4 address"):
        Framing("ipv4", dst_ip="10.0.0.300")
    with pytest.raises(ValueError, match="unknown framing"):
        Framing("atm")


@pytest.mark.parametrize("kind", FRAMINGS)
def test_decoder_finds_the_header_of_any_framing(kind: str) -> None:
    frames = FrameFactory(Framing(kind), stream=9).frames(0, 5, 77)
    chatter = bytes.fromhex("ffffffffffff005079666800") + b"\x08\x06" + bytes(46)  # ARP
    decoder = FrameDecoder()
    assert decoder.decode([chatter, *frames]) == [(n, 77) for n in range(5)]
    assert (decoder.offset, decoder.stream, decoder.foreign) == (Framing(kind).offset, 9, 1)


def test_every_single_bit_flip_in_the_probe_payload_is_corruption() -> None:
    frame = FrameFactory(Framing(), 80, stream=3).frames(7, 1, 1)[0]
    for bit in range(len(frame) * 8):
        damaged = bytearray(frame)
        damaged[bit >> 3] ^= 1 << (bit & 7)
        decoder = FrameDecoder(14, 3)
        intact = decoder.decode([bytes(damaged)])
        if bit < 14 * 8:  # the Ethernet header: routers rewrite it, the CRC leaves it out
            assert intact == [(7, 1)]
        else:
            assert (intact, decoder.corrupted, decoder.foreign) == ([], 1, 0)


def test_other_streams_and_truncated_frames_are_foreign_or_corrupted() -> None:
    ours = FrameFactory(Framing(), 64, stream=1).frames(0, 2, 0)
    theirs = FrameFactory(Framing(), 64, stream=0xFF).frames(0, 2, 0)
    decoder = FrameDecoder(14, 1)
    assert decoder.decode([ours[0], *theirs, ours[1][:30], ours[1][:-1]]) == [(0, 0)]
    assert (decoder.foreign, decoder.corrupted) == (3, 1)  # truncated header: foreign


# --- accounting --------------------------------------------------------------------------


def reference(arrivals: list[int], expected: int) -> dict:
    """The definitions, by brute force."""
    seen: set[int] = set()
    highest = -1
    dup = reordered = 0
    for seq in arrivals:
        if seq in seen:
            dup += 1
        elif seq < highest:
            reordered += 1
        seen.add(seq)
        highest = max(highest, seq)
    bursts: Counter[int] = Counter()
    run = 0
    for seq in range(max(expected, highest + 1)):
        if seq in seen:
            if run:
                bursts[run] += 1
            run = 0
        else:
            run += 1
    if run:
        bursts[run] += 1
    return {"dup": dup, "reordered": reordered, "bursts": bursts}


def lossy_path(rng: random.Random, count: int, jumps: bool) -> list[int]:
    out: list[int] = []
    held: list[int] = []
    seq = 0
    while seq < count:
        if jumps and rng.random() < 0.002:
            seq += rng.randrange(10, 200)  # a long outage, longer than small windows
            continue
        if rng.random() < 0.05:
            seq += 1
            continue
        (held if rng.random() < 0.05 else out).append(seq)
        if rng.random() < 0.03:
            out.append(seq)
        if held and rng.random() < 0.3:
            out.append(held.pop(0))
        seq += 1
    return out + held


@pytest.mark.parametrize("seed", range(6))
def test_tracker_matches_the_definitions(seed: int) -> None:
    rng = random.Random(seed)
    count = 3000
    arrivals = lossy_path(rng, count, jumps=seed % 2 == 1)
    tracker = SequenceTracker(window=1 << 12)
    for seq in arrivals:
        tracker.add(seq)
    tracker.finish(count)
    want = reference(arrivals, count)
    assert tracker.late == 0
    assert (tracker.duplicated, tracker.reordered) == (want["dup"], want["reordered"])
    assert tracker.bursts == want["bursts"]
    assert tracker.lost == count - len(set(arrivals))


def test_tracker_with_a_small_window_counts_very_late_frames_as_lost() -> None:
    tracker = SequenceTracker(window=8)
    for seq in [*range(0, 5), *range(6, 40), 5, 45, 41]:
        tracker.add(seq)
    tracker.finish()
    assert (tracker.late, tracker.reordered) == (1, 1)  # 5 is too late, 41 is not
    assert tracker.bursts == Counter({1: 2, 3: 1})  # 5, 40, 42..44
    assert tracker.unique == 41


def test_tracker_jump_beyond_the_window() -> None:
    tracker = SequenceTracker(window=4)
    for seq in (0, 2, 100, 101, 99):
        tracker.add(seq)
    tracker.finish(105)
    assert tracker.bursts == Counter({1: 1, 96: 1, 3: 1})  # 1; 3..98; 102..104


def test_wilson_interval_and_percentiles() -> None:
    low, high = wilson_interval(50, 1000)
    assert (round(low, 4), round(high, 4)) == (0.0381, 0.0653)
    assert wilson_interval(0, 100)[0] == 0.0 and 0.03 < wilson_interval(0, 100)[1] < 0.04
    assert percentile([10, 20, 30, 40], 0.5) == 25
    assert percentile([10, 20, 30, 40], 1.0) == 40


# --- blast and sink over loopback --------------------------------------------------------


@pytest.fixture(params=["fast", "fallback"])
def io_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    if request.param == "fallback":
        monkeypatch.setattr(traffic, "_fastpath", None)
    elif traffic._fastpath is None:
        pytest.skip("the C helpers are not built")
    return request.param


@contextmanager
def tunnel() -> Iterator[tuple]:
    """Two endpoints facing each other: sender udp:S->R, receiver udp:R->S."""
    s, r = free_udp_ports(2)
    sender = open_endpoint(f"udp:{s}:127.0.0.1:{r}")
    receiver = open_endpoint(f"udp:{r}:127.0.0.1:{s}")
    try:
        yield sender, receiver
    finally:
        sender.close()
        receiver.close()


def test_blast_into_sink_loses_nothing(io_path: str) -> None:
    with tunnel() as (sender, receiver):
        results: list = []
        thread = threading.Thread(
            target=lambda: results.append(traffic.sink(receiver, count=5000, duration=5))
        )
        thread.start()
        factory = FrameFactory(Framing(), 512)
        sent = traffic.blast(sender, factory, rate=50_000, count=5000)
        thread.join(6)
    report = results[0].as_dict()
    assert (sent.sent, sent.send_errors) == (5000, 0)
    assert report["stream"] == factory.stream
    assert (report["received"], report["lost"], report["expected"]) == (5000, 0, 5000)
    assert report["duplicated"] == report["reordered"] == report["corrupted"] == 0


def test_blast_keeps_its_rate_and_duration() -> None:
    with tunnel() as (sender, _):
        result = traffic.blast(sender, FrameFactory(Framing()), rate=4000, duration=0.25)
    assert 900 <= result.sent <= 1001
    assert 0.24 <= result.seconds <= 0.35


def test_sink_stops_when_idle_and_on_request() -> None:
    with tunnel() as (sender, receiver):
        stop = threading.Event()
        timer = threading.Timer(0.3, stop.set)
        timer.start()
        assert traffic.sink(receiver, stop=stop).tracker.received == 0
        traffic.blast(sender, FrameFactory(Framing()), count=10)
        result = traffic.sink(receiver, idle=0.2, duration=3)
    assert result.tracker.received == 10
    assert result.last_ns - result.first_ns < 0.2e9


# --- the commands ------------------------------------------------------------------------


def test_blast_and_sink_commands(tmp_path) -> None:
    s, r = free_udp_ports(2)
    sink_process = subprocess.Popen(
        [*TUNNELSCOPE, "sink", f"udp:{r}:127.0.0.1:{s}", "--json"]
        + ["--idle", "0.5", "--duration", "10"],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert traffic.wait_until_bound([r])
        result = CliRunner().invoke(
            cli,
            ["blast", f"udp:{s}:127.0.0.1:{r}", "--frame", "hdlc", "--size", "300"]
            + ["--count", "2000", "--rate", "20000", "--stream", "77", "--json"],
        )
        out, _ = sink_process.communicate(timeout=10)
    finally:
        sink_process.kill()
    assert result.exit_code == 0, result.output
    sent = json.loads(result.output)
    received = json.loads(out)
    assert (sent["sent"], sent["stream"], sent["size"]) == (2000, 77, 300)
    assert (received["received"], received["lost"], received["stream"]) == (2000, 0, 77)


@pytest.mark.parametrize(
    "args, message",
    [
        (["blast", "udp:1:127.0.0.1:2", "--size", "20"], "frame size 20 is out of range"),
        (["blast", "udp:x", "--count", "1"], "udp:x"),
        (["blast", "udp:1:127.0.0.1:2", "--frame", "fr", "--dlci", "2000"], "'--dlci': 2000"),
        (["sink", "nope:1"], "unknown endpoint type"),
    ],
)
def test_commands_refuse_bad_input_in_one_line(args: list[str], message: str) -> None:
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 2
    assert message in result.output
    assert "Traceback" not in result.output


def test_blast_to_a_port_nobody_listens_on_counts_errors() -> None:
    s, r = free_udp_ports(2)
    result = CliRunner().invoke(
        cli, ["blast", f"udp:{s}:127.0.0.1:{r}", "--count", "200", "--rate", "2000", "--json"]
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.output)
    assert report["sent"] + report["send_errors"] == 200
    assert report["send_errors"] > 0  # ICMP port unreachable comes back as ECONNREFUSED
