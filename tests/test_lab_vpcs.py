"""Two VPCS PCs as a TOML lab and as a Dynagen .net file, served by `tunnelscope serve` and
driven by the command-line verbs and the console (through a pseudo-terminal); pings and
tshark are the judges."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import random
import re
import select
import signal
import socket
import struct
import subprocess
import termios
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import peers
import pytest
import tshark
from command import TUNNELSCOPE

pytestmark = [pytest.mark.timeout(300)]

_ANSI = re.compile(rb"\x1b\[[0-9;?]*[A-Za-z]|\x1b[=>]|\r")


def lab_ports_from_base() -> int:
    """A Dynagen udp base whose ports (base..base+3) and VPCS's extra ports (+9) are free."""
    for _ in range(200):
        base = random.randrange(20000, 60000, 2)
        needed = [base, base + 1, base + 2, base + 3, base + 9, base + 11]
        if not any(peers.udp_port_bound(port) for port in needed):
            return base
    raise RuntimeError("no free block of UDP ports")


def write_lab(tmp_path: Path, kind: str) -> tuple[Path, list[int]]:
    """The two-VPCS lab of labs/ on free ports; (file, [PC1 port, PC1 remote, PC2 ..])."""
    if kind == "net":
        base = lab_ports_from_base()
        text = (Path(__file__).parent.parent / "labs/two-vpcs.net").read_text()
        path = tmp_path / "two-vpcs.net"
        path.write_text(text.replace("udp = 20000", f"udp = {base}"))
        return path, [base, base + 1, base + 2, base + 3]
    pc1, ours1, pc2, ours2 = peers.free_udp_ports(4)
    path = tmp_path / "two-vpcs.toml"
    path.write_text(  # no encapsulation: captures detect it
        f'name = "two-vpcs"\n[[link]]\na = "PC1 e0"\nb = "PC2 e0"\n'
        f'a_endpoint = "udp:{ours1}:127.0.0.1:{pc1}"\nb_endpoint = "udp:{ours2}:127.0.0.1:{pc2}"\n'
    )
    return path, [pc1, ours1, pc2, ours2]


@contextlib.contextmanager
def served(lab: Path) -> Iterator[str]:
    """`tunnelscope serve LAB` on a free control port; yields HOST:PORT, stops it by PID."""
    with open(lab.parent / "serve.err", "w+") as log:
        process = subprocess.Popen(
            [*TUNNELSCOPE, "serve", str(lab), "--control", "127.0.0.1:0", "-v"],
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        yield from _serving(process, log)


def _serving(process: subprocess.Popen[str], log: IO[str]) -> Iterator[str]:
    try:
        assert process.stdout is not None
        address = ""
        deadline = time.monotonic() + 30
        while not address and time.monotonic() < deadline:
            line = process.stdout.readline()
            if not line:
                break
            match = re.match(r"control on (\S+)", line)
            address = match.group(1) if match else ""
        log.seek(0)
        assert address, f"serve did not start: {log.read()}"
        yield address
        process.send_signal(signal.SIGTERM)
        assert process.wait(15) == 0
    finally:
        if process.poll() is None:
            process.kill()
            process.wait(5)


def verb(address: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "TUNNELSCOPE_CONTROL": address}
    return subprocess.run(
        [*TUNNELSCOPE, *args], capture_output=True, text=True, timeout=60, env=env
    )


def ok(address: str, *args: str) -> str:
    done = verb(address, *args)
    assert done.returncode == 0, done.stderr
    return done.stdout


def refused(address: str, *args: str) -> str:
    """A verb that must fail with one line and status 2; that line."""
    done = verb(address, *args)
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tunnelscope: error: "), lines
    return lines[0]


def lost(replies: list[tuple[int, bool]]) -> set[int]:
    return {seq for seq, answered in replies if not answered}


class Terminal:
    """A program on a pseudo-terminal, 200 columns wide, read with `expect`."""

    def __init__(self, command: list[str], env: dict[str, str]) -> None:
        self.master, slave = os.openpty()
        fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 50, 200, 0, 0))
        self.process = subprocess.Popen(
            command, stdin=slave, stdout=slave, stderr=slave, env=env, start_new_session=True
        )
        os.close(slave)
        self.seen = b""

    def send(self, text: str) -> None:
        os.write(self.master, text.encode())

    def expect(self, pattern: str, timeout: float = 15.0) -> str:
        """Read until `pattern` appears (escape sequences removed); the text up to its end."""
        deadline = time.monotonic() + timeout
        regex = re.compile(pattern.encode(), re.DOTALL)
        while True:
            match = regex.search(self.seen)
            if match:
                text, self.seen = self.seen[: match.end()], self.seen[match.end() :]
                return text.decode(errors="replace")
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(f"no {pattern!r} in {self.seen.decode(errors='replace')!r}")
            ready, _, _ = select.select([self.master], [], [], remaining)
            if ready:
                try:
                    chunk = os.read(self.master, 4096)
                except OSError:  # the program exited
                    chunk = b""
                if not chunk:
                    raise AssertionError(f"EOF before {pattern!r}: {self.seen!r}")
                self.seen = _ANSI.sub(b"", self.seen + chunk)

    def close(self) -> int:
        try:
            return self.process.wait(10)
        finally:
            if self.process.poll() is None:
                self.process.kill()
                self.process.wait(5)
            os.close(self.master)


@peers.needs_vpcs
@tshark.required
@pytest.mark.parametrize("kind", ["toml", "net"])
def test_two_vpcs_lab_driven_by_the_verbs_and_the_console(tmp_path: Path, kind: str) -> None:
    lab, (pc1_port, ours1, pc2_port, ours2) = write_lab(tmp_path, kind)
    plan = ok("", "serve", str(lab), "--dry-run")
    assert f"PC1     e0         {pc1_port}" in plan
    captures = tmp_path / "captures"
    with contextlib.ExitStack() as stack:
        address = stack.enter_context(served(lab))
        pc1 = stack.enter_context(peers.VPCS(pc1_port, ours1, mac_offset=1))
        pc2 = stack.enter_context(peers.VPCS(pc2_port, ours2, mac_offset=2))
        pc1.set_ip("10.0.0.1/24")
        pc2.set_ip("10.0.0.2/24")
        assert lost(pc1.ping("10.0.0.2", count=3)) == set()

        assert ok(address, "capture", "PC1", "e0", "pc1.pcap").strip() == (
            f"capturing PC1 e0 to {captures / 'pc1.pcap'}"
        )
        assert lost(pc1.ping("10.0.0.2", count=3)) == set()
        ok(address, "filter", "PC1", "e0", "freq_drop", "in", "3")
        # PC1 receives only the replies: every 3rd one is dropped
        assert lost(pc1.ping("10.0.0.2", count=6)) == {3, 6}
        [link] = json.loads(ok(address, "links", "--json"))
        assert link["ends"] == ["PC1 e0", "PC2 e0"]
        assert link["filters"] == [
            {"name": "PC1:e0:in:freq_drop", "direction": "b2a", "impairment": "freq_drop 3"}
        ]
        assert link["stats"]["b2a"]["dropped"] == {"freq_drop": 2}
        assert link["encapsulation"] == "ethernet"
        assert link["capture"]["path"] == str(captures / "pc1.pcap")
        table = ok(address, "links")
        assert "PC1 e0 -- PC2 e0" in table and "freq_drop 2" in table
        assert "PC1 e0 > PC2 e0" in ok(address, "stats", "--count", "1", "--interval", "0.1")
        stopped = ok(address, "capture", "--stop", "PC1", "e0")
        assert stopped.startswith("packet capture stopped")
        rows = tshark.fields(str(captures / "pc1.pcap"), ["icmp.type", "eth.type"], "icmp")
        types = [row["icmp.type"][0] for row in rows]
        assert types.count("8") == 9 and types.count("0") == 7  # dropped replies never landed

        # bad input: one line, status 2, and the lab goes on
        assert "outside the captures directory" in refused(
            address, "capture", "PC1", "e0", "../../escape.pcap"
        )
        assert "unknown device 'PC9'" in refused(address, "filter", "PC9", "e0", "none")
        assert "PC1 has no linked interface 'e9'" in refused(address, "capture", "PC1", "e9", "x")
        assert "out of range" in refused(address, "filter", "PC1", "e0", "packet_loss", "in", "200")
        host, port = address.rsplit(":", 1)
        with socket.create_connection((host, int(port)), 5) as sock:
            sock.sendall(b"\x00\xff garbage " * 100 + b"\nbridge delete PC1:e0--PC2:e0\n")
            sock.recv(4096)
        with socket.create_connection((host, int(port)), 5) as sock:
            sock.sendall(b"lab filter PC1 e0")  # and leaves mid-command
        ok(address, "filter", "PC1", "e0", "none")
        assert lost(pc1.ping("10.0.0.2", count=3)) == set()

        env = {**os.environ, "TUNNELSCOPE_CONTROL": address, "TERM": "xterm"}
        console = Terminal([*TUNNELSCOPE, "console", "--history", ""], env)
        try:
            console.expect("=> ")
            console.send("help\n")
            console.expect("no capture DEVICE INTERFACE.*=> ")
            console.send("sho\tPC1\n")  # Tab completes the command
            console.expect(r"PC1 e0: to PC2 e0 via udp:.*=> ")
            console.send("capture PC2 \tc.pcapng\n")  # ... and the only interface
            console.expect(f"capturing PC2 e0 to {captures / 'c.pcapng'}.*=> ")
            assert lost(pc1.ping("10.0.0.2", count=2)) == set()
            console.send("filter PC1 e0 freq_drop in 3\n")
            console.expect(r"set: b2a freq_drop 3.*=> ")
            console.send("list\n")
            console.expect(r"PC1 e0 -- PC2 e0.*b2a freq_drop 3.*=> ")
            console.send("stats\n")
            console.expect(r"PC2 e0 > PC1 e0.*=> ")
            console.send("!ls /\n")
            console.expect("no shell escape.*=> ")
            console.send("__import__('os').system('id')\n")
            console.expect("unknown command.*=> ")
            console.send("capture PC1 e0 ../x.pcap\n")
            console.expect("error: .*outside the captures directory.*=> ")
            console.send("no capture PC2 e0\n")
            console.expect("packet capture stopped.*=> ")
            console.send("filter PC1 e0 none\n")
            console.expect("filters removed.*=> ")
            console.send("stats protocols 6\n")  # a live sample, tallied per protocol
            pinger = threading.Thread(target=pc1.ping, args=("10.0.0.2",), kwargs={"count": 5})
            pinger.start()
            console.expect(r"sampling 1 links for 6 s.*PC1 e0 -- PC2 e0 +\d+ +.*ICMP \d+.*=> ")
            pinger.join(30)
            console.send("stats protocols forever\n")
            console.expect("error: SECONDS must be above 0.*=> ")
            console.send("exit\n")
        finally:
            assert console.close() == 0
        rows = tshark.fields(str(captures / "c.pcapng"), ["icmp.type"], "icmp")
        assert len(rows) == 4  # two pings, both ways
        assert lost(pc1.ping("10.0.0.2", count=2)) == set()


def reassembled(ns: peers.Netns) -> int:
    """IP datagrams the namespace's kernel reassembled from fragments (ReasmOKs)."""
    lines = [line.split() for line in ns.exec("cat", "/proc/net/snmp").stdout.splitlines()]
    names, values = [words for words in lines if words[0] == "Ip:"][:2]
    return int(values[names.index("ReasmOKs")])


HOSTS = ("10.77.0.1", "10.77.0.2")


@contextlib.contextmanager
def two_hosts() -> Iterator[tuple[peers.Netns, peers.Netns]]:
    """Two hosts: network namespaces joined by a veth (MTU 1500), addressed HOSTS."""
    with peers.netns() as host_a, peers.netns() as host_b:
        suffix = host_a.name[-4:]
        peers.run("ip", "link", "add", f"tsa{suffix}", "netns", host_a.name, "type", "veth",
                  "peer", "name", f"tsb{suffix}", "netns", host_b.name)  # fmt: skip
        for ns, side, address in ((host_a, "a", HOSTS[0]), (host_b, "b", HOSTS[1])):
            ns.ip("addr", "add", f"{address}/24", "dev", f"ts{side}{suffix}")
            ns.ip("link", "set", f"ts{side}{suffix}", "up")
        yield host_a, host_b


def two_host_lab(tmp_path: Path, relay: str = "") -> tuple[Path, dict[str, dict]]:
    """PC1 on host a, PC2 on host b, the same udp base; (lab file, plan rows by device)."""
    lab = tmp_path / "hosts.net"
    lab.write_text(
        f"[{HOSTS[0]}:7200]\n udp = 20000\n{relay} [[VPCS PC1]]\n  e0 = PC2 e0\n"
        f"[{HOSTS[1]}:7200]\n udp = 20000\n [[VPCS PC2]]\n"
    )
    plan = json.loads(ok("", "serve", str(lab), "--dry-run", "--json"))
    return lab, {row["device"]: row for row in plan["plan"]} | {"": plan}


def serve_hosts(
    stack: contextlib.ExitStack,
    lab: Path,
    hosts: tuple[peers.Netns, peers.Netns],
    control: str,
    stream: str = "off",
) -> list[str]:
    """Each host's `serve LAB --host` in its namespace; their control addresses."""
    addresses = []
    for ns, host in zip(hosts, HOSTS):
        log = stack.enter_context(open(lab.parent / f"serve-{host}.err", "w+"))  # noqa: SIM115
        command = ["ip", "netns", "exec", ns.name, *TUNNELSCOPE, "serve", str(lab), "--host", host]
        command += ["--control", control.format(host=host), "--stream", stream.format(host=host)]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=log, text=True)
        addresses.append(stack.enter_context(contextlib.contextmanager(_serving)(process, log)))
    return addresses


def host_pc(name: str, row: dict, ns: peers.Netns, mac: int) -> peers.VPCS:
    """A VPCS configured as the plan says, on its host."""
    host, port = row["emulator_remote"].rsplit(":", 1)
    return peers.VPCS(row["emulator_port"], int(port), mac, 0, host, ns.name)


@peers.needs_root
@peers.needs_vpcs
def test_a_lab_spanning_two_hosts_carries_pings_of_every_size(tmp_path: Path) -> None:
    """The .net file names the hosts by address, with the same udp base; each host runs its
    part with --host; pings cross through tunnels the veth's MTU fragments."""
    lab, rows = two_host_lab(tmp_path)
    assert rows[""]["hosts"] == {HOSTS[0]: ["PC1:e0--PC2:e0"], HOSTS[1]: []}
    assert rows["PC1"]["emulator_remote"] == "127.0.0.1:20001"  # the relay is on its host
    assert rows["PC2"]["emulator_remote"] == "10.77.0.1:20002"  # same base, other host
    with two_hosts() as (host_a, host_b), contextlib.ExitStack() as stack:
        serve_hosts(stack, lab, (host_a, host_b), "127.0.0.1:0")
        pc1 = stack.enter_context(host_pc("PC1", rows["PC1"], host_a, 0))
        pc2 = stack.enter_context(host_pc("PC2", rows["PC2"], host_b, 1))
        pc1.set_ip("10.0.0.1/24")
        pc2.set_ip("10.0.0.2/24")
        before = reassembled(host_b)
        for size in (56, 1472, 3000):
            replies = pc1.ping("10.0.0.2", count=3, size=size)
            assert lost(replies) == set(), (size, pc1.transcript[-800:])
        assert reassembled(host_b) - before >= 6  # 1472 and 3000 bytes: fragmented tunnels


@peers.needs_root
@peers.needs_vpcs
@tshark.required
def test_one_console_drives_a_link_relayed_on_another_host(tmp_path: Path) -> None:
    """From host a, the verbs reach the link host b relays (relay = b): a capture there that
    tshark reads, freq_drop in 3 on it, a capture streamed from b into a file on a, and a
    links table with a HOST column; a third host that does not answer is shown as such."""
    lab, rows = two_host_lab(tmp_path, relay=f" relay = {HOSTS[1]}\n")
    assert rows[""]["hosts"] == {HOSTS[0]: [], HOSTS[1]: ["PC1:e0--PC2:e0"]}
    with two_hosts() as (host_a, host_b), contextlib.ExitStack() as stack:
        controls = serve_hosts(stack, lab, (host_a, host_b), "{host}:0", stream="{host}:0")
        pc1 = stack.enter_context(host_pc("PC1", rows["PC1"], host_a, 0))
        pc2 = stack.enter_context(host_pc("PC2", rows["PC2"], host_b, 1))
        pc1.set_ip("10.0.0.1/24")
        pc2.set_ip("10.0.0.2/24")
        flags = [f"--control=a={controls[0]}", f"--control=b={controls[1]}"]
        flags.append("--control=c=127.0.0.1:1")  # nobody serves there

        def on_a(*words: str) -> str:
            done = host_a.exec(*TUNNELSCOPE, *words, *flags, timeout=60, check=False)
            assert done.returncode == 0, done.stderr
            return done.stdout

        def forwarded() -> int:
            stats = json.loads(on_a("links", "--json"))[0]["stats"]
            return stats["a2b"]["forwarded"] + stats["b2a"]["forwarded"]

        before = forwarded()  # the PCs' own start-up frames went by already
        capture = ("capture", "PC1", "e0", "pc1.pcap", "--remote-file")
        assert on_a(*capture).startswith("capturing PC1 e0 to")
        assert lost(pc1.ping("10.0.0.2", count=3)) == set()
        assert on_a("filter", "PC1", "e0", "freq_drop", "in", "3").strip()
        assert lost(pc1.ping("10.0.0.2", count=9)) == {3, 6, 9}
        table = on_a("links")
        assert table.split("\n")[0].split()[:2] == ["HOST", "LINK"]
        assert re.search(r"^c\s+unreachable: no tunnelscope control at", table, re.M)
        assert "(Connection refused)" in table  # the rest of the row, wrapped to fit
        [link, down] = json.loads(on_a("links", "--json"))
        assert link["host"] == "b" and down["host"] == "c" and "unreachable" in down
        assert on_a("capture", "--stop", "PC1", "e0").strip()
        frames = tshark.fields(str(tmp_path / "captures" / "pc1.pcap"), ["frame.number"])
        assert len(frames) == forwarded() - before  # post point: what the remote relay delivered

        here = tmp_path / "here"  # the user's directory on host a
        here.mkdir()
        command = ["ip", "netns", "exec", host_a.name, *TUNNELSCOPE, "capture", "PC1", "e0"]
        streamed = subprocess.Popen(
            [*command, "here.pcapng", *flags], cwd=here, stdout=subprocess.PIPE, text=True
        )
        try:
            assert streamed.stdout is not None
            started = streamed.stdout.readline()
            assert started.startswith("capturing PC1 e0 (relayed on b) into here.pcapng"), started
            assert on_a("filter", "PC1", "e0", "none").strip()
            before = forwarded()
            assert lost(pc1.ping("10.0.0.2", count=4)) == set()
            delivered = forwarded() - before
        finally:
            streamed.send_signal(signal.SIGINT)
            assert streamed.wait(15) == 0
        frames = tshark.fields(str(here / "here.pcapng"), ["icmp.seq"])
        assert len(frames) == delivered  # every frame b delivered, streamed into a's file

        # a live view of the same remote link: `capture --wireshark` runs `wireshark -k -i -`
        # on the stream (here a stand-in that hands it to tshark and ends after 8 frames)
        viewer = tmp_path / "bin"
        viewer.mkdir()
        seen = tmp_path / "viewer.txt"
        (viewer / "wireshark").write_text(
            '#!/bin/sh\n[ "$*" = "-k -i -" ] || exit 9\n'
            f"exec tshark -l -i - -c 8 -T fields -e icmp.seq > {seen}\n"
        )
        (viewer / "wireshark").chmod(0o755)
        env = {**os.environ, "PATH": f"{viewer}:{os.environ['PATH']}"}
        watching = subprocess.Popen([*command, "--wireshark", *flags], env=env)
        try:
            time.sleep(1)  # the stream is up before the pings
            assert lost(pc1.ping("10.0.0.2", count=4)) == set()
            assert watching.wait(20) == 0
        finally:
            watching.kill()
        assert seen.read_text().split() == ["1", "1", "2", "2", "3", "3", "4", "4"]
