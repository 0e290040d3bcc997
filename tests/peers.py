"""Real peers for tests: VPCS processes, Linux network namespaces with TAP/veth devices.

Import it as `import peers` (tests/ has no __init__.py, pytest puts it on sys.path).
Everything here is bounded in time and cleans up after itself, also when a test fails:

    with peers.VPCS(local_port, remote_port) as pc:      # a VPCS whose tunnel is 127.0.0.1
        pc.set_ip("10.0.0.1/24")
        replies = pc.ping("10.0.0.2", count=3)            # [(1, True), (2, False), ...]

    with peers.tap_namespace("10.99.1.1/24") as ns, open_endpoint(ns.tap_spec) as tap:
        with peers.FakeHost(tap, "10.99.1.2"):             # answers ARP and ping for .2
            assert ns.ping("10.99.1.2", count=3) == (3, 3)  # (transmitted, received)

Tests that need root or vpcs say so with @peers.needs_root / @peers.needs_vpcs.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import secrets
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Callable, TypeVar

import pytest

logging.getLogger("scapy.runtime").setLevel(logging.ERROR)  # no route/interface chatter

from scapy.layers.inet import ICMP, IP  # noqa: E402
from scapy.layers.l2 import ARP, Ether  # noqa: E402
from scapy.packet import Raw  # noqa: E402

from tunnelscope.nio import Endpoint  # noqa: E402
from tunnelscope.nio.netns import run_in_netns  # noqa: E402

F = TypeVar("F", bound=Callable[..., object])
T = TypeVar("T")

IS_ROOT = os.geteuid() == 0
VPCS_PATH = shutil.which("vpcs")
NETNS_PREFIX = "tstest-"


def needs_root(test: F) -> F:
    """Mark a test (or class) `root` and skip it unless we are root."""
    skip = pytest.mark.skipif(not IS_ROOT, reason="needs root (namespaces, TAP, raw sockets)")
    return pytest.mark.root(skip(test))


def needs_vpcs(test: F) -> F:
    """Mark a test (or class) `vpcs` and skip it when the vpcs binary is missing."""
    skip = pytest.mark.skipif(VPCS_PATH is None, reason="vpcs is not installed")
    return pytest.mark.vpcs(skip(test))


def free_udp_port(host: str = "127.0.0.1") -> int:
    """A UDP port nobody has bound at `host` right now (the kernel's choice)."""
    return free_udp_ports(1, host)[0]


def free_udp_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """`count` distinct free UDP ports, no two 9 apart (VPCS also binds its port + 9)."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    ports: list[int] = []
    with contextlib.ExitStack() as stack:  # every candidate stays bound: none comes twice
        for _ in range(20 * count):
            if len(ports) == count:
                break
            sock = stack.enter_context(socket.socket(family, socket.SOCK_DGRAM))
            sock.bind((host, 0))
            port = sock.getsockname()[1]
            if all(abs(port - other) != 9 for other in ports):
                ports.append(port)
    assert len(ports) == count, "the kernel keeps handing out neighbouring ports"
    return ports


def free_tcp_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def udp_port_bound(port: int) -> bool:
    """True when some socket holds UDP `port` on 127.0.0.1 (or the wildcard)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return True
    return False


def wait_until(condition: Callable[[], bool], timeout: float, interval: float = 0.05) -> bool:
    """Poll `condition` until it holds or `timeout` seconds pass; its last value."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)
    return True


@contextlib.contextmanager
def started(command: list[str], log: Path, ready: Callable[[], bool]) -> Iterator[subprocess.Popen]:
    """A process, once `ready()`; SIGINT at exit, killed if it hangs."""
    with open(log, "w+") as err:
        process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=err, text=True)
        try:
            deadline = time.monotonic() + 30
            while not ready() and time.monotonic() < deadline:
                assert process.poll() is None, log.read_text()
                time.sleep(0.1)
            assert ready(), log.read_text()
            yield process
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
            try:
                process.wait(20)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def receive(
    endpoint: Endpoint,
    count: int,
    timeout: float = 2.0,
    keep: Callable[[bytes], bool] | None = None,
) -> list[bytes]:
    """Frames from `endpoint` (only those `keep` accepts), until `count` or `timeout` s."""
    frames: list[bytes] = []
    deadline = time.monotonic() + timeout
    while len(frames) < count:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        select.select([endpoint], [], [], min(remaining, 0.1))
        frames += [frame for frame in endpoint.recv_batch() if keep is None or keep(frame)]
    return frames


class FakeHost:
    """A host made of scapy packets behind an endpoint: answers ARP and ping for `ip`.

    A thread owns the endpoint while the context is open; `received` keeps every frame.
    With `echo=False` it answers ARP only, so pings go unanswered.
    """

    def __init__(
        self, endpoint: Endpoint, ip: str, mac: str = "02:00:00:00:00:99", echo: bool = True
    ) -> None:
        self.endpoint = endpoint
        self.ip = ip
        self.mac = mac
        self.echo = echo
        self.received: list[bytes] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=f"fakehost-{ip}", daemon=True)

    def answer(self, frame: bytes) -> bytes | None:
        """The reply a host at `ip` would send to `frame`, if any."""
        packet = Ether(frame)
        if ARP in packet and packet[ARP].op == 1 and packet[ARP].pdst == self.ip:
            request = packet[ARP]
            arp = ARP(op=2, hwsrc=self.mac, psrc=self.ip, hwdst=request.hwsrc, pdst=request.psrc)
            return bytes(Ether(dst=packet.src, src=self.mac) / arp)
        if self.echo and IP in packet and packet[IP].dst == self.ip:
            ip = IP(bytes(packet[IP])[: packet[IP].len])  # without the Ethernet padding
            if ICMP in ip and ip[ICMP].type == 8:
                echo = ip[ICMP]
                icmp = ICMP(type=0, id=echo.id, seq=echo.seq) / Raw(bytes(echo.payload))
                reply = IP(src=self.ip, dst=ip.src) / icmp
                return bytes(Ether(dst=packet.src, src=self.mac) / reply)
        return None

    def _serve(self) -> None:
        while not self._stop.is_set():
            select.select([self.endpoint], [], [], 0.05)
            for frame in self.endpoint.recv_batch():
                self.received.append(frame)
                reply = self.answer(frame)
                if reply is not None:
                    self.endpoint.send_batch([reply])

    def __enter__(self) -> FakeHost:
        self._thread.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)


# ----------------------------------------------------------------------------------- VPCS

_TELNET = re.compile(rb"\xff[\xfb-\xfe].|\xff[\xf0-\xfa]", re.DOTALL)  # option negotiation
_ANSI = re.compile(rb"\x1b\[[0-9;]*m")
_PING_LINE = re.compile(r"icmp_seq=(\d+)\s+(ttl=\d+|timeout)(.*)")


class VPCSError(RuntimeError):
    """VPCS did not start, died, or did not answer in time."""


class VPCS:
    """One VPCS process (one PC), tunnel 127.0.0.1:local_port <-> remote_host:remote_port,
    on this host or inside network namespace `netns` (a host of a lab spanning hosts).

    VPCS forks a worker into a session of its own, so the process group is not enough to
    find it; every process we start carries a unique environment marker and `close` kills
    whatever still carries it. VPCS also binds local_port + 9 (its unused PC 10 slot).
    """

    PROMPT = b"VPCS> "

    def __init__(
        self,
        local_port: int,
        remote_port: int,
        mac_offset: int = 0,
        console_port: int = 0,
        remote_host: str = "127.0.0.1",
        netns: str | None = None,
    ) -> None:
        self.local_port = local_port
        self.remote_port = remote_port
        self.remote_host = remote_host
        self.netns = netns
        self.mac_offset = mac_offset
        self.console_port = console_port or free_tcp_port()
        self._marker = f"TUNNELSCOPE_TEST_PEER={secrets.token_hex(8)}"
        self._workdir = tempfile.TemporaryDirectory(prefix="tstest-vpcs-")
        self._proc: subprocess.Popen[bytes] | None = None
        self._console: socket.socket | None = None
        self.transcript = ""  # everything the console said: for assertion messages

    @property
    def mac(self) -> str:
        """The PC's MAC address: VPCS's 00:50:79:66:68:00 plus the MAC offset."""
        return f"00:50:79:66:68:{self.mac_offset:02x}"

    @classmethod
    def attach(cls, console_port: int, timeout: float = 10.0) -> VPCS:
        """The console of a VPCS someone else runs (a GNS3 node): commands only, no process."""
        pc = cls(0, 0, console_port=console_port)
        deadline = time.monotonic() + timeout
        while pc._console is None:
            try:
                pc._console = socket.create_connection(("127.0.0.1", console_port), 1.0)
            except OSError:
                if time.monotonic() >= deadline:
                    raise VPCSError(f"no VPCS console on port {console_port}") from None
                time.sleep(0.1)
        pc._console.sendall(b"\n")
        pc._read_prompt(deadline - time.monotonic())
        with contextlib.suppress(VPCSError):  # the banner's prompt and ours: read them all
            while True:
                pc._read_prompt(0.5)
        return pc

    def start(self, timeout: float = 10.0) -> None:
        if VPCS_PATH is None:
            raise VPCSError("vpcs is not installed")
        if self._inside(lambda: udp_port_bound(self.local_port)):
            raise VPCSError(f"UDP port {self.local_port} is taken: VPCS would silently not bind")
        command = ["ip", "netns", "exec", self.netns] if self.netns else []
        command += [VPCS_PATH, "-i", "1", "-F", "-p", str(self.console_port)]
        command += ["-m", str(self.mac_offset), "-s", str(self.local_port)]
        command += ["-c", str(self.remote_port), "-t", self.remote_host]
        key, value = self._marker.split("=")
        with open(os.path.join(self._workdir.name, "vpcs.log"), "wb") as log:
            self._proc = subprocess.Popen(
                command,
                cwd=self._workdir.name,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env={**os.environ, key: value},
                start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while self._console is None:
            if self._proc.poll() is not None:
                raise VPCSError(f"vpcs exited with {self._proc.returncode}: {self._log()}")
            try:
                self._console = self._inside(
                    lambda: socket.create_connection(("127.0.0.1", self.console_port), 1.0)
                )
            except OSError:
                if time.monotonic() >= deadline:
                    raise VPCSError(f"no VPCS console on port {self.console_port}") from None
                time.sleep(0.05)
        self._read_prompt(deadline - time.monotonic())
        bound = wait_until(
            lambda: self._inside(lambda: udp_port_bound(self.local_port)),
            deadline - time.monotonic(),
        )
        if not bound:
            raise VPCSError(f"VPCS did not bind UDP port {self.local_port}")

    def _inside(self, opener: Callable[[], T]) -> T:
        """Run `opener` in the PC's network namespace (sockets opened there stay there)."""
        return run_in_netns("vpcs", self.netns, opener)

    def _log(self) -> str:
        with open(os.path.join(self._workdir.name, "vpcs.log"), "rb") as log:
            return log.read()[-500:].decode(errors="replace")

    def _read_prompt(self, timeout: float) -> str:
        """Read until the prompt; the cleaned output before it."""
        assert self._console is not None, "VPCS is not started"
        deadline = time.monotonic() + timeout
        data = b""
        while not data.endswith(self.PROMPT):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise VPCSError(f"no VPCS prompt within {timeout:.1f} s; got {data[-300:]!r}")
            self._console.settimeout(remaining)
            try:
                chunk = self._console.recv(4096)
            except socket.timeout:
                continue
            if not chunk:
                raise VPCSError(f"VPCS closed its console; got {data[-300:]!r}")
            data = _TELNET.sub(b"", data + chunk)
        text = _ANSI.sub(b"", data[: -len(self.PROMPT)]).decode(errors="replace")
        text = text.replace("\r", "")
        self.transcript += text + self.PROMPT.decode()
        return text

    def command(self, line: str, timeout: float = 10.0) -> str:
        """Run one console command; its output (without the echoed command and prompt)."""
        assert self._console is not None, "VPCS is not started"
        self._console.sendall(line.encode() + b"\n")
        output = self._read_prompt(timeout)
        echoed, _, rest = output.partition("\n")
        return rest if echoed.strip() == line.strip() else output

    def set_ip(self, address: str, gateway: str = "", timeout: float = 10.0) -> str:
        """`ip 10.0.0.1/24 [GATEWAY]`; about 3 s (VPCS checks for a duplicate address)."""
        output = self.command(f"ip {address} {gateway}".strip(), timeout)
        if "PC1 : " not in output:
            raise VPCSError(f"ip {address} failed: {output.strip()}")
        return output

    def ping(
        self,
        address: str,
        count: int = 3,
        interval_ms: int = 200,
        wait_ms: int = 1000,
        size: int = 56,
    ) -> list[tuple[int, bool]]:
        """Ping from VPCS (`size` bytes of ICMP data); one (seq, answered) per probe.

        When VPCS cannot resolve the address by ARP (about 3 s) no probe leaves: all False.
        """
        line = f"ping {address} -c {count} -i {interval_ms} -w {wait_ms} -l {size}"
        timeout = 5.0 + count * (interval_ms + wait_ms) / 1000
        output = self.command(line, timeout)
        results = {seq: False for seq in range(1, count + 1)}
        for match in _PING_LINE.finditer(output):
            # an ICMP error (e.g. unreachable) also carries a ttl: not an answer
            answered = match.group(2).startswith("ttl") and "ICMP type" not in match.group(3)
            results[int(match.group(1))] = answered
        return sorted(results.items())

    def pids(self) -> list[int]:
        """Every live process of this VPCS (they all carry our environment marker)."""
        marker = self._marker.encode()
        pids = []
        for entry in os.listdir("/proc"):
            if entry.isdigit():
                try:
                    with open(f"/proc/{entry}/environ", "rb") as environ:
                        if marker in environ.read().split(b"\0"):
                            pids.append(int(entry))
                except OSError:  # gone meanwhile, or a kernel thread
                    pass
        return pids

    def close(self) -> None:
        """Kill the whole tree (main process, worker, anything spawned), whatever state."""
        if self._console is not None:
            self._console.close()
            self._console = None
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self._proc.pid, signal.SIGKILL)
            for pid in self.pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._proc.wait(timeout=5)
            wait_until(lambda: not self.pids(), timeout=5)
            self._proc = None
        self._workdir.cleanup()

    def __enter__(self) -> VPCS:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


# ----------------------------------------------------------------------- network namespaces

_PING_SUMMARY = re.compile(r"(\d+) packets transmitted, (\d+) received")


def run(*command: str, timeout: float = 10.0, check: bool = True) -> subprocess.CompletedProcess:
    """Run a command (text output); on failure the error says what it printed."""
    result = subprocess.run(command, capture_output=True, text=True, timeout=timeout)
    if check and result.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed: {result.stderr.strip()}")
    return result


class Netns:
    """A network namespace of our own, with IPv6 off so the kernel's traffic is predictable."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.tap_spec = ""  # set by add_tap: the endpoint spec that reaches the TAP
        self.eth_spec = ""  # set by add_veth: the endpoint spec of the free veth end

    def exec(
        self, *command: str, timeout: float = 10.0, check: bool = True
    ) -> subprocess.CompletedProcess:
        """Run a command inside the namespace (`ip netns exec`)."""
        return run("ip", "netns", "exec", self.name, *command, timeout=timeout, check=check)

    def ip(self, *args: str) -> subprocess.CompletedProcess:
        return run("ip", "-n", self.name, *args)

    def add_tap(self, address: str, ifname: str = "tap0") -> str:
        """A persistent TAP (up, with `address` as CIDR) that `tap:IFNAME@NS` attaches to."""
        self.ip("tuntap", "add", "dev", ifname, "mode", "tap")
        self.ip("addr", "add", address, "dev", ifname)
        self.ip("link", "set", ifname, "up")
        self.tap_spec = f"tap:{ifname}@{self.name}"
        return self.tap_spec

    def add_veth(self, address: str, ifname: str = "veth0", peer: str = "veth1") -> str:
        """A veth pair: `peer` holds `address` (the kernel's side), `ifname` is left for eth:."""
        self.ip("link", "add", ifname, "type", "veth", "peer", "name", peer)
        self.ip("addr", "add", address, "dev", peer)
        self.ip("link", "set", peer, "up")
        self.ip("link", "set", ifname, "up")
        self.eth_spec = f"eth:{ifname}@{self.name}"
        return self.eth_spec

    def ping(
        self, address: str, count: int = 3, interval: float = 0.2, wait: float = 1.0
    ) -> tuple[int, int]:
        """Kernel ping from inside the namespace: (transmitted, received)."""
        if shutil.which("ping") is None:
            pytest.skip("ping is not installed (Debian package iputils-ping)")
        options = ["-n", "-c", str(count), "-i", str(interval), "-W", str(wait)]
        timeout = count * interval + wait + 10
        result = self.exec("ping", *options, address, timeout=timeout, check=False)
        match = _PING_SUMMARY.search(result.stdout)
        if match is None:
            raise RuntimeError(f"ping {address} gave no summary: {result.stdout}{result.stderr}")
        return int(match.group(1)), int(match.group(2))


@contextlib.contextmanager
def netns() -> Iterator[Netns]:
    """A fresh namespace named tstest-XXXXXXXX, loopback up, IPv6 off; deleted at exit."""
    name = NETNS_PREFIX + secrets.token_hex(4)
    run("ip", "netns", "add", name)
    try:
        ns = Netns(name)
        off = ("net.ipv6.conf.all.disable_ipv6=1", "net.ipv6.conf.default.disable_ipv6=1")
        ns.exec("sysctl", "-qw", *off)
        ns.ip("link", "set", "lo", "up")
        yield ns
    finally:
        run("ip", "netns", "delete", name, check=False)


@contextlib.contextmanager
def tap_namespace(address: str, ifname: str = "tap0") -> Iterator[Netns]:
    """A fresh namespace holding a TAP with `address` (CIDR); open `ns.tap_spec` to use it."""
    with netns() as ns:
        ns.add_tap(address, ifname)
        yield ns
