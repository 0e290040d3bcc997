"""TAP and AF_PACKET endpoints against the real Linux kernel, inside namespaces we create.

The kernel is the peer: it answers the ARP requests and pings we craft with scapy, which
proves the fd works from the host's namespace while the process itself never left it.
"""

from __future__ import annotations

import contextlib
import os
import sys

import peers
import pytest
from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import ARP, Ether

from tunnelscope.nio import KIND_DGRAM, KIND_FD, Endpoint, EndpointError, open_endpoint

pytestmark = [pytest.mark.timeout(60), pytest.mark.skipif(sys.platform != "linux", reason="Linux")]

MAC = "02:00:00:00:00:02"


def _netns_ids() -> tuple[str, str]:
    return os.readlink("/proc/self/ns/net"), os.readlink("/proc/thread-self/ns/net")


def _threads_netns() -> set[str]:
    """The network namespaces of all our threads (a helper thread may be just exiting)."""
    found = set()
    for task in os.listdir("/proc/self/task"):
        with contextlib.suppress(FileNotFoundError):
            found.add(os.readlink(f"/proc/self/task/{task}/ns/net"))
    return found


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


def _arp_request(target: str, source: str) -> bytes:
    arp = ARP(op=1, hwsrc=MAC, psrc=source, pdst=target)
    return bytes(Ether(dst="ff:ff:ff:ff:ff:ff", src=MAC) / arp)


def _is_arp_reply(frame: bytes) -> bool:
    return ARP in Ether(frame) and Ether(frame)[ARP].op == 2


def _is_echo_reply(frame: bytes) -> bool:
    packet = Ether(frame)
    return ICMP in packet and packet[ICMP].type == 0


def _resolve_and_ping(endpoint: Endpoint, target: str, source: str) -> None:
    """ARP for `target`, then ping it; asserts the kernel's answers."""
    assert endpoint.send_batch([_arp_request(target, source)]) == (1, 0)
    (reply,) = peers.receive(endpoint, 1, keep=_is_arp_reply)
    arp = Ether(reply)[ARP]
    assert (arp.psrc, arp.pdst, arp.hwdst) == (target, source, MAC)
    kernel_mac = arp.hwsrc

    payload = os.urandom(56)
    echo = IP(src=source, dst=target) / ICMP(type=8, id=0x1234, seq=7) / payload
    assert endpoint.send_batch([bytes(Ether(dst=kernel_mac, src=MAC) / echo)]) == (1, 0)
    (frame,) = peers.receive(endpoint, 1, keep=_is_echo_reply)
    packet = Ether(frame)
    assert (packet.src, packet.dst) == (kernel_mac, MAC)
    assert (packet[IP].src, packet[IP].dst) == (target, source)
    assert (packet[ICMP].id, packet[ICMP].seq, bytes(packet[ICMP].payload)) == (0x1234, 7, payload)


@peers.needs_root
def test_tap_created_inside_a_namespace_answers_from_the_host() -> None:
    host_ns = _netns_ids()
    with peers.netns() as ns, open_endpoint(f"tap:tstap0@{ns.name}") as tap:
        assert tap.kind == KIND_FD
        assert _netns_ids() == host_ns  # the helper thread took the detour, not us
        assert peers.wait_until(lambda: _threads_netns() == {host_ns[0]}, 2)  # and it is gone
        assert "state UNKNOWN" in ns.ip("link", "show", "tstap0").stdout  # up, carrier on
        assert ",UP," in ns.ip("link", "show", "tstap0").stdout
        assert peers.run("ip", "link", "show", "tstap0", check=False).returncode != 0
        ns.ip("addr", "add", "10.99.3.1/24", "dev", "tstap0")

        assert tap.send_batch([_arp_request("10.99.3.1", "10.99.3.2")]) == (1, 0)
        (reply,) = peers.receive(tap, 1, keep=_is_arp_reply)
        assert len(reply) == 42  # the kernel does not pad what it writes to a TAP
        _resolve_and_ping(tap, "10.99.3.1", "10.99.3.2")
        assert tap.recv_batch() == []  # IPv6 is off: nothing else talks
        assert _netns_ids() == host_ns
    assert _netns_ids() == host_ns


@peers.needs_root
def test_tap_created_in_host_namespace_disappears_on_close() -> None:
    with open_endpoint("tap:tstap9") as tap:
        assert ",UP," in peers.run("ip", "link", "show", "tstap9").stdout
        assert tap.send_batch([b"", b"short"]) == (0, 2)  # shorter than a header: counted
        assert tap.counters["send_failed"] == 2
    assert peers.run("ip", "link", "show", "tstap9", check=False).returncode != 0


@peers.needs_root
def test_kernel_ping_from_namespace_to_a_fake_host_behind_the_tap() -> None:
    with peers.tap_namespace("10.99.4.1/24") as ns, open_endpoint(ns.tap_spec) as tap:
        assert ns.tap_spec == f"tap:tap0@{ns.name}"
        with peers.FakeHost(tap, "10.99.4.2") as host:
            assert ns.ping("10.99.4.2", count=3) == (3, 3)
        kinds = [Ether(frame).lastlayer().name for frame in host.received]
        assert kinds.count("ARP") >= 1
        assert sum(1 for frame in host.received if ICMP in Ether(frame)) == 3


@peers.needs_root
def test_tap_open_errors_leave_nothing_behind() -> None:
    with peers.tap_namespace("10.99.5.1/24") as ns, open_endpoint(ns.tap_spec):
        cases = [
            (ns.tap_spec, f"{ns.tap_spec}: interface tap0 is already in use"),
            (f"tap:lo@{ns.name}", f"tap:lo@{ns.name}: interface lo exists and is not a TAP device"),
            (
                "tap:x@tstest-none",
                "tap:x@tstest-none: network namespace 'tstest-none' does not exist",
            ),
        ]
        for spec, message in cases:
            before = _open_fds()
            with pytest.raises(EndpointError) as error:
                open_endpoint(spec)
            assert str(error.value) == message
            assert _open_fds() == before


@peers.needs_root
def test_eth_on_a_veth_in_a_namespace() -> None:
    with peers.netns() as ns:
        spec = ns.add_veth("10.99.6.1/24")
        assert spec == f"eth:veth0@{ns.name}"
        host_ns = _netns_ids()
        with open_endpoint(spec) as eth:
            assert eth.kind == KIND_DGRAM
            assert _netns_ids() == host_ns
            assert "promiscuity 1 " in ns.ip("-d", "link", "show", "veth0").stdout
            _resolve_and_ping(eth, "10.99.6.1", "10.99.6.2")
            with peers.FakeHost(eth, "10.99.6.2") as host:
                assert ns.ping("10.99.6.2", count=3) == (3, 3)
            assert host.received  # the kernel's ARP and echo requests, from veth1
            assert all(Ether(frame).src != host.mac for frame in host.received)
        assert "promiscuity 0 " in ns.ip("-d", "link", "show", "veth0").stdout


@peers.needs_root
def test_eth_reads_what_arrives_not_what_leaves() -> None:
    """Another sender's frames going out of the interface are not read as if they arrived."""
    with peers.netns() as ns:
        spec = ns.add_veth("10.99.7.1/24")
        with open_endpoint(spec) as reader, open_endpoint(spec) as sender:
            assert sender.send_batch([_arp_request("10.99.7.1", "10.99.7.2")]) == (1, 0)
            for endpoint in (reader, sender):  # both see the reply; neither the request
                frames = peers.receive(endpoint, 2, timeout=1.0)
                assert [Ether(frame)[ARP].op for frame in frames] == [2]


@peers.needs_root
def test_eth_open_errors() -> None:
    with peers.netns() as ns:
        spec = f"eth:nope0@{ns.name}"
        before = _open_fds()
        with pytest.raises(EndpointError) as error:
            open_endpoint(spec)
        assert (
            str(error.value)
            == f"{spec}: no interface named 'nope0' in network namespace '{ns.name}'"
        )
        assert _open_fds() == before


UNPRIVILEGED = """
import sys
from tunnelscope.nio import EndpointError, open_endpoint
for spec in sys.argv[1:]:
    try:
        open_endpoint(spec).close()
        print("opened")
    except EndpointError as error:
        print(error)
"""


@peers.needs_root
def test_without_capabilities_the_errors_say_what_is_needed() -> None:
    """Root without capabilities (an empty bounding set) is what an ordinary user gets."""
    with peers.netns() as ns:
        specs = ["tap:tsnocap0", "eth:lo", f"tap:x@{ns.name}", "udp:80:127.0.0.1:81"]
        drop = ["setpriv", "--bounding-set=-all", "--inh-caps=-all", "--"]
        result = peers.run(*drop, sys.executable, "-c", UNPRIVILEGED, *specs)
    assert result.stdout.splitlines() == [
        "tap:tsnocap0: creating a TAP device needs root or CAP_NET_ADMIN",
        "eth:lo: a raw Ethernet socket needs root or CAP_NET_RAW",
        f"tap:x@{ns.name}: cannot enter network namespace '{ns.name}'"
        " (Operation not permitted; needs root or CAP_SYS_ADMIN)",
        "udp:80:127.0.0.1:81: binding local port 80 needs root",
    ]


@peers.needs_root
def test_harness_leaves_no_namespace_behind() -> None:
    names = peers.run("ip", "netns", "list").stdout
    with peers.netns() as ns:
        assert ns.name.startswith("tstest-")
        assert ns.name in peers.run("ip", "netns", "list").stdout
    assert peers.run("ip", "netns", "list").stdout == names
