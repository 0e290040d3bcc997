"""The fuzz harness: mutated inputs, seeded from captures/, against what reads untrusted bytes.

Targets (each input must end in a result or the one documented error, never anything else):
  decoders  frames of every link type (the routing captures among them: OSPF, BGP, IS-IS, ...)
            -> `decode`: no exception, a one-line printable summary
  readers   capture files -> `read_capture`: packets, or CaptureFormatError
  decap     host captures of tunnels -> the C and the Python decap scanners: the same output
            bytes, the same summary, or the same error (a differential test)
  tpacket   the same frames in TPACKET_V3 blocks of a live ring (sniff) -> both scanners'
            scan_tpacket3, differentially; damaged blocks end in the same error
  control   request lines -> `handle_line`: a reply, never an exception; what reaches a
            command is words without control characters (C0, DEL, C1)

`tests/test_fuzz.py` runs a few thousand inputs per target in CI; `make fuzz` runs
FUZZ_COUNT (1,000,000) per target:

    python tests/fuzz.py --count 1000000 [--target decap] [--seed 1]

A failing input is written to build/fuzz/ and its reproducer printed; the exit status is 1.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import os
import random
import struct
import sys
import tempfile
import time
import traceback
import unicodedata
from collections.abc import Callable, Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any, TypeVar

from tunnelscope.analysis.decap import Decap, Options, Summary, c_scanner_available
from tunnelscope.decoders import decode
from tunnelscope.formats import pcap, pcapng
from tunnelscope.formats.capture import CaptureError, open_capture, read_capture
from tunnelscope.formats.linktype import LinkType
from tunnelscope.formats.packet import CaptureFormatError
from tunnelscope.lab.control import Reply, handle_line

CAPTURES = Path(__file__).resolve().parent.parent / "captures"
INTERESTING = (0x00, 0x01, 0x7F, 0x80, 0xFF, 0x0A, 0x1B, 0x22, 0x20)
EXTREME_WORDS = (b"\xff\xff\xff\xff", b"\x00\x00\x00\x00", b"\x7f\xff\xff\xff", b"\x00\x01\x00\x00")
CONTROL_SEEDS = [
    b"hypervisor version",
    b"bridge create br0",
    b"bridge add_nio_udp br0 20000 127.0.0.1 20001",
    b'bridge start_capture br0 "/tmp/a b.pcap" EN10MB',
    b"bridge add_packet_filter br0 filter0 frequency_drop 5",
    b'bridge add_packet_filter br0 filter1 bpf "icmp[icmptype] == icmp-echo"',
    b"bridge set_packet_filter br0 f1 a2b delay 10 2  # comment",
    b'lab filter R1 s1/0 out "packet_loss 5"',
    b"hypervisor cmd_list bridge\r",
]


T = TypeVar("T")


class Found(Exception):
    """A target broke its contract on one input."""


def seed_frames() -> list[tuple[int, bytes]]:
    """(link type, frame) of every frame of the reference captures."""
    frames = []
    for path in sorted(CAPTURES.glob("*.pcap*")):
        with open_capture(str(path)) as reader:
            frames += [(packet.linktype, packet.data) for packet in reader]
    return frames


def seed_files() -> list[bytes]:
    return [path.read_bytes() for path in sorted(CAPTURES.glob("*.pcap*"))]


def host_capture(
    frames: list[tuple[int, bytes]],
    as_pcapng: bool,
    ipv6: bool,
    fragments: random.Random | None = None,
) -> bytes:
    """What tcpdump on the host writes of these lab frames (see `host_records`)."""
    records = host_records(frames, ipv6, fragments)
    if as_pcapng:
        head = pcapng.section_header() + pcapng.interface_description(1, "lo")
        return head + b"".join(pcapng.enhanced_packet(0, t, f, len(f)) for t, f in records)
    return pcap.global_header(1) + b"".join(pcap.record(t, f) for t, f in records)


def host_records(
    frames: list[tuple[int, bytes]], ipv6: bool, fragments: random.Random | None = None
) -> list[tuple[int, bytes]]:
    """(ns, Ethernet frame) the host sees of these lab frames: each one a UDP datagram between
    two tunnel ports, both ways; with `fragments`, each datagram cut into IP fragments sent in
    a random order (some repeated, some missing)."""
    records: list[tuple[int, bytes]] = []
    for number, (_, frame) in enumerate(frames):
        ports = (10001, 10002) if number % 2 else (10002, 10001)
        udp = struct.pack(">HHHH", *ports, 8 + len(frame), 0) + frame
        if ipv6:
            loopback = bytes(15) + b"\x01"
            ip = struct.pack(">IHBB16s16s", 6 << 28, len(udp), 17, 64, loopback, loopback) + udp
            ether = bytes(12) + b"\x86\xdd"
        else:
            ip = struct.pack(">BBHHHBBH4s4s", 0x45, 0, 20 + len(udp), number, 0, 64, 17, 0,
                             b"\x7f\x00\x00\x01", b"\x7f\x00\x00\x01") + udp  # fmt: skip
            ether = bytes(12) + b"\x08\x00"
        pieces = [ip] if fragments is None else fragmented(fragments, ip, ipv6, number)
        for piece in pieces:
            records.append((1_700_000_000_000_000_000 + len(records) * 1_000_000, ether + piece))
    return records


TPACKET3_MAC = 82  # where the kernel puts a 14-byte Ethernet header: tp_net 96 - 14


def tpacket3_block(records: list[tuple[int, bytes]], mac: int = TPACKET3_MAC) -> bytes:
    """The TPACKET_V3 block a kernel ring would hand over holding these (ns, frame) records:
    tpacket_block_desc, then per packet a tpacket3_hdr (with its sockaddr_ll after it) and
    the frame at tp_mac, each 16-byte aligned; the last packet's next offset is 0."""
    first, packets = 48, b""
    for number, (ts, frame) in enumerate(records):
        length = -(-(mac + len(frame)) // 16) * 16
        following = 0 if number + 1 == len(records) else length
        sec, nsec = divmod(ts, 1_000_000_000)
        header = struct.pack(
            "=6IHH", following, sec, nsec, len(frame), len(frame), 1, mac, mac + 14
        )
        sockaddr = struct.pack("=HHiHBB8s", 17, 0x0800, 1, 772, 0, 6, bytes(8))
        packet = header + bytes(48 - len(header)) + sockaddr
        packets += (packet + bytes(mac - len(packet)) + frame).ljust(length, b"\0")
    descriptor = struct.pack("=3I3IQ4I", 1, 0, 1, len(records), first, first + len(packets), 1,
                             0, 0, 0, 0)  # fmt: skip
    return descriptor + packets


def tpacket3_blocks(records: list[tuple[int, bytes]], per_block: int) -> list[bytes]:
    return [tpacket3_block(records[n : n + per_block]) for n in range(0, len(records), per_block)]


def fragmented(rng: random.Random, ip: bytes, ipv6: bool, ident: int) -> list[bytes]:
    """The IP datagram `ip` (no options, no extension headers) as fragments, shuffled."""
    header, payload = (ip[:40], ip[40:]) if ipv6 else (ip[:20], ip[20:])
    size = rng.choice((8, 16, 64, 512, 1480))
    pieces = []
    for offset in range(0, len(payload), size):
        data = payload[offset : offset + size]
        more = offset + size < len(payload)
        if ipv6:
            fragment_header = struct.pack(">BBHI", 17, 0, offset | more, ident)
            length = struct.pack(">H", 8 + len(data))
            pieces.append(header[:4] + length + b"\x2c" + header[7:] + fragment_header + data)
        else:
            fields = struct.pack(">HHH", 20 + len(data), ident, 0x2000 * more | offset >> 3)
            pieces.append(header[:2] + fields + header[8:] + data)
    rng.shuffle(pieces)
    if rng.random() < 0.2:
        pieces.append(rng.choice(pieces))
    if rng.random() < 0.1:
        pieces.pop(rng.randrange(len(pieces)))
    return pieces


def mutate(rng: random.Random, data: bytes, others: list[bytes]) -> bytes:
    """A few of: bit flips, interesting bytes, cuts, inserted or repeated runs, splices."""
    out = bytearray(data)
    for _ in range(rng.choice((1, 1, 2, 3, 8))):
        kind = rng.randrange(7)
        at = rng.randrange(len(out) + 1)
        if kind == 0 and out:
            out[at % len(out)] ^= 1 << rng.randrange(8)
        elif kind == 1 and out:
            out[at % len(out)] = rng.choice(INTERESTING)
        elif kind == 2:
            del out[at : at + rng.randrange(1, 64)]
        elif kind == 3:
            out[at:at] = rng.randbytes(rng.randrange(1, 16))
        elif kind == 4 and out:
            start = rng.randrange(len(out))
            out[at:at] = out[start : start + rng.randrange(1, 32)]
        elif kind == 5 and len(out) >= 4:
            spot = rng.randrange(len(out) - 3)  # a length or count field, made extreme
            out[spot : spot + 4] = rng.choice(EXTREME_WORDS)
        elif kind == 6 and others:
            other = rng.choice(others)
            cut = rng.randrange(len(other) + 1)
            out[at:] = other[cut:]
    return bytes(out)


# --- the targets ---------------------------------------------------------------------------


def fuzz_decoders(rng: random.Random, count: int) -> None:
    frames = seed_frames()
    datas = [data for _, data in frames]
    linktypes = sorted({linktype for linktype, _ in frames} | {int(t) for t in LinkType})
    for _ in range(count):
        linktype, data = rng.choice(frames)
        if rng.random() < 0.1:
            linktype = rng.choice(linktypes)
        data = mutate(rng, data, datas)
        decoded = _attempt((), decode, linktype, data)
        if not decoded.summary.isprintable():
            raise Found(f"unprintable summary {decoded.summary!r}", linktype, data)


def fuzz_readers(rng: random.Random, count: int) -> None:
    files = seed_files()
    for _ in range(count):
        data = mutate(rng, rng.choice(files), files)
        _attempt((CaptureFormatError,), _read_all, data)


def fuzz_decap(rng: random.Random, count: int) -> None:
    frames = seed_frames()
    with _differential("decap") as tmp:
        for _ in range(count):
            picked, fragments = _picked(rng, frames)
            data = host_capture(picked, rng.random() < 0.5, rng.random() < 0.3, fragments)
            if rng.random() < 0.5:
                data = mutate(rng, data, [data for _, data in frames])
            dedupe = rng.random() < 0.3
            results = [_decap(data, use_c, dedupe, f"{tmp}/out.pcapng") for use_c in (True, False)]
            if results[0] != results[1]:
                raise Found(f"C and Python scanners differ (dedupe={dedupe}): {results}", data)


def fuzz_tpacket(rng: random.Random, count: int) -> None:
    """Live ring blocks (sniff): host frames packed into TPACKET_V3 blocks, then mutated."""
    frames = seed_frames()
    with _differential("tpacket") as tmp:
        for _ in range(count):
            picked, fragments = _picked(rng, frames)
            records = host_records(picked, rng.random() < 0.3, fragments)
            blocks = tpacket3_blocks(records, rng.randrange(1, 8)) or [tpacket3_block([])]
            if rng.random() < 0.7:
                at = rng.randrange(len(blocks))
                blocks[at] = mutate(rng, blocks[at], blocks)
            ports = frozenset((10001, 10002)) if rng.random() < 0.5 else None
            options = Options(ports=ports, dedupe=rng.random() < 0.3)
            results = [
                _ring_decap(blocks, dataclasses.replace(options, use_c=use_c), f"{tmp}/out.pcapng")
                for use_c in (True, False)
            ]
            if results[0] != results[1]:
                raise Found(f"C and Python scanners differ on ring blocks: {results}", *blocks)


@contextlib.contextmanager
def _differential(target: str) -> Iterator[str]:
    """A scratch directory for a target that compares the C and the Python scanner."""
    if not c_scanner_available():
        raise SystemExit(f"fuzz {target}: the C scanner is not built (pip install -e .)")
    with tempfile.TemporaryDirectory(dir="/dev/shm" if os.path.isdir("/dev/shm") else None) as tmp:
        yield tmp


def _picked(
    rng: random.Random, frames: list[tuple[int, bytes]]
) -> tuple[list[tuple[int, bytes]], random.Random | None]:
    """A few seed frames, half the time mutated, and whether to fragment them (an rng)."""
    picked = rng.sample(frames, min(len(frames), rng.randrange(1, 12)))
    if rng.random() < 0.5:
        picked = [(t, mutate(rng, d, [data for _, data in frames])) for t, d in picked]
    return picked, rng if rng.random() < 0.3 else None


def _decap(data: bytes, use_c: bool, dedupe: bool, out: str) -> tuple[object, ...]:
    """What one scanner made of `data`: the summary or the error, and the output bytes."""
    options = Options(dedupe=dedupe, use_c=use_c)
    return _outcome(lambda job: job.run(io.BytesIO(data)), options, out, data)


def _ring_decap(blocks: list[bytes], options: Options, out: str) -> tuple[object, ...]:
    """The same for ring blocks."""
    ethernet = LinkType.ETHERNET
    return _outcome(lambda job: job.run_blocks(blocks, ethernet), options, out, *blocks)


def _outcome(
    run: Callable[[Decap], Summary], options: Options, out: str, *inputs: bytes
) -> tuple[object, ...]:
    job = Decap(out, None, options)
    try:
        summary = asdict(run(job))
        summary.pop("backend", None)
        result: object = summary
    except (CaptureFormatError, CaptureError) as exc:
        result = f"{type(exc).__name__}: {exc}"
    except Exception as exc:
        raise Found(f"use_c={options.use_c}: {traceback.format_exc()}", *inputs) from exc
    with open(out, "rb") as written:
        return result, written.read()


def fuzz_control(rng: random.Random, count: int) -> None:
    seen: list[list[str]] = []

    def execute(words: list[str]) -> Reply:
        seen.append(words)
        return Reply("ok")

    for _ in range(count):
        line = mutate(rng, rng.choice(CONTROL_SEEDS), CONTROL_SEEDS).replace(b"\n", b"")
        seen.clear()
        reply = _attempt((), handle_line, line, execute)
        text = "".join(reply.lines())
        if "\n" in text or "\r" in text or not isinstance(reply.code, int):
            raise Found(f"reply breaks the line format: {reply!r}", line)
        for words in seen:
            if any(unicodedata.category(c) == "Cc" and c != "\t" for w in words for c in w):
                raise Found(f"a control character reached a command: {words!r}", line)


def _read_all(data: bytes) -> int:
    return sum(1 for _ in read_capture(io.BytesIO(data)))


def _attempt(allowed: tuple[type[Exception], ...], function: Callable[..., T], *args: Any) -> T:
    """function(*args); an exception other than `allowed` is a finding (None for those)."""
    try:
        return function(*args)
    except allowed:
        return None  # type: ignore[return-value]
    except Exception as exc:
        raise Found(traceback.format_exc(), *args) from exc


TARGETS: dict[str, Callable[[random.Random, int], None]] = {
    "decoders": fuzz_decoders,
    "readers": fuzz_readers,
    "decap": fuzz_decap,
    "tpacket": fuzz_tpacket,
    "control": fuzz_control,
}


def run(target: str, count: int, seed: int) -> Found | None:
    """Fuzz one target; the first failure found, or None."""
    try:
        TARGETS[target](random.Random(f"{target}-{seed}"), count)
    except Found as found:
        return found
    return None


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--target", choices=[*TARGETS, "all"], default="all")
    parser.add_argument("--count", type=int, default=100_000, help="inputs per target")
    parser.add_argument("--seed", type=int, default=1)
    args = parser.parse_args()
    failed = False
    for target in TARGETS if args.target == "all" else [args.target]:
        started = time.monotonic()
        found = run(target, args.count, args.seed)
        elapsed = time.monotonic() - started
        if found is None:
            print(f"fuzz {target}: {args.count} inputs, 0 failures ({elapsed:.0f} s)")
            continue
        failed = True
        crash = Path("build/fuzz") / f"crash-{target}-{args.seed}.bin"
        crash.parent.mkdir(parents=True, exist_ok=True)
        data = next((a for a in found.args[1:] if isinstance(a, bytes)), b"")
        crash.write_bytes(data)
        print(f"fuzz {target}: FAILED after {elapsed:.0f} s, input in {crash}\n{found.args[0]}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
