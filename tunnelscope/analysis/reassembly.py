"""IP reassembly for decap: tunnel datagrams from their IPv4 or IPv6 fragments, in any order.

Between hosts a tunnel datagram carrying a 1514-byte Ethernet frame is 1542 bytes of IP and is
fragmented on a 1500-byte link; the receiving kernel reassembles it before the relay reads it.
decap (and sniff) do the same so they see what the relay saw. The rules follow Linux:

- a datagram is keyed by (source, destination, identification; IPv4 also protocol); it is
  complete when its last fragment (MF = 0) fixed its length and every byte is covered;
- a fragment lying inside what is already covered is a duplicate and ignored; any other
  overlap abandons the datagram (RFC 5722, Linux since 4.19); so do malformed fragments
  (a non-last fragment not a multiple of 8 bytes, past 65535 bytes, two different ends) and a
  fragment the capture cut short (snaplen);
- a datagram still missing a fragment REASSEMBLY_TIMEOUT_NS (capture time: 30 s for IPv4,
  60 s for IPv6, ipfrag_time) after its first fragment is given up; so is, oldest first, what
  would take the pending fragments past REASSEMBLY_BYTES (4 MiB, ipfrag_high_thresh; down to
  3/4 of it) or the table past REASSEMBLY_DATAGRAMS entries.

An abandoned or completed datagram stays in the table as a tombstone without data, so its later
fragments do not start a second datagram and each loss is counted once; a completed one takes
copies of its fragments (a capture on `any` sees each twice) for DUPLICATE_FRAGMENT_NS, after
which the same key starts a new datagram (the 16-bit IPv4 identification wraps).

tunnelscope/analysis/_scan.c has the same code in C (`reassemble`); keep the two in step.
"""

from __future__ import annotations

from typing import NamedTuple

REASSEMBLY_TIMEOUT_NS = {4: 30_000_000_000, 6: 60_000_000_000}  # ipfrag_time, ip6frag_time
REASSEMBLY_BYTES = 4 << 20  # ipfrag_high_thresh: fragment bytes + FRAGMENT_OVERHEAD each
REASSEMBLY_DATAGRAMS = 4096  # datagrams in the table, tombstones included
FRAGMENT_OVERHEAD = 64  # bytes charged per fragment besides its data
DUPLICATE_FRAGMENT_NS = 1_000_000_000  # a completed datagram's fragments count as copies this long
LOST_REASONS = ("timeout", "incomplete", "evicted", "overlap", "malformed", "snaplen")

LIVE, DONE, DEAD = 0, 1, 2


class Fragment(NamedTuple):
    """One IP fragment of a datagram, as `decap.locate_udp` finds it in a record."""

    key: bytes  # family (4 or 6), source, destination (16 bytes each), identification
    offset: int  # of its data in the datagram's fragmentable part, bytes
    length: int  # of its data, from the IP header
    data: bytes  # what the record holds of it (shorter when cut by the snaplen)
    more: bool  # MF / M: not the last fragment
    header_len: int  # IP header bytes counted against the 65535-byte limit
    next_header: int  # protocol of the fragmentable part (IPv4: 17; IPv6: the first header)


class _Datagram:
    """A datagram being reassembled, or its tombstone (state DONE or DEAD, data freed)."""

    __slots__ = ("state", "first_ts", "done_ts", "total", "top", "have", "covered", "pieces",
                 "charged", "next_header")  # fmt: skip

    def __init__(self, ts: int) -> None:
        self.state = LIVE
        self.first_ts = ts
        self.done_ts = 0
        self.total = 0  # datagram length once the last fragment came, else 0
        self.top = 0  # highest end of a fragment so far
        self.have = 0  # bytes covered
        self.covered = 0  # one bit per 8-byte block
        self.pieces: list[tuple[int, bytes]] = []
        self.charged = 0
        self.next_header = -1


class Reassembler:
    """IP datagrams from their fragments, any order; bounded by time, bytes and entries."""

    def __init__(self) -> None:
        self._table: dict[bytes, _Datagram] = {}  # oldest first
        self.pending_bytes = 0
        self.max_ts = 0
        self.reassembled = 0
        self.duplicate_fragments = 0
        self.lost = dict.fromkeys(LOST_REASONS, 0)

    def add(self, fragment: Fragment, ts: int) -> tuple[bytes, int] | None:
        """The whole fragmentable part and its first header's protocol once `fragment`
        completes its datagram; None while it waits or when it was given up."""
        self.max_ts = max(self.max_ts, ts)
        self._expire()
        table = self._table
        datagram = table.get(fragment.key)
        if datagram is not None and datagram.state == DONE:
            if ts - datagram.done_ts <= DUPLICATE_FRAGMENT_NS and _covers(datagram, fragment):
                self.duplicate_fragments += 1
                return None
            datagram = table[fragment.key] = _Datagram(ts)  # a new datagram, same key
        elif datagram is not None and datagram.state == DEAD:
            return None
        elif datagram is None:
            if len(table) >= REASSEMBLY_DATAGRAMS:
                self._drop_oldest("evicted")
            datagram = table[fragment.key] = _Datagram(ts)
        offset, length = fragment.offset, fragment.length
        end = offset + length
        if len(fragment.data) < length:
            return self._abandon(datagram, "snaplen")
        total = datagram.total
        if fragment.more:  # a multiple of 8 bytes, within a known end
            malformed = length % 8 or (total and end > total)
        else:  # the one end: the same each time, no data beyond it
            malformed = (total and end != total) or end < datagram.top
        if malformed or not length or end + fragment.header_len > 65535:
            return self._abandon(datagram, "malformed")
        if _covers(datagram, fragment):
            self.duplicate_fragments += 1
            return None
        blocks = _blocks(offset, end)
        if datagram.covered & blocks:
            return self._abandon(datagram, "overlap")
        charge = length + FRAGMENT_OVERHEAD
        if self.pending_bytes + charge > REASSEMBLY_BYTES:
            while table and self.pending_bytes + charge > REASSEMBLY_BYTES * 3 // 4:
                self._drop_oldest("evicted")
            if fragment.key not in table:  # it was the oldest: keep its loss counted once
                tombstone = table[fragment.key] = _Datagram(ts)
                tombstone.state = DEAD
                return None
        datagram.pieces.append((offset, fragment.data))
        datagram.covered |= blocks
        datagram.have += length
        datagram.charged += charge
        self.pending_bytes += charge
        datagram.top = max(datagram.top, end)
        if not fragment.more:
            datagram.total = end
        if offset == 0:
            datagram.next_header = fragment.next_header
        if not datagram.total or datagram.have != datagram.total:
            return None
        whole = bytearray(datagram.total)
        for at, data in datagram.pieces:
            whole[at : at + len(data)] = data
        self._free(datagram, DONE)
        datagram.done_ts = ts
        self.reassembled += 1
        return bytes(whole), datagram.next_header

    def finish(self) -> None:
        """End of input: every datagram still missing a fragment is lost."""
        self.lost["incomplete"] += sum(d.state == LIVE for d in self._table.values())
        self._table.clear()
        self.pending_bytes = 0

    def _expire(self) -> None:
        table = self._table
        while table:
            key, datagram = next(iter(table.items()))
            if self.max_ts - datagram.first_ts <= REASSEMBLY_TIMEOUT_NS[key[0]]:
                return
            self._drop_oldest("timeout")

    def _drop_oldest(self, reason: str) -> None:
        datagram = self._table.pop(next(iter(self._table)))
        if datagram.state == LIVE:
            self.lost[reason] += 1
        self._free(datagram, DEAD)

    def _abandon(self, datagram: _Datagram, reason: str) -> None:
        self._free(datagram, DEAD)
        self.lost[reason] += 1

    def _free(self, datagram: _Datagram, state: int) -> None:
        self.pending_bytes -= datagram.charged
        datagram.charged = 0
        datagram.pieces = []
        datagram.state = state


def _blocks(offset: int, end: int) -> int:
    """The 8-byte blocks [offset, end) touches, as bits."""
    first, last = offset >> 3, (end + 7) >> 3
    return ((1 << (last - first)) - 1) << first


def _covers(datagram: _Datagram, fragment: Fragment) -> bool:
    """Every block of `fragment` is covered already (a duplicate)."""
    if not fragment.length:
        return False
    blocks = _blocks(fragment.offset, fragment.offset + fragment.length)
    return datagram.covered & blocks == blocks
