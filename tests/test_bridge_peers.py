"""The bridge between real peers: two VPCS processes, and the Linux kernel through TAPs.

Losses are predicted, not hard-coded: the capture taken while the impairment is active lists
the frames A sent in order, dynamips' freq_drop semantics say which of them die, and the
peers' own ping results must match that prediction exactly.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import peers
import pytest

from tunnelscope.datapath.engine import Engine, Link, available_backends
from tunnelscope.datapath.impairments import parse_impairment
from tunnelscope.decoders import decode
from tunnelscope.formats.capture import open_capture
from tunnelscope.formats.linktype import LinkType

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(params=available_backends())
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@contextmanager
def running(backend: str, a_spec: str, b_spec: str) -> Iterator[Link]:
    engine = Engine(backend)
    link = engine.add_link("link", a_spec, b_spec, seed=1)
    thread = threading.Thread(target=engine.run, daemon=True)
    thread.start()
    try:
        yield link
    finally:
        engine.stop()
        thread.join(5)
        engine.close()


def a2b_frames(path: Path) -> list[tuple[dict, str | None]]:
    """(decoded fields, comment) of every frame A sent, at the pre point, in order."""
    with open_capture(str(path)) as reader:
        return [
            (decode(p.linktype, p.data).fields, p.comment)
            for p in reader
            if p.interface == 0 and int(p.direction) == 2
        ]


def predicted_lost_echo_requests(frames: list[tuple[dict, str | None]], n: int) -> set[int]:
    """Dynamips freq_drop N: the N-th, 2N-th, ... frame since configuration dies."""
    lost = set()
    for position, (fields, comment) in enumerate(frames, 1):
        dies = position % n == 0
        assert (comment == "dropped by freq_drop") == dies  # the capture agrees, frame by frame
        if dies and fields.get("icmp.type") == 8:
            lost.add(int(fields["icmp.seq"]))
    return lost


@peers.needs_vpcs
def test_vpcs_pings_through_the_bridge_and_freq_drop_kills_the_predicted_ones(
    backend: str, tmp_path: Path
) -> None:
    p1, l1, l2, p2 = peers.free_udp_ports(4)
    with (
        running(backend, f"udp:{l1}:127.0.0.1:{p1}", f"udp:{l2}:127.0.0.1:{p2}") as link,
        peers.VPCS(p1, l1, mac_offset=1) as pc1,
        peers.VPCS(p2, l2, mac_offset=2) as pc2,
    ):
        pc1.set_ip("10.0.0.1/24")
        pc2.set_ip("10.0.0.2/24")
        assert pc1.ping("10.0.0.2", count=10, interval_ms=100) == [
            (seq, True) for seq in range(1, 11)
        ], pc1.transcript

        before = link.stats()
        link.set_impairments([parse_impairment("a2b freq_drop 3")])
        path = tmp_path / "vpcs.pcapng"
        link.start_capture(str(path), LinkType.ETHERNET, "both")
        results = pc1.ping("10.0.0.2", count=10, interval_ms=100)
        after = link.stats()
        link.stop_capture()

    frames = a2b_frames(path)
    lost = predicted_lost_echo_requests(frames, 3)
    assert lost  # 10 echo requests through freq_drop 3: some must die
    assert results == [(seq, seq not in lost) for seq in range(1, 11)], pc1.transcript
    received = after["a2b"]["received"] - before["a2b"]["received"]
    assert received == len(frames)
    dropped = after["a2b"]["dropped"]["freq_drop"]
    assert dropped == sum(1 for _, comment in frames if comment)


@peers.needs_root
def test_kernel_pings_through_taps_in_two_namespaces(backend: str, tmp_path: Path) -> None:
    with (
        peers.tap_namespace("10.99.1.1/24") as ns1,
        peers.tap_namespace("10.99.1.2/24") as ns2,
        running(backend, ns1.tap_spec, ns2.tap_spec) as link,
    ):
        assert ns1.ping("10.99.1.2", count=5, interval=0.1) == (5, 5)

        link.set_impairments([parse_impairment("a2b freq_drop 2")])
        path = tmp_path / "kernel.pcapng"
        link.start_capture(str(path), LinkType.ETHERNET, "both")
        transmitted, received = ns1.ping("10.99.1.2", count=10, interval=0.1, wait=0.5)
        link.stop_capture()

    frames = a2b_frames(path)
    lost = predicted_lost_echo_requests(frames, 2)
    assert transmitted == 10
    assert received == 10 - len(lost)
    assert 3 <= len(lost) <= 5  # half the frames die; a few may be ARP instead of echoes
