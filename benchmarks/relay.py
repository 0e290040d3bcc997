#!/usr/bin/env python3
"""Relay benchmark on loopback: what forwarding a lab tunnel costs, against the physical limit.

Each relay runs as a subprocess between `tunnelscope blast` and `tunnelscope sink`:
  direct   no relay: blast straight into sink (the ceiling of this harness)
  minimal  benchmarks/minirelay.c, one recvmmsg/sendmmsg loop, compiled here with gcc (the
           physical limit every ratio is taken against); with capture on, the same loop also
           writing every frame to a pcap with one writev per batch (the capture reference)
  c        `tunnelscope bridge --backend c`;  python: `--backend python`
  base     the C backend of another checkout (--baseline DIR, its extension built in place):
           before/after figures of a change from one run
  ubridge  GNS3's relay, when its binary is given (--ubridge PATH) or on PATH
Cases: 64, 512, 1400 and 9000-byte frames (9000: jumbo frames between QEMU VMs), paced and
flat out (saturated); the C backend with --gso (UDP GSO sends); one direction and both (a
--peer process of this script on each side, sending and receiving); capture off and on;
freq_drop 5; delay 10 ms; 1000 links idle and with traffic (an Engine with 1000 links in this
script's --serve mode, fed by --peer). The relay is pinned to the last CPU, the traffic
processes to the others (--cpu). Runs are interleaved: run 1 of every case, then run 2...
Figures, medians of --runs runs: delivered frames/s, loss, and the relay's CPU time per frame it
forwarded (by its own count), read from /proc over the traffic window (per-thread schedstat in
ns; utime+stime in 10 ms ticks where schedstat is missing), the steadiest figure on a shared
machine, with its ratio to the minimal loop's in the same mode (capture on: the capturing
loop's). CPU per frame is measured at a fixed offered load every relay sustains (--load,
"paced"; both directions: half each way), throughput flat out.

    python benchmarks/relay.py            # 3 runs of every case, about 7 minutes on 2 cores
    python benchmarks/relay.py --quick    # 1 run of fewer cases, about a minute
    python benchmarks/relay.py --runs 6 --only size,capture   # the groups named, 6 runs
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import resource
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from tunnelscope.analysis.traffic import (
    FrameDecoder,
    FrameFactory,
    Framing,
    Pacer,
    recv_frames,
    send_frames,
    wait_until_bound,
)
from tunnelscope.datapath.engine import Engine
from tunnelscope.demo import free_udp_ports
from tunnelscope.nio import open_endpoint

HERE = Path(__file__).resolve().parent
HOST = "127.0.0.1"
LONG = 600  # seconds a relay may live; it is stopped with SIGTERM once measured
IDLE = 0.5  # a receiver stops this long after the last frame


@dataclass(frozen=True)
class Case:
    group: str  # the row's label
    relay: str  # direct, minimal, c, python, ubridge
    size: int = 64
    paced: bool = True
    both: bool = False
    links: int = 1
    lab: bool = False  # an Engine with `links` links (--serve) fed by --peer, as a lab runs
    traffic: bool = True
    impairments: tuple[str, ...] = ()
    capture: bool = False
    gso: bool = False  # `tunnelscope bridge --gso` (C backend: UDP_SEGMENT sends)

    @property
    def mode(self) -> str:
        return "idle" if not self.traffic else "paced" if self.paced else "flat"


@dataclass
class Sample:
    sent: int = 0
    delivered: int = 0
    seconds: float = 0.0  # first to last delivered frame (idle: the window)
    cpu: float | None = None  # relay CPU seconds over the window
    forwarded: int | None = None  # what the relay handed to the kernel, by its own count


@dataclass
class Row:
    case: Case
    samples: list[Sample] = field(default_factory=list)

    def median(self, key: str) -> float | None:
        values = [v for v in (_figure(s, key) for s in self.samples) if v is not None]
        return statistics.median(values) if values else None


def _figure(s: Sample, key: str) -> float | None:
    if key == "fps":
        return s.delivered / s.seconds if s.seconds and s.delivered else 0.0
    if key == "loss":
        return 100 * (1 - s.delivered / s.sent) if s.sent else None
    if key == "cpu_us":
        frames = s.delivered if s.forwarded is None else s.forwarded
        return s.cpu / frames * 1e6 if s.cpu is not None and frames else None
    if key == "cpu_share":
        return 100 * s.cpu / s.seconds if s.cpu is not None and s.seconds else None
    raise KeyError(key)


# --- measuring ---------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """CPU time of a process so far: its threads' schedstat (ns), else utime+stime (ticks)."""
    try:
        total = 0
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/schedstat") as f:
                total += int(f.read().split()[0])
        return total / 1e9
    except (OSError, ValueError, IndexError):
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def tunnelscope(*args: str) -> list[str]:
    return [sys.executable, "-m", "tunnelscope", *args]


def this_script(mode: str, config: dict[str, Any]) -> list[str]:
    return [sys.executable, str(Path(__file__).resolve()), mode, json.dumps(config)]


class Harness:
    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workdir = workdir
        self.minirelay = self._compile()

    def _compile(self) -> str:
        binary = self.workdir / "minirelay"
        subprocess.run(
            ["gcc", "-O2", "-o", str(binary), str(HERE / "minirelay.c")],
            check=True,
        )
        return str(binary)

    def relay_command(self, case: Case, ports: list[int]) -> tuple[list[str], str | None]:
        """The relay's command line and working directory, for link ports (la, pa, lb, pb)."""
        la, pa, lb, pb = ports[:4]
        if case.lab:
            quads = [ports[i : i + 4] for i in range(0, len(ports), 4)]
            config = {"backend": case.relay, "links": quads, "duration": LONG}
            return this_script("--serve", config), None
        a, b = f"udp:{la}:{HOST}:{pa}", f"udp:{lb}:{HOST}:{pb}"
        if case.relay == "minimal":
            capture = [str(self.workdir / "capture.pcap")] if case.capture else []
            return [self.minirelay, *map(str, (la, pa, lb, pb)), str(LONG), *capture], None
        if case.relay == "ubridge":
            directory = tempfile.mkdtemp(dir=self.workdir)
            ini = f"[bridge0]\nsource_udp = {la}:{HOST}:{pa}\ndestination_udp = {lb}:{HOST}:{pb}\n"
            Path(directory, "ubridge.ini").write_text(ini)
            return [self.args.ubridge], directory
        backend = "c" if case.relay == "base" else case.relay
        command = tunnelscope("bridge", a, b, "--backend", backend, "--duration", str(LONG))
        command.append("--json")
        for impairment in case.impairments:
            command += ["-I", impairment]
        if case.capture:
            command += ["-w", str(self.workdir / "capture.pcap"), "--linktype", "ethernet"]
        if case.gso:
            command.append("--gso")
        return command, None

    def _pin(self, relay: bool) -> Any:
        """A preexec_fn pinning the relay to CPU --cpu, the traffic to the other CPUs."""
        cpus = os.sched_getaffinity(0)
        if self.args.cpu is None or self.args.cpu not in cpus or len(cpus) < 2:
            return None
        chosen = {self.args.cpu} if relay else cpus - {self.args.cpu}
        return lambda: os.sched_setaffinity(0, chosen)

    def measure(self, case: Case) -> Sample:
        """One sample; tried again with new ports if a port was taken meanwhile."""
        for _ in range(3):
            try:
                return self._measure(case, ports_for(case.links))
            except PortTaken:
                continue
        raise RuntimeError(f"{case}: failed three times (the processes' errors are above)")

    def _measure(self, case: Case, ports: list[int]) -> Sample:
        go = self.workdir / "go"  # bidirectional peers start sending once it exists
        go.unlink(missing_ok=True)
        relay = None
        processes: list[subprocess.Popen] = []
        try:
            if case.relay != "direct":
                command, cwd = self.relay_command(case, ports)
                env = {**os.environ, "PYTHONPATH": self.args.baseline or ""}
                relay = subprocess.Popen(
                    command,
                    cwd=cwd,
                    stdout=subprocess.PIPE,
                    text=True,
                    preexec_fn=self._pin(True),
                    env=env if case.relay == "base" else None,
                )
                processes.append(relay)
            receivers = self._traffic(case, ports, send=False)
            processes += receivers
            listening = ports[0::2] if relay else []  # the relay's la and lb of every link
            if case.traffic:  # and the receivers': pb (and pa for bidirectional peers)
                listening += ports[3::4] + (ports[1::4] if case.both else [])
            _wait_bound(listening, processes)
            start_cpu = cpu_seconds(relay.pid) if relay else 0.0
            if not case.traffic:
                time.sleep(self.args.duration)
            go.touch()
            senders = self._traffic(case, ports, send=True)
            processes += senders
            outputs = [_json_output(p, self.args.duration + 30) for p in senders + receivers]
            cpu = cpu_seconds(relay.pid) - start_cpu if relay else None
            forwarded = _forwarded(relay) if relay else None
        finally:
            for process in processes:
                _stop(process)
        if not case.traffic:
            return Sample(seconds=self.args.duration, cpu=cpu, forwarded=forwarded)
        got = [o for o in outputs if "received" in o]  # sinks, and peers that receive
        return Sample(
            sent=sum(o.get("sent", 0) for o in outputs),
            delivered=sum(o["received"] - o.get("duplicated", 0) for o in got),
            seconds=max(o["seconds"] for o in got),
            cpu=cpu,
            forwarded=forwarded,
        )

    def _traffic(self, case: Case, ports: list[int], send: bool) -> list[subprocess.Popen]:
        """Senders (blast, --peer) or receivers (sink, --peer; bidirectional peers)."""
        if not case.traffic:
            return []
        relayed = case.relay != "direct"
        quads = [ports[i : i + 4] for i in range(0, len(ports), 4)]
        # side A's peer talks to the relay's A port (or straight to side B's peer when direct)
        a_specs = [f"udp:{pa}:{HOST}:{la if relayed else pb}" for la, pa, lb, pb in quads]
        b_specs = [f"udp:{pb}:{HOST}:{lb if relayed else pa}" for la, pa, lb, pb in quads]
        rate = (self.args.load / (2 if case.both else 1)) if case.paced else None
        if case.both or case.lab:
            if case.both and send:
                return []  # bidirectional peers were started with the receivers
            peer = {"size": case.size, "duration": self.args.duration, "rate": rate}
            if case.both:
                peer["go"] = str(self.workdir / "go")
                specs = [([spec], [spec]) for spec in (a_specs[0], b_specs[0])]
            else:
                specs = [(a_specs, [])] if send else [([], b_specs)]
            return [
                subprocess.Popen(
                    this_script("--peer", {**peer, "send": s, "recv": r}),
                    stdout=subprocess.PIPE,
                    preexec_fn=self._pin(False),
                )
                for s, r in specs
            ]
        if send:
            command = tunnelscope("blast", a_specs[0], "--size", str(case.size), "--json")
            command += ["--duration", str(self.args.duration)]
            command += ["--rate", str(rate)] if rate else []
        else:
            command = tunnelscope("sink", b_specs[0], "--json", "--idle", str(IDLE))
            command += ["--duration", str(self.args.duration + 20)]
        return [subprocess.Popen(command, stdout=subprocess.PIPE, preexec_fn=self._pin(False))]


class PortTaken(Exception):
    """A relay or traffic process failed: most likely someone took one of its ports."""


def _wait_bound(ports: list[int], processes: list[subprocess.Popen]) -> None:
    deadline = time.monotonic() + 30
    while not wait_until_bound(ports, timeout=0.1):
        if any(p.poll() is not None for p in processes):
            raise PortTaken
        if time.monotonic() > deadline:
            raise RuntimeError("the relay or the receivers did not start in 30 s")


def _forwarded(relay: subprocess.Popen) -> int | None:
    """What the relay says it forwarded, once stopped (ubridge says nothing)."""
    relay.send_signal(signal.SIGTERM)
    out, _ = relay.communicate(timeout=30)
    if out.startswith("forwarded "):  # minirelay
        return sum(int(n) for n in out.split()[1:])
    if not out.startswith("{"):
        return None
    summary = json.loads(out)
    if "forwarded" in summary:  # --serve
        return summary["forwarded"]
    return summary["a2b"]["forwarded"] + summary["b2a"]["forwarded"]  # tunnelscope bridge


def _stop(process: subprocess.Popen) -> None:
    if process.poll() is None:
        process.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(5)
    if process.poll() is None:
        process.kill()
        process.wait()


def _json_output(process: subprocess.Popen, timeout: float) -> dict[str, Any]:
    out, _ = process.communicate(timeout=timeout)
    if process.returncode:  # its error is on stderr; most likely a port taken meanwhile
        raise PortTaken
    return json.loads(out)


def ports_for(links: int) -> list[int]:
    """la, pa, lb, pb per link. Thousands come from below the kernel's ephemeral range, so
    that no bind(port 0) elsewhere on the machine takes one before the relay binds it."""
    count = 4 * links
    if links == 1:
        return free_udp_ports(count)
    with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
        ephemeral = int(f.read().split()[0])
    held: list[socket.socket] = []
    try:
        for port in range(random.randrange(10000, ephemeral - 2 * count), ephemeral):
            sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            try:
                sock.bind((HOST, port))
            except OSError:
                sock.close()
                continue
            held.append(sock)
            if len(held) == count:
                return [s.getsockname()[1] for s in held]
        raise RuntimeError(f"fewer than {count} free UDP ports below {ephemeral}")
    finally:
        for sock in held:
            sock.close()


# --- the relay and the peers for many links (hidden modes) ----------------------------------


def serve(config: dict[str, Any]) -> None:
    """An Engine with many links in one process, as a lab runs them."""
    _more_files(4 * len(config["links"]))
    engine = Engine(config["backend"])
    for index, (la, pa, lb, pb) in enumerate(config["links"]):
        engine.add_link(f"l{index}", f"udp:{la}:{HOST}:{pa}", f"udp:{lb}:{HOST}:{pb}", index)
    signal.signal(signal.SIGTERM, lambda *_: engine.stop())
    engine.run(duration=config["duration"])
    stats = [link.stats() for link in engine.links.values()]
    print(
        json.dumps({"forwarded": sum(s["a2b"]["forwarded"] + s["b2a"]["forwarded"] for s in stats)})
    )
    engine.close()


def peer(config: dict[str, Any]) -> None:
    """Send to and/or receive from many endpoints; print {sent, received, seconds}."""
    _more_files(2 * len(config["send"]) + 2 * len(config["recv"]))
    specs = dict.fromkeys(config["send"] + config["recv"])  # a peer may send and receive on one
    endpoints = {spec: open_endpoint(spec) for spec in specs}
    result = {"sent": 0, "received": 0, "seconds": 0.0}
    sender = None
    if config["send"]:
        targets = [endpoints[spec] for spec in config["send"]]
        sender = threading.Thread(target=_send_many, args=(targets, config, result))
        sender.start()
    if config["recv"]:
        _receive_many([endpoints[spec] for spec in config["recv"]], config, result)
    if sender:
        sender.join()
    print(json.dumps(result))


def _send_many(endpoints: list, config: dict[str, Any], result: dict[str, Any]) -> None:
    while config.get("go") and not os.path.exists(config["go"]):
        time.sleep(0.01)
    factories = [FrameFactory(Framing(), config["size"], i) for i in range(len(endpoints))]
    sequences = [0] * len(endpoints)
    pacer = Pacer(config["rate"])
    start = time.monotonic_ns()
    end = start + int(config["duration"] * 1e9)
    total = index = 0
    while (now := time.monotonic_ns()) < end:
        due = pacer.due(now - start, total)  # at most a batch, then the next link
        if not due:
            time.sleep(pacer.wait_ns(now - start, total) / 1e9)
            continue
        frames = factories[index].frames(sequences[index], due, time.time_ns())
        result["sent"] += send_frames(endpoints[index], frames)
        sequences[index] += due
        total += due
        index = (index + 1) % len(endpoints)


def _receive_many(endpoints: list, config: dict[str, Any], result: dict[str, Any]) -> None:
    poller = select.epoll()
    for endpoint in endpoints:
        poller.register(endpoint.fileno(), select.EPOLLIN)
    by_fd = {endpoint.fileno(): (endpoint, FrameDecoder(14)) for endpoint in endpoints}
    deadline = time.monotonic() + config["duration"] + 20
    first = last = None
    while time.monotonic() < deadline and (last is None or time.monotonic() - last < IDLE):
        for fd, _ in poller.poll(0.1):
            endpoint, decoder = by_fd[fd]
            result["received"] += len(decoder.decode(recv_frames(endpoint, 64)))
            last = time.monotonic()
            first = first or last
    if first is not None and last is not None:
        result["seconds"] = last - first


def _more_files(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < needed + 100:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, needed + 100), hard))


# --- the plan and the report -------------------------------------------------------------


def plan(quick: bool, ubridge: str | None, baseline: bool) -> list[Case]:
    base = ["base"] if baseline else []
    relays = ["minimal", "c", *base, "python"] + (["ubridge"] if ubridge else [])
    backends = ["c"] if quick else ["c", "python"]
    sizes = (64, 1400, 9000) if quick else (64, 512, 1400, 9000)
    cases = [Case("size", "direct")]  # what the harness itself loses at the paced load
    for size in sizes:
        cases += [Case("size", relay, size) for relay in relays]
    for size in (64, 1400, 9000):
        cases += [Case("size", relay, size, paced=False) for relay in ["direct", *relays]]
    cases += [Case("C --gso", r, size, gso=True) for size in (64, 1400, 9000) for r in ["c", *base]]
    cases += [Case("both directions", r, both=True) for r in ["minimal", *backends]]
    for size in (64, 1400, 9000):
        capturing = (
            ["minimal", "c", *base]
            + ([] if quick else ["python"])
            + (["ubridge"] if ubridge else [])
        )
        cases += [Case("capture on", r, size, capture=True) for r in capturing]
    cases += [Case("freq_drop 5", r, impairments=("freq_drop 5",)) for r in backends]
    cases += [Case("delay 10 ms", r, paced=False, impairments=("delay 10",)) for r in backends]
    cases += [Case("1000 links idle", r, links=1000, lab=True, traffic=False) for r in backends]
    for relay in backends:
        for paced in (False,) if quick else (True, False):
            cases += [Case("1 link, traffic", relay, links=1, lab=True, paced=paced)]
            cases += [Case("1000 links, traffic", relay, links=1000, lab=True, paced=paced)]
    return cases


def report(rows: list[Row], args: argparse.Namespace) -> str:
    def find(**want: Any) -> Row | None:
        for row in rows:
            if all(getattr(row.case, k) == v for k, v in want.items()):
                return row
        return None

    lines = [
        f"relay benchmark: {args.runs} run(s) per case, medians; paced = {args.load:g} frames/s"
        f" offered, flat = as fast as the sender goes; {os.cpu_count()} CPUs, load average"
        f" {args.loadavg:.2f} at the start",
        "CPU us/frame = the relay's CPU time over the traffic / the frames it says it forwarded"
        " (delivered ones for ubridge); x minimal = that against minirelay.c in the same mode",
        "",
        f"{'case':<22}{'relay':<9}{'mode':<7}{'size':>6}{'delivered/s':>13}{'loss %':>9}"
        f"{'CPU us/frame':>14}{'x minimal':>11}",
    ]
    for row in rows:
        c = row.case
        minimal = find(relay="minimal", size=c.size, paced=c.paced, both=c.both, capture=c.capture)
        cpu, base = row.median("cpu_us"), minimal.median("cpu_us") if minimal else None
        ratio = f"{cpu / base:.2f}" if cpu and base else ""
        cpu_text = f"{cpu:.2f}" if cpu is not None else ""
        if not c.traffic:
            cpu_text, ratio = f"{row.median('cpu_share'):.2f} % CPU", ""
        loss = row.median("loss")
        lines.append(
            f"{c.group:<22}{c.relay:<9}{c.mode:<7}{c.size:>6}{row.median('fps') or 0:>13,.0f}"
            f"{'' if loss is None else f'{loss:.2f}':>9}{cpu_text:>14}{ratio:>11}"
        )
    against_base = [(row, find(**{**asdict(row.case), "relay": "base"})) for row in rows]
    against_base = [(row, base) for row, base in against_base if row.case.relay == "c" and base]
    if against_base:
        lines += ["", "c against base (the --baseline checkout), same run: CPU/frame, frames/s"]
    for row, base in against_base:
        c = row.case
        cpu, fps = (_ratio(row, base, key) for key in ("cpu_us", "fps"))
        figures = f"CPU x {cpu or 0:.3f}  frames/s x {fps or 0:.3f}"
        lines.append(f"  {c.group:<20}{c.mode:<7}{c.size:>6}  {figures}")
    lines += ["", "targets:"]
    for text, value, limit, higher in targets(rows, find):
        if value is None:
            lines.append(f"  {text}: not measured")
            continue
        ok = value >= limit if higher else value <= limit
        sign = ">=" if higher else "<="
        lines.append(f"  {text}: {value:.3f} ({sign} {limit:g}) {'ok' if ok else 'MISSED'}")
    return "\n".join(lines)


def _ratio(row: Row | None, base: Row | None, key: str) -> float | None:
    a, b = (r.median(key) if r else None for r in (row, base))
    return a / b if a and b else None


def targets(rows: list[Row], find: Any) -> list[tuple[str, float | None, float, bool]]:
    out = []
    for size in (64, 1400, 9000):
        for paced in (True, False):
            c = find(group="size", relay="c", size=size, paced=paced)
            minimal = find(group="size", relay="minimal", size=size, paced=paced)
            mode = "paced" if paced else "flat"
            out.append(
                (
                    f"C CPU/frame at {size} B {mode} vs minimal",
                    _ratio(c, minimal, "cpu_us"),
                    1.0,
                    False,
                )
            )
            if not paced:
                out.append(
                    (
                        f"C frames/s at {size} B flat vs minimal",
                        _ratio(c, minimal, "fps"),
                        0.95,
                        True,
                    )
                )
        capture = find(group="capture on", relay="c", size=size)
        minimal = find(group="capture on", relay="minimal", size=size)
        text = f"C capture on CPU/frame at {size} B vs capturing minimal"
        out.append((text, _ratio(capture, minimal, "cpu_us"), 1.1, False))
    for backend in ("c", "python"):
        delayed = find(group="delay 10 ms", relay=backend)
        plain = find(group="size", relay=backend, size=64, paced=False)
        if delayed:
            out.append(
                (
                    f"{backend} delay 10 ms throughput vs without",
                    _ratio(delayed, plain, "fps"),
                    0.9,
                    True,
                )
            )
        idle = find(group="1000 links idle", relay=backend)
        if idle:
            out.append(
                (f"{backend} 1000 idle links, % of a CPU", idle.median("cpu_share"), 1.0, False)
            )
        many = find(relay=backend, links=1000, traffic=True, paced=False)
        one = find(relay=backend, links=1, lab=True, paced=False)
        if many:
            out.append(
                (f"{backend} 1000 links aggregate vs one link", _ratio(many, one, "fps"), 0.8, True)
            )
    return out


def _progress(text: str) -> None:
    """One updating line on a terminal; nothing in a log."""
    if sys.stderr.isatty():
        print(f"\r{text:<78}", end="" if text else "\r", file=sys.stderr, flush=True)


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] in ("--serve", "--peer"):
        (serve if sys.argv[1] == "--serve" else peer)(json.loads(sys.argv[2]))
        return
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="1 run of fewer cases (~1 min)")
    parser.add_argument("--runs", type=int, help="runs per case (default 3, quick 1)")
    parser.add_argument("--duration", type=float, help="seconds of traffic per run")
    parser.add_argument("--load", type=float, default=50_000, help="paced offered frames/s")
    parser.add_argument("--json", metavar="FILE", help="also write every sample as JSON")
    parser.add_argument(
        "--baseline",
        metavar="DIR",
        help="also run the C backend of the tunnelscope checkout in DIR (relay 'base')",
    )
    parser.add_argument("--ubridge", metavar="PATH", help="ubridge binary (default: on PATH)")
    parser.add_argument(
        "--only",
        metavar="GROUPS",
        help="only these groups (comma-separated"
        " prefixes of the case labels: size, capture, both, ...)",
    )
    parser.add_argument(
        "--cpu",
        type=int,
        default=(os.cpu_count() or 1) - 1,
        help="pin the relay to this CPU, the traffic to the others (default: the"
        " last CPU; -1: no pinning)",
    )
    args = parser.parse_args()
    args.ubridge = args.ubridge or shutil.which("ubridge")
    args.runs = args.runs or (1 if args.quick else 3)
    args.loadavg = os.getloadavg()[0]
    args.duration = args.duration or (1.5 if args.quick else 2.0)
    cases = plan(args.quick, args.ubridge, bool(args.baseline))
    if args.only:
        prefixes = tuple(p.strip() for p in args.only.split(","))
        cases = [c for c in cases if c.group.startswith(prefixes)]
    rows = [Row(case) for case in cases]
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="tunnelscope-bench-") as workdir:
        harness = Harness(args, Path(workdir))
        for run in range(args.runs):
            for row in rows:
                c = row.case
                progress = f"run {run + 1}/{args.runs}: {c.group}, {c.relay}, {c.mode}, {c.size} B"
                _progress(progress)
                row.samples.append(harness.measure(c))
    _progress("")
    print(report(rows, args))
    print(f"\n({time.monotonic() - started:.0f} s)")
    if args.json:
        samples = [
            {**asdict(row.case), "samples": [asdict(s) for s in row.samples]} for row in rows
        ]
        Path(args.json).write_text(json.dumps(samples, indent=1))


if __name__ == "__main__":
    main()
