"""UDP endpoints on loopback: frames cross intact, ports are never shared, refusals counted."""

from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import peers
import pytest

from tunnelscope.nio import KIND_DGRAM, Endpoint, EndpointError, open_endpoint


def _has_ipv6_loopback() -> bool:
    try:
        with socket.socket(socket.AF_INET6, socket.SOCK_DGRAM) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


HOSTS = [
    pytest.param("127.0.0.1", id="ipv4"),
    pytest.param(
        "::1",
        id="ipv6",
        marks=pytest.mark.skipif(not _has_ipv6_loopback(), reason="no IPv6 loopback"),
    ),
]


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _open_fds() -> set[str]:
    return set(os.listdir("/proc/self/fd"))


@pytest.fixture(params=HOSTS)
def pair(request: pytest.FixtureRequest) -> Iterator[tuple[Endpoint, Endpoint]]:
    host = request.param
    port_a, port_b = peers.free_udp_ports(2, host)
    h = _bracket(host)
    with (
        open_endpoint(f"udp:{port_a}:{h}:{port_b}") as a,
        open_endpoint(f"udp:{port_b}:{h}:{port_a}") as b,
    ):
        yield a, b


def test_binds_loopback_and_connects(pair: tuple[Endpoint, Endpoint]) -> None:
    a, b = pair
    assert a.kind == KIND_DGRAM
    assert a.fileno() >= 0
    local, peer = a.sock.getsockname(), a.sock.getpeername()  # type: ignore[attr-defined]
    assert local[0] in ("127.0.0.1", "::1")  # loopback peer -> loopback bind, not wildcard
    assert peer[:2] == b.sock.getsockname()[:2]  # type: ignore[attr-defined]
    assert a.sock.getblocking() is False  # type: ignore[attr-defined]


def test_frames_of_every_size_cross_intact(pair: tuple[Endpoint, Endpoint]) -> None:
    a, b = pair
    frames = [b"", b"\x01", bytes(range(14)), os.urandom(1514), os.urandom(65507)]
    assert a.send_batch(frames) == (len(frames), 0)
    assert peers.receive(b, len(frames)) == frames
    assert b.send_batch(frames[::-1]) == (len(frames), 0)
    assert peers.receive(a, len(frames)) == frames[::-1]
    assert (
        a.counters
        == b.counters
        == {
            "refused": 0,
            "oversize": 0,
            "send_busy": 0,
            "send_failed": 0,
        }
    )


def test_batches_keep_order_and_respect_max_frames(pair: tuple[Endpoint, Endpoint]) -> None:
    a, b = pair
    frames = [i.to_bytes(2, "big") * 30 for i in range(200)]
    assert a.send_batch(frames) == (200, 0)
    first = b.recv_batch(max_frames=64)
    assert len(first) == 64
    assert first + peers.receive(b, 136) == frames
    assert b.recv_batch() == []  # nothing left: returns at once, never blocks


def test_explicit_local_address() -> None:
    port_a, port_b = peers.free_udp_ports(2)
    with open_endpoint(f"udp:127.0.0.1:{port_a}:127.0.0.1:{port_b}") as a:
        assert a.sock.getsockname() == ("127.0.0.1", port_a)  # type: ignore[attr-defined]


def test_host_name_prefers_ipv4() -> None:
    port_a, port_b = peers.free_udp_ports(2)
    with open_endpoint(f"udp:{port_a}:localhost:{port_b}") as a:
        assert a.sock.getpeername() == ("127.0.0.1", port_b)  # type: ignore[attr-defined]
        assert a.sock.getsockname() == ("127.0.0.1", port_a)  # type: ignore[attr-defined]


@pytest.mark.parametrize("holder", ["127.0.0.1", "0.0.0.0"])
def test_port_in_use_is_an_error(holder: str) -> None:
    port, other = peers.free_udp_ports(2)
    spec = f"udp:{port}:127.0.0.1:{other}"
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as dynamips does
        sock.bind((holder, port))
        before = _open_fds()
        with pytest.raises(EndpointError) as error:
            open_endpoint(spec)
        assert _open_fds() == before  # nothing half-opened left behind
    assert str(error.value) == f"{spec}: local port {port} is already in use"


def test_second_endpoint_on_same_port_is_an_error() -> None:
    port, other = peers.free_udp_ports(2)
    with open_endpoint(f"udp:{port}:127.0.0.1:{other}"), pytest.raises(EndpointError) as error:
        open_endpoint(f"udp:{port}:127.0.0.1:{other + 1}")
    assert str(error.value).endswith(f": local port {port} is already in use")


def test_local_address_not_on_this_host() -> None:
    spec = "udp:192.0.2.1:10001:192.0.2.2:10002"  # TEST-NET-1: never assigned here
    with pytest.raises(EndpointError) as error:
        open_endpoint(spec)
    assert str(error.value) == f"{spec}: local address 192.0.2.1 is not an address of this host"


def test_unresolvable_host_name() -> None:
    with pytest.raises(EndpointError) as error:
        open_endpoint("udp:10001:no-such-host.invalid:10002")
    assert str(error.value).startswith(
        "udp:10001:no-such-host.invalid:10002: cannot resolve remote host 'no-such-host.invalid' ("
    )


@pytest.mark.parametrize("host", HOSTS)
def test_refused_is_counted_not_raised(host: str) -> None:
    """Peer not listening yet: ICMP port unreachable turns into ECONNREFUSED, counted."""
    port, silent = peers.free_udp_ports(2, host)
    with open_endpoint(f"udp:{port}:{_bracket(host)}:{silent}") as a:
        assert a.send_batch([b"hello"]) == (1, 0)  # the error comes back afterwards
        assert peers.wait_until(lambda: not a.recv_batch() and a.counters["refused"] == 1, 2)
        assert a.send_batch([b"again"]) == (1, 0)
        sent, errors = a.send_batch([b"x", b"y"])  # the first reports the pending refusal
        assert (sent, errors) == (1, 1)
        assert a.counters["refused"] == 2
        assert a.counters["send_failed"] == a.counters["oversize"] == 0


def test_too_big_for_udp_is_counted_not_raised(pair: tuple[Endpoint, Endpoint]) -> None:
    a, b = pair
    assert a.send_batch([b"x" * 65536, b"fits"]) == (1, 1)
    assert a.counters["send_failed"] == 1
    assert peers.receive(b, 1) == [b"fits"]
