"""The offline tap: pull the lab links out of a host capture of UDP tunnels.

A host capture (Ethernet, Linux cooked SLL/SLL2, raw IP; IPv4 and IPv6) sees every lab link as
UDP datagrams whose payload is one whole L2 frame. `decap` finds those tunnels, pairs the two
directions of each link, detects its encapsulation and writes one pcapng interface per link
(or one classic pcap per link with `split_dir`).

Words used below:
- an *end* is one (address, port) socket; a *flow* is one direction, src end -> dst end; a
  *link* is the unordered pair of ends, i.e. both flows of one tunnel.
- direction: a frame sent from the lower end (addresses compared as bytes, then ports) is
  *outbound* (epb_flags 2), from the higher end *inbound* (1). The lower end's port is named
  first: `udp 10001<->10002 hdlc`.

How one pass is enough: the first frames of a new link come to Python, which holds them
(bounded) until the detector decides whether the link is a tunnel and which link type it
carries; then the pcapng IDB is written (an IDB only needs to precede its first EPB) and the
link's two flows enter the scanner's flow table. Frames already known are copied from the input
to the output by the scanner without Python per frame: `tunnelscope.analysis._scan.Scanner` (C)
or its pure-Python twin `PyScanner` below, which produces identical bytes (`TUNNELSCOPE_NO_C=1` or
`use_c=False` forces it). Output keeps input order: frames that arrive while an earlier frame
still waits for its link's decision wait behind it. A pending link is decided, with whatever it
has seen, when the detector is sure, after FRAME_BUDGET frames, when it has waited HOLD_NS of
capture time, when more than HOLD_BYTES/HOLD_FRAMES wait behind it, or at end of input. Memory
is therefore bounded by the 4 MiB input chunk plus those limits, whatever the file size.

IP fragments (`fragments`) are put together by tunnelscope/analysis/reassembly.py (the C
scanner has the same code): a completed datagram (`reassembled`) is then one frame like any
other, at the position and time of the fragment that completed it; datagrams that cannot be
completed are lost frames, counted by reason (`lost`, see reassembly.py).

Left out and counted: frames that are not UDP over IP (`not_udp`, including malformed headers),
UDP that is not a tunnel
(`not_tunnel`: well-known service ports such as DNS and NTP, flows the detector rejects, and
with `ports` every link without a listed port) and, with `dedupe`, second copies
(`duplicates`).

Dedupe (GNS3 2.x relays node -> ubridge -> peer on loopback, so a loopback capture holds every
frame twice, on two different tunnels): a frame is dropped when a frame with the same UDP
payload arrived on a different flow less than DEDUPE_WINDOW_NS (50 ms) before or after it,
among the last DEDUPE_CAPACITY frames kept, counting only frames of flows not already known to
be non-tunnels. Dropped copies are not remembered, so the original stays the reference. The C
scanner compares 64-bit payload hashes, the Python one 128-bit digests. Through a ubridge, the
node -> ubridge flow is seen first in both directions, so one link's frames end up on two
interfaces: each keeps the direction whose node it faces. The rule cannot tell a relayed copy
from a frame an emulated switch floods to several links at once (broadcasts): those collapse
to their first link too, so dedupe is for captures in which a relay doubles every frame.
"""

from __future__ import annotations

import hashlib
import ipaddress
import os
import struct
import sys
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field
from types import ModuleType
from typing import TYPE_CHECKING, BinaryIO, Callable, Optional, Union

from tunnelscope.analysis.reassembly import (
    LOST_REASONS,
    REASSEMBLY_BYTES,
    REASSEMBLY_DATAGRAMS,
    Fragment,
    Reassembler,
)
from tunnelscope.decoders.detect import LinkTypeDetector
from tunnelscope.formats import pcap, pcapng
from tunnelscope.formats.capture import CaptureError, read_capture
from tunnelscope.formats.linktype import LinkType
from tunnelscope.formats.packet import MAX_CAPLEN, CaptureFormatError, Direction

if TYPE_CHECKING:
    from tunnelscope.analysis._scan import Scanner as CScanner

CHUNK = 4 << 20  # input read size
FRAME_BUDGET = 16  # frames a link may hold while its link type is being detected
HOLD_NS = 2_000_000_000  # capture time a link may stay undecided
HOLD_BYTES = 8 << 20  # output that may wait behind an undecided link
HOLD_FRAMES = 16384  # undecided frames that may wait in all
MAX_IGNORED_FLOWS = 65536  # non-tunnel flows remembered; then forgotten (and re-examined)
DEDUPE_WINDOW_NS = 50_000_000
DEDUPE_CAPACITY = 65536
# detector confidence from which a flow pair counts as a tunnel: frames that merely fit a link
# header tie with "none of the four" (0.5); one recognised frame already reaches about 0.6
MIN_CONFIDENCE = 0.55

# UDP services that are never lab tunnels: DNS, DHCP, TFTP, NTP, NetBIOS, SNMP, IKE, syslog,
# RIP, DHCPv6, QUIC/HTTP3, SSDP, STUN, NAT-T, VXLAN, mDNS, LLMNR, Geneve, WireGuard.
SERVICE_PORTS = frozenset(
    {53, 67, 68, 69, 123, 137, 138, 161, 162, 443, 500, 514, 520, 546, 547, 1900, 3478, 4500,
     4789, 5353, 5355, 6081, 51820}
)  # fmt: skip

# scanner events
NEED_MORE, FRAME, BLOCK = 0, 1, 2
NO_STOP = (1 << 64) - 1  # scan_tpacket3's stop_at when there is no frame count
# TPACKET_V3 (linux/if_packet.h): struct tpacket_block_desc, struct tpacket3_hdr
BLOCK_DESC_LEN, TPACKET3_HDR_LEN = 48, 48
# port filter modes
PORTS_ALL, PORTS_ONLY, PORTS_EXCEPT = 0, 1, 2
# outer link types the scanner understands
OUTER_LINKTYPES = (
    LinkType.ETHERNET,
    LinkType.LINUX_SLL,
    LinkType.LINUX_SLL2,
    LinkType.RAW,
    LinkType.IPV4,
    LinkType.IPV6,
)

NOT_UDP = 0
_VLAN_TPIDS = (0x8100, 0x88A8, 0x9100, 0x9200)
_IPV6_EXTENSIONS = (0, 43, 60)  # hop-by-hop, routing, destination options
_MASK64 = (1 << 64) - 1
_BYTE_ORDERS = {b"\x4d\x3c\x2b\x1a": "<", b"\x1a\x2b\x3c\x4d": ">"}  # pcapng magic as stored
_PCAP_MAGICS = {
    b"\xd4\xc3\xb2\xa1": ("<", 1000),
    b"\x4d\x3c\xb2\xa1": ("<", 1),
    b"\xa1\xb2\xc3\xd4": (">", 1000),
    b"\xa1\xb2\x3c\x4d": (">", 1),
}

# a scanner FRAME: ts_ns, flow key, payload (what the capture holds of it), orig_len, duplicate
FrameInfo = tuple[int, bytes, bytes, int, bool]
ScanResult = tuple[int, int, Optional[FrameInfo]]


def c_scanner_available() -> bool:
    return _load_c() is not None


def _load_c() -> ModuleType | None:
    if os.environ.get("TUNNELSCOPE_NO_C"):
        return None
    try:
        from tunnelscope.analysis import _scan
    except ImportError:
        return None
    return _scan


# ---------------------------------------------------------------------------------------------
# The scanner: bytes of input records in, output records out, unknown flows back to the caller.
# tunnelscope/analysis/_scan.c is the same code in C; keep the two in step (tests compare their
# bytes).


def locate_udp(data: bytes, linktype: int) -> tuple[bytes, int, int, int] | Fragment | int:
    """Find the UDP payload in one outer frame: (flow key, offset, caplen, orig_len).

    Returns a `Fragment` for an IP fragment that may hold UDP (reassembly.py puts them
    together; `reassembled_udp` reads the whole datagram), NOT_UDP when there is none. The flow
    key is 37 bytes: family (4 or 6), source address, destination address (16 bytes each, IPv4
    zero-padded), source port, destination port (big-endian). caplen is what the capture holds
    of the payload, orig_len the payload length the UDP header announces (Ethernet padding and
    snaplen cuts are both handled).
    """
    n = len(data)
    if linktype == LinkType.ETHERNET:
        if n < 14:
            return NOT_UDP
        ethertype, off = data[12] << 8 | data[13], 14
        for _ in range(2):
            if ethertype not in _VLAN_TPIDS or n < off + 4:
                break
            ethertype, off = data[off + 2] << 8 | data[off + 3], off + 4
        version = 4 if ethertype == 0x0800 else 6 if ethertype == 0x86DD else 0
    elif linktype == LinkType.LINUX_SLL or linktype == LinkType.LINUX_SLL2:
        off = 16 if linktype == LinkType.LINUX_SLL else 20
        if n < off:
            return NOT_UDP
        at = 14 if linktype == LinkType.LINUX_SLL else 0
        ethertype = data[at] << 8 | data[at + 1]
        version = 4 if ethertype == 0x0800 else 6 if ethertype == 0x86DD else 0
    elif linktype == LinkType.RAW:
        if n < 1:
            return NOT_UDP
        off, version = 0, data[0] >> 4
    elif linktype == LinkType.IPV4:
        off, version = 0, 4
    elif linktype == LinkType.IPV6:
        off, version = 0, 6
    else:
        return NOT_UDP
    if version == 4:
        if n - off < 20 or data[off] >> 4 != 4:
            return NOT_UDP
        ihl = (data[off] & 15) * 4
        if ihl < 20 or data[off + 9] != 17:
            return NOT_UDP
        total = data[off + 2] << 8 | data[off + 3]
        end = off + min(n - off, total)
        udp, datagram = off + ihl, total - ihl
        addresses = data[off + 12 : off + 16] + bytes(12) + data[off + 16 : off + 20] + bytes(12)
        flags_offset = data[off + 6] << 8 | data[off + 7]
        if flags_offset & 0x3FFF:  # MF or an offset: a fragment
            if total < ihl or end < udp:
                return NOT_UDP
            key = b"\x04" + addresses + data[off + 4 : off + 6] + b"\x11" + bytes(4)
            offset, more = (flags_offset & 0x1FFF) * 8, bool(flags_offset & 0x2000)
            return Fragment(key, offset, datagram, data[udp:end], more, ihl, 17)
        if total < ihl + 8:
            return NOT_UDP
    elif version == 6:
        if n - off < 40 or data[off] >> 4 != 6:
            return NOT_UDP
        payload_length = data[off + 4] << 8 | data[off + 5]
        end, udp = off + min(n - off, 40 + payload_length), off + 40
        found = _skip_extensions(data, data[off + 6], udp, end)
        if found is None:
            return NOT_UDP
        next_header, udp = found
        addresses = data[off + 8 : off + 40]
        if next_header == 44:  # the fragment header
            if end - udp < 8:
                return NOT_UDP
            offset_flags, start = data[udp + 2] << 8 | data[udp + 3], udp + 8
            if offset_flags & 0xFFF9:  # an offset or M: a fragment
                if data[udp] != 17 and data[udp] not in _IPV6_EXTENSIONS:
                    return NOT_UDP
                length = off + 40 + payload_length - start
                if length < 0:
                    return NOT_UDP
                key = b"\x06" + addresses + data[udp + 4 : udp + 8] + bytes(3)
                more, header_len = bool(offset_flags & 1), udp - off - 40
                return Fragment(
                    key, offset_flags & 0xFFF8, length, data[start:end], more, header_len, data[udp]
                )
            found = _skip_extensions(data, data[udp], start, end)  # atomic: the whole datagram
            if found is None:
                return NOT_UDP
            next_header, udp = found
        if next_header != 17:
            return NOT_UDP
        datagram = off + 40 + payload_length - udp
    else:
        return NOT_UDP
    return _udp_in(data, bytes((version,)) + addresses, udp, end, datagram)


def reassembled_udp(
    fragment: Fragment, datagram: bytes, next_header: int
) -> tuple[bytes, int, int, int] | int:
    """`locate_udp` for a datagram put together from `fragment` and the others: the whole
    fragmentable part, whose first header is `next_header`."""
    udp, end = 0, len(datagram)
    if fragment.key[0] == 6:
        found = _skip_extensions(datagram, next_header, 0, end)
        if found is None:
            return NOT_UDP
        next_header, udp = found
    if next_header != 17:
        return NOT_UDP
    return _udp_in(datagram, fragment.key[:33], udp, end, end - udp)


def _skip_extensions(data: bytes, next_header: int, at: int, end: int) -> tuple[int, int] | None:
    """Past IPv6 hop-by-hop, routing and destination options headers: (next header, offset),
    None when one does not fit."""
    for _ in range(8):
        if next_header not in _IPV6_EXTENSIONS:
            break
        if end - at < 8:
            return None
        next_header, at = data[at], at + (data[at + 1] + 1) * 8
        if at > end:  # a header running past the data: nothing more can fit
            return None
    return next_header, at


def _udp_in(
    data: bytes, family_addresses: bytes, udp: int, end: int, datagram: int
) -> tuple[bytes, int, int, int] | int:
    """The UDP header at data[udp:], the IP datagram holding `datagram` bytes from it."""
    if end - udp < 8:
        return NOT_UDP
    udp_length = data[udp + 4] << 8 | data[udp + 5]
    if udp_length < 8 or udp_length > datagram:
        return NOT_UDP
    key = family_addresses + data[udp : udp + 4]
    return key, udp + 8, min(udp_length - 8, end - udp - 8), udp_length - 8


class _Dedupe:
    """Recently kept payloads (see the module doc); the twin of the ring in _scan.c."""

    def __init__(self, window_ns: int) -> None:
        self.window = window_ns
        self.ring: deque[tuple[bytes, int, int]] = deque()  # digest, ts, seq
        self.latest: dict[bytes, tuple[int, bytes, int]] = {}  # digest -> ts, flow, seq
        self.seq = 0

    def duplicate(self, payload: bytes, ts: int, flow: bytes) -> bool:
        ring, latest = self.ring, self.latest
        while ring and (ts - ring[0][1] > self.window or len(ring) >= DEDUPE_CAPACITY):
            digest, _, seq = ring.popleft()
            if latest[digest][2] == seq:
                del latest[digest]
        digest = hashlib.blake2b(payload, digest_size=16).digest()
        entry = latest.get(digest)
        if entry is not None and entry[1] != flow and abs(ts - entry[0]) <= self.window:
            return True
        latest[digest] = (ts, flow, self.seq)
        ring.append((digest, ts, self.seq))
        self.seq += 1
        return False


class PyScanner:
    """Pure-Python twin of `tunnelscope.analysis._scan.Scanner` (same constructor, methods, bytes).

    `scan(buf, pos, end)` processes whole records in buf[pos:end]: records of flows in the
    table are written (pcapng EPBs, or pcap records when `output_pcapng` is false) to their
    stream's output or counted as left out; it returns (NEED_MORE, pos of the first incomplete
    record, None), (FRAME, pos after the record, info) for a UDP frame of a flow not in the
    table, or (BLOCK, pos of the block, None) for a pcapng block other than a packet (the
    caller parses it and resumes after it). `scan_tpacket3` does the same for the packets of
    a live ring's block (`tunnelscope sniff`). Malformed input raises ValueError.
    """

    def __init__(
        self,
        pcapng_input: bool,
        caplen_limit: int,
        output_pcapng: bool,
        out_nanosecond: bool,
        dedupe_window_ns: int,
        port_mode: int,
        ports: bytes,
    ) -> None:
        self._pcapng_input = pcapng_input
        self._limit = caplen_limit
        self._output_pcapng = output_pcapng
        self._out_nanosecond = out_nanosecond
        self._dedupe = _Dedupe(dedupe_window_ns) if dedupe_window_ns else None
        self._port_mode = port_mode
        self._ports = ports
        self._endian = "<"
        self._interfaces: list[tuple[int, int, int]] = []  # linktype, tsresol_ns, snaplen
        self._flows: dict[bytes, tuple[int, int, int]] = {}  # key -> stream, iface, direction
        self._flow_frames: dict[bytes, int] = {}
        self._out: dict[int, list[bytes]] = {}
        self._counters = dict.fromkeys(
            ("frames", "written", "not_udp", "fragments", "not_tunnel", "duplicates"), 0
        )
        self._reassembly = Reassembler()
        self.last_ts = 0

    def set_section(self, swapped: bool) -> None:
        """Byte order of what follows (pcap file or pcapng section); forgets interfaces."""
        self._endian = ">" if swapped else "<"
        self._interfaces = []

    def add_interface(self, linktype: int, tsresol_ns: int, snaplen: int) -> None:
        self._interfaces.append((linktype, tsresol_ns, snaplen))

    def set_flow(self, key: bytes, stream: int, iface: int, direction: int) -> None:
        """stream -1: leave the flow out; otherwise write it to that stream and interface."""
        self._flows[key] = (stream, iface, direction)
        self._flow_frames.setdefault(key, 0)

    def clear_ignored(self) -> None:
        for key in [key for key, value in self._flows.items() if value[0] < 0]:
            del self._flows[key], self._flow_frames[key]

    def flow_frames(self, key: bytes) -> int:
        return self._flow_frames.get(key, 0)

    def counters(self) -> dict[str, int]:
        reassembly = self._reassembly
        counters = dict(self._counters, reassembled=reassembly.reassembled)
        counters["duplicate_fragments"] = reassembly.duplicate_fragments
        counters.update((f"lost_{reason}", n) for reason, n in reassembly.lost.items())
        return counters

    def finish(self) -> None:
        """End of input: datagrams still waiting for a fragment are lost."""
        self._reassembly.finish()

    def take(self) -> list[tuple[int, bytes]]:
        """The output produced since the last call, per stream, in stream order."""
        out = [(stream, b"".join(parts)) for stream, parts in sorted(self._out.items()) if parts]
        self._out = {}
        return out

    def write(self, fds: list[int]) -> None:
        """Write the output produced since the last call: stream i to file descriptor fds[i]."""
        for stream, data in self.take():
            write_all(fds[stream], data, stream)

    def scan(self, buf: bytes | bytearray, pos: int, end: int) -> ScanResult:
        view = memoryview(buf)
        try:
            if self._pcapng_input:
                return self._scan_pcapng(view, pos, end)
            return self._scan_pcap(view, pos, end)
        finally:
            view.release()

    def _scan_pcap(self, view: memoryview, pos: int, end: int) -> ScanResult:
        header = struct.Struct(self._endian + "IIII")
        linktype, tsresol, _ = self._interfaces[0]
        while pos + 16 <= end:
            sec, frac, caplen, orig_len = header.unpack_from(view, pos)
            if caplen > self._limit:
                raise ValueError(
                    f"frame {self._counters['frames'] + 1}: caplen {caplen} above the "
                    f"{self._limit}-byte limit"
                )
            if pos + 16 + caplen > end:
                break
            start, pos = pos + 16, pos + 16 + caplen
            info = self._frame(view, start, caplen, linktype, sec * 1_000_000_000 + frac * tsresol)
            if info is not None:
                return FRAME, pos, info
        return NEED_MORE, pos, None

    def _scan_pcapng(self, view: memoryview, pos: int, end: int) -> ScanResult:
        e = self._endian
        while pos + 12 <= end:
            if view[pos : pos + 4] == b"\x0a\x0d\x0d\x0a":
                order = _BYTE_ORDERS.get(view[pos + 8 : pos + 12].tobytes())
                if order is None:
                    raise ValueError("bad pcapng byte-order magic")
                total = struct.unpack_from(order + "I", view, pos + 4)[0]
                if total < 28 or total % 4 or total > pcapng.MAX_BLOCK:
                    raise ValueError(f"bad pcapng section header length {total}")
                return (BLOCK if pos + total <= end else NEED_MORE), pos, None
            block_type, total = struct.unpack_from(e + "II", view, pos)
            if total < 12 or total % 4 or total > pcapng.MAX_BLOCK:
                raise ValueError(f"bad pcapng block length {total} (block type {block_type:#x})")
            if pos + total > end:
                break
            if block_type == pcapng.EPB:
                number = self._counters["frames"] + 1
                if total < 32:
                    raise ValueError(f"frame {number}: truncated enhanced packet block")
                iface, high, low, caplen, _ = struct.unpack_from(e + "IIIII", view, pos + 8)
                if iface >= len(self._interfaces):
                    raise ValueError(f"frame {number}: unknown interface {iface}")
                if caplen > MAX_CAPLEN or 20 + caplen > total - 12:
                    raise ValueError(f"frame {number}: bad caplen {caplen}")
                linktype, tsresol, _ = self._interfaces[iface]
                ts = ((high << 32 | low) * tsresol) & _MASK64
                start = pos + 28
            elif block_type == pcapng.SPB and self._interfaces:
                if total < 16:
                    raise ValueError("truncated simple packet block")
                orig_len = struct.unpack_from(e + "I", view, pos + 8)[0]
                linktype, _, snaplen = self._interfaces[0]
                caplen, ts, start = min(orig_len, snaplen or orig_len, total - 16), 0, pos + 12
            else:
                return BLOCK, pos, None
            pos += total
            info = self._frame(view, start, caplen, linktype, ts)
            if info is not None:
                return FRAME, pos, info
        return NEED_MORE, pos, None

    def scan_tpacket3(
        self, block: bytes | bytearray | memoryview, index: int, stop_at: int = NO_STOP
    ) -> ScanResult:
        """The packets of one TPACKET_V3 block from number `index` on (a live packet ring): as
        `scan`, with packet numbers for positions; NEED_MORE once the block is done, or after
        the packet that brings the `written` counter to `stop_at`."""
        if index < 0:
            raise ValueError("index must not be negative")
        if not self._interfaces:
            raise ValueError("no interface declared")
        view = memoryview(block)
        try:
            return self._scan_tpacket3(view, index, stop_at)
        finally:
            view.release()

    def _scan_tpacket3(self, view: memoryview, index: int, stop_at: int) -> ScanResult:
        end, linktype = len(view), self._interfaces[0][0]
        if end < BLOCK_DESC_LEN:
            raise ValueError(f"truncated TPACKET_V3 block ({end} bytes)")
        count, at = struct.unpack_from("=II", view, 12)  # num_pkts, offset_to_first_pkt
        for number in range(1, count + 1):
            if at + TPACKET3_HDR_LEN > end:
                raise ValueError(f"TPACKET_V3 packet {number} lies past the block end")
            following, sec, nsec, caplen = struct.unpack_from("=IIII", view, at)
            mac = struct.unpack_from("=H", view, at + 24)[0]
            if at + mac + caplen > end:
                raise ValueError(f"TPACKET_V3 packet {number} runs past the block end")
            if caplen > self._limit:
                raise ValueError(
                    f"frame {self._counters['frames'] + 1}: caplen {caplen} above the "
                    f"{self._limit}-byte limit"
                )
            if number < count and following < TPACKET3_HDR_LEN:
                raise ValueError(f"TPACKET_V3 packet {number}: bad next offset {following}")
            if number > index:
                ts = sec * 1_000_000_000 + nsec
                info = self._frame(view, at + mac, caplen, linktype, ts)
                if info is not None:
                    return FRAME, number, info
                if self._counters["written"] >= stop_at:
                    return NEED_MORE, number, None
            at += following
        return NEED_MORE, count, None

    def _frame(
        self, view: memoryview, start: int, caplen: int, linktype: int, ts: int
    ) -> FrameInfo | None:
        """Write or count one record; return its details when its flow is unknown."""
        counters = self._counters
        counters["frames"] += 1
        self.last_ts = ts
        data = bytes(view[start : start + caplen])
        found = locate_udp(data, linktype)
        if isinstance(found, Fragment):
            counters["fragments"] += 1
            whole = self._reassembly.add(found, ts)
            if whole is None:
                return None
            data = whole[0]
            found = reassembled_udp(found, *whole)
        if found == NOT_UDP:
            counters["not_udp"] += 1
            return None
        key, off, length, orig_len = found  # type: ignore[misc]
        if self._port_mode != PORTS_ALL:
            listed = self._ports_listed(key)
            if listed != (self._port_mode == PORTS_ONLY):
                counters["not_tunnel"] += 1
                return None
        flow = self._flows.get(key)
        if flow is not None and flow[0] < 0:
            counters["not_tunnel"] += 1
            return None
        payload = data[off : off + length]
        duplicate = self._dedupe is not None and self._dedupe.duplicate(payload, ts, key)
        if flow is None:
            return ts, key, payload, orig_len, duplicate
        if duplicate:
            counters["duplicates"] += 1
            return None
        stream, iface, direction = flow
        record = encode_record(
            self._output_pcapng, self._out_nanosecond, iface, ts, payload, orig_len, direction
        )
        self._out.setdefault(stream, []).append(record)
        self._flow_frames[key] += 1
        counters["written"] += 1
        return None

    def _ports_listed(self, key: bytes) -> bool:
        ports = self._ports
        source, destination = key[33] << 8 | key[34], key[35] << 8 | key[36]
        return bool(ports[source >> 3] >> (source & 7) & 1) or bool(
            ports[destination >> 3] >> (destination & 7) & 1
        )


def encode_record(
    output_pcapng: bool,
    nanosecond: bool,
    iface: int,
    ts: int,
    payload: bytes,
    orig_len: int,
    direction: int,
) -> bytes:
    """One output record: an EPB with epb_flags, or a classic pcap record (--split)."""
    if output_pcapng:
        return pcapng.enhanced_packet(iface, ts, payload, orig_len, Direction(direction))
    return pcap.record(ts, payload, orig_len, nanosecond)


Scanner = Union["CScanner", PyScanner]


def port_bitmap(ports: Iterable[int]) -> bytes:
    """65536 bits, bit p set for each port p (the scanners' port filter)."""
    bitmap = bytearray(8192)
    for port in ports:
        bitmap[port >> 3] |= 1 << (port & 7)
    return bytes(bitmap)


# ---------------------------------------------------------------------------------------------
# Links and the driver


@dataclass
class Options:
    ports: frozenset[int] | None = None  # keep only links with one of these ports (all tunnels)
    linktype: LinkType | None = None  # write every link with this link type
    dedupe: bool = False
    use_c: bool | None = None  # None: the C scanner when built and TUNNELSCOPE_NO_C is unset


@dataclass
class LinkSummary:
    name: str
    low: str  # "address:port" of the lower end (its frames are outbound)
    high: str
    linktype: str
    linktype_number: int
    how: str  # "detected" or "--linktype"
    confidence: float
    outbound: int  # frames written, from the lower end
    inbound: int
    file: str | None = None  # --split only


@dataclass
class Summary:
    frames: int = 0  # records read, fragments included
    written: int = 0
    not_udp: int = 0
    fragments: int = 0  # records holding an IP fragment
    reassembled: int = 0  # datagrams put together from them (each one frame, or not a tunnel)
    duplicate_fragments: int = 0  # copies of a fragment already held, ignored
    # fragmented datagrams never completed, by reason (see reassembly.py): each a lost frame
    lost: dict[str, int] = field(default_factory=lambda: dict.fromkeys(LOST_REASONS, 0))
    not_tunnel: int = 0
    duplicates: int = 0
    backend: str = "c"
    links: list[LinkSummary] = field(default_factory=list)

    def frames_lost(self) -> int:
        return sum(self.lost.values())

    def line(self) -> str:
        text = (
            f"{self.frames} frames read, {self.written} written on {len(self.links)} "
            f"link{'s' * (len(self.links) != 1)}"
        )
        if self.fragments:
            text += f"; {self.reassembled} reassembled from {self.fragments} fragments"
            if self.duplicate_fragments:
                text += f" ({self.duplicate_fragments} duplicate fragments ignored)"
        text += f"; left out: {self.not_tunnel} non-tunnel UDP, {self.not_udp} not UDP"
        if self.duplicates:
            text += f", {self.duplicates} duplicates dropped"
        lost = self.frames_lost()
        if lost:
            lost_ = self.lost
            limits = f"{REASSEMBLY_BYTES >> 20} MiB, {REASSEMBLY_DATAGRAMS} datagrams"
            reasons = [
                (lost_["timeout"] + lost_["incomplete"], "missing a fragment"),
                (lost_["evicted"], f"over the reassembly limits ({limits})"),
                (lost_["overlap"], "with overlapping fragments"),
                (lost_["malformed"], "with malformed fragments"),
                (lost_["snaplen"], "cut by the snaplen"),
            ]
            why = ", ".join(f"{n} {reason}" for n, reason in reasons if n)
            text += f"; lost: {lost} frame{'s' * (lost != 1)} in incomplete datagrams ({why})"
        return text


class _Link:
    """A pair of ends: undecided while its first frames are held, then tunnel or not."""

    __slots__ = (
        "key", "family", "low", "high", "detector", "first_ts", "seen", "held_duplicates",
        "tunnel", "linktype", "how", "confidence", "stream", "iface", "name",
        "written", "file",
    )  # fmt: skip

    def __init__(self, key: tuple[bytes, bytes, bytes], first_ts: int) -> None:
        self.key = key
        self.family, self.low, self.high = key
        self.detector = LinkTypeDetector()
        self.first_ts = first_ts
        self.seen = 0
        self.held_duplicates = 0
        self.tunnel: bool | None = None
        self.linktype = LinkType.ETHERNET
        self.how = "detected"
        self.confidence = 0.0
        self.stream = self.iface = -1
        self.name = ""
        self.written = [0, 0]  # frames written by Python: outbound, inbound
        self.file: str | None = None

    def end_text(self, end: bytes) -> str:
        raw = end[:4] if self.family == b"\x04" else end[:16]
        address = ipaddress.ip_address(raw)
        port = end[16] << 8 | end[17]
        return f"{address}:{port}" if address.version == 4 else f"[{address}]:{port}"

    def port(self, end: bytes) -> int:
        return end[16] << 8 | end[17]

    def flow_keys(self) -> tuple[bytes, bytes]:
        """Keys of the outbound (low -> high) and inbound flows."""
        low, high = self.low, self.high
        return (
            self.family + low[:16] + high[:16] + low[16:] + high[16:],
            self.family + high[:16] + low[:16] + high[16:] + low[16:],
        )


class _Held:
    """A frame of an undecided link, waiting in the output queue."""

    __slots__ = ("link", "ts", "payload", "orig_len", "outbound")

    def __init__(self, link: _Link, ts: int, payload: bytes, orig_len: int, outbound: bool):
        self.link = link
        self.ts = ts
        self.payload = payload
        self.orig_len = orig_len
        self.outbound = outbound


def _link_key(flow: bytes) -> tuple[tuple[bytes, bytes, bytes], bool]:
    """(family, lower end, higher end) of a flow key, and whether the flow leaves the lower end."""
    source = flow[1:17] + flow[33:35]
    destination = flow[17:33] + flow[35:37]
    outbound = source <= destination
    low, high = (source, destination) if outbound else (destination, source)
    return (flow[:1], low, high), outbound


def write_all(fd: int, data: bytes | memoryview, stream: int = 0) -> None:
    """Write everything; an OSError names the stream in `filename`, as the C scanner does."""
    view = memoryview(data)
    try:
        while view:
            view = view[os.write(fd, view) :]
    except OSError as exc:
        raise OSError(exc.errno, exc.strerror, stream) from None


class _Output:
    """One output file. Header blocks and records written by Python gather here; the
    scanner's output goes from its own buffer straight to `fd`, after a `flush`."""

    def __init__(self, path: str) -> None:
        self.path = path
        self._close_fd = path != "-"
        try:
            self.fd = (
                os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
                if self._close_fd
                else sys.stdout.fileno()
            )
        except OSError as exc:
            raise self.error(exc) from None
        self._parts: list[bytes] = []
        self._size = 0

    def error(self, exc: OSError) -> CaptureError:
        return CaptureError(f"cannot write {self.path}: {exc.strerror or exc}")

    def add(self, data: bytes) -> None:
        self._parts.append(data)
        self._size += len(data)
        if self._size >= 1 << 20:
            self.flush()

    def flush(self) -> None:
        if self._parts:
            data = b"".join(self._parts)
            self._parts.clear()
            self._size = 0
            try:
                write_all(self.fd, data)
            except OSError as exc:
                raise self.error(exc) from None

    def close(self, flush: bool = True) -> None:
        try:
            if flush:
                self.flush()
        finally:
            if self._close_fd:
                self._close_fd = False
                os.close(self.fd)


class _HeaderTap:
    """Records the bytes `read_capture` consumes, for the byte order it does not expose."""

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        self.head = b""

    def read(self, size: int) -> bytes:
        data = self.stream.read(size)
        self.head += data
        return data


def _fill(stream: BinaryIO, buf: bytearray, start: int) -> int:
    """Read until buf is full or the input ends (full chunks keep runs reproducible)."""
    got = start
    with memoryview(buf) as view:
        while got < len(buf):
            with view[got:] as part:
                count = stream.readinto(part)
            if not count:
                break
            got += count
    return got - start


class Decap:
    """One run: input stream in, pcapng (or one pcap per link) out, a `Summary` back."""

    scanner: Scanner  # made by run(), once the input's format is known

    def __init__(
        self,
        output: str | None,
        split_dir: str | None,
        options: Options,
        progress: Callable[[int], None] | None = None,
    ) -> None:
        if (output is None) == (split_dir is None):
            raise ValueError("give exactly one of output and split_dir")
        self.options = options
        self.output = output
        self.split_dir = split_dir
        self.progress = progress
        self._module = _load_c() if options.use_c is not False else None
        if options.use_c and self._module is None:
            raise RuntimeError("the C scanner (tunnelscope.analysis._scan) is not available")
        self.links: list[_Link] = []  # tunnel links, in order of decision
        self._outputs: list[_Output] = []  # per scanner stream
        self._fds: list[int] = []  # the same, for the scanner
        self._pending: dict[tuple[bytes, bytes, bytes], _Link] = {}  # oldest first
        self._queue: deque[tuple[int, bytes] | _Held] = deque()
        self._queued_bytes = 0
        self._queued_held = 0
        self._names: set[str] = set()
        self._ignored_flows = 0
        self._counts = dict.fromkeys(("written", "not_tunnel", "duplicates"), 0)
        self._count: int | None = None  # a live run's frame count: held frames stop there too
        self._pcapng_input = False
        self._endian = "<"
        self._out_nanosecond = False

    def frames_written(self) -> int:
        """Frames written so far (a live run stops after a count of them)."""
        return self.scanner.counters()["written"] + self._counts["written"]

    @property
    def backend(self) -> str:
        return "c" if self._module is not None else "python"

    # -- the loop ----------------------------------------------------------------------------

    def run(self, stream: BinaryIO) -> Summary:
        """Decap all of `stream`. Raises CaptureFormatError (bad input) or CaptureError (bad
        output); after a bad input record the output is still closed, valid, and holds every
        frame before it."""
        tap = _HeaderTap(stream)
        reader = read_capture(tap)  # type: ignore[arg-type]
        if reader.format == "pcapng":
            self._endian = _BYTE_ORDERS[tap.head[8:12]]
            self._start(True, MAX_CAPLEN, nanosecond=True)
        else:
            self._endian, tsresol = _PCAP_MAGICS[tap.head[:4]]
            snaplen, linktype = reader.snaplen, reader.interfaces[0].linktype
            limit = min(max(snaplen, 65535), MAX_CAPLEN) if snaplen else MAX_CAPLEN
            if linktype not in OUTER_LINKTYPES:
                raise CaptureFormatError(
                    f"link type {linktype} is not a host capture link type "
                    "(Ethernet, Linux SLL/SLL2 or raw IP)"
                )
            self._start(False, limit, nanosecond=tsresol == 1)
            self.scanner.add_interface(linktype, tsresol, snaplen)
        self._open_outputs()
        return self._drive(lambda: self._pump(stream))

    def run_blocks(
        self, blocks: Iterable[memoryview], linktype: LinkType, count: int | None = None
    ) -> Summary:
        """Decap TPACKET_V3 blocks as a live packet ring hands them over (`tunnelscope
        sniff`): each is scanned in place, done with once the next one is asked for. Frames
        of `linktype`, nanosecond times; `count`: stop once that many frames were written.
        Raises CaptureError (bad output)."""
        self._start(False, MAX_CAPLEN, nanosecond=True)
        self.scanner.add_interface(linktype, 1, MAX_CAPLEN)
        self._open_outputs()
        self._count = count
        return self._drive(lambda: self._pump_blocks(blocks))

    def _start(self, pcapng_input: bool, limit: int, nanosecond: bool) -> None:
        """The scanner, once the input's format is known."""
        self._pcapng_input, self._out_nanosecond = pcapng_input, nanosecond
        options = self.options
        if options.ports:
            port_mode, ports = PORTS_ONLY, port_bitmap(options.ports)
        else:
            port_mode, ports = PORTS_EXCEPT, port_bitmap(SERVICE_PORTS)
        factory = self._module.Scanner if self._module is not None else PyScanner
        self.scanner = factory(
            pcapng_input,
            limit,
            self.split_dir is None,
            nanosecond,
            DEDUPE_WINDOW_NS if options.dedupe else 0,
            port_mode,
            ports,
        )
        self.scanner.set_section(self._endian == ">")

    def _open_outputs(self) -> None:
        if self.output is not None:
            self._add_output(self.output).add(pcapng.section_header())
        else:
            try:
                os.makedirs(self.split_dir or ".", exist_ok=True)
            except OSError as exc:
                raise CaptureError(f"cannot create {self.split_dir}: {exc.strerror}") from None

    def _drive(self, pump: Callable[[], None]) -> Summary:
        """Run `pump`, then close the outputs: valid after bad input, as they are on error."""
        try:
            pump()
        except (CaptureFormatError, ValueError) as exc:
            self._finish()
            raise CaptureFormatError(str(exc)) from None
        except BaseException:
            for output in self._outputs:
                output.close(flush=False)
            raise
        self._finish()
        return self._summary()

    def _pump(self, stream: BinaryIO) -> None:
        scanner = self.scanner
        buf = bytearray(CHUNK)
        pos = end = total = 0
        eof = False
        while True:
            event, pos, info = scanner.scan(buf, pos, end)
            self._collect()
            if event == FRAME:
                self._on_frame(info)  # type: ignore[arg-type]
            elif event == BLOCK:
                pos = self._on_block(buf, pos)
            elif eof:
                if pos < end:
                    raise CaptureFormatError(self._truncated(end - pos))
                return
            else:
                if pos:  # move the incomplete record to the front
                    buf[: end - pos] = buf[pos:end]
                    end, pos = end - pos, 0
                if end == len(buf):  # a record larger than the buffer
                    buf.extend(bytes(len(buf)))
                got = _fill(stream, buf, end)
                eof = end + got < len(buf)
                end += got
                total += got
                if self.progress is not None:
                    self.progress(total)
            self._settle()

    def _pump_blocks(self, blocks: Iterable[memoryview]) -> None:
        for block in blocks:
            if not self._scan_block(block):
                return

    def _scan_block(self, block: memoryview) -> bool:
        """All of one block; False once the run's count of frames was written."""
        scanner, count = self.scanner, self._count
        index = 0
        while True:
            if count is None:
                event, index, info = scanner.scan_tpacket3(block, index)
            else:  # stop where the scanner's own `written` makes the count
                left = count - self.frames_written()
                if left <= 0:
                    return False
                stop_at = scanner.counters()["written"] + left
                event, index, info = scanner.scan_tpacket3(block, index, stop_at)
            self._collect()
            if event == FRAME:
                self._on_frame(info)  # type: ignore[arg-type]
            self._settle()
            if event != FRAME:
                return count is None or self.frames_written() < count

    def _truncated(self, left: int) -> str:
        frames = self.scanner.counters()["frames"]
        if self._pcapng_input:
            return f"truncated pcapng block after frame {frames} ({left} bytes)"
        if left < 16:
            return f"truncated record header after frame {frames}"
        return f"frame {frames + 1}: truncated record ({left - 16} bytes of data)"

    def _on_frame(self, info: FrameInfo) -> None:
        ts, flow, payload, orig_len, duplicate = info
        caplen = len(payload)
        key, outbound = _link_key(flow)
        link = self._pending.get(key)
        if link is None:
            link = self._pending[key] = _Link(key, ts)
        known = self.options.ports is not None and self.options.linktype is not None
        if not known:  # a snaplen cut must not read as malformed: judge it zero-filled
            link.detector.feed(payload + bytes(orig_len - caplen) if orig_len > caplen else payload)
        link.seen += 1
        if duplicate:
            link.held_duplicates += 1
        else:
            self._queue.append(_Held(link, ts, payload, orig_len, outbound))
            self._queued_bytes += caplen
            self._queued_held += 1
        if known or link.detector.decided or link.seen >= FRAME_BUDGET:
            self._decide(link)

    def _on_block(self, buf: bytearray, pos: int) -> int:
        """A pcapng block the scanner leaves to us: SHB and IDB matter, the rest is skipped."""
        scanner = self.scanner
        if buf[pos : pos + 4] == b"\x0a\x0d\x0d\x0a":
            self._endian = _BYTE_ORDERS[bytes(buf[pos + 8 : pos + 12])]
            scanner.set_section(self._endian == ">")
            return pos + struct.unpack_from(self._endian + "I", buf, pos + 4)[0]
        e = self._endian
        block_type, total = struct.unpack_from(e + "II", buf, pos)
        if block_type == pcapng.IDB:
            if total < 20:
                raise CaptureFormatError("truncated interface description block")
            linktype, _, snaplen = struct.unpack_from(e + "HHI", buf, pos + 8)
            tsresol = 1000
            for code, value in pcapng._parse_options(bytes(buf[pos + 16 : pos + total - 4]), e):
                if code == pcapng.IF_TSRESOL:
                    tsresol = pcapng._tsresol_ns(value)
            scanner.add_interface(linktype, tsresol, snaplen)
        return pos + total

    # -- decisions -----------------------------------------------------------------------------

    def _settle(self) -> None:
        """Decide links that waited too long, then write what no longer waits."""
        now = self.scanner.last_ts
        while self._pending:
            link = next(iter(self._pending.values()))
            if now - link.first_ts <= HOLD_NS:
                break
            self._decide(link)
        self._flush_queue()
        while self._queue and (self._queued_bytes > HOLD_BYTES or self._queued_held > HOLD_FRAMES):
            self._decide(self._queue[0].link)  # type: ignore[union-attr]
            self._flush_queue()

    def _decide(self, link: _Link) -> None:
        del self._pending[link.key]
        options = self.options
        detection = link.detector.result() if link.detector.frames else None
        if options.ports is not None:
            link.tunnel = True
        else:
            link.tunnel = detection is not None and detection.confidence >= MIN_CONFIDENCE
        outbound, inbound = link.flow_keys()
        scanner = self.scanner
        if not link.tunnel:
            scanner.set_flow(outbound, -1, 0, 0)
            scanner.set_flow(inbound, -1, 0, 0)
            self._counts["not_tunnel"] += link.held_duplicates
            self._ignored_flows += 2
            if self._ignored_flows > MAX_IGNORED_FLOWS:
                scanner.clear_ignored()
                self._ignored_flows = 0
            return
        if options.linktype is not None:
            link.linktype, link.how, link.confidence = options.linktype, "--linktype", 1.0
        elif detection is not None:
            link.linktype, link.confidence = detection.linktype, detection.confidence
        self._counts["duplicates"] += link.held_duplicates
        self._open_link(link)
        scanner.set_flow(outbound, link.stream, link.iface, Direction.OUTBOUND)
        scanner.set_flow(inbound, link.stream, link.iface, Direction.INBOUND)
        self.links.append(link)

    def _open_link(self, link: _Link) -> None:
        """Declare the link's interface (pcapng) or create its own pcap file (split)."""
        low, high = link.port(link.low), link.port(link.high)
        short = link.linktype.short_name
        name, number = f"udp {low}<->{high} {short}", 1
        while name in self._names:
            number += 1
            name = f"udp {low}<->{high} {short} #{number}"
        self._names.add(name)
        link.name = name
        how = "--linktype" if link.how == "--linktype" else f"confidence {link.confidence:.2f}"
        description = (
            f"{link.end_text(link.low)} <-> {link.end_text(link.high)}, "
            f"{link.linktype.name} ({how}), outbound = from {link.end_text(link.low)}"
        )
        if self.split_dir is None:  # the IDB goes out now, before any of the link's frames
            link.stream, link.iface = 0, len(self.links)
            header = pcapng.interface_description(link.linktype, name, description)
            self._outputs[0].add(header)
        else:
            suffix = f"-{number}" if number > 1 else ""
            link.file = os.path.join(self.split_dir, f"udp-{low}-{high}-{short}{suffix}.pcap")
            link.stream, link.iface = len(self._outputs), 0
            header = pcap.global_header(link.linktype, nanosecond=self._out_nanosecond)
            self._add_output(link.file).add(header)

    def _add_output(self, path: str) -> _Output:
        output = _Output(path)
        self._outputs.append(output)
        self._fds.append(output.fd)
        return output

    # -- output --------------------------------------------------------------------------------

    def _collect(self) -> None:
        """The scanner's output goes straight to the files, or, while frames of undecided
        links wait, into the queue behind them."""
        if self._queue:
            for stream, data in self.scanner.take():
                self._queue.append((stream, data))
                self._queued_bytes += len(data)
            return
        for output in self._outputs:
            output.flush()
        try:
            self.scanner.write(self._fds)
        except OSError as exc:  # exc.filename: the failing stream
            raise self._outputs[exc.filename].error(exc) from None

    def _flush_queue(self) -> None:
        queue = self._queue
        while queue:
            item = queue[0]
            if isinstance(item, _Held):
                link = item.link
                if link.tunnel is None:
                    return
                queue.popleft()
                self._queued_bytes -= len(item.payload)
                self._queued_held -= 1
                if not link.tunnel:
                    self._counts["not_tunnel"] += 1
                    continue
                if self._count is not None and self.frames_written() >= self._count:
                    continue  # held past the count while its link's type was decided
                direction = Direction.OUTBOUND if item.outbound else Direction.INBOUND
                record = encode_record(
                    self.split_dir is None,
                    self._out_nanosecond,
                    link.iface,
                    item.ts,
                    item.payload,
                    item.orig_len,
                    direction,
                )
                self._outputs[link.stream].add(record)
                link.written[0 if item.outbound else 1] += 1
                self._counts["written"] += 1
            else:
                queue.popleft()
                self._queued_bytes -= len(item[1])
                self._outputs[item[0]].add(item[1])

    def _finish(self) -> None:
        """End of input: decide every waiting link, write everything, close the files."""
        self.scanner.finish()
        while self._pending:
            self._decide(next(iter(self._pending.values())))
        self._collect()
        self._flush_queue()
        for output in self._outputs:
            output.close()

    def _summary(self) -> Summary:
        counters = self.scanner.counters()
        summary = Summary(
            frames=counters["frames"],
            written=counters["written"] + self._counts["written"],
            not_udp=counters["not_udp"],
            fragments=counters["fragments"],
            reassembled=counters["reassembled"],
            duplicate_fragments=counters["duplicate_fragments"],
            lost={reason: counters[f"lost_{reason}"] for reason in LOST_REASONS},
            not_tunnel=counters["not_tunnel"] + self._counts["not_tunnel"],
            duplicates=counters["duplicates"] + self._counts["duplicates"],
            backend=self.backend,
        )
        for link in self.links:
            outbound, inbound = link.flow_keys()
            summary.links.append(
                LinkSummary(
                    name=link.name,
                    low=link.end_text(link.low),
                    high=link.end_text(link.high),
                    linktype=link.linktype.short_name,
                    linktype_number=int(link.linktype),
                    how=link.how,
                    confidence=round(link.confidence, 3),
                    outbound=self.scanner.flow_frames(outbound) + link.written[0],
                    inbound=self.scanner.flow_frames(inbound) + link.written[1],
                    file=link.file,
                )
            )
        return summary


def decap(
    source: str,
    output: str | None = None,
    split_dir: str | None = None,
    options: Options | None = None,
    progress: Callable[[int], None] | None = None,
) -> Summary:
    """Decap the capture at `source` ('-': standard input) into `output` or `split_dir`.

    Raises OSError (input unreadable), CaptureFormatError (not a capture, damaged) or
    CaptureError (output unwritable).
    """
    job = Decap(output, split_dir, options or Options(), progress)
    if source == "-":
        return job.run(sys.stdin.buffer)
    with open(source, "rb") as stream:
        return job.run(stream)
