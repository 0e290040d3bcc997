#!/usr/bin/env python3
"""Live capture benchmark: how late does tshark see a frame, and what does capturing cost?

Latency: `tunnelscope bridge A B -w - --pcapng --flush-ms 10`, fed at a paced rate (1,000 and
100,000 frames/s by default) with Ethernet frames of an unassigned ethertype that carry their
send time (CLOCK_MONOTONIC ns, one clock for every process of the machine). Two readers:
  pipe    this script reads the pcapng stream itself: the relay-to-reader latency (relay, flush
          policy, pipe), what the flush policy is judged on
  tshark  `tshark -l -i - -T fields -e data.data`: what a user sees; tshark 4.0 reads a pipe
          through dumpcap and a temporary file, which adds its own delay, and cannot dissect
          100,000 frames/s on this machine (the "seen" column)
Latency of a frame = when the reader has it minus its send time; p50/p99 per run, medians
over --runs.

CPU: the relay's CPU time per forwarded frame (benchmarks/relay.py's `cpu_seconds`) with the
capture to a pipe (drained by `cat`) against none, same paced load, and the ratio.

    python benchmarks/live.py            # 3 runs, about a minute on 2 cores
    python benchmarks/live.py --quick    # 1 run at 1,000 and 20,000 frames/s
"""

from __future__ import annotations

import argparse
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import BinaryIO, TextIO

sys.path.insert(0, str(Path(__file__).resolve().parent))
from relay import cpu_seconds, tunnelscope  # noqa: E402

from tunnelscope.analysis.traffic import wait_until_bound  # noqa: E402
from tunnelscope.demo import free_udp_ports  # noqa: E402

HOST = "127.0.0.1"
HEADER = b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x88\xb5"  # local experimental
SIZE = 100


def paced_sender(sock: socket.socket, rate: int, seconds: float) -> int:
    """Send `rate` frames/s for `seconds`, each stamped with its send time; how many sent."""
    start = time.monotonic_ns()
    sent = 0
    padding = bytes(SIZE - len(HEADER) - 8)
    while True:
        elapsed = time.monotonic_ns() - start
        if elapsed >= seconds * 1e9:
            return sent
        due = int(elapsed * rate // 1_000_000_000) + 1 - sent
        for _ in range(due):
            sock.send(HEADER + struct.pack(">Q", time.monotonic_ns()) + padding)
            sent += 1
        time.sleep(0.0002 if due == 0 else 0)


def relay(ports: list[int], backend: str, extra: list[str], stdout: int) -> subprocess.Popen:
    la, pa, lb, pb = ports
    command = tunnelscope("bridge", f"udp:{la}:{HOST}:{pa}", f"udp:{lb}:{HOST}:{pb}")
    command += ["--backend", backend, "--linktype", "ethernet", "--json", *extra]
    return subprocess.Popen(command, stdout=stdout, stderr=subprocess.PIPE)


def peers(ports: list[int]) -> tuple[socket.socket, socket.socket]:
    la, pa, lb, pb = ports
    sender = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    sender.bind((HOST, pa))
    sender.connect((HOST, la))
    drain = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # side B: the kernel drops
    drain.bind((HOST, pb))
    drain.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
    return sender, drain


def read_pipe(stream: BinaryIO) -> None:
    """Parse the pcapng stream on stdin (each frame carries its send time after the Ethernet
    header) and print every frame's delay in ns at the end, one per line."""
    delays = []
    buffer = b""
    stamp = 28 + len(HEADER)
    while chunk := stream.read1(1 << 16):
        now = time.monotonic_ns()
        buffer += chunk
        offset = 0
        while offset + 8 <= len(buffer):
            kind, length = struct.unpack_from("<II", buffer, offset)
            if offset + length > len(buffer):
                break
            if kind == 6:
                delays.append(now - struct.unpack_from(">Q", buffer, offset + stamp)[0])
            offset += length
        buffer = buffer[offset:]
    sys.stdout.write("".join(f"{d}\n" for d in delays))


def read_delays(stream: TextIO, delays: list[int]) -> None:
    delays.extend(int(line) for line in stream)


def read_tshark(stream: TextIO, delays: list[int]) -> None:
    for line in stream:
        now = time.monotonic_ns()
        if len(line) >= 16:
            delays.append(now - int(line[:16], 16))


def latency(
    rate: int, seconds: float, backend: str, flush_ms: float, reader_kind: str
) -> tuple[float, float, int]:
    """(p50 ms, p99 ms, % of the frames sent that the reader saw) for one run."""
    ports = free_udp_ports(4)
    bridge = relay(ports, backend, ["-w", "-", "--pcapng", "--flush-ms", str(flush_ms)], -1)
    tshark = None
    delays: list[int] = []
    if reader_kind == "pipe":  # in its own process: no GIL shared with the sender
        tshark = subprocess.Popen(
            [sys.executable, __file__, "--read"],
            stdin=bridge.stdout,
            stdout=subprocess.PIPE,
            text=True,
        )
        bridge.stdout.close()  # type: ignore[union-attr]
        target, stream = read_delays, tshark.stdout
    elif reader_kind == "tshark":
        tshark = subprocess.Popen(
            ["tshark", "-l", "-i", "-", "-T", "fields", "-e", "data.data"],
            stdin=bridge.stdout,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        bridge.stdout.close()  # type: ignore[union-attr]
        target, stream = read_tshark, tshark.stdout
    reader = threading.Thread(target=target, args=(stream, delays), daemon=True)
    reader.start()
    sender, drain = peers(ports)
    try:
        wait_until_bound(ports[0::2])
        time.sleep(1.5)  # tshark is up and has read the header
        sent = paced_sender(sender, rate, seconds)
        time.sleep(1.0)
    finally:
        bridge.terminate()
        bridge.wait(10)
        if tshark:
            tshark.wait(20)
        reader.join(5)
        sender.close()
        drain.close()
    if len(delays) < 2:
        return float("nan"), float("nan"), 0.0
    cuts = statistics.quantiles(delays, n=100)
    return cuts[49] / 1e6, cuts[98] / 1e6, 100 * len(delays) / sent


def cpu_per_frame(rate: int, seconds: float, backend: str, capture: bool) -> float:
    """The relay's CPU µs per frame it received, at `rate`, capturing to a pipe or not."""
    ports = free_udp_ports(4)
    extra = ["-w", "-", "--pcapng"] if capture else []
    sink = subprocess.Popen(["cat"], stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    bridge = relay(ports, backend, extra, sink.stdin.fileno())  # type: ignore[union-attr]
    sink.stdin.close()  # type: ignore[union-attr]
    sender, drain = peers(ports)
    try:
        wait_until_bound(ports[0::2])
        time.sleep(0.5)
        start = cpu_seconds(bridge.pid)
        sent = paced_sender(sender, rate, seconds)
        time.sleep(0.2)
        used = cpu_seconds(bridge.pid) - start
    finally:
        bridge.terminate()
        bridge.wait(10)
        sink.wait(10)
        sender.close()
        drain.close()
    return used / sent * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--backend", default="c", choices=["c", "python"])
    parser.add_argument("--flush-ms", type=float, default=10.0)
    parser.add_argument("--rates", default="1000,100000")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--read", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.read:
        read_pipe(sys.stdin.buffer)
        return
    if args.quick:
        args.runs, args.rates, args.seconds = 1, "1000,20000", 2.0
    rates = [int(r) for r in args.rates.split(",")]
    print(f"tunnelscope live capture, {args.backend} backend, flush timer {args.flush_ms} ms")
    print(f"{'reader':>7} {'rate fps':>10} {'p50 ms':>8} {'p99 ms':>8} {'seen %':>7}", end="")
    print(f"  (medians of {args.runs} runs)")
    for kind in ("pipe", "tshark"):
        for rate in rates:
            runs = [
                latency(rate, args.seconds, args.backend, args.flush_ms, kind)
                for _ in range(args.runs)
            ]
            p50, p99 = (statistics.median(r[i] for r in runs) for i in (0, 1))
            seen = statistics.median(r[2] for r in runs)
            print(f"{kind:>7} {rate:>10} {p50:>8.2f} {p99:>8.2f} {seen:>7.1f}")
    print(f"{'rate fps':>10} {'cpu µs/frame none':>18} {'pipe':>8} {'ratio':>6}")
    for rate in rates:
        none, pipe = (
            statistics.median(
                cpu_per_frame(rate, args.seconds, args.backend, c) for _ in range(args.runs)
            )
            for c in (False, True)
        )
        print(f"{rate:>10} {none:>18.2f} {pipe:>8.2f} {pipe / none:>6.2f}")


if __name__ == "__main__":
    main()
