"""A real GNS3 server (gns3-server 2.2.x from PyPI) with tunnelscope as its ubridge.

Two cloud nodes with one UDP port each are joined through the compute API, exactly the
ubridge commands a controller link would send; the test's own UDP sockets sit behind the
clouds' tunnels. The protocol exchange every tunnelscope process saw is written to the test
run's output, and into every failure message.

gns3-server comes from $TUNNELSCOPE_GNS3_SERVER (a gns3server executable), a venv in
.venv-gns3/ (scripts/install.sh), or is installed here into a cached venv; without any of
them (no network) the test is skipped. Everything is bounded in time; the server's process
group is killed by its id.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import peers
import pytest
import tshark
from command import TUNNELSCOPE

pytestmark = pytest.mark.timeout(600)

GNS3_VERSION = "2.2.61"
ROOT = Path(__file__).resolve().parent.parent
CACHE = Path.home() / ".cache" / "tunnelscope" / f"gns3-server-{GNS3_VERSION}"


def _gns3server() -> str | None:
    candidates = [os.environ.get("TUNNELSCOPE_GNS3_SERVER", "")]
    candidates += [str(ROOT / ".venv-gns3/bin/gns3server"), str(CACHE / "bin/gns3server")]
    for path in candidates:
        if path and os.access(path, os.X_OK):
            return path
    try:  # its own venv: gns3-server pins its own aiohttp, jsonschema...
        subprocess.run([sys.executable, "-m", "venv", str(CACHE)], check=True, timeout=120)
        pip = [str(CACHE / "bin/pip"), "install", "-q", f"gns3-server=={GNS3_VERSION}"]
        subprocess.run(pip, check=True, timeout=300, capture_output=True)
    except (subprocess.SubprocessError, OSError):
        return None
    return str(CACHE / "bin/gns3server")


class Gns3:
    """A gns3server process bound to 127.0.0.1, and its REST API."""

    def __init__(self, executable: str, workdir: Path, launcher_kind: str = "captures-dir") -> None:
        """`launcher_kind`: installed with --captures-dir PROJECTS, "installed" without it
        (from a directory outside the projects), or "by-hand" (`exec ... hypervisor "$@"`)."""
        self.workdir = workdir
        self.port = peers.free_tcp_port()
        self.exchange = workdir / "exchange.log"
        self.projects = workdir / "projects"
        home = workdir / "home"
        elsewhere = workdir / "elsewhere"
        for directory in (home, self.projects, workdir / "images", workdir / "configs", elsewhere):
            directory.mkdir(parents=True, exist_ok=True)
        launcher = workdir / "tunnelscope-ubridge"
        if launcher_kind == "by-hand":
            command = " ".join(shlex.quote(word) for word in TUNNELSCOPE)
            launcher.write_text(
                f'#!/bin/sh\nexec {command} hypervisor --log {self.exchange} "$@"\n'
            )
            launcher.chmod(0o755)
        else:
            directory = ["--captures-dir", str(self.projects)]
            subprocess.run(
                [*TUNNELSCOPE, "hypervisor", "--install-launcher", str(launcher)]
                + (directory if launcher_kind == "captures-dir" else [])
                + ["--log", str(self.exchange)],
                cwd=elsewhere,
                check=True,
                timeout=60,
                capture_output=True,
            )
        vpcs = workdir / "vpcs"  # Debian's vpcs 0.5b2 is older than GNS3 accepts: say 0.6.1
        vpcs.write_text(
            '#!/bin/sh\n[ "$1" = -v ] &&'
            ' exec echo "Welcome to Virtual PC Simulator, version 0.6.1"\n'
            f'exec {peers.VPCS_PATH or "vpcs"} "$@"\n'
        )
        vpcs.chmod(0o755)
        config = workdir / "gns3_server.conf"
        config.write_text(
            "[Server]\n"
            f"host = 127.0.0.1\nport = {self.port}\nubridge_path = {launcher}\n"
            f"projects_path = {self.projects}\nimages_path = {workdir / 'images'}\n"
            f"configs_path = {workdir / 'configs'}\nreport_errors = False\nauth = False\n"
            f"[VPCS]\nvpcs_path = {vpcs}\n"
        )
        self.log = workdir / "gns3server.log"
        command = [executable, "--config", str(config), "--local", "--host", "127.0.0.1"]
        command += ["--port", str(self.port), "--log", str(self.log)]
        env = {**os.environ, "HOME": str(home)}
        self.process = subprocess.Popen(
            command,
            cwd=workdir,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        if not peers.wait_until(self._up, 60, 0.2):
            self.close()
            raise RuntimeError(f"gns3server did not answer: {self.log.read_text()[-2000:]}")

    def _up(self) -> bool:
        if self.process.poll() is not None:
            raise RuntimeError(f"gns3server exited: {self.log.read_text()[-2000:]}")
        try:
            return self.call("GET", "/v2/version")[0] == 200
        except OSError:
            return False

    def call(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        data = None if body is None else json.dumps(body).encode()
        request = urllib.request.Request(
            f"http://127.0.0.1:{self.port}{path}",
            data=data,
            method=method,
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                text = response.read().decode()
                return response.status, json.loads(text) if text else None
        except urllib.error.HTTPError as exc:
            return exc.code, exc.read().decode()

    def ok(self, method: str, path: str, body: Any = None) -> Any:
        status, reply = self.call(method, path, body)
        assert 200 <= status < 300, f"{method} {path}: {status} {reply}\n{self.exchange_text()}"
        return reply

    def exchange_text(self) -> str:
        return self.exchange.read_text() if self.exchange.exists() else "(no exchange logged)"

    def close(self) -> None:
        """SIGTERM (GNS3 stops its ubridges with `hypervisor stop`), then kill the group."""
        if self.process.poll() is None:
            self.process.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.process.wait(15)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(5)


@pytest.fixture(scope="module")
def gns3(tmp_path_factory: pytest.TempPathFactory, pytestconfig: pytest.Config) -> Iterator[Gns3]:
    executable = _gns3server()
    if executable is None:
        pytest.skip(f"gns3-server {GNS3_VERSION} is not installed and cannot be installed here")
    server = Gns3(executable, tmp_path_factory.mktemp("gns3"))
    try:
        yield server
    finally:
        server.close()
        reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:  # the exchange goes into the test run's log
            reporter.write_sep("-", "the ubridge protocol exchange tunnelscope saw")
            reporter.write_line(server.exchange_text())


def frame(number: int) -> bytes:
    """An Ethernet frame (local-experimental ethertype) carrying its sequence number."""
    return b"\x02\x00\x00\x00\x00\x02\x02\x00\x00\x00\x00\x01\x88\xb5" + bytes([number]) * 60


class Cloudlink:
    """Peer A - cloud C1 - [link] - cloud C2 - peer B, built through the compute API."""

    def __init__(self, gns3: Gns3) -> None:
        self.gns3 = gns3
        self.project = str(uuid.uuid4())
        gns3.ok("POST", "/v2/compute/projects", {"name": "tunnelscope", "project_id": self.project})
        base = f"/v2/compute/projects/{self.project}"
        self.peers = []
        self.nodes = []
        cloud_ports = peers.free_udp_ports(4)
        link = [gns3.ok("POST", f"{base}/ports/udp")["udp_port"] for _ in range(2)]
        for index in range(2):
            peer_port, cloud_port = cloud_ports[2 * index], cloud_ports[2 * index + 1]
            peer = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            peer.bind(("127.0.0.1", peer_port))
            peer.connect(("127.0.0.1", cloud_port))
            peer.settimeout(0.05)
            self.peers.append(peer)
            node = str(uuid.uuid4())
            mapping = {"name": "UDP tunnel 1", "port_number": 0, "type": "udp"}
            mapping.update(lport=cloud_port, rhost="127.0.0.1", rport=peer_port)
            body = {"name": f"C{index + 1}", "node_id": node, "ports_mapping": [mapping]}
            gns3.ok("POST", f"{base}/cloud/nodes", body)
            self.nodes.append(f"{base}/cloud/nodes/{node}/adapters/0/ports/0")
        self.nios = []
        for index in range(2):
            nio = {"type": "nio_udp", "lport": link[index], "rhost": "127.0.0.1"}
            nio["rport"] = link[1 - index]
            gns3.ok("POST", f"{self.nodes[index]}/nio", nio)
            self.nios.append(nio)

    def exchange(self, sender: int, numbers: list[int]) -> list[int]:
        """Send numbered frames from peer `sender`, paced; the numbers the other peer got."""
        receiver = self.peers[1 - sender]
        for number in numbers:
            self.peers[sender].send(frame(number))
            time.sleep(0.005)
        got: list[int] = []
        deadline = time.monotonic() + 1.5
        while time.monotonic() < deadline:
            try:
                got.append(receiver.recv(2048)[14])
            except (TimeoutError, socket.timeout):
                if len(got) == len(numbers):
                    break
        return got

    def filters(self, filters: dict[str, list[int]]) -> None:
        """What the GUI's link filter dialog sends: a PUT of the NIO with its filters."""
        body = {**self.nios[0], "filters": filters}
        self.gns3.ok("PUT", f"{self.nodes[0]}/nio", body)

    def close(self) -> None:
        for peer in self.peers:
            peer.close()
        self.gns3.ok("POST", f"/v2/compute/projects/{self.project}/close")


@pytest.fixture
def cloudlink(gns3: Gns3) -> Iterator[Cloudlink]:
    link = Cloudlink(gns3)
    try:
        # the links come up when the clouds' bridges start: wait for a frame to pass
        assert peers.wait_until(lambda: link.exchange(0, [0]) == [0], 20, 0.1), (
            "no frame crossed the clouds\n" + gns3.exchange_text()
        )
        yield link
    finally:
        link.close()


def test_gns3_checks_the_version_as_it_checks_ubridge(gns3: Gns3) -> None:
    launcher = gns3.workdir / "tunnelscope-ubridge"
    done = subprocess.run([str(launcher), "-v"], capture_output=True, text=True, timeout=60)
    match = re.search(r"ubridge version ([0-9a-z\.]+)", done.stdout)
    assert match, done.stdout + done.stderr
    assert tuple(int(x) for x in match.group(1).split(".")) >= (0, 9, 14)


def test_frames_cross_the_link_both_ways(cloudlink: Cloudlink) -> None:
    assert cloudlink.exchange(0, list(range(1, 21))) == list(range(1, 21))
    assert cloudlink.exchange(1, list(range(21, 41))) == list(range(21, 41))
    log = cloudlink.gns3.exchange_text()
    for command in ("hypervisor version", "bridge create", "bridge add_nio_udp", "bridge start"):
        assert command in log


def test_frequency_drop_and_suspend_follow_dynamips(cloudlink: Cloudlink) -> None:
    cloudlink.filters({"frequency_drop": [3]})
    # ubridge's frequency_drop: one counter over both directions, restarted by the update
    assert cloudlink.exchange(0, list(range(1, 10))) == [1, 2, 4, 5, 7, 8]
    assert cloudlink.exchange(1, [10, 11, 12]) == [10, 11]
    assert cloudlink.exchange(0, [13, 14, 15]) == [13, 14]  # 15 is the 3rd since 12
    cloudlink.filters({"frequency_drop": [-1]})  # the GUI's "suspend link"
    assert cloudlink.exchange(0, [16, 17]) == []
    assert cloudlink.exchange(1, [18, 19]) == []
    cloudlink.filters({})
    assert cloudlink.exchange(0, [20, 21]) == [20, 21]
    log = cloudlink.gns3.exchange_text()
    assert "add_packet_filter" in log and "frequency_drop -1" in log


@tshark.required
def test_capture_through_the_compute_api_is_read_by_tshark(cloudlink: Cloudlink) -> None:
    body = {"capture_file_name": "cloud.pcap", "data_link_type": "DLT_EN10MB"}
    path = cloudlink.gns3.ok("POST", f"{cloudlink.nodes[0]}/start_capture", body)["pcap_file_path"]
    cloudlink.filters({"frequency_drop": [4]})
    assert cloudlink.exchange(0, list(range(1, 9))) == [1, 2, 3, 5, 6, 7]
    assert cloudlink.exchange(1, [9, 10]) == [9, 10]
    cloudlink.gns3.ok("POST", f"{cloudlink.nodes[0]}/stop_capture")
    cloudlink.filters({})
    rows = tshark.fields(path, ["eth.type", "eth.src"])
    assert len(rows) == 8  # what crossed: the dropped frames never reach the file
    assert {row["eth.type"][0] for row in rows} == {"0x88b5"}
    assert "bridge start_capture" in cloudlink.gns3.exchange_text()


# --- two VPCS nodes, a hypervisor per node, without --captures-dir ---------------------------


@pytest.fixture(scope="module", params=["by-hand", "installed"])
def gns3_default(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    pytestconfig: pytest.Config,
) -> Iterator[Gns3]:
    """A GNS3 server whose ubridge_path runs tunnelscope without --captures-dir."""
    executable = _gns3server()
    if executable is None:
        pytest.skip(f"gns3-server {GNS3_VERSION} is not installed and cannot be installed here")
    if peers.VPCS_PATH is None:
        pytest.skip("vpcs is not installed")
    server = Gns3(executable, tmp_path_factory.mktemp(f"gns3-{request.param}"), request.param)
    try:
        yield server
    finally:
        server.close()
        reporter = pytestconfig.pluginmanager.get_plugin("terminalreporter")
        if reporter is not None:
            reporter.write_sep("-", f"the exchange tunnelscope saw ({request.param} launcher)")
            reporter.write_line(server.exchange_text())


class VpcsPair:
    """PC1 - [link] - PC2, two GNS3 VPCS nodes (each behind its own tunnelscope hypervisor)."""

    def __init__(self, gns3: Gns3) -> None:
        self.gns3 = gns3
        self.project = str(uuid.uuid4())
        gns3.ok("POST", "/v2/compute/projects", {"name": "pair", "project_id": self.project})
        base = f"/v2/compute/projects/{self.project}"
        link = [gns3.ok("POST", f"{base}/ports/udp")["udp_port"] for _ in range(2)]
        self.nodes, self.ports, self.nios, self.pcs = [], [], [], []
        for index in range(2):
            node = str(uuid.uuid4())
            script = f"ip 10.77.0.{index + 1}/24\n"
            body = {"name": f"PC{index + 1}", "node_id": node, "startup_script": script}
            reply = gns3.ok("POST", f"{base}/vpcs/nodes", body)
            self.nodes.append(f"{base}/vpcs/nodes/{node}")
            self.ports.append(f"{base}/vpcs/nodes/{node}/adapters/0/ports/0")
            nio = {"type": "nio_udp", "lport": link[index], "rhost": "127.0.0.1"}
            nio["rport"] = link[1 - index]
            gns3.ok("POST", f"{self.ports[index]}/nio", nio)
            self.nios.append(nio)
            gns3.ok("POST", f"{self.nodes[index]}/start", {})
            self.pcs.append(peers.VPCS.attach(reply["console"], timeout=20))

    def ping(self, count: int = 4) -> list[tuple[int, bool]]:
        return self.pcs[0].ping("10.77.0.2", count=count, interval_ms=300, wait_ms=1500)

    def filters(self, filters: dict[str, list[Any]]) -> None:
        body = {**self.nios[0], "filters": filters}
        self.gns3.ok("PUT", f"{self.ports[0]}/nio", body)

    def close(self) -> None:
        for pc in self.pcs:
            pc.close()
        for node in self.nodes:
            self.gns3.call("POST", f"{node}/stop", {})
        self.gns3.ok("POST", f"/v2/compute/projects/{self.project}/close")


@tshark.required
def test_vpcs_pair_captures_and_every_link_filter_without_captures_dir(
    gns3_default: Gns3,
) -> None:
    gns3 = gns3_default
    pair = VpcsPair(gns3)
    try:
        assert peers.wait_until(lambda: any(ok for _, ok in pair.ping(2)), 30, 0.5), (
            pair.pcs[0].transcript + gns3.exchange_text()
        )
        body = {"capture_file_name": "pc1-pc2.pcap", "data_link_type": "DLT_EN10MB"}
        path = gns3.ok("POST", f"{pair.ports[0]}/start_capture", body)["pcap_file_path"]
        assert path.startswith(str(gns3.projects / pair.project / "project-files" / "captures"))
        assert [ok for _, ok in pair.ping(3)] == [True] * 3, pair.pcs[0].transcript[-600:]
        every = {
            "frequency_drop": [0],
            "packet_loss": [0],
            "delay": [5, 0],
            "corrupt": [0],
            "bpf": ["icmp[icmptype] == icmp-echo"],
        }
        pair.filters(every)
        log = gns3.exchange_text()
        for line in (
            "filter0 frequency_drop 0",
            "filter1 packet_loss 0",
            "filter2 delay 5 0",
            "filter3 corrupt 0",
            'filter4 bpf "icmp[icmptype] == icmp-echo"',
        ):
            pattern = rf"<- bridge add_packet_filter \S+ {re.escape(line)}$"
            assert re.search(pattern, log, re.MULTILINE), log
        assert "-> 2" not in log.split("filter0 frequency_drop 0")[-1], log
        pair.pcs[0].command("clear arp")
        pair.pcs[1].command("clear arp")
        assert [ok for _, ok in pair.ping(3)] == [False] * 3
        pair.filters({"bpf": ["icmp[icmptype] == icmp-echo"]})  # the BPF filter alone
        pair.pcs[0].command("clear arp")
        assert [ok for _, ok in pair.ping(4)] == [False] * 4
        pair.filters({})
        assert [ok for _, ok in pair.ping(3)] == [True] * 3
        gns3.ok("POST", f"{pair.ports[0]}/stop_capture", {})
    finally:
        pair.close()
    rows = tshark.fields(path, ["arp.opcode", "icmp.type"])
    icmp = [row["icmp.type"][0] for row in rows if row["icmp.type"]]
    arp = [row["arp.opcode"][0] for row in rows if row["arp.opcode"]]
    # 3 answered pings, 7 lost requests (never in the file: dropped before it), 3 answered
    assert icmp == ["8", "0"] * 3 + ["8", "0"] * 3, rows
    assert {"1", "2"} <= set(arp)  # ARP passed while the echo requests were dropped
