"""A real VPCS on the far end of a UDP endpoint: the endpoint and the harness, end to end."""

from __future__ import annotations

import peers
import pytest
from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import ARP, Ether

from tunnelscope.nio import open_endpoint

pytestmark = [pytest.mark.timeout(90)]


def _is_echo_request(frame: bytes) -> bool:
    packet = Ether(frame)
    return ICMP in packet and packet[ICMP].type == 8


@peers.needs_vpcs
def test_vpcs_pings_a_fake_host_behind_our_udp_endpoint() -> None:
    ours, theirs = peers.free_udp_ports(2)
    with (
        open_endpoint(f"udp:{ours}:127.0.0.1:{theirs}") as endpoint,
        peers.VPCS(theirs, ours, mac_offset=5) as pc,
    ):
        assert pc.mac == "00:50:79:66:68:05"
        assert "PC1 : 10.0.0.1 255.255.255.0" in pc.set_ip("10.0.0.1/24")
        with peers.FakeHost(endpoint, "10.0.0.2") as host:
            assert pc.ping("10.0.0.2", count=3) == [(1, True), (2, True), (3, True)], pc.transcript

    requests = [Ether(f) for f in host.received if ARP in Ether(f) and Ether(f)[ARP].op == 1]
    asked = [r for r in requests if r[ARP].pdst == "10.0.0.2"]
    assert asked, [Ether(f).summary() for f in host.received]
    assert asked[0].src == asked[0][ARP].hwsrc == "00:50:79:66:68:05"
    assert asked[0][ARP].psrc == "10.0.0.1"
    assert len(bytes(asked[0])) >= 60  # VPCS pads its ARP frames (42 bytes of ARP)
    echoes = [Ether(f) for f in host.received if _is_echo_request(f)]
    assert [e[ICMP].seq for e in echoes] == [1, 2, 3]
    assert all(e[IP].src == "10.0.0.1" and e.dst == host.mac for e in echoes)
    assert endpoint.counters["oversize"] == 0


@peers.needs_vpcs
def test_vpcs_reports_unanswered_and_unreachable() -> None:
    ours, theirs = peers.free_udp_ports(2)
    with (
        open_endpoint(f"udp:{ours}:127.0.0.1:{theirs}") as endpoint,
        peers.VPCS(theirs, ours) as pc,
    ):
        pc.set_ip("10.0.0.1/24")
        with peers.FakeHost(endpoint, "10.0.0.2", echo=False) as host:  # ARP yes, ping no
            assert pc.ping("10.0.0.2", count=2, wait_ms=300) == [(1, False), (2, False)]
        assert sum(1 for f in host.received if _is_echo_request(f)) == 2
        assert pc.ping("10.0.0.3", count=2) == [(1, False), (2, False)]  # nobody answers ARP
        assert "not reachable" in pc.transcript


@peers.needs_vpcs
def test_vpcs_harness_kills_the_whole_tree() -> None:
    port, peer = peers.free_udp_ports(2)
    pc = peers.VPCS(port, peer)
    with pc:
        pids = pc.pids()
        assert len(pids) == 2  # the console process and its worker (own session)
        assert peers.udp_port_bound(port)
    assert not any(_alive(pid) for pid in pids)
    # the port is free once the kernel has torn the dead worker's socket down
    assert peers.wait_until(lambda: not peers.udp_port_bound(port), timeout=5)
    with (
        pytest.raises(peers.VPCSError, match="is taken"),
        open_endpoint(f"udp:{port}:127.0.0.1:{peer}"),
        peers.VPCS(port, peer),
    ):
        pass


def _alive(pid: int) -> bool:
    """True for a running process; a zombie (killed, not yet reaped by init) counts as dead."""
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False
