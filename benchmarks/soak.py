#!/usr/bin/env python3
"""Soak: the relay's memory over millions of frames, which must stay flat.

`tunnelscope bridge` runs between `tunnelscope blast` (paced, --rate) and `tunnelscope sink`
on loopback while its resident set (VmRSS) is read at each of its own `--stats` lines, so
every reading pairs a frame count with the memory held at that moment. Cases: the bare relay,
capture on (pcapng pre+post, a 2-file ring so the disk stays small) with impairments that
hold and drop frames (freq_drop, delay with jitter, packet_loss). A leak of even one byte a
frame shows as about 10 MB over 10 million frames.

    python benchmarks/soak.py                      # 10 million frames per case
    python benchmarks/soak.py --frames 2000000     # a quicker look
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time

from tunnelscope.demo import free_udp_ports

TUNNELSCOPE = [sys.executable, "-m", "tunnelscope"]
RECEIVED = re.compile(r"a2b received (\d+)")
CASES = {
    "relay": [],
    "capture+impair": [
        "-w", "{dir}/soak.pcapng", "--capture-at", "both", "-b", "filesize:50000", "-b", "files:2",
        "-I", "a2b freq_drop 7", "-I", "a2b delay 2 1", "-I", "a2b packet_loss 1",
    ],
}  # fmt: skip


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for {pid}")


def soak(case: list[str], frames: int, rate: float, directory: str) -> list[tuple[int, float]]:
    """(frames received, RSS MiB) at each stats line of one bridge run."""
    a_peer, a_relay, b_relay, b_peer = free_udp_ports(4)
    bridge = subprocess.Popen(
        [*TUNNELSCOPE, "bridge", "--backend", "c", "--stats", "0.5", "--seed", "1"]
        + [f"udp:{a_relay}:127.0.0.1:{a_peer}", f"udp:{b_relay}:127.0.0.1:{b_peer}"]
        + [arg.format(dir=directory) for arg in case],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    sink = subprocess.Popen(
        [*TUNNELSCOPE, "sink", f"udp:{b_peer}:127.0.0.1:{b_relay}", "--idle", "3"],
        stdout=subprocess.DEVNULL,
    )
    time.sleep(1.0)
    blast = subprocess.Popen(
        [*TUNNELSCOPE, "blast", f"udp:{a_peer}:127.0.0.1:{a_relay}", "--count", str(frames)]
        + ["--rate", str(rate)],
        stdout=subprocess.DEVNULL,
    )
    readings: list[tuple[int, float]] = []
    deadline = time.monotonic() + frames / rate * 3 + 60
    try:
        assert bridge.stderr is not None
        for line in bridge.stderr:
            match = RECEIVED.search(line)
            if match:
                readings.append((int(match.group(1)), rss_mib(bridge.pid)))
            settled = len(readings) > 1 and readings[-1][0] == readings[-2][0]
            if (blast.poll() is not None and settled) or time.monotonic() > deadline:
                break  # every frame that will come has come
    finally:
        for process in (blast, bridge, sink):
            process.terminate()
            process.wait(10)
    return readings


def at(readings: list[tuple[int, float]], frames: int) -> float:
    """RSS at the first reading with at least `frames` received."""
    return next(rss for count, rss in readings if count >= frames)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=10_000_000)
    parser.add_argument("--rate", type=float, default=150_000, help="frames/s offered")
    args = parser.parse_args()
    marks = [args.frames // 10, args.frames // 4, args.frames // 2, args.frames * 9 // 10]
    print(f"relay RSS (MiB) by frames received, 64-byte frames at {args.rate:,.0f} frames/s")
    print(f"{'case':16}" + "".join(f"{mark / 1e6:>9.2f}M" for mark in marks) + "  growth")
    for name, case in CASES.items():
        with tempfile.TemporaryDirectory() as directory:
            readings = soak(case, args.frames, args.rate, directory)
        if not readings or readings[-1][0] < marks[-1]:
            got = readings[-1][0] if readings else 0
            print(f"{name:16} only {got:,} frames received (relay overrun: lower --rate)")
            continue
        values = [at(readings, mark) for mark in marks]
        growth = values[-1] - values[0]
        per_frame = growth * 1024 * 1024 / (marks[-1] - marks[0])
        print(
            f"{name:16}" + "".join(f"{value:>10.1f}" for value in values)
            + f"  {growth:+.1f} MiB ({per_frame:+.3f} B/frame)"
        )  # fmt: skip


if __name__ == "__main__":
    main()
