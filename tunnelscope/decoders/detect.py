"""Guess which link layer a UDP tunnel carries, from several frames, never from one alone.

A frame is scored as each of the four tunnel link types by how well the whole of it parses:

  0.01  the link header is impossible: C-HDLC not `0F 00`/`8F 00`, PPP not `FF 03`, Frame
        Relay without a 2-byte Q.922 address (EA clear in byte 0, set in byte 1), Ethernet
        shorter than 14 bytes (not 0: one corrupted frame must not rule a type out for good)
  0.05  the header fits but the decoder finds the frame malformed, or an Ethernet source MAC
        is a group address
  0.3   the header fits, what it carries is unknown (ethertype, PPP protocol, NLPID)
  1.0   the header fits and the payload is recognised and well-formed (IP with its lengths
        right, ARP, SLARP, LCP, LMI, CDP, ...)

The scores are multiplied over frames as likelihoods, against a fifth hypothesis, "none of
them", that scores 0.3 on every frame; the confidence is the best type's share of the total.
So one payload-bearing frame cannot decide (one perfect C-HDLC frame next to an Ethernet
reading with an unknown ethertype gives about 0.6), three agreeing frames usually do, frames
that merely fit a header never do, and a stream that fits nothing stays at Ethernet with low
confidence. Ambiguous starts are settled by the payload: an Ethernet frame to a MAC beginning
`0F 00` or `FF 03` reads as C-HDLC or PPP with an unknown protocol (0.3) but as Ethernet with
a valid packet (1.0). Empty frames count as fed but carry no evidence.

`decided` means confidence >= 0.9 over at least 3 non-empty frames.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable
from dataclasses import dataclass

from tunnelscope.decoders import decode
from tunnelscope.formats.linktype import TUNNEL_LINKTYPES, LinkType

DECIDED_CONFIDENCE = 0.9
DECIDED_FRAMES = 3

IMPOSSIBLE = 0.01
MALFORMED = 0.05
UNKNOWN_PAYLOAD = 0.3
RECOGNISED = 1.0
_NONE_FITS = UNKNOWN_PAYLOAD  # the per-frame likelihood of "none of the four"

# Protocols that are part of a link layer: recognising only these says nothing of the payload.
_LINK_PROTOCOLS = frozenset({"eth", "vlan", "ieee8021ad", "llc", "chdlc", "ppp", "fr"})


@dataclass
class Detection:
    linktype: LinkType
    confidence: float  # 0..1
    frames: int  # frames fed, empty ones included (a caller can resume after them)


def _header_fits(linktype: LinkType, data: bytes) -> bool:
    """The link header alone: the cheap test every frame must pass to count for a type."""
    if linktype == LinkType.ETHERNET:
        return len(data) >= 14
    if linktype == LinkType.C_HDLC:
        return data[:1] in (b"\x0f", b"\x8f") and data[1:2] == b"\x00"
    if linktype == LinkType.PPP_SERIAL:
        return data[:2] == b"\xff\x03"
    return len(data) >= 2 and not data[0] & 1 and bool(data[1] & 1)  # Frame Relay


def score(linktype: LinkType, data: bytes) -> float:
    """How well one frame parses as `linktype` (the table in the module docstring)."""
    if not _header_fits(linktype, data):
        return IMPOSSIBLE
    decoded = decode(linktype, data)
    if decoded.malformed or (linktype == LinkType.ETHERNET and data[6] & 1):
        return MALFORMED
    if any(protocol not in _LINK_PROTOCOLS for protocol in decoded.protocols):
        return RECOGNISED
    return UNKNOWN_PAYLOAD


class LinkTypeDetector:
    """Feed frames one by one (a live tunnel); ask for the best guess at any time."""

    def __init__(self) -> None:
        self.frames = 0
        self._evidence = 0  # non-empty frames
        self._log_likelihood = dict.fromkeys(TUNNEL_LINKTYPES, 0.0)
        self._log_none = 0.0

    def feed(self, data: bytes) -> None:
        self.frames += 1
        if not data:
            return
        data = bytes(data)
        self._evidence += 1
        for linktype in TUNNEL_LINKTYPES:
            self._log_likelihood[linktype] += math.log(score(linktype, data))
        self._log_none += math.log(_NONE_FITS)

    def result(self) -> Detection:
        """The best guess so far; Ethernet (with its low confidence) when nothing fits better."""
        logs = [*self._log_likelihood.values(), self._log_none]
        top = max(logs)
        total = sum(math.exp(log - top) for log in logs)
        best = max(TUNNEL_LINKTYPES, key=self._log_likelihood.__getitem__)  # ties: Ethernet
        if self._log_likelihood[best] < self._log_none:
            best = LinkType.ETHERNET
        confidence = math.exp(self._log_likelihood[best] - top) / total
        return Detection(best, confidence, self.frames)

    @property
    def decided(self) -> bool:
        """Confident enough to commit: confidence >= 0.9 over at least 3 non-empty frames."""
        return self._evidence >= DECIDED_FRAMES and self.result().confidence >= DECIDED_CONFIDENCE


def detect_linktype(frames: Iterable[bytes], max_frames: int = 32) -> Detection:
    """Detect over the first `max_frames` frames (no early stop once decided)."""
    detector = LinkTypeDetector()
    for data in itertools.islice(frames, max_frames):
        detector.feed(data)
    return detector.result()
