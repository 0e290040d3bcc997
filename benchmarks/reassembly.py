"""Does a reassembly flood keep `tunnelscope decap` in bounded memory, and what does
reassembly cost?

    python benchmarks/reassembly.py [--frames 100000] [--flood 200000] [--runs 3] [--dir DIR]

Builds three host captures (Ethernet/IPv4/UDP, classic pcap) of one Ethernet tunnel carrying
`--frames` frames of 1514 bytes:
- baseline: every tunnel datagram whole (no fragments);
- fragmented: every tunnel datagram in two IP fragments, the second one first (as a 1500-byte
  link cuts them), all complete;
- flood: the baseline plus `--flood` datagrams of 1480 bytes that never complete (their first
  fragment only, a new identification each), interleaved.
Each is decapped by the C scanner and the pure-Python one (TUNNELSCOPE_NO_C=1), each run its
own process; peak RSS and CPU time come from benchmarks/decap.py's wrapper
(getrusage(RUSAGE_CHILDREN) of a fresh process). Figures: medians of `--runs` runs, ratios
against the baseline of the same backend in the same run. The pending fragments are bounded
at REASSEMBLY_BYTES (4 MiB), so the flood's RSS should stay within a few MiB of the baseline
whatever `--flood` is.
"""

from __future__ import annotations

import argparse
import os
import statistics
import struct
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from decap import _measure  # noqa: E402  (benchmarks/decap.py)

FRAME = bytes.fromhex("0000000000020000000000010800") + bytes(1500)  # 1514-byte Ethernet frame
ETHER = bytes.fromhex("020000000002020000000001") + b"\x08\x00"
START_NS = 1_700_000_000_000_000_000


def _ipv4(ident: int, flags_offset: int, payload: bytes, src: bytes = b"\xc0\x00\x02\x01") -> bytes:
    header = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(payload), ident & 0xFFFF,
                         flags_offset, 64, 17, 0, src, b"\xc0\x00\x02\x02")  # fmt: skip
    return ETHER + header + payload


def _record(out, n: int, packet: bytes) -> None:
    ts = START_NS + n * 10_000
    out.write(struct.pack("<IIII", ts // 10**9, ts % 10**9 // 1000, len(packet), len(packet)))
    out.write(packet)


def build(path: str, kind: str, frames: int, flood: int) -> None:
    udp = struct.pack(">HHHH", 10001, 10002, 8 + len(FRAME), 0) + FRAME
    with open(path, "wb") as out:
        out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 262144, 1))
        n = 0
        extra = flood // frames if kind == "flood" else 0
        for ident in range(frames):
            if kind == "fragmented":  # 1480 + 42 bytes: the tail first
                _record(out, n, _ipv4(ident, 185, udp[1480:]))
                _record(out, n + 1, _ipv4(ident, 0x2000, udp[:1480]))
                n += 2
                continue
            _record(out, n, _ipv4(ident, 0, udp))
            n += 1
            for k in range(extra):  # never completed: first fragments only, new keys
                junk = ident * extra + k
                source = struct.pack(">BBH", 198, 51, junk >> 16)
                _record(out, n, _ipv4(junk, 0x2000, bytes(1480), source))
                n += 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--flood", type=int, default=200_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", help="Where to build the captures (default: /dev/shm).")
    args = parser.parse_args()
    where = args.dir or ("/dev/shm" if os.path.isdir("/dev/shm") else None)
    with tempfile.TemporaryDirectory(dir=where, prefix="tunnelscope-reasm-") as work:
        kinds = ("baseline", "fragmented", "flood")
        for kind in kinds:
            build(os.path.join(work, f"{kind}.pcap"), kind, args.frames, args.flood)
        sizes = {k: os.path.getsize(os.path.join(work, f"{k}.pcap")) >> 20 for k in kinds}
        print(f"{args.frames} tunnel frames; flood: {args.flood} never-completed datagrams; "
              f"files {sizes} MiB; medians of {args.runs} runs")  # fmt: skip
        for backend in ("c", "python"):
            env = dict(os.environ)
            if backend == "python":
                env["TUNNELSCOPE_NO_C"] = "1"
            else:
                env.pop("TUNNELSCOPE_NO_C", None)
            results = {}
            for kind in kinds:
                source = os.path.join(work, f"{kind}.pcap")
                command = [sys.executable, "-m", "tunnelscope", "decap", source, "-w"]
                command.append(os.path.join(work, "o"))
                runs = [_measure(command, env) for _ in range(args.runs)]
                results[kind] = {
                    key: statistics.median(run[key] for run in runs) for key in ("rss_mb", "cpu")
                }
            base = results["baseline"]
            for kind in kinds:
                rss, cpu = results[kind]["rss_mb"], results[kind]["cpu"]
                print(f"  {backend:6} {kind:10}: peak RSS {rss:6.1f} MiB "
                      f"({rss - base['rss_mb']:+5.1f} MiB, x{rss / base['rss_mb']:.2f}), "
                      f"CPU {cpu:6.2f} s (x{cpu / base['cpu']:.2f})")  # fmt: skip


if __name__ == "__main__":
    main()
