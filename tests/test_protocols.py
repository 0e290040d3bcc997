"""Tallying the protocols of a live link from a bounded sample of its stream."""

from __future__ import annotations

import threading
import time

import pytest
import tshark
from scapy.contrib.ospf import OSPF_Hdr, OSPF_Hello
from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import ARP, Ether
from test_stream import send, served

from tunnelscope.analysis.protocols import sample_links, sample_protocols
from tunnelscope.lab.stream import Request, connect

pytestmark = pytest.mark.timeout(90)
FRAMES = [
    bytes(Ether() / IP(src="10.0.0.1", dst="224.0.0.5") / OSPF_Hdr(src="1.1.1.1") / OSPF_Hello()),
    bytes(Ether() / IP(src="10.0.0.1", dst="10.0.0.2") / ICMP()),
    bytes(Ether(dst="ff:ff:ff:ff:ff:ff") / ARP(psrc="10.0.0.1", pdst="10.0.0.2")),
]


def _sampled(dissector: str, rounds: int, frames: int, seconds: float = 10.0):
    with served() as (link, server, a, _):
        sock = connect(server.where, Request(link="lan"))
        assert _wait(lambda: len(link.captures) == 1)
        sender = threading.Thread(target=send, args=(a, FRAMES * rounds))
        sender.start()
        try:
            return sample_protocols(sock, "lan", dissector, seconds, frames)
        finally:
            sender.join(30)


def _wait(condition, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.01)
    return condition()


@tshark.required
def test_a_sample_stops_at_its_frame_count_and_names_wiresharks_protocols() -> None:
    tally = _sampled("wireshark", rounds=20, frames=30)
    assert tally.frames == 30 and tally.error is None
    assert tally.protocols == {"OSPF": 10, "ICMP": 10, "ARP": 10}
    assert tally.undissected == 0


def test_a_sample_stops_at_its_time_with_the_builtin_decoders() -> None:
    started = time.monotonic()
    tally = _sampled("builtin", rounds=2, frames=1000, seconds=1.0)  # 6 frames, then silence
    assert time.monotonic() - started < 10
    assert tally.frames == 6 and tally.error is None
    assert sum(tally.protocols.values()) == 6 and tally.protocols["ARP"] == 2


def test_several_links_at_once_and_a_stream_that_is_gone() -> None:
    with served() as (link, server, a, _):
        good = connect(server.where, Request(link="lan"))
        gone = connect(server.where, Request(link="lan"))
        gone.close()
        assert _wait(lambda: len(link.captures) >= 1)
        sender = threading.Thread(target=send, args=(a, FRAMES * 3))
        sender.start()
        tallies = sample_links({"lan": good, "closed": gone}, "builtin", 1.0, 9)
        sender.join(30)
    assert [t.link for t in tallies] == ["lan", "closed"]
    assert tallies[0].frames == 9 and tallies[1].frames == 0 and tallies[1].error
