"""How fast, and in how much memory, does `tunnelscope compare` match two large captures?

    python benchmarks/compare.py [--frames 1000000] [--rate 50000] [--window 2] [--dir DIR]
                                 [--json]

Writes a path's two captures of FRAMES Ethernet/IPv4/UDP frames (64..1514 bytes, each
unique, RATE frames per second): A, and B = A 50 us later with every 100th frame lost, every
1000th duplicated and every 500th overtaken by the next one. Two layouts:
- two classic pcap files (A, B), merged by timestamp;
- one pcapng holding `bench pre` and `bench post` interfaces, as `tunnelscope bridge
  --capture-point both` writes them (the lost frames carry `dropped by packet_loss`).
Each comparison runs in a fresh process (`compare()` only: no interpreter start-up, no
file writing); it reports wall time, frames per second (frames read from A and B together),
its peak RSS (VmHWM, Linux) and, for scale, how long reading the same files alone takes.
The counts are checked against what was written. Memory is bounded by what arrives within
one window: RATE x WINDOW frames, not FRAMES.
"""

from __future__ import annotations

import argparse
import json
import os
import struct
import subprocess
import sys
import tempfile

SIZES = (64, 64, 98, 150, 342, 590, 1014, 1514)
LOSS_EVERY, DUPLICATE_EVERY, REORDER_EVERY = 100, 1000, 500
DELAY_NS = 50_000
T0 = 1_700_000_000 * 10**9
HEAD = bytes.fromhex("0200000000020200000000010800")  # Ethernet, IPv4

_MEASURE = """
import json, sys, time
from tunnelscope.formats.capture import open_capture
from tunnelscope.analysis.compare import Selection, compare

def peak_rss_mb():  # VmHWM: this program's peak alone (ru_maxrss counts the forking parent's)
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith("VmHWM:"))
    return int(line.split()[1]) / 1024

a, b, window = sys.argv[1], sys.argv[2] or None, float(sys.argv[3])
start = time.perf_counter()
report = compare(Selection.parse(a), Selection.parse(b) if b else None, window)
seconds = time.perf_counter() - start
start = time.perf_counter()
for path in [a] + ([b] if b else []):  # the readers alone, for comparison
    with open_capture(path) as reader:
        for _ in reader:
            pass
streams = report.streams
print(json.dumps({
    "seconds": seconds,
    "read_seconds": time.perf_counter() - start,
    "frames": report.a.frames + report.b.frames,
    "rss_mb": peak_rss_mb(),
    "matched": report.matched,
    "missing": sum(s.missing.count for s in streams),
    "duplicates": sum(s.duplicates.count for s in streams),
    "reordered": sum(s.reordered.count for s in streams),
    "only_b": sum(s.only_b.count for s in streams),
}))
"""


def frame(index: int) -> bytes:
    """A valid Ethernet/IPv4/UDP frame whose payload starts with its index (unique)."""
    size = SIZES[index % len(SIZES)]
    ip_len = size - len(HEAD)
    ip = struct.pack(
        "!BBHHHBBH4s4s", 0x45, 0, ip_len, index & 0xFFFF, 0, 64, 17, 0, bytes(4), bytes(4)
    )
    udp = struct.pack("!HHHH", 10000, 10001, ip_len - 20, 0)
    return HEAD + ip + udp + index.to_bytes(8, "big") + bytes(ip_len - 36)


def b_order(frames: int) -> list[int]:
    """The frame indexes in B's order: loss, duplicates, one-place reordering."""
    order = []
    for index in range(frames):
        if index % LOSS_EVERY == LOSS_EVERY - 1:
            continue
        order.append(index)
        if index % DUPLICATE_EVERY == 0:
            order.append(index)
    position = 1
    while position < len(order) - 1:
        if order[position] % REORDER_EVERY == 0 and order[position + 1] != order[position]:
            order[position], order[position + 1] = order[position + 1], order[position]
            position += 1
        position += 1
    return order


def write(directory: str, frames: int, rate: int) -> tuple[str, str, str]:
    """Write a.pcap, b.pcap and prepost.pcapng; return their paths."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
    from tunnelscope.formats import pcap, pcapng
    from tunnelscope.formats.packet import Direction

    spacing = 10**9 // rate
    a_path, b_path = os.path.join(directory, "a.pcap"), os.path.join(directory, "b.pcap")
    ng_path = os.path.join(directory, "prepost.pcapng")
    order = b_order(frames)
    out = Direction.OUTBOUND
    with open(a_path, "wb") as a, open(b_path, "wb") as b, open(ng_path, "wb") as ng:
        a.write(pcap.global_header(1, nanosecond=True))
        b.write(pcap.global_header(1, nanosecond=True))
        ng.write(pcapng.section_header() + pcapng.interface_description(1, "bench pre"))
        ng.write(pcapng.interface_description(1, "bench post"))
        position = highest = 0
        for start in range(0, frames, 10_000):
            a_chunk, b_chunk, ng_chunk = [], [], []
            for index in range(start, min(start + 10_000, frames)):
                ts, data = T0 + index * spacing, frame(index)
                a_chunk.append(pcap.record(ts, data, nanosecond=True))
                lost = index % LOSS_EVERY == LOSS_EVERY - 1
                comment = "dropped by packet_loss" if lost else None
                ng_chunk.append(pcapng.enhanced_packet(0, ts, data, None, out, comment))
                # B sends what A has had: a held frame right after the one that overtook it
                while position < len(order) and max(highest, order[position]) <= index:
                    sent = order[position]
                    highest = max(highest, sent)
                    b_ts = ts + DELAY_NS + position % 7
                    b_chunk.append(pcap.record(b_ts, frame(sent), nanosecond=True))
                    ng_chunk.append(pcapng.enhanced_packet(1, b_ts, frame(sent), None, out))
                    position += 1
            a.write(b"".join(a_chunk))
            b.write(b"".join(b_chunk))
            ng.write(b"".join(ng_chunk))
    return a_path, b_path, ng_path


def expected(frames: int) -> dict[str, int]:
    """The counts compare must find: B's first copies behind a higher index came late."""
    order = b_order(frames)
    seen: set[int] = set()
    highest = reordered = 0
    for index in order:
        if index not in seen:
            seen.add(index)
            reordered += index < highest
            highest = max(highest, index)
    return {
        "missing": frames - len(seen),
        "duplicates": len(order) - len(seen),
        "reordered": reordered,
        "matched": len(seen),
        "only_b": 0,
    }


def measure(a: str, b: str, window: float) -> dict[str, float]:
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
    done = subprocess.run(
        [sys.executable, "-c", _MEASURE, a, b, str(window)],
        capture_output=True,
        text=True,
        cwd=root,
    )
    if done.returncode:
        raise RuntimeError(f"the measuring process failed: {done.stderr.strip()}")
    return json.loads(done.stdout)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=1_000_000)
    parser.add_argument("--rate", type=int, default=50_000, help="frames per second in A")
    parser.add_argument("--window", type=float, default=2.0)
    parser.add_argument("--dir", help="where to write the captures (default: /dev/shm or /tmp)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    args = parser.parse_args()
    base = args.dir or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
    with tempfile.TemporaryDirectory(dir=base) as directory:
        a, b, ng = write(directory, args.frames, args.rate)
        results = {
            "pcap pair": measure(a, b, args.window),
            "pcapng pre/post": measure(ng, "", args.window),
        }
    want = expected(args.frames)
    for result in results.values():
        result["correct"] = all(result[key] == value for key, value in want.items())
    if args.json:
        print(json.dumps({"frames": args.frames, "rate": args.rate, "results": results}))
        return
    print(f"{args.frames} frames per capture, {args.rate} frames/s, window {args.window} s")
    for name, r in results.items():
        print(
            f"{name:16} {r['seconds']:6.2f} s  {r['frames'] / r['seconds']:9,.0f} frames/s  "
            f"(reading alone {r['read_seconds']:5.2f} s)  "
            f"peak RSS {r['rss_mb']:6.1f} MB  missing {r['missing']}  duplicates "
            f"{r['duplicates']}  reordered {r['reordered']}  counts "
            f"{'as written' if r['correct'] else 'WRONG'}"
        )


if __name__ == "__main__":
    main()
