"""Match the frames of two captures of the same traffic, taken at two points of a path.

A is where the frames should come from, B where they should arrive: the *pre* and *post*
points of a tunnelscope link, or both ends of a path through a switch that rewrites VLAN
tags or Frame Relay DLCIs. Frames are matched by content: the hash of the frame's bytes,
optionally normalised first (`IGNORABLE`), so per-frame work is one hash and a few dict and
deque operations; only the frames a report lists are decoded.

Both captures are read once, as streams, merged by timestamp. A frame of A that no frame of
B matched within `window` seconds is declared missing at B; a frame of B that matched no
frame of A within the window is "only at B", unless A had that frame already matched (a
duplicate). Identical frames (repeated ARP requests) match first-in first-out. Memory is
bounded by what arrives within one window, not by the size of the captures.

A B frame may come before its A frame (B's clock behind A's): it waits one window for it.
Two limits follow from matching by content alone: when identical frames repeat faster than
the window, a lost one is counted right but may be named as a later copy; and with B's clock
behind, a repeat at B that comes before A's repeat is taken for a duplicate.

Where both captures carry direction flags (pcapng epb_flags, link types 204-206) each
direction is compared on its own: a tunnelscope a2b frame (outbound) is matched only
with outbound frames. A missing frame is attributed to the impairment named by the pre
capture's `dropped by <name>` comment; without a comment, to B's capture having stopped or
not started, or to the path outside tunnelscope when A is a tunnelscope pre capture.

Selections (`Selection.parse`): PATH[#INTERFACE][@DIRECTION]. INTERFACE is an interface
name, the last word(s) of one (`#pre` picks `r1-r2 pre`) or a 0-based number; DIRECTION is
out (= a2b) or in (= b2a). `compare(Selection("link.pcapng"), None)` compares the `<link>
pre` and `<link> post` interfaces of one tunnelscope capture.
"""

from __future__ import annotations

import contextlib
import os
import stat
import sys
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import chain
from typing import BinaryIO

from tunnelscope.decoders import decode
from tunnelscope.decoders.base import Decoded, top_protocol
from tunnelscope.decoders.frelay import CONTROL_UI, NLPID_IPV4, NLPID_IPV6, NLPID_SNAP
from tunnelscope.decoders.wireshark import Dissectors, headline, protocol_column
from tunnelscope.formats.capture import Reader, read_capture
from tunnelscope.formats.linktype import LinkType
from tunnelscope.formats.packet import CaptureFormatError, Direction

IGNORABLE = ("l2", "vlan", "fr-address", "ttl")
ALIASES = {"dlci": "fr-address", "fr": "fr-address", "checksum": "ttl", "hlim": "ttl"}
DEFAULT_WINDOW = 2.0
DEFAULT_LIMIT = 100
DIRECTIONS = {
    "out": Direction.OUTBOUND,
    "a2b": Direction.OUTBOUND,
    "in": Direction.INBOUND,
    "b2a": Direction.INBOUND,
}
DROP_COMMENT = "dropped by "
PROGRESS_EVERY = 1 << 14  # frames between progress calls

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_IPV6 = 0x86DD
ETHERTYPE_ARP = 0x0806
VLAN_TPIDS = frozenset((b"\x81\x00", b"\x88\xa8", b"\x91\x00", b"\x92\x00"))
_PPP_TO_ETHERTYPE = {0x0021: ETHERTYPE_IPV4, 0x0057: ETHERTYPE_IPV6}
_NLPID_TO_ETHERTYPE = {NLPID_IPV4: ETHERTYPE_IPV4, NLPID_IPV6: ETHERTYPE_IPV6}
_IP_VERSION_TO_ETHERTYPE = {4: ETHERTYPE_IPV4, 6: ETHERTYPE_IPV6}

# Entry slots. An A entry: [ts, number, key, data, comment]; data becomes None once matched
# (it is only kept to describe the frame if it goes missing). A B entry waiting for its A
# frame: [ts, number, key, data, matched].
TS, NUMBER, KEY, DATA, COMMENT = 0, 1, 2, 3, 4
MATCHED = 4
NEVER = 1 << 126  # a time after every capture (ns)
COMPACT = 16  # a bucket drops its settled entries once this many pile up at its front


class CompareError(Exception):
    """The captures cannot be compared as asked (one line, shown to the user as is)."""


# --------------------------------------------------------------------------- selections


@dataclass(frozen=True)
class Selection:
    """Which frames of a capture file take part: one interface, maybe one direction."""

    path: str
    interface: str | None = None
    direction: Direction | None = None

    @classmethod
    def parse(cls, text: str) -> Selection:
        """PATH[#INTERFACE][@DIRECTION]; a path that exists as given is never split."""
        path, rest = text, ""
        if text != "-" and not os.path.exists(text):
            cuts = [i for i, c in enumerate(text) if c in "#@"]
            existing = [i for i in cuts if text[:i] == "-" or os.path.exists(text[:i])]
            if existing or cuts:  # the longest path that exists, else the shortest prefix
                cut = existing[-1] if existing else cuts[0]
                path, rest = text[:cut], text[cut:]
        interface, direction = rest, None
        head, at, word = rest.rpartition("@")
        if at and word.lower() in DIRECTIONS:
            interface, direction = head, DIRECTIONS[word.lower()]
        elif at and not rest.startswith("#"):  # else the @ is part of an interface name
            raise CompareError(f"{text}: unknown direction {word!r} (use out, in, a2b, b2a)")
        if interface and not interface.startswith("#"):
            raise CompareError(f"{text}: expected FILE#INTERFACE or FILE@DIRECTION")
        return cls(path, interface[1:] or None, direction)

    def label(self) -> str:
        text = self.path if self.path != "-" else "stdin"
        if self.interface is not None:
            text += f"#{self.interface}"
        if self.direction:
            text += f"@{_DIRECTION_WORDS[self.direction]}"
        return text


_DIRECTION_WORDS = {Direction.OUTBOUND: "out", Direction.INBOUND: "in"}
TUNNELSCOPE_WORDS = {Direction.OUTBOUND: "a2b", Direction.INBOUND: "b2a"}  # seen from end A


def parse_ignore(words: list[str]) -> frozenset[str]:
    """`l2,vlan` (repeatable, comma-separated) -> the set of IGNORABLE names."""
    result = set()
    for word in ",".join(words).replace(" ", "").split(","):
        if not word:
            continue
        name = ALIASES.get(word.lower(), word.lower())
        if name not in IGNORABLE:
            raise CompareError(f"cannot ignore {word!r} (use {', '.join(IGNORABLE)})")
        result.add(name)
    return frozenset(result)


# ------------------------------------------------------------------------- normalisation


def _ethernet_l3(data: bytes) -> tuple[int, int]:
    start, etype = 14, int.from_bytes(data[12:14], "big")
    while data[start - 2 : start] in VLAN_TPIDS:
        start, etype = start + 4, int.from_bytes(data[start + 2 : start + 4], "big")
    if etype >= 0x0600:
        return start, etype
    if data[start : start + 3] == b"\xaa\xaa\x03":  # 802.3 length, LLC, SNAP
        ethertype = int.from_bytes(data[start + 6 : start + 8], "big")
        return start + 8, ethertype if data[start + 3 : start + 6] == bytes(3) else 0
    return start + 3, 0  # 802.3 length, LLC


def _chdlc_l3(data: bytes) -> tuple[int, int]:
    return 4, int.from_bytes(data[2:4], "big")


def _ppp_l3(data: bytes) -> tuple[int, int]:
    start = 2 if data[:2] == b"\xff\x03" else 0
    size = 1 if data[start : start + 1] and data[start] & 1 else 2
    protocol = int.from_bytes(data[start : start + size], "big")
    return start + size, _PPP_TO_ETHERTYPE.get(protocol, 0)


def _fr_address_size(data: bytes) -> int:
    """The Q.922 address is 2 to 4 bytes; the byte with EA set ends it."""
    for size in (2, 3):
        if data[size - 1 : size] and data[size - 1] & 1:
            return size
    return 4


def _frelay_l3(data: bytes) -> tuple[int, int]:
    start = _fr_address_size(data)
    if data[start : start + 1] != bytes((CONTROL_UI,)):  # Cisco encapsulation: an ethertype
        return start + 2, int.from_bytes(data[start : start + 2], "big")
    start += 1
    if data[start : start + 1] == b"\0" and len(data) > start + 1:  # RFC 2427 pad byte
        start += 1
    nlpid = data[start] if start < len(data) else 0
    start += 1
    if nlpid == NLPID_SNAP and data[start : start + 3] == bytes(3):
        return start + 5, int.from_bytes(data[start + 3 : start + 5], "big")
    return start, _NLPID_TO_ETHERTYPE.get(nlpid, 0)


def _raw_l3(data: bytes) -> tuple[int, int]:
    return 0, _IP_VERSION_TO_ETHERTYPE.get(data[0] >> 4 if data else 0, 0)


def _sll_l3(data: bytes) -> tuple[int, int]:
    return 16, int.from_bytes(data[14:16], "big")


def _sll2_l3(data: bytes) -> tuple[int, int]:
    return 20, int.from_bytes(data[0:2], "big")


# Where the L3 packet starts in a frame, and its ethertype (0: not IPv4/IPv6/ARP-like).
_L3_LOCATORS: dict[int, Callable[[bytes], tuple[int, int]]] = {
    LinkType.ETHERNET: _ethernet_l3,
    LinkType.C_HDLC: _chdlc_l3,
    LinkType.PPP_SERIAL: _ppp_l3,
    LinkType.PPP: _ppp_l3,
    LinkType.FRELAY: _frelay_l3,
    LinkType.RAW: _raw_l3,
    LinkType.IPV4: _raw_l3,
    LinkType.IPV6: _raw_l3,
    LinkType.LINUX_SLL: _sll_l3,
    LinkType.LINUX_SLL2: _sll2_l3,
}


def _l3_length(packet: bytearray, start: int, etype: int) -> int | None:
    """The L3 packet's own length, to cut Ethernet padding off; None when unknown."""
    if etype == ETHERTYPE_IPV4 and len(packet) >= start + 4:
        return int.from_bytes(packet[start + 2 : start + 4], "big")
    if etype == ETHERTYPE_IPV6 and len(packet) >= start + 6:
        return 40 + int.from_bytes(packet[start + 4 : start + 6], "big")
    if etype == ETHERTYPE_ARP and len(packet) >= start + 6:
        return 8 + 2 * (packet[start + 4] + packet[start + 5])
    return None


def normaliser(linktype: int, ignore: frozenset[str]) -> Callable[[bytes], bytes] | None:
    """The function that rewrites a frame before it is hashed; None: compare bytes as they are.

    l2: keep only the L3 packet (and cut Ethernet padding). vlan: remove 802.1Q/QinQ tags
    (and padding). fr-address: zero every bit of the Q.922 address but the EA bits (DLCI,
    C/R, FECN, BECN, DE). ttl: zero the IPv4 TTL and header checksum, the IPv6 hop limit.
    """
    if not ignore:
        return None
    locate = _L3_LOCATORS.get(linktype)
    if locate is None and ignore & {"l2", "ttl"}:
        raise CompareError(f"cannot find the L3 header in link type {_linktype_name(linktype)}")
    l2 = "l2" in ignore
    vlan = "vlan" in ignore and linktype == LinkType.ETHERNET and not l2
    fr_address = "fr-address" in ignore and linktype == LinkType.FRELAY and not l2
    ttl = "ttl" in ignore
    if not (l2 or vlan or fr_address or ttl):
        return None

    def normalise(data: bytes) -> bytes:
        if vlan:
            while data[12:14] in VLAN_TPIDS:
                data = data[:12] + data[16:]
        start, etype = locate(data) if locate else (0, 0)
        packet = bytearray(data[start:] if l2 else data)
        if l2:
            start = 0
        if fr_address:
            size = _fr_address_size(packet)
            packet[:size] = bytes(b & 1 for b in packet[:size])
        if l2 or vlan:
            length = _l3_length(packet, start, etype)
            if length is not None and start + length <= len(packet):
                del packet[start + length :]
        if ttl and etype == ETHERTYPE_IPV4 and len(packet) >= start + 12:
            packet[start + 8] = 0
            packet[start + 10 : start + 12] = b"\0\0"
        elif ttl and etype == ETHERTYPE_IPV6 and len(packet) >= start + 8:
            packet[start + 7] = 0
        return bytes(packet)

    return normalise


# ------------------------------------------------------------------------------- reports


@dataclass
class Frame:
    """One frame a report lists, decoded."""

    number: int  # in its file, 1-based, as Wireshark numbers it
    ts_ns: int
    summary: str
    protocol: str
    flow: str
    fields: dict[str, object]
    cause: str | None = None  # missing frames: why
    comment: str | None = None
    original: int | None = None  # duplicated and reordered frames of B: the frame of A
    behind: int | None = None  # reordered: the A frame it came after although sent before

    def as_dict(self) -> dict[str, object]:
        seconds, fraction = divmod(self.ts_ns, 1_000_000_000)
        data: dict[str, object] = {"number": self.number, "time": seconds + fraction / 1e9}
        data.update(summary=self.summary, protocol=self.protocol, flow=self.flow)
        if self.cause is not None or self.comment is not None:
            data.update(cause=self.cause, comment=self.comment)
        if self.original is not None:
            data["original"] = self.original
        if self.behind is not None:
            data["behind"] = self.behind
        data["fields"] = self.fields
        return data


def describe(linktype: int, number: int, ts_ns: int, data: bytes) -> Frame:
    """Decode a frame for a report: its summary, top protocol and flow (who talks to whom)."""
    decoded = decode(linktype, data)
    fields = decoded.fields
    protocol = top_protocol(decoded)
    for prefix in ("ip", "ipv6"):
        if f"{prefix}.src" in fields:
            src, dst = str(fields[f"{prefix}.src"]), str(fields[f"{prefix}.dst"])
            for l4 in ("udp", "tcp"):
                if f"{l4}.srcport" in fields:
                    src += f":{fields[f'{l4}.srcport']}"
                    dst += f":{fields[f'{l4}.dstport']}"
            flow = f"{src} > {dst}"
            break
    else:
        if "arp.src.proto_ipv4" in fields:
            flow = f"{fields['arp.src.proto_ipv4']} > {fields['arp.dst.proto_ipv4']}"
        elif "eth.src" in fields:
            flow = f"{fields['eth.src']} > {fields['eth.dst']}"
        elif "fr.dlci" in fields:
            flow = f"DLCI {fields['fr.dlci']}"
        else:
            flow = "-"
    return Frame(number, ts_ns, decoded.summary, protocol, flow, fields)


@dataclass
class Listing:
    """A count of frames and the first `limit` of them, decoded."""

    limit: int
    count: int = 0
    frames: list[Frame] = field(default_factory=list)

    @property
    def full(self) -> bool:
        return 0 < self.limit <= len(self.frames)

    def as_dict(self) -> dict[str, object]:
        return {"count": self.count, "frames": [frame.as_dict() for frame in self.frames]}


_DECADES_NS = [10**exponent for exponent in range(3, 11)]  # 1 us .. 10 s


@dataclass
class Delays:
    """The distribution of B's time minus A's, in a histogram of 7 significant bits (< 1 %)."""

    count: int = 0
    total: int = 0
    minimum: int = NEVER
    maximum: int = -NEVER
    histogram: dict[int, int] = field(default_factory=dict)

    def add(self, delay: int) -> None:
        self.count += 1
        self.total += delay
        if delay < self.minimum:
            self.minimum = delay
        if delay > self.maximum:
            self.maximum = delay
        shift = abs(delay).bit_length() - 7
        if shift > 0:
            delay = delay >> shift << shift if delay > 0 else -(-delay >> shift << shift)
        self.histogram[delay] = self.histogram.get(delay, 0) + 1

    def quantile(self, q: float) -> int | None:
        """The smallest bucket holding at least q of the delays (clamped to min and max)."""
        if not self.count:
            return None
        rank = max(1, round(q * self.count))
        seen = 0
        for bucket in sorted(self.histogram):
            seen += self.histogram[bucket]
            if seen >= rank:
                return min(max(bucket, self.minimum), self.maximum)
        return self.maximum

    def decades(self) -> list[tuple[int | None, int]]:
        """(upper bound in ns or None for "above 10 s", count) per decade; negative first."""
        counts: Counter[int] = Counter()
        for bucket, number in self.histogram.items():
            if bucket < 0:
                counts[-1] += number
            else:
                counts[next((d for d in _DECADES_NS if bucket < d), 0)] += number
        rows: list[tuple[int | None, int]] = [(-1, counts[-1])] if counts[-1] else []
        rows += [(d, counts[d]) for d in _DECADES_NS if counts[d]]
        return rows + ([(None, counts[0])] if counts[0] else [])

    def as_dict(self) -> dict[str, object]:
        names = {-1: "negative", None: "above"}
        return {
            "count": self.count,
            "min_ns": self.minimum if self.count else None,
            "median_ns": self.quantile(0.5),
            "p90_ns": self.quantile(0.9),
            "p99_ns": self.quantile(0.99),
            "max_ns": self.maximum if self.count else None,
            "mean_ns": self.total // self.count if self.count else None,
            "histogram": [
                {"below_ns": names.get(bound, bound), "count": count}
                for bound, count in self.decades()
            ],
        }


@dataclass
class StreamReport:
    """The comparison of one direction (or of everything, when directions are not recorded)."""

    direction: Direction | None  # None: all frames, directions not compared separately
    limit: int
    a_frames: int = 0
    b_frames: int = 0
    matched: int = 0
    missing: Listing = field(init=False)
    only_b: Listing = field(init=False)
    duplicates: Listing = field(init=False)
    reordered: Listing = field(init=False)
    causes: Counter[str | None] = field(default_factory=Counter)
    groups: Counter[tuple[str, str]] = field(default_factory=Counter)
    lost: Counter[str] = field(default_factory=Counter)  # missing frames per protocol
    bursts: Counter[int] = field(default_factory=Counter)
    longest_burst_at: int | None = None  # A's frame number where the longest burst starts
    delays: Delays = field(default_factory=Delays)
    commented: int = 0  # A frames with a `dropped by` comment
    commented_seen: int = 0  # ... that B has anyway

    def __post_init__(self) -> None:
        self.missing, self.only_b = Listing(self.limit), Listing(self.limit)
        self.duplicates, self.reordered = Listing(self.limit), Listing(self.limit)

    @property
    def name(self) -> str:
        if self.direction is None:
            return "all"
        return _DIRECTION_WORDS.get(self.direction, "unflagged")

    @property
    def commented_missing(self) -> int:
        return self.commented - self.commented_seen

    @property
    def uncommented_missing(self) -> int:
        return self.missing.count - self.commented_missing

    def as_dict(self) -> dict[str, object]:
        longest = max(self.bursts, default=0)
        return {
            "direction": None if self.direction is None else self.name,
            "a_frames": self.a_frames,
            "b_frames": self.b_frames,
            "matched": self.matched,
            "missing": {
                **self.missing.as_dict(),
                "by_cause": {cause or "unknown": n for cause, n in self.causes.most_common()},
                "by_protocol": dict(self.lost.most_common()),
                "groups": [
                    {"protocol": protocol, "flow": flow, "count": count}
                    for (protocol, flow), count in self.groups.most_common()
                ],
                "bursts": {
                    "count": sum(self.bursts.values()),
                    "longest": longest,
                    "longest_at": self.longest_burst_at,
                    "lengths": {str(n): self.bursts[n] for n in sorted(self.bursts)},
                },
            },
            "only_b": self.only_b.as_dict(),
            "duplicates": self.duplicates.as_dict(),
            "reordered": self.reordered.as_dict(),
            "delay": self.delays.as_dict(),
            "drop_comments": {
                "commented": self.commented,
                "missing": self.commented_missing,
                "seen_at_b": self.commented_seen,
            },
        }


@dataclass
class SideReport:
    """What was read of one capture."""

    selection: Selection
    interface: str
    linktype: int
    frames: int = 0  # of the selection
    first_ns: int | None = None
    last_ns: int | None = None
    truncated: str | None = None  # why reading stopped early
    statistics_dropped: int | None = None  # isb_ifdrop of the interface, when written

    @property
    def linktype_name(self) -> str:
        return _linktype_name(self.linktype)

    def as_dict(self) -> dict[str, object]:
        return {
            "capture": self.selection.label(),
            "interface": self.interface or None,
            "direction": _DIRECTION_WORDS.get(self.selection.direction or Direction.UNKNOWN),
            "linktype": self.linktype_name,
            "frames": self.frames,
            "truncated": self.truncated,
            "statistics_dropped": self.statistics_dropped,
        }


@dataclass
class Report:
    """The whole comparison: both sides, then one StreamReport per direction."""

    a: SideReport
    b: SideReport
    window_ns: int
    ignore: frozenset[str]
    streams: list[StreamReport]
    tunnelscope_pair: bool  # A is a tunnelscope pre capture, B its post

    @property
    def matched(self) -> int:
        return sum(stream.matched for stream in self.streams)

    @property
    def unrelated(self) -> bool:
        """Both captures hold frames and not one of them matched."""
        return self.matched == 0 and self.a.frames > 0 and self.b.frames > 0

    def warnings(self) -> list[str]:
        """What makes the result partial or suspect (each one line)."""
        problems = []
        for role, side in (("A", self.a), ("B", self.b)):
            if side.truncated:
                problems.append(
                    f"{role} ({side.selection.label()}): {side.truncated}; compared up to there"
                )
            elif side.frames == 0:
                problems.append(f"{role} ({side.selection.label()}) holds no frames")
        if self.unrelated:
            hint = [name for name in IGNORABLE if name not in self.ignore]
            problems.append(
                "no frame of A appears at B: the captures are unrelated"
                + (f", or the path rewrites frames (try --ignore {','.join(hint)})" if hint else "")
            )
        return problems

    def as_dict(self) -> dict[str, object]:
        return {
            "a": self.a.as_dict(),
            "b": self.b.as_dict(),
            "window": self.window_ns / 1e9,
            "ignore": sorted(self.ignore),
            "tunnelscope_pair": self.tunnelscope_pair,
            "directions": [stream.as_dict() for stream in self.streams],
            "warnings": self.warnings(),
        }


_KNOWN_LINKTYPES = {int(linktype): linktype for linktype in LinkType}


def _linktype_name(linktype: int) -> str:
    known = _KNOWN_LINKTYPES.get(linktype)
    return known.short_name if known else f"linktype {linktype}"


def cause_of(comment: str | None) -> str | None:
    """`dropped by freq_drop, freq_drop` -> `freq_drop`; None without a drop comment."""
    if not comment:
        return None
    for part in comment.split("; "):  # several comments are joined with "; "
        if part.startswith(DROP_COMMENT):
            names = part[len(DROP_COMMENT) :].split(", ")
            return ", ".join(dict.fromkeys(names))
    return None


# --------------------------------------------------------------------------------- reading


_Item = tuple["_Side", int, int, bytes, int, "str | None", bool]


class _Capture:
    """An open capture file; its first frame is read at once, to learn its interfaces."""

    def __init__(self, where: str, selection: Selection, stack: contextlib.ExitStack) -> None:
        self.stream: BinaryIO = sys.stdin.buffer
        if selection.path != "-":
            try:
                stream = open(selection.path, "rb", buffering=1 << 20)  # noqa: SIM115
                self.stream = stack.enter_context(stream)
            except OSError as exc:
                raise CompareError(f"{where}: {exc.strerror or exc}") from None
        try:
            self.reader: Reader = read_capture(self.stream)
        except CaptureFormatError as exc:
            raise CompareError(f"{where}: {exc}") from None
        self._packets = iter(self.reader)
        self.error: str | None = None
        try:
            self.first = next(self._packets, None)
        except (CaptureFormatError, OSError) as exc:
            self.first, self.error = None, _reason(exc)

    def frames(self, sides: list[_Side]) -> Iterator[_Item]:
        """(side, ts_ns, number, data, direction, comment, True) of each frame a side selects.

        A damaged record ends the stream; every side's report says why.
        """
        selected = {side.index: side for side in sides}
        packets = self._packets if self.first is None else chain((self.first,), self._packets)
        number = 0
        try:
            for packet in packets:
                number += 1
                side = selected.get(packet.interface)
                if side is None:
                    continue
                data, direction = packet.data, packet.direction
                if side.direction_byte and data:
                    direction = Direction.OUTBOUND if data[0] else Direction.INBOUND
                    data = data[1:]
                if side.wanted and direction != side.wanted:
                    continue
                report = side.report
                report.frames += 1
                report.last_ns = ts = packet.ts_ns
                if report.first_ns is None:
                    report.first_ns = ts
                yield side, ts, number, data, direction, packet.comment, True
        except (CaptureFormatError, OSError) as exc:
            self.error = _reason(exc)
        for side in sides:
            side.report.truncated = self.error
            side.done = True
            if side.index < len(self.reader.interfaces):
                side.report.statistics_dropped = self.reader.interfaces[side.index].dropped

    def position(self) -> int:
        """Bytes read so far (for a progress bar); 0 on a pipe."""
        try:
            return self.stream.tell()
        except OSError:
            return 0

    def size(self) -> int | None:
        """The file's size; None for a pipe."""
        with contextlib.suppress(OSError, ValueError):
            info = os.fstat(self.stream.fileno())
            return info.st_size if stat.S_ISREG(info.st_mode) else None
        return None


class _Side:
    """A or B: one interface of a capture, maybe one direction of it."""

    def __init__(self, role: str, selection: Selection, capture: _Capture) -> None:
        self.role = role
        self.selection = selection
        self.capture = capture
        self.where = f"{role} ({selection.label()})"
        self.index = self._resolve()
        interfaces = capture.reader.interfaces
        iface = interfaces[self.index] if self.index < len(interfaces) else None
        linktype = iface.linktype if iface else 0
        self.report = SideReport(selection, iface.name if iface else "", linktype)
        known = _KNOWN_LINKTYPES.get(linktype)
        self.direction_byte = bool(known and known.has_direction_byte)
        self.linktype = known.without_direction if known else linktype
        first = capture.first
        self.flagged = self.direction_byte or bool(first and first.direction)
        if selection.direction and not self.flagged:
            raise CompareError(f"{self.where}: the capture records no directions")
        self.wanted = selection.direction  # the other side's direction may be added
        self.done = False

    def _resolve(self) -> int:
        """The selected interface: a whole name, else the last words of one, else a number."""
        names = [iface.name for iface in self.capture.reader.interfaces]
        wanted = self.selection.interface
        listing = ", ".join(repr(name or f"interface {i}") for i, name in enumerate(names))
        if wanted is None:
            if len(names) > 1:
                example = self.selection.path + "#" + (names[0].split() or ["0"])[-1]
                raise CompareError(
                    f"{self.where}: {len(names)} interfaces ({listing}); pick one, e.g. {example}"
                )
            return 0
        for candidates in (
            [i for i, name in enumerate(names) if name == wanted],
            [i for i, name in enumerate(names) if name.endswith(" " + wanted)],
        ):
            if len(candidates) == 1:
                return candidates[0]
            if candidates:
                raise CompareError(f"{self.where}: {wanted!r} names several interfaces ({listing})")
        if wanted.isdigit() and int(wanted) < len(names):
            return int(wanted)
        raise CompareError(f"{self.where}: no interface {wanted!r} (it has {listing or 'none'})")


def _reason(exc: Exception) -> str:
    if isinstance(exc, OSError):
        return exc.strerror or str(exc)
    return str(exc)


def _merge(side_a: _Side, side_b: _Side, window: int) -> Iterator[_Item]:
    """Two captures' frames in timestamp order; the last item says "may it wait for a match?".

    After a damaged record in one capture the other goes on for one window only, and its
    frames may only match frames already waiting: the comparison stops where the damage is.
    """
    a, b = side_a.capture.frames([side_a]), side_b.capture.frames([side_b])
    a_item, b_item = next(a, None), next(b, None)
    damaged_at_once = any(
        i is None and s.capture.error for s, i in ((side_a, a_item), (side_b, b_item))
    )
    cut = -NEVER if damaged_at_once else NEVER
    while a_item is not None or b_item is not None:
        if b_item is None or (a_item is not None and a_item[1] <= b_item[1]):
            item, a_item = a_item, next(a, None)
            other, ended = b_item, a_item is None
        else:
            item, b_item = b_item, next(b, None)
            other, ended = a_item, b_item is None
        side, ts = item[0], item[1]
        if ended and side.capture.error and other is not None:
            cut = ts
        if ts > cut:
            if ts > cut + window:
                return
            if side is side_a:
                continue
            item = (*item[:-1], False)
        yield item


# -------------------------------------------------------------------------------- matching


class _Stream:
    """Matching state of one direction: the frames seen within the last window.

    `table` maps a frame's key to its bucket `[low, mid, entry, entry, ...]`: A's entries with
    that key, in A order. Entries before index 2 + low have left the window, those before
    2 + mid are matched (FIFO matching keeps them a prefix), the rest wait for B. `pending_a`
    holds every A entry of the window in A order, to settle them when they leave it. B frames
    that came before their A frame (clocks apart) wait in `table_b` ([low, entry, ...]) and
    `pending_b`.
    """

    __slots__ = ("report", "side_a", "side_b", "table", "pending_a", "table_b", "pending_b")
    __slots__ += ("highest", "run", "run_start", "wireshark")

    def __init__(
        self, report: StreamReport, side_a: _Side, side_b: _Side, wireshark: _Wireshark | None
    ) -> None:
        self.report = report
        self.wireshark = wireshark
        self.side_a = side_a
        self.side_b = side_b
        self.table: dict[int, list] = {}
        self.pending_a: deque[list] = deque()
        self.table_b: dict[int, list] = {}
        self.pending_b: deque[list] = deque()
        self.highest = 0  # the highest A frame number matched so far (reorder detection)
        self.run = 0  # missing frames in a row, in A order
        self.run_start = 0

    def add_a(self, ts: int, number: int, key: int, data: bytes, comment: str | None) -> None:
        entry = [ts, number, key, data, comment]
        report = self.report
        report.a_frames += 1
        if comment is not None and cause_of(comment):
            report.commented += 1
        self.pending_a.append(entry)
        bucket = self.table.get(key)
        if bucket is None:
            bucket = self.table[key] = [0, 0]
        bucket.append(entry)
        early = self.table_b.get(key) if self.table_b else None
        if early is not None:  # B had it first (its clock is behind A's)
            b_entry = early[early[0] + 1]
            _pop_front(self.table_b, key, early, 1)
            b_entry[MATCHED] = True
            bucket[1] += 1
            self._matched(entry, b_entry[TS])

    def add_b(self, ts: int, number: int, key: int, data: bytes, register: bool = True) -> None:
        """A frame of B; `register` False: only to match A frames already waiting."""
        bucket = self.table.get(key)
        if bucket is not None:
            mid = bucket[1]
            if mid + 2 < len(bucket):
                self.report.b_frames += 1
                bucket[1] = mid + 1
                self._matched(bucket[mid + 2], ts, number, data)
                return
            if mid > bucket[0]:
                if register:
                    self.report.b_frames += 1
                    duplicates = self.report.duplicates
                    self._list(duplicates, self.side_b, number, ts, data, bucket[mid + 1][NUMBER])
                return
        if register:
            self.report.b_frames += 1
            entry = [ts, number, key, data, False]
            self.pending_b.append(entry)
            waiting = self.table_b.get(key)
            if waiting is None:
                self.table_b[key] = [0, entry]
            else:
                waiting.append(entry)

    def _matched(self, entry: list, ts_b: int, number_b: int = 0, data_b: bytes = b"") -> None:
        report = self.report
        report.matched += 1
        report.delays.add(ts_b - entry[TS])
        if entry[COMMENT] is not None and cause_of(entry[COMMENT]):
            report.commented_seen += 1
        if number_b:  # matched in B's order: a frame behind the highest A number came late
            if entry[NUMBER] < self.highest:
                frame = self._list(
                    report.reordered, self.side_b, number_b, ts_b, data_b, entry[NUMBER]
                )
                if frame is not None:
                    frame.behind = self.highest
            else:
                self.highest = entry[NUMBER]
        entry[DATA] = None

    def _list(
        self, listing: Listing, side: _Side, number: int, ts: int, data: bytes, original: int | None
    ) -> Frame | None:
        """Count a frame; describe it while the listing has room. The Frame, if listed."""
        listing.count += 1
        if listing.full:
            return None
        frame = describe(side.linktype, number, ts, data)
        frame.original = original
        listing.frames.append(frame)
        if self.wireshark is not None:
            self.wireshark.submit(side.linktype, data, None, frame)
        return frame

    def expire(self, cutoff: int, b_stopped: int | None) -> int:
        """Settle every entry older than `cutoff`; return the time of the oldest one left."""
        pending, table = self.pending_a, self.table
        while pending and pending[0][TS] < cutoff:
            entry = pending.popleft()
            key = entry[KEY]
            bucket = table[key]
            if bucket[0] < bucket[1]:
                self.end_run()
            else:
                bucket[1] += 1
                self._missing(entry, b_stopped)
            _pop_front(table, key, bucket, 2)
        pending, table = self.pending_b, self.table_b
        while pending and pending[0][TS] < cutoff:
            entry = pending.popleft()
            if not entry[MATCHED]:
                _pop_front(table, entry[KEY], table[entry[KEY]], 1)
                number, ts, data = entry[NUMBER], entry[TS], entry[DATA]
                self._list(self.report.only_b, self.side_b, number, ts, data, None)
        oldest = self.pending_a[0][TS] if self.pending_a else NEVER
        return min(oldest, pending[0][TS]) if pending else oldest

    def _missing(self, entry: list, b_stopped: int | None) -> None:
        report = self.report
        ts, number, comment = entry[TS], entry[NUMBER], entry[COMMENT]
        cause = cause_of(comment)
        if cause is None:  # could it have reached B while B was not capturing?
            first_b, delays = self.side_b.report.first_ns, report.delays
            if first_b is None or ts + (delays.minimum if delays.count else 0) < first_b:
                cause = "before B started"
            elif b_stopped is not None and ts + max(delays.maximum, 0) > b_stopped:
                cause = "after B stopped"
        report.causes[cause] += 1
        frame = describe(self.side_a.linktype, number, ts, entry[DATA])
        report.groups[frame.protocol, frame.flow] += 1
        report.missing.count += 1
        listed = not report.missing.full
        if listed:
            frame.cause, frame.comment = cause, comment
            report.missing.frames.append(frame)
        if self.wireshark is not None:  # its protocol is counted when tshark answers
            self.wireshark.submit(
                self.side_a.linktype, entry[DATA], report, frame if listed else None
            )
        else:
            report.lost[frame.protocol.upper()] += 1  # as protocol_column names it
        if not self.run:
            self.run_start = number
        self.run += 1

    def end_run(self) -> None:
        run = self.run
        if run:
            bursts = self.report.bursts
            if run > max(bursts, default=0):
                self.report.longest_burst_at = self.run_start
            bursts[run] += 1
            self.run = 0


class _Wireshark:
    """Wireshark's dissection of the frames a report names.

    Every missing frame is dissected (for the per-protocol count); listed frames get
    Wireshark's summary ("OSPF Hello Packet") and fields.
    """

    def __init__(self) -> None:
        self.dissectors = Dissectors(_dissected)

    def submit(
        self, linktype: int, data: bytes, report: StreamReport | None, frame: Frame | None
    ) -> None:
        self.dissectors.submit(linktype, data, (report, frame))

    def close(self) -> None:
        """Wait for every answer; CompareError when tshark stopped early."""
        failure = self.dissectors.close()
        if failure:
            raise CompareError(failure)


def _dissected(tag: object, decoded: Decoded) -> None:
    report, frame = tag  # type: ignore[misc]
    if report is not None:
        report.lost[protocol_column(decoded)] += 1
    if frame is not None:
        frame.summary = headline(decoded.fields, decoded.summary)
        frame.fields = decoded.fields


def _pop_front(table: dict[int, list], key: int, bucket: list, head: int) -> None:
    """Take the oldest entry out of a bucket: [low, (mid,) entries...] with `head` counters.

    The entry stays in the list (a pop from the front would be O(n) for a run of identical
    frames) until COMPACT of them pile up and make at least half of it.
    """
    low = bucket[0] + 1
    if low + head == len(bucket):
        del table[key]
        return
    if low >= COMPACT and 2 * low >= len(bucket):
        del bucket[head : head + low]
        if head == 2:
            bucket[1] -= low
        low = 0
    bucket[0] = low


# ------------------------------------------------------------------------------ comparing


def pre_post(selection: Selection) -> tuple[Selection, Selection]:
    """The `<link> pre` and `<link> post` interfaces of one tunnelscope capture.

    The selection's interface, if any, names the link (`r1-r2`, or one of its two interfaces).
    """
    where = selection.label()
    if selection.path == "-":
        raise CompareError("comparing a capture with itself needs a file, not standard input")
    with contextlib.ExitStack() as stack:
        names = [iface.name for iface in _Capture(where, selection, stack).reader.interfaces]
    links = [name[:-4] for name in names if name.endswith(" pre") and name[:-4] + " post" in names]
    wanted = selection.interface
    if wanted is not None:
        for suffix in (" pre", " post"):
            wanted = wanted[: -len(suffix)] if wanted.endswith(suffix) else wanted
        if wanted not in links:
            raise CompareError(f"{where}: no link {wanted!r} captured at both points")
        links = [wanted]
    if not links:
        listing = ", ".join(repr(name) for name in names) or "none"
        raise CompareError(
            f"{where}: no '<link> pre' and '<link> post' interfaces (it has {listing}); "
            "give A and B"
        )
    if len(links) > 1:
        raise CompareError(f"{where}: several links ({', '.join(links)}); pick one with FILE#LINK")
    direction = selection.direction
    return (
        Selection(selection.path, f"{links[0]} pre", direction),
        Selection(selection.path, f"{links[0]} post", direction),
    )


def compare(
    a: Selection,
    b: Selection | None = None,
    window: float = DEFAULT_WINDOW,
    ignore: frozenset[str] = frozenset(),
    limit: int = DEFAULT_LIMIT,
    progress: Callable[[int, int | None], None] | None = None,
    dissector: str = "builtin",
) -> Report:
    """Compare A with B (None: A's pre and post interfaces); `progress(bytes read, total)`.

    `limit` caps each list of frames per direction (0: no cap); counts are always complete.
    `dissector` "wireshark" describes the listed frames and counts the missing ones per
    protocol with Wireshark's dissectors (`tunnelscope.decoders.wireshark`), "builtin" with
    tunnelscope's own.
    Raises CompareError when the captures cannot be compared as asked; a damaged record is
    not an error: the report says how far the comparison went.
    """
    if b is None:
        a, b = pre_post(a)
    if a.path == b.path == "-":
        raise CompareError("only one of A and B can be standard input")
    if window <= 0:
        raise CompareError("the window must be longer than 0 s")
    with contextlib.ExitStack() as stack:
        side_a = _Side("A", a, _Capture(f"A ({a.label()})", a, stack))
        capture_b = side_a.capture if b.path == a.path != "-" else None
        side_b = _Side("B", b, capture_b or _Capture(f"B ({b.label()})", b, stack))
        if side_b.index == side_a.index and side_b.capture is side_a.capture:  # read it twice
            side_b = _Side("B", b, _Capture(f"B ({b.label()})", b, stack))
        if side_a.linktype != side_b.linktype and "l2" not in ignore:
            raise CompareError(
                f"A is {_linktype_name(side_a.linktype)} and B is "
                f"{_linktype_name(side_b.linktype)}: their frames cannot match byte for byte; "
                "--ignore l2 compares them from the L3 header"
            )
        wireshark = _Wireshark() if dissector == "wireshark" else None
        try:
            streams = _run(side_a, side_b, round(window * 1e9), ignore, limit, progress, wireshark)
        finally:
            if wireshark is not None:
                wireshark.close()
    return _finish(side_a, side_b, round(window * 1e9), ignore, streams)


def _run(
    side_a: _Side,
    side_b: _Side,
    window: int,
    ignore: frozenset[str],
    limit: int,
    progress: Callable[[int, int | None], None] | None,
    wireshark: _Wireshark | None,
) -> dict[int, _Stream]:
    """Match frame by frame, in the order the frames happened (the hot loop)."""
    split = side_a.flagged and side_b.flagged  # compare each direction on its own
    if side_a.flagged and not side_a.wanted:
        side_a.wanted = side_b.selection.direction
    if side_b.flagged and not side_b.wanted:
        side_b.wanted = side_a.selection.direction
    if side_a.capture is side_b.capture:  # one file: its order is the order of events
        items = side_a.capture.frames([side_a, side_b])
        captures = [side_a.capture]
    else:
        items = _merge(side_a, side_b, window)
        captures = [side_a.capture, side_b.capture]
    sizes = [capture.size() for capture in captures]
    total = None if None in sizes else sum(size or 0 for size in sizes)
    norm_a = normaliser(side_a.linktype, ignore)
    norm_b = normaliser(side_b.linktype, ignore)
    streams: dict[int, _Stream] = {}
    deadline = NEVER  # no entry older than this is in any stream
    for count, (side, ts, number, data, direction, comment, register) in enumerate(items, 1):
        if ts - window > deadline:
            b_stopped = side_b.report.last_ns if side_b.done else None
            deadline = NEVER
            for stream in streams.values():
                oldest = stream.expire(ts - window, b_stopped)
                if oldest < deadline:
                    deadline = oldest
        stream = streams.get(direction if split else 0)
        if stream is None:
            report = StreamReport(Direction(direction) if split else None, limit)
            stream = streams[direction if split else 0] = _Stream(report, side_a, side_b, wireshark)
        if side is side_a:
            stream.add_a(ts, number, hash(norm_a(data) if norm_a else data), data, comment)
        else:
            stream.add_b(ts, number, hash(norm_b(data) if norm_b else data), data, register)
        if ts < deadline:
            deadline = ts
        if progress is not None and not count % PROGRESS_EVERY:
            progress(sum(capture.position() for capture in captures), total)
    b_stopped = side_b.report.last_ns
    for stream in streams.values():
        stream.expire(NEVER, b_stopped)
        stream.end_run()
    return streams


def _finish(
    side_a: _Side, side_b: _Side, window: int, ignore: frozenset[str], streams: dict[int, _Stream]
) -> Report:
    """Name the cause of the missing frames nothing explained, now that A is known."""
    name_a, name_b = side_a.report.interface, side_b.report.interface
    pair = name_a.endswith(" pre") and name_b == name_a[:-4] + " post"
    reports = [streams[key].report for key in sorted(streams, key=_DIRECTION_ORDER.get)]
    tunnelscope_pre = name_a.endswith(" pre") or any(r.commented for r in reports)
    label = "no drop recorded" if pair else "outside tunnelscope" if tunnelscope_pre else None
    for report in reports:
        if label and None in report.causes:
            report.causes[label] = report.causes.pop(None)
        for frame in report.missing.frames:
            frame.cause = frame.cause or label
    return Report(side_a.report, side_b.report, window, ignore, reports, pair)


_DIRECTION_ORDER = {Direction.OUTBOUND: 0, Direction.INBOUND: 1, Direction.UNKNOWN: 2}
