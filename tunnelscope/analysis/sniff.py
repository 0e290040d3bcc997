"""The passive live tap: lab tunnels straight off an interface, decapsulated as they pass.

Why: `decap` needs a host capture first; `sniff` reads the same packets live from an
AF_PACKET socket and feeds them, as a pcap byte stream, to decap's own machinery (tunnel
discovery, per-link link type, ports, dedupe), so both give the same frames. The lab is never
touched: nothing is relayed, no port is bound.

On loopback the kernel shows a packet to packet sockets twice (leaving and arriving);
PACKET_IGNORE_OUTGOING keeps one copy, as libpcap does. Timestamps are the kernel's
(SO_TIMESTAMPNS).
"""

from __future__ import annotations

import contextlib
import select
import socket
import struct
import threading
import time
from collections.abc import Callable

from tunnelscope.analysis.decap import Decap, Options, Summary
from tunnelscope.formats import pcap
from tunnelscope.formats.linktype import LinkType

ETH_P_ALL = 0x0003
SOL_PACKET, PACKET_IGNORE_OUTGOING = 263, 23  # linux/socket.h, linux/if_packet.h (Linux 4.20)
PACKET_STATISTICS = 6  # struct tpacket_stats {u32 tp_packets, tp_drops}, reset by each read
SO_TIMESTAMPNS = getattr(socket, "SO_TIMESTAMPNS", 35)
ARPHRD_ETHER, ARPHRD_LOOPBACK = 1, 772
SNAPLEN = 262144
POLL = 0.2  # seconds between checks of the stop conditions while idle


class SniffError(Exception):
    """The interface cannot be sniffed: one line of text."""


class PacketSource:
    """An interface read as a pcap stream (nanosecond records), what `Decap.run` reads.

    Ethernet-like interfaces (loopback included) give Ethernet frames; others (tun, ppp) give
    their IP packets, written as raw IP. `readinto` blocks until packets arrive and returns 0
    once `stop()` was called or `deadline` (time.monotonic) passed.
    """

    def __init__(self, interface: str = "lo", deadline: float | None = None) -> None:
        self.interface = interface
        self.deadline = deadline
        self.until: Callable[[], bool] | None = None  # another reason to stop (a frame count)
        self.packets = 0
        self.kernel_drops = 0  # packets the socket buffer had no room for (tcpdump's "dropped")
        self._stopped = threading.Event()
        self.sock, linktype = _open(interface)
        self._pending = bytearray(pcap.global_header(linktype, SNAPLEN, nanosecond=True))

    def stop(self) -> None:
        """Safe from signal handlers and other threads."""
        self._stopped.set()

    def close(self) -> None:
        self._count_kernel_drops()
        self.sock.close()

    def _count_kernel_drops(self) -> None:
        with contextlib.suppress(OSError):
            stats = self.sock.getsockopt(SOL_PACKET, PACKET_STATISTICS, 8)
            self.kernel_drops += struct.unpack("II", stats)[1]

    def read(self, size: int) -> bytes:
        """Only for the capture header (read_capture reads it this way)."""
        data = bytes(self._pending[:size])
        del self._pending[:size]
        return data

    def readinto(self, buffer: memoryview) -> int:
        while not self._pending:
            if self._done():
                return 0
            wait = POLL if self.deadline is None else min(POLL, self.deadline - time.monotonic())
            readable, _, _ = select.select([self.sock], [], [], max(wait, 0))
            if readable:
                self._drain(len(buffer))
        size = min(len(buffer), len(self._pending))
        buffer[:size] = self._pending[:size]
        del self._pending[:size]
        return size

    def _done(self) -> bool:
        if self.deadline is not None and time.monotonic() >= self.deadline:
            return True
        return self._stopped.is_set() or (self.until is not None and self.until())

    def _drain(self, limit: int) -> None:
        """Turn every waiting packet (up to about `limit` bytes) into pcap records."""
        while len(self._pending) < limit:
            try:
                data, ancillary, _, _ = self.sock.recvmsg(SNAPLEN, 64, socket.MSG_DONTWAIT)
            except BlockingIOError:
                return
            ts = time.time_ns()
            for level, kind, value in ancillary:
                if level == socket.SOL_SOCKET and kind == SO_TIMESTAMPNS and len(value) >= 16:
                    seconds, nanoseconds = struct.unpack("qq", value[:16])
                    ts = seconds * 1_000_000_000 + nanoseconds
            self._pending += pcap.record(ts, data, len(data), nanosecond=True)
            self.packets += 1


def _open(interface: str) -> tuple[socket.socket, LinkType]:
    try:
        sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
    except PermissionError:
        raise SniffError(
            "sniffing needs CAP_NET_RAW (run as root, or: sudo setcap cap_net_raw+ep PYTHON)"
        ) from None
    except OSError as exc:
        raise SniffError(f"cannot open a packet socket: {exc.strerror or exc}") from None
    try:
        sock.bind((interface, ETH_P_ALL))
        hatype = sock.getsockname()[3]
        if hatype not in (ARPHRD_ETHER, ARPHRD_LOOPBACK):  # no Ethernet header: take IP
            sock.close()
            sock = socket.socket(socket.AF_PACKET, socket.SOCK_DGRAM, socket.htons(ETH_P_ALL))
            sock.bind((interface, ETH_P_ALL))
        if hatype == ARPHRD_LOOPBACK:
            sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        sock.setsockopt(socket.SOL_SOCKET, SO_TIMESTAMPNS, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8 << 20)
    except OSError as exc:
        sock.close()
        raise SniffError(f"cannot sniff {interface}: {exc.strerror or exc}") from None
    linktype = LinkType.ETHERNET if hatype in (ARPHRD_ETHER, ARPHRD_LOOPBACK) else LinkType.RAW
    return sock, linktype


class Sniffer:
    """One live run: `source` in, decap's output (a pcapng, or one pcap per link) out.

    `count`: stop once that many tunnel frames were written.
    """

    def __init__(
        self,
        source: PacketSource,
        output: str | None,
        split_dir: str | None,
        options: Options,
        count: int | None = None,
    ) -> None:
        self.source = source
        self.job = job = Decap(output, split_dir, options)
        if count is not None:
            source.until = lambda: job.frames_written() >= count

    def run(self) -> Summary:
        """Until the source ends; CaptureError when the output cannot be written."""
        try:
            return self.job.run(self.source, live=True)  # type: ignore[arg-type]
        finally:
            self.source.close()
