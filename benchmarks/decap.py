"""How fast is `tunnelscope decap` against the loops people write today?

    python benchmarks/decap.py [--frames 1000000] [--runs 3] [--dir DIR]

Builds a host capture (Ethernet/IPv4/UDP, classic pcap) of four lab links (Ethernet, Cisco
HDLC, PPP, Frame Relay, both directions, frame sizes 64..1514 bytes) with 1 % DNS/NTP noise,
then times, each as its own process on the same file:
- `tunnelscope decap IN -w OUT` (C scanner), and the same forced to pure Python
  (TUNNELSCOPE_NO_C=1);
- the plain dpkt loop: dpkt.pcap.Reader -> dpkt.ethernet.Ethernet(buf).data.data.data ->
  dpkt.pcap.Writer.writepkt (it does less: no pairing, no detection, no noise filter, one
  output link type);
- the same loop with scapy (PcapReader -> pkt[UDP].payload -> PcapWriter), on the first
  SCAPY_FRAMES frames only, extrapolated (it runs at a few thousand frames/s).
Wall time includes interpreter start-up for every contender (`tunnelscope --version` is
timed too, to show how much of it is start-up). Fast contenders: median of `--runs` runs;
slow ones (pure Python, scapy): one run. CPU time and peak RSS come from
getrusage(RUSAGE_CHILDREN) in a fresh wrapper process per run, so each figure is that
contender's alone. Files live in /dev/shm when it exists, so that disk write-back does not
blur the figures.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import struct
import subprocess
import sys
import tempfile
import time

SCAPY_FRAMES = 20_000
SIZES = (64, 64, 98, 98, 150, 342, 590, 590, 1014, 1514)  # inner frame sizes, cycled
TARGET_RATIO = 10.0
RSS_LIMIT_MB = 100.0


def _inner_frames() -> list[list[bytes]]:
    """Per link, one frame per size: a valid L2 header, then an IPv4 packet, then filler."""

    def ipv4(size: int) -> bytes:
        header = struct.pack("!BBHHHBBH4s4s", 0x45, 0, size, 1, 0, 64, 1, 0, bytes(4), bytes(4))
        return header + bytes(size - 20)

    heads = (
        bytes.fromhex("0000000000020000000000010800"),  # Ethernet
        bytes.fromhex("0f000800"),  # Cisco HDLC
        bytes.fromhex("ff030021"),  # PPP
        bytes.fromhex("184103cc"),  # Frame Relay DLCI 100, IETF, NLPID IPv4
    )
    return [[head + ipv4(size - len(head)) for size in SIZES] for head in heads]


def _noise(index: int) -> tuple[int, int, bytes]:
    if index % 2:
        query = struct.pack("!HHHHHH", index & 0xFFFF, 0x0100, 1, 0, 0, 0)
        return 40000 + index % 20000, 53, query + b"\x07example\x03com\x00\x00\x01\x00\x01"
    return 123, 123, b"\x23" + bytes(47)


def build_capture(path: str, frames: int) -> None:
    """Frame i: link i % 4, direction (i // 4) % 2; every 100th frame is noise."""
    links = _inner_frames()
    ether = bytes.fromhex("00000000000100000000000208 00".replace(" ", ""))
    ts = 1_700_000_000_000_000  # microseconds
    chunk: list[bytes] = []
    with open(path, "wb") as out:
        out.write(struct.pack("<IHHiIII", 0xA1B2C3D4, 2, 4, 0, 0, 65535, 1))
        for i in range(frames):
            if i % 100 == 99:
                sport, dport, payload = _noise(i)
                src, dst = b"\x0a\x00\x00\x05", b"\x0a\x00\x00\x01"
            else:
                link, back = i % 4, (i // 4) % 2
                payload = links[link][(i // 8) % len(SIZES)]
                low, high = 10000 + 2 * link, 10001 + 2 * link
                sport, dport = (high, low) if back else (low, high)
                src = dst = b"\x7f\x00\x00\x01"
            udp = struct.pack("!HHHH", sport, dport, 8 + len(payload), 0)
            ip = struct.pack(
                "!BBHHHBBH4s4s", 0x45, 0, 28 + len(payload), i & 0xFFFF, 0x4000, 64, 17, 0, src, dst
            )
            frame = ether + ip + udp + payload
            ts += 7
            chunk.append(
                struct.pack("<IIII", ts // 1_000_000, ts % 1_000_000, len(frame), len(frame))
            )
            chunk.append(frame)
            if len(chunk) >= 20000:
                out.write(b"".join(chunk))
                chunk.clear()
        out.write(b"".join(chunk))


# -- the contenders, run as `python benchmarks/decap.py --contender NAME IN OUT` ------------------


def dpkt_loop(source: str, target: str) -> None:
    import dpkt

    with open(source, "rb") as src, open(target, "wb") as dst:
        writer = dpkt.pcap.Writer(dst)
        for ts, buf in dpkt.pcap.Reader(src):
            writer.writepkt(dpkt.ethernet.Ethernet(buf).data.data.data, ts)


def scapy_loop(source: str, target: str) -> None:
    from scapy.layers.inet import UDP
    from scapy.utils import PcapReader, PcapWriter

    writer = PcapWriter(target, linktype=1, sync=False)
    for packet in PcapReader(source):
        if UDP in packet:
            writer.write(bytes(packet[UDP].payload))
    writer.close()


def _measure(command: list[str], env: dict[str, str]) -> dict[str, float]:
    """Run in a fresh wrapper process: wall time and peak RSS of `command` alone."""
    wrapper = [sys.executable, __file__, "--measure", json.dumps(command)]
    done = subprocess.run(wrapper, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])


def _measure_here(command: list[str]) -> None:
    start = time.perf_counter()
    done = subprocess.run(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - start
    if done.returncode != 0:
        print(done.stderr, file=sys.stderr)
        raise SystemExit(done.returncode)
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = usage.ru_utime + usage.ru_stime
    print(json.dumps({"seconds": seconds, "cpu": cpu, "rss_mb": usage.ru_maxrss / 1024}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=1_000_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", help="work directory (default: a temporary one, removed)")
    parser.add_argument("--measure", help=argparse.SUPPRESS)
    parser.add_argument("--contender", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.measure:
        _measure_here(json.loads(args.measure))
        return
    if args.contender:
        name, source, target = args.contender
        {"dpkt": dpkt_loop, "scapy": scapy_loop}[name](source, target)
        return
    if args.dir:
        os.makedirs(args.dir, exist_ok=True)
        run(args.dir, args.frames, args.runs)
    else:
        where = "/dev/shm" if os.path.isdir("/dev/shm") else None
        with tempfile.TemporaryDirectory(prefix="decap-bench-", dir=where) as work:
            run(work, args.frames, args.runs)


def run(work: str, frames: int, runs: int) -> None:
    big, small = os.path.join(work, "host.pcap"), os.path.join(work, "host-small.pcap")
    scapy_frames = min(SCAPY_FRAMES, frames)
    start = time.perf_counter()
    build_capture(big, frames)
    build_capture(small, scapy_frames)
    size_mb = os.path.getsize(big) / 1e6
    print(
        f"capture: {frames} frames, {size_mb:.0f} MB, 4 links + 1 % DNS/NTP noise "
        f"(built in {time.perf_counter() - start:.1f} s)"
    )
    env = dict(os.environ)
    env.pop("TUNNELSCOPE_NO_C", None)
    python_env = dict(env, TUNNELSCOPE_NO_C="1")
    me = [sys.executable, __file__, "--contender"]
    decap = [sys.executable, "-m", "tunnelscope", "decap"]
    contenders = [
        ("tunnelscope decap (C)", decap + [big, "-w", f"{work}/out.pcapng"], env, frames, runs),
        ("dpkt loop", me + ["dpkt", big, f"{work}/dpkt.pcap"], env, frames, runs),
        ("tunnelscope decap (pure Python)", decap + [big, "-w", f"{work}/py.pcapng"],
         python_env, frames, 1),
        ("scapy loop", me + ["scapy", small, f"{work}/scapy.pcap"], env, scapy_frames, 1),
    ]  # fmt: skip
    startup = [_measure([sys.executable, "-m", "tunnelscope", "--version"], env) for _ in "123"]
    startup_s = statistics.median(m["seconds"] for m in startup)
    print(
        f"start-up of `tunnelscope --version`: {startup_s:.2f} s wall, "
        f"peak RSS {max(m['rss_mb'] for m in startup):.1f} MB (included below)\n"
    )
    print(f"{'':33} {'frames/s':>12}  {'wall s':>7}  {'CPU s':>7}  {'peak RSS':>9}")
    results: dict[str, tuple[float, float]] = {}
    for name, command, environment, count, repeat in contenders:
        measured = [_measure(command, environment) for _ in range(repeat)]
        seconds = statistics.median(m["seconds"] for m in measured)
        cpu = statistics.median(m["cpu"] for m in measured) * frames / count
        rss = max(m["rss_mb"] for m in measured)
        results[name] = (count / seconds, rss)
        note = f"median of {repeat}" if repeat > 1 else "1 run"
        if count != frames:
            note += f", on the first {count} frames, extrapolated"
        print(
            f"{name:33} {count / seconds:>12,.0f}  {frames / (count / seconds):7.2f}  "
            f"{cpu:7.2f}  {rss:6.1f} MB  ({note})"
        )
    fast, baseline = results["tunnelscope decap (C)"], results["dpkt loop"]
    print()
    for name, (rate, _) in list(results.items())[1:]:
        print(f"tunnelscope decap (C) / {name:31} {fast[0] / rate:8.1f}x")
    ok = fast[0] / baseline[0] >= TARGET_RATIO and fast[1] < RSS_LIMIT_MB
    print(
        f"\ntarget: >= {TARGET_RATIO:.0f}x the dpkt loop and peak RSS < {RSS_LIMIT_MB:.0f} MB: "
        f"{'met' if ok else 'NOT met'}"
    )


if __name__ == "__main__":
    main()
