"""The passive live tap: lab tunnels straight off an interface, decapsulated as they pass.

Why: `decap` needs a host capture first; `sniff` reads the same packets live and feeds them to
decap's own machinery (tunnel discovery, per-link link type, ports, dedupe, reassembly), so
both give the same frames. The lab is never touched: nothing is relayed, no port is bound.

How it keeps up with a saturated link at about tcpdump's cost: like libpcap, it reads a
PACKET_MMAP TPACKET_V3 ring. The kernel writes packets into blocks of memory it shares with
us and hands a block over when it is full or RETIRE_MS after it was opened (a quiet link still
flushes); the decap scanner walks the block in place (`Scanner.scan_tpacket3`: no system call
and no Python per packet) and the block goes back to the kernel. A kernel socket filter
(classic BPF that libpcap compiles from the tunnel ports) keeps other traffic out of the ring;
it lets every IP fragment through (the ports are in the first fragment only) and looks behind
one or two VLAN tags. When every block is full the kernel drops packets and counts them
(PACKET_STATISTICS, tcpdump's "dropped by kernel"); a bigger ring (`buffer_kib`, tcpdump's -B)
absorbs longer bursts.

On loopback the kernel shows a packet to packet sockets twice (leaving and arriving);
PACKET_IGNORE_OUTGOING keeps one copy, as libpcap does. Timestamps are the kernel's, in ns: with
SO_TIMESTAMPNS on, the time each packet arrived (skb->tstamp), which every other tap on the
host sees too, rather than the time the ring's tap ran.
"""

from __future__ import annotations

import contextlib
import mmap
import select
import socket
import struct
import threading
import time
from collections.abc import Iterable, Iterator

from tunnelscope.analysis.decap import Decap, Options, Summary
from tunnelscope.datapath.bpf import FilterError, Program, compile_filter
from tunnelscope.formats.linktype import LinkType
from tunnelscope.nio.eth import attach_filter

ETH_P_ALL = 0x0003
SOL_PACKET = 263
# linux/if_packet.h
PACKET_RX_RING, PACKET_STATISTICS, PACKET_VERSION, PACKET_IGNORE_OUTGOING = 5, 6, 10, 23
TPACKET_V3 = 2
TP_STATUS_KERNEL, TP_STATUS_USER = 0, 1
BLOCK_STATUS = 8  # offset of block_status in struct tpacket_block_desc
ARPHRD_ETHER, ARPHRD_LOOPBACK = 1, 772
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
DLT_RAW = 12  # what libpcap calls LINKTYPE_RAW (101) when it compiles
MAX_PORT_TERMS = 150  # about 23 instructions each: within the kernel's 4096 per program

BLOCK_SIZE = 256 << 10  # holds any frame (loopback's MTU is 65536) and ~1300 small ones
RETIRE_MS = 20  # a block holding packets is handed over at the latest this long after it opened
DEFAULT_BUFFER_KIB = 2048  # tcpdump's default
POLL = 0.2  # seconds between checks of the stop conditions while idle
DRAIN = 3 * RETIRE_MS / 1000  # after a stop: time for the block being filled to be handed over


class SniffError(Exception):
    """The interface cannot be sniffed: one line of text."""


class PacketRing:
    """An interface's packets in a TPACKET_V3 ring of `buffer_kib` KiB (whole blocks, at least
    two), only tunnel traffic of `ports` (all UDP when None) and IP fragments.

    Ethernet-like interfaces (loopback included) give Ethernet frames; others (tun, ppp) give
    their IP packets (`linktype` RAW). `blocks()` ends once `stop()` was called or `deadline`
    (time.monotonic) passed; `kernel_drops` is valid after `close()`.
    """

    def __init__(
        self,
        interface: str = "lo",
        buffer_kib: int = DEFAULT_BUFFER_KIB,
        ports: frozenset[int] | None = None,
        deadline: float | None = None,
    ) -> None:
        self.interface = interface
        self.deadline = deadline
        self.block_count = max(2, -(-buffer_kib * 1024 // BLOCK_SIZE))
        self.size_kib = self.block_count * BLOCK_SIZE >> 10
        self.kernel_drops = 0  # packets the ring had no room for (tcpdump's "dropped")
        self.ring_full = 0  # times the kernel found every block full (tp_freeze_q_cnt)
        self._stopped = threading.Event()
        self.sock, self.linktype = _open(interface)
        try:
            self._map = _map_ring(self.sock, self.block_count)
        except OSError as exc:
            self.sock.close()
            message = f"cannot map a {self.size_kib} KiB ring: {exc.strerror or exc}"
            raise SniffError(message) from None
        self._view = memoryview(self._map)
        try:
            program = capture_program(ports, self.linktype)
            if program is not None:
                attach_filter(self.sock, program)
            self.sock.bind((interface, ETH_P_ALL))  # packets flow from here on
        except OSError as exc:
            self._unmap()
            raise SniffError(f"cannot sniff {interface}: {exc.strerror or exc}") from None
        self._poll = select.poll()
        self._poll.register(self.sock, select.POLLIN | select.POLLERR)
        self._next = 0  # the block the kernel hands over next

    def stop(self) -> None:
        """Safe from signal handlers and other threads."""
        self._stopped.set()

    def blocks(self) -> Iterator[memoryview]:
        """Each block as the kernel hands it over, in ring order; it goes back to the kernel
        when the next one is asked for. After a stop, blocks still come for DRAIN seconds:
        the one being filled is handed over within that time, so nothing captured is lost."""
        drain_until: float | None = None
        while True:
            now = time.monotonic()
            if drain_until is None and self._done(now):
                drain_until = now + DRAIN
            if drain_until is not None and now >= drain_until:
                return
            offset = self._next * BLOCK_SIZE
            if struct.unpack_from("=I", self._map, offset + BLOCK_STATUS)[0] & TP_STATUS_USER:
                with self._view[offset : offset + BLOCK_SIZE] as block:
                    yield block
                struct.pack_into("=I", self._map, offset + BLOCK_STATUS, TP_STATUS_KERNEL)
                self._next = (self._next + 1) % self.block_count
                continue
            until = drain_until or self.deadline
            wait = POLL if until is None else min(POLL, until - now)
            self._poll.poll(max(wait, 0) * 1000)

    def _done(self, now: float) -> bool:
        return self._stopped.is_set() or (self.deadline is not None and now >= self.deadline)

    def close(self) -> None:
        """Count what the kernel dropped, then give the ring and the socket back."""
        with contextlib.suppress(OSError):
            stats = self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 12)
            _, drops, freezes = struct.unpack("=III", stats)
            self.kernel_drops += drops
            self.ring_full += freezes
        self._unmap()

    def _unmap(self) -> None:
        self._view.release()
        self._map.close()
        self.sock.close()


def _open(interface: str) -> tuple[socket.socket, LinkType]:
    """A packet socket bound to `interface` with protocol 0: no packets until the ring is set."""
    try:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    except PermissionError:
        raise SniffError(
            "sniffing needs CAP_NET_RAW (run as root, or: sudo setcap cap_net_raw+ep PYTHON)"
        ) from None
    except OSError as exc:
        raise SniffError(f"cannot open a packet socket: {exc.strerror or exc}") from None
    try:
        sock.bind((interface, 0))
        hatype = sock.getsockname()[3]
        if hatype not in (ARPHRD_ETHER, ARPHRD_LOOPBACK):  # no Ethernet header: take IP
            sock.close()
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, 0)
            sock.bind((interface, 0))
        if hatype == ARPHRD_LOOPBACK:
            sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)  # arrival times, not ring times
    except OSError as exc:
        sock.close()
        raise SniffError(f"cannot sniff {interface}: {exc.strerror or exc}") from None
    linktype = LinkType.ETHERNET if hatype in (ARPHRD_ETHER, ARPHRD_LOOPBACK) else LinkType.RAW
    return sock, linktype


def _map_ring(sock: socket.socket, block_count: int) -> mmap.mmap:
    sock.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3)
    # struct tpacket_req3: block size and number, frame size and number (V3 packs packets
    # of any size into a block; the kernel only checks frames_per_block * blocks), retire
    # timeout, private area size, features
    request = struct.pack("=7I", BLOCK_SIZE, block_count, BLOCK_SIZE, block_count, RETIRE_MS, 0, 0)
    sock.setsockopt(SOL_PACKET, PACKET_RX_RING, request)
    flags = mmap.PROT_READ | mmap.PROT_WRITE
    return mmap.mmap(sock.fileno(), block_count * BLOCK_SIZE, mmap.MAP_SHARED, flags)


def capture_program(ports: frozenset[int] | None, linktype: LinkType) -> Program | None:
    """The kernel's filter: UDP of `ports` (any UDP when None: decap's own rules decide),
    every IPv4 fragment, IPv6 packets whose UDP header may follow extension headers or a
    fragment header, and on Ethernet the same behind one or two VLAN tags. More disjoint
    ports than the kernel's limit on program length allows: any UDP. None without libpcap
    (the scanner filters anyway)."""
    terms = _port_terms(ports) if ports else []
    expression = _filter_expression(terms if len(terms) <= MAX_PORT_TERMS else [], linktype)
    try:
        return compile_filter(expression, 1 if linktype == LinkType.ETHERNET else DLT_RAW)
    except FilterError:
        return None


def _filter_expression(port_terms: list[str], linktype: LinkType) -> str:
    udp = f"udp and ({' or '.join(port_terms)})" if port_terms else "udp"
    ipv6_more = " or ".join(f"ip6[6] == {header}" for header in (0, 43, 44, 60))
    ip = f"({udp}) or (ip and ip[6:2] & 0x3fff != 0) or (ip6 and ({ipv6_more}))"
    if linktype != LinkType.ETHERNET:
        return ip
    return f"{ip} or (vlan and ({ip} or (vlan and ({ip}))))"  # each vlan moves what follows


def _port_terms(ports: Iterable[int]) -> list[str]:
    """`port P` and `portrange P-Q` terms covering exactly `ports`."""
    terms: list[str] = []
    ordered = sorted(ports)
    start = previous = ordered[0]
    for port in [*ordered[1:], -1]:
        if port == previous + 1:
            previous = port
            continue
        terms.append(f"port {start}" if start == previous else f"portrange {start}-{previous}")
        start = previous = port
    return terms


class Sniffer:
    """One live run: `ring` in, decap's output (a pcapng, or one pcap per link) out.

    `count`: stop once that many tunnel frames were written.
    """

    def __init__(
        self,
        ring: PacketRing,
        output: str | None,
        split_dir: str | None,
        options: Options,
        count: int | None = None,
    ) -> None:
        self.ring = ring
        self.count = count
        self.job = Decap(output, split_dir, options)

    def run(self) -> Summary:
        """Until the ring ends or the count is reached; CaptureError when the output cannot
        be written. The ring is closed after, its kernel drop count final."""
        try:
            with contextlib.closing(self.ring.blocks()) as blocks:
                return self.job.run_blocks(blocks, self.ring.linktype, self.count)
        finally:
            self.ring.close()
