"""How fast is `tunnelscope decode`, built-in and through Wireshark, against tshark itself?

    python benchmarks/decode.py [--frames 100000] [--small 10000] [--runs 3] [--dir DIR]
                                [--no-pyshark] [--json]

Writes one C-HDLC capture of FRAMES router-lab frames (OSPF Hello, BGP KEEPALIVE, ICMP echo,
RIPv2, EIGRP Hello, in turn) and one of SMALL frames, then times, on the same file and with
output to /dev/null:
- `tunnelscope decode --dissect builtin FILE` (the built-in decoders, text lines);
- `tunnelscope decode --dissect wireshark --json FILE` (Wireshark's dissection, JSON);
- `tshark -n -r FILE` (text) and `tshark -n -r FILE -T json`, the baselines;
- on the small file, pyshark's own parsing (FileCapture with use_json, use_ek, every field
  of every layer reached), the measurement behind parsing tshark's EK output directly
  (see tunnelscope/decoders/wireshark.py and docs/decoders.md).
Runs are interleaved (each round runs every command once, so load from elsewhere hits all
alike); the figures are medians over the rounds: wall seconds, frames per second, CPU
microseconds per frame (the command and everything it started), the peak RSS of the
command's own process (for tunnelscope: the Python process; for tshark: tshark) and that of
the processes it started (for tunnelscope's Wireshark path: its tshark), sampled from
/proc every 20 ms. Memory flat in the number of frames: compare the SMALL and FRAMES rows.
Targets: Wireshark path within 1.5x of `tshark -T json`; built-in faster than `tshark -r`.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
PYSHARK = """
import sys, pyshark
capture = pyshark.FileCapture(sys.argv[1], **{sys.argv[2]: True})
count = sum(len(layer.field_names) for packet in capture for layer in packet.layers)
capture.close()
print(count)
"""  # every field of every layer reached: what a conversion to Decoded would have to do


def frames() -> list[bytes]:
    """One frame of each protocol, on C-HDLC (as a router's serial link carries them)."""
    from scapy.contrib.bgp import BGPHeader
    from scapy.contrib.eigrp import EIGRP, EIGRPParam
    from scapy.contrib.ospf import OSPF_Hdr, OSPF_Hello
    from scapy.layers.inet import ICMP, IP, TCP, UDP
    from scapy.layers.rip import RIP, RIPEntry

    hdlc = b"\x0f\x00\x08\x00"
    src = "10.0.0.1"
    packets = [
        IP(src=src, dst="224.0.0.5", ttl=1) / OSPF_Hdr(src="1.1.1.1") / OSPF_Hello(),
        IP(src=src, dst="10.0.0.2") / TCP(sport=179, dport=40000, flags="PA") / BGPHeader(type=4),
        IP(src=src, dst="10.0.0.2") / ICMP(id=1, seq=1) / (b"abcd" * 18),
        IP(src=src, dst="224.0.0.9") / UDP(sport=520, dport=520) / RIP(cmd=2, version=2)
        / RIPEntry(addr="10.1.0.0", mask="255.255.0.0", metric=1),
        IP(src=src, dst="224.0.0.10") / EIGRP(opcode=5, asn=100, tlvlist=[EIGRPParam()]),
    ]  # fmt: skip
    return [hdlc + bytes(packet) for packet in packets]


def write_capture(path: str, count: int) -> None:
    sys.path.insert(0, ROOT)
    from tunnelscope.formats.capture import CaptureWriter, Format
    from tunnelscope.formats.linktype import LinkType

    kinds = frames()
    writer = CaptureWriter.open(path, Format(pcapng=False))
    interface = writer.add_interface(LinkType.C_HDLC, "")
    for index in range(count):
        writer.write(interface, 1_700_000_000 * 10**9 + index * 100_000, kinds[index % len(kinds)])
    writer.close()


def run(command: list[str]) -> dict[str, float]:
    """Wall seconds, CPU seconds of the command and its children, peak RSS (MB) of the
    command's own process and of its children."""
    before = os.times()
    start = time.perf_counter()
    with open(os.devnull, "wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=sink)
        peaks = {"own": 0, "children": 0}
        sampler = threading.Thread(target=_sample_peaks, args=(process.pid, command, peaks))
        sampler.start()
        status = process.wait()
        sampler.join()
    seconds = time.perf_counter() - start
    after = os.times()
    if status != 0:
        raise SystemExit(f"{' '.join(command)} failed (status {status})")
    cpu = (after.children_user - before.children_user) + (
        after.children_system - before.children_system
    )
    return {
        "seconds": seconds,
        "cpu": cpu,
        "rss_mb": peaks["own"] / 1024,
        "children_rss_mb": peaks["children"] / 1024,
    }


def _peak_kb(pid: int | str) -> int:
    """VmHWM, the process's own peak resident set (kB); 0 once it has exited."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def _sample_peaks(pid: int, command: list[str], peaks: dict[str, int]) -> None:
    """Until PID exits: its own peak RSS and its children's (ru_maxrss would mix the two)."""
    children_file = f"/proc/{pid}/task/{pid}/children"
    started = "\0".join(command).encode()
    while True:
        with contextlib.suppress(OSError), open(f"/proc/{pid}/cmdline", "rb") as cmdline:
            if not cmdline.read().startswith(started):  # not exec'd yet: still our copy
                time.sleep(0.001)
                continue
        own = _peak_kb(pid)
        if not own:  # exited (a zombie has no memory left to report)
            return
        peaks["own"] = max(peaks["own"], own)
        with contextlib.suppress(OSError), open(children_file) as children:
            for child in children.read().split():
                peaks["children"] = max(peaks["children"], _peak_kb(child))
        time.sleep(0.02)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--frames", type=int, default=100_000)
    parser.add_argument("--small", type=int, default=10_000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--dir", default=None)
    parser.add_argument("--no-pyshark", action="store_true")
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args()
    python = [sys.executable, "-m", "tunnelscope", "decode"]
    with tempfile.TemporaryDirectory(dir=options.dir) as folder:
        files = {}
        for size in sorted({options.small, options.frames}):
            files[size] = os.path.join(folder, f"routing-{size}.pcap")
            write_capture(files[size], size)
        cases: list[tuple[str, int, list[str]]] = []
        for size, path in files.items():
            cases += [
                ("decode --dissect builtin", size, [*python, "--dissect", "builtin", path]),
                (
                    "decode --dissect wireshark --json",
                    size,
                    [*python, "--dissect", "wireshark", "--json", path],
                ),
                ("tshark -r FILE", size, ["tshark", "-n", "-r", path]),
                ("tshark -r FILE -T json", size, ["tshark", "-n", "-r", path, "-T", "json"]),
            ]
        if not options.no_pyshark:
            small = files[options.small]
            for mode in ("use_json", "use_ek"):
                cases.append((f"pyshark FileCapture({mode})", options.small,
                              [sys.executable, "-c", PYSHARK, small, mode]))  # fmt: skip
        run(["tshark", "-n", "-r", files[options.small], "-T", "json"])  # warm caches
        run([*python, "--json", files[options.small]])
        samples: dict[tuple[str, int], list[dict[str, float]]] = {}
        for _ in range(options.runs):
            for name, size, command in cases:
                samples.setdefault((name, size), []).append(run(command))
    rows = []
    for (name, size), runs in samples.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        cpu = statistics.median(r["cpu"] for r in runs)
        rows.append(
            {
                "command": name,
                "frames": size,
                "seconds": round(seconds, 3),
                "frames_per_second": round(size / seconds),
                "cpu_us_per_frame": round(cpu / size * 1e6, 1),
                "peak_rss_mb": round(max(r["rss_mb"] for r in runs), 1),
                "children_peak_rss_mb": round(max(r["children_rss_mb"] for r in runs), 1),
            }
        )
    by = {(row["command"], row["frames"]): row["seconds"] for row in rows}
    big = options.frames
    ratios = {
        "wireshark_json_vs_tshark_json": round(
            by["decode --dissect wireshark --json", big] / by["tshark -r FILE -T json", big], 2
        ),
        "builtin_vs_tshark_text": round(
            by["decode --dissect builtin", big] / by["tshark -r FILE", big], 2
        ),
    }
    if options.json:
        print(json.dumps({"runs": options.runs, "rows": rows, "ratios": ratios}, indent=2))
        return
    print(f"medians of {options.runs} interleaved runs, output to /dev/null")
    print(
        f"{'command':38} {'frames':>7} {'s':>8} {'frames/s':>9} {'CPU us/fr':>9} {'RSS MB':>7}"
        f" {'children':>8}"
    )
    for row in rows:
        print(
            f"{row['command']:38} {row['frames']:>7} {row['seconds']:>8.3f} "
            f"{row['frames_per_second']:>9} {row['cpu_us_per_frame']:>9} {row['peak_rss_mb']:>7}"
            f" {row['children_peak_rss_mb'] or '':>8}"
        )
    print(
        f"wireshark --json / tshark -T json: {ratios['wireshark_json_vs_tshark_json']}x "
        "(target <= 1.5)"
    )
    print(f"builtin / tshark -r text: {ratios['builtin_vs_tshark_text']}x (target < 1)")


if __name__ == "__main__":
    main()
