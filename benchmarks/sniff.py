#!/usr/bin/env python3
"""sniff against tcpdump on the same tunnel traffic: frames kept and CPU per frame (issue 13).

    python benchmarks/sniff.py [--rate 180000] [--seconds 5] [--runs 5] [--size 64]

A generator (`tunnelscope blast`, pinned to CPU 0) sends one tunnel flat out at --rate frames/s
of --size-byte frames on loopback, into a socket bound here and never read (the kernel drops
them there, after every packet tap saw them). Each run measures, one after the other (their
order alternates from run to run), pinned to CPU 1:
  tcpdump   tcpdump -i lo -w OUT.pcap udp port B   (libpcap's TPACKET_V3 ring, no decap)
  sniff     tunnelscope sniff --ports A,B -w OUT.pcapng   (its ring, decap in C)
Figures per tool, medians of --runs: the offered rate (what blast sent, per second: below
--rate when the machine is busy), frames kept (tcpdump's "captured", sniff's "written") and
their share of those offered, the kernel's drops (each tool's own report), CPU seconds
over the traffic window (its threads' schedstat, from just before the first frame to 0.5 s after
the last), microseconds of CPU per frame kept, and sniff's ratio to tcpdump's. Targets: sniff
keeps every frame tcpdump keeps, with CPU per frame <= 2x tcpdump's. Needs root and tcpdump;
files go to /dev/shm when it exists.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from tunnelscope.demo import free_udp_ports

sys.path.insert(0, str(Path(__file__).resolve().parent))
from relay import cpu_seconds  # noqa: E402

TOOLS = ("tcpdump", "sniff")
SETTLE = 0.5  # seconds after the last frame before the CPU reading
TARGET_CPU_RATIO = 2.0


@dataclass
class Sample:
    offered: int
    kept: int
    drops: int
    cpu: float

    @property
    def share(self) -> float:
        return self.kept / self.offered if self.offered else 0.0

    @property
    def us_per_frame(self) -> float:
        return self.cpu / self.kept * 1e6 if self.kept else float("inf")


def command(tool: str, ports: tuple[int, int], out: Path) -> list[str]:
    pinned = ["taskset", "-c", "1"]
    if tool == "tcpdump":
        return [*pinned, "tcpdump", "-i", "lo", "-w", str(out), "udp", "port", str(ports[1])]
    sniff = [sys.executable, "-m", "tunnelscope", "sniff", "--ports", f"{ports[0]},{ports[1]}"]
    return [*pinned, *sniff, "-w", str(out), "--json"]


def measure(tool: str, args: argparse.Namespace, workdir: Path) -> Sample:
    source, sink_port = free_udp_ports(2)
    out, log = workdir / f"{tool}.out", workdir / f"{tool}.err"
    with contextlib.ExitStack() as stack:
        sink = stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_DGRAM))
        sink.bind(("127.0.0.1", sink_port))  # never read: the kernel drops there
        err = stack.enter_context(open(log, "w+"))
        process = subprocess.Popen(
            command(tool, (source, sink_port), out), stdout=subprocess.PIPE, stderr=err, text=True
        )
        try:
            ready = "listening on" if tool == "tcpdump" else "sniffing on"
            deadline = time.monotonic() + 30
            while ready not in log.read_text():
                if process.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"{tool} did not start: {log.read_text()}")
                time.sleep(0.05)
            time.sleep(0.2)
            start = cpu_seconds(process.pid)
            blast = [sys.executable, "-m", "tunnelscope", "blast"]
            blast += [f"udp:{source}:127.0.0.1:{sink_port}", "--size", str(args.size)]
            blast += ["--rate", str(args.rate), "--duration", str(args.seconds), "--json"]
            done = subprocess.run(
                ["taskset", "-c", "0", *blast], capture_output=True, text=True, check=True
            )
            time.sleep(SETTLE)
            cpu = cpu_seconds(process.pid) - start
            process.send_signal(signal.SIGINT)
            stdout, _ = process.communicate(timeout=60)
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        text = log.read_text()
    offered = json.loads(done.stdout)["sent"]
    if tool == "tcpdump":
        kept = int(re.search(r"(\d+) packets? captured", text).group(1))  # type: ignore[union-attr]
        drops = int(re.search(r"(\d+) packets? dropped by kernel", text).group(1))  # type: ignore[union-attr]
    else:
        kept = json.loads(stdout)["written"]
        found = re.search(r"the kernel dropped (\d+) packets", text)
        drops = int(found.group(1)) if found else 0
    out.unlink(missing_ok=True)
    return Sample(offered, kept, drops, cpu)


def report(samples: dict[str, list[Sample]], seconds: float) -> str:
    def median(tool: str, figure: str) -> float:
        return statistics.median(getattr(s, figure) for s in samples[tool])

    lines = [
        f"{'tool':8} {'offered/s':>10} {'kept':>9} {'kept/offered':>13} {'kernel drops':>13} "
        f"{'CPU s':>7} {'us/frame':>9} {'ratio':>6}"
    ]
    base = median("tcpdump", "us_per_frame")
    for tool in TOOLS:
        us = median(tool, "us_per_frame")
        lines.append(
            f"{tool:8} {median(tool, 'offered') / seconds:10.0f} {median(tool, 'kept'):9.0f} "
            f"{median(tool, 'share'):13.4f} {median(tool, 'drops'):13.0f} "
            f"{median(tool, 'cpu'):7.3f} {us:9.3f} {us / base:6.2f}"
        )
    ratio = median("sniff", "us_per_frame") / base
    keeps = median("sniff", "share") >= median("tcpdump", "share")
    lines.append(
        f"targets: sniff keeps every frame tcpdump keeps: {'met' if keeps else 'MISSED'}; "
        f"CPU per frame {ratio:.2f}x tcpdump's (<= {TARGET_CPU_RATIO}): "
        f"{'met' if ratio <= TARGET_CPU_RATIO else 'MISSED'}"
    )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rate", type=float, default=180_000, help="offered frames/s")
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--size", type=int, default=64, help="frame size (the UDP payload)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("benchmarks/sniff.py: needs root (packet sockets)")
    if shutil.which("tcpdump") is None or shutil.which("taskset") is None:
        raise SystemExit("benchmarks/sniff.py: needs tcpdump and taskset on PATH")
    samples: dict[str, list[Sample]] = {tool: [] for tool in TOOLS}
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None
    with tempfile.TemporaryDirectory(dir=shm) as tmp:
        for run in range(args.runs):
            for tool in TOOLS if run % 2 == 0 else TOOLS[::-1]:
                sample = measure(tool, args, Path(tmp))
                samples[tool].append(sample)
                print(
                    f"run {run + 1} {tool:8} kept {sample.kept}/{sample.offered} drops "
                    f"{sample.drops} cpu {sample.cpu:.3f} s {sample.us_per_frame:.3f} us/frame",
                    file=sys.stderr,
                    flush=True,
                )
    print(report(samples, args.seconds))


if __name__ == "__main__":
    main()
