"""ubridge's `docker` and `brctl` modules on real kernel objects: veth pairs, network
namespaces entered through a PID, Linux bridges, and GNS3's Docker sequence (a TAP created
by add_nio_tap, moved into the container's namespace, bridged to a UDP tunnel).

Every device and namespace is created here with a random suffix and removed at the end."""

from __future__ import annotations

import contextlib
import os
import secrets
import subprocess
from collections.abc import Iterator
from pathlib import Path

import peers
import pytest
from test_control import Service

from tunnelscope.lab.control import Code, ControlError
from tunnelscope.nio import open_endpoint

pytestmark = [pytest.mark.timeout(120)]


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    served = Service(tmp_path / "captures")
    yield served
    served.stop()


@contextlib.contextmanager
def container() -> Iterator[tuple[peers.Netns, int]]:
    """A namespace with a process in it: what GNS3 knows of a Docker container (its PID)."""
    with peers.netns() as ns:
        process = subprocess.Popen(["ip", "netns", "exec", ns.name, "sleep", "120"])
        try:
            assert peers.wait_until(
                lambda: (
                    os.readlink(f"/proc/{process.pid}/ns/net") != os.readlink("/proc/self/ns/net")
                ),
                5,
            )
            yield ns, process.pid
        finally:
            process.kill()
            process.wait(5)


def host_links() -> str:
    return peers.run("ip", "-o", "link", "show").stdout


def open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


@peers.needs_root
def test_veths_moved_into_namespaces_ping_through_a_linux_bridge(service: Service) -> None:
    tag = secrets.token_hex(3)
    bridge = f"tsbr{tag}"
    peers.run("ip", "link", "add", bridge, "type", "bridge")
    try:
        peers.run("ip", "link", "set", bridge, "up")
        with container() as (ns1, pid1), container() as (ns2, pid2), service.client() as client:
            for index, (ns, pid) in enumerate(((ns1, pid1), (ns2, pid2)), 1):
                host, inside = f"tsh{index}{tag}", f"tsc{index}{tag}"
                reply = client.request("docker", "create_veth", host, inside)
                assert reply[-1] == f"veth pair created: {host} and {inside}"
                assert client.request("docker", "move_to_ns", inside, str(pid), "eth0") == [
                    f"{inside} moved to namespace {pid}"
                ]
                assert client.request("brctl", "addif", bridge, host) == [
                    f"{host} has been added to bridge {bridge}"
                ]
                ns.ip("addr", "add", f"10.99.40.{index}/24", "dev", "eth0")
                ns.ip("link", "set", "eth0", "up")
            assert f"master {bridge}" in peers.run("ip", "link", "show", f"tsh1{tag}").stdout
            assert ns1.ping("10.99.40.2", count=3) == (3, 3)
            assert client.request("docker", "delete_veth", f"tsh1{tag}") == [
                f"veth interface tsh1{tag} has been deleted"
            ]
            assert "eth0" not in ns1.ip("-o", "link", "show").stdout  # its peer went too
            assert ns2.ping("10.99.40.1", count=1, wait=0.5) == (1, 0)
            client.request("docker", "delete_veth", f"tsh2{tag}")
        assert tag not in host_links().replace(bridge, "")
    finally:
        for name in (f"tsh1{tag}", f"tsh2{tag}", bridge):
            peers.run("ip", "link", "delete", name, check=False)


@peers.needs_root
def test_gns3s_docker_sequence_tap_in_the_container_bridged_to_a_tunnel(
    service: Service,
) -> None:
    """bridge create, add_nio_tap (the TAP exists from now on), set_mac_addr, move_to_ns,
    add_nio_udp, start: the container pings a host behind the UDP tunnel."""
    tap = f"tap-ts-{secrets.token_hex(3)}"
    mac = "02:42:ac:11:00:07"
    lport, rport = peers.free_udp_ports(2)
    with container() as (ns, pid), service.client() as client:
        client.request("bridge", "create", "bridge0")
        assert client.request("bridge", "add_nio_tap", "bridge0", tap) == [
            "NIO TAP added to bridge 'bridge0'"
        ]
        assert tap in host_links()
        client.request("docker", "set_mac_addr", tap, mac)
        client.request("docker", "move_to_ns", tap, str(pid), "eth0")
        assert tap not in host_links()
        client.request("bridge", "add_nio_udp", "bridge0", str(lport), "127.0.0.1", str(rport))
        client.request("bridge", "start", "bridge0")
        ns.ip("addr", "add", "10.99.41.1/24", "dev", "eth0")
        ns.ip("link", "set", "eth0", "up")
        assert f"link/ether {mac}" in ns.ip("link", "show", "eth0").stdout
        far = open_endpoint(f"udp:{rport}:127.0.0.1:{lport}")
        with far, peers.FakeHost(far, "10.99.41.2"):
            assert ns.ping("10.99.41.2", count=3) == (3, 3)
            client.request("bridge", "stop", "bridge0")  # the TAP stays, as in ubridge
            assert "eth0" in ns.ip("-o", "link", "show").stdout
            client.request("bridge", "start", "bridge0")
            assert ns.ping("10.99.41.2", count=2) == (2, 2)
        client.request("bridge", "delete", "bridge0")  # closing the TAP removes eth0
        assert peers.wait_until(lambda: "eth0" not in ns.ip("-o", "link", "show").stdout, 5)


@peers.needs_root
def test_bad_docker_and_brctl_requests_cost_one_error_and_leave_nothing(
    service: Service,
) -> None:
    tag = secrets.token_hex(3)
    host, inside = f"tsh{tag}", f"tsc{tag}"
    with service.client() as client:
        client.request("docker", "create_veth", host, inside)
        before = open_fds()
        try:
            bad = [
                (["docker", "create_veth", host, f"tsx{tag}"], Code.CREATE, "could not create"),
                (["docker", "create_veth", "x" * 16, "y"], Code.CREATE, "invalid interface"),
                (["docker", "create_veth", "-a", "y"], Code.CREATE, "invalid interface"),
                (["docker", "move_to_ns", f"tsn{tag}", "1", "eth0"], Code.CREATE, "index"),
                (["docker", "move_to_ns", inside, "999999999", "eth0"], Code.CREATE, "no process"),
                (["docker", "move_to_ns", inside, "abc", "eth0"], Code.CREATE, "process id"),
                (["docker", "move_to_ns", inside, "1", "a/b"], Code.CREATE, "invalid interface"),
                (["docker", "delete_veth", f"tsn{tag}"], Code.DELETE, "index for"),
                (["docker", "set_mac_addr", inside, "02:00"], Code.CREATE, "MAC address format"),
                (["docker", "set_mac_addr", f"tsn{tag}", "02:00:00:00:00:01"], Code.CREATE, ""),
                (["docker", "move_to_ns", inside, "1"], Code.BAD_PARAM, "min/max=3/3"),
                (["brctl", "addif", f"tsb{tag}", host], Code.CREATE, "no such bridge"),
                (["brctl", "addif", "lo", host], Code.CREATE, "no such bridge"),
                (["brctl", "addif", f"tsb{tag}", f"tsn{tag}"], Code.CREATE, "Could not find"),
                (["brctl", "delif", "a", "b"], Code.UNK_CMD, "Unknown command"),
            ]
            for words, code, text in bad:
                with pytest.raises(ControlError) as caught:
                    client.request(*words)
                assert (caught.value.code, text in caught.value.text) == (code, True), words
            assert client.request("hypervisor", "version") == ["0.9.18"]
            assert open_fds() == before
            links = host_links()
            assert f"tsx{tag}" not in links and f"tsn{tag}" not in links
            assert inside in links  # a refused move leaves the interface where it was
        finally:
            peers.run("ip", "link", "delete", host, check=False)
        assert tag not in host_links()
