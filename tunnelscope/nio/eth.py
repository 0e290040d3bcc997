"""`eth:IFNAME[@NETNS]`: an existing Linux interface, through an AF_PACKET raw socket.

Every frame the interface receives comes in (the socket puts it in promiscuous mode while
open, so frames for the lab's MAC addresses arrive too); frames we send leave through it.
Frames leaving the interface are not read (PACKET_IGNORE_OUTGOING, and a check of the packet
type for kernels before 4.20): the link carries what arrives from the wire, not what the
host or another program transmits, so nothing loops back into the lab. (The kernel never
hands a socket its own sends.) With offloads on (GRO/TSO) the kernel can hand over frames
bigger than the MTU; switch them off with `ethtool -K IFNAME gro off gso off tso off`.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import socket
import struct
from dataclasses import dataclass

from tunnelscope.nio.netns import parse_ifname_netns, run_in_netns
from tunnelscope.nio.spec import (
    RECV_BUFFER,
    EndpointError,
    EndpointSpec,
    SocketEndpoint,
    tune_buffers,
)

ETH_P_ALL = 0x0003
SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_MR_PROMISC = 1
PACKET_IGNORE_OUTGOING = 23
PACKET_OUTGOING = 4
SO_ATTACH_FILTER = 26
SO_DETACH_FILTER = 27


def parse(text: str, args: str) -> EthSpec:
    return EthSpec(text, *parse_ifname_netns(text, args))


def _open_packet_socket(ifname: str) -> socket.socket:
    # Protocol 0 queues nothing until bind() picks the interface: no frames from elsewhere.
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, 0)
    try:
        with contextlib.suppress(OSError):  # Linux < 4.20: _recv_one filters instead
            sock.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
        tune_buffers(sock)
        sock.setblocking(False)
        sock.bind((ifname, ETH_P_ALL))
        mreq = struct.pack("iHH8s", socket.if_nametoindex(ifname), PACKET_MR_PROMISC, 0, b"")
        sock.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP, mreq)
    except BaseException:
        sock.close()
        raise
    return sock


def attach_filter(sock: socket.socket, program: list[tuple[int, int, int, int]]) -> None:
    """Give the kernel a classic BPF program (code, jt, jf, k) to run on what `sock` receives:
    packets it rejects are never queued. Raises OSError (EINVAL: a program it refuses)."""
    code = ctypes.create_string_buffer(b"".join(struct.pack("HBBI", *i) for i in program))
    fprog = struct.pack("HL", len(program), ctypes.addressof(code))
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


@dataclass(frozen=True)
class EthSpec(EndpointSpec):
    ifname: str
    netns: str | None

    def open(self) -> EthEndpoint:
        try:
            sock = run_in_netns(self.text, self.netns, lambda: _open_packet_socket(self.ifname))
        except OSError as exc:
            raise EndpointError(f"{self.text}: {self._explain(exc)}") from None
        return EthEndpoint(self.text, sock)

    def _explain(self, exc: OSError) -> str:
        if exc.errno in (errno.EPERM, errno.EACCES):
            return "a raw Ethernet socket needs root or CAP_NET_RAW"
        if exc.errno in (errno.ENODEV, errno.ENXIO):
            where = f" in network namespace '{self.netns}'" if self.netns else ""
            return f"no interface named '{self.ifname}'{where}"
        return f"cannot open interface {self.ifname}: {exc.strerror}"


class EthEndpoint(SocketEndpoint):
    def set_filter(self, program: list[tuple[int, int, int, int]] | None) -> None:
        """A classic BPF program (code, jt, jf, k) the kernel runs on what the interface
        hands us, as libpcap's pcap_setfilter does: frames it rejects never arrive. None
        removes it. Frames already queued were read under the old filter."""
        if program is None:
            with contextlib.suppress(OSError):  # ENOENT: there was none
                self.sock.setsockopt(socket.SOL_SOCKET, SO_DETACH_FILTER, 0)
            return
        attach_filter(self.sock, program)

    def _recv_one(self) -> int:
        size, address = self.sock.recvfrom_into(self._buffer, RECV_BUFFER, socket.MSG_TRUNC)
        return -1 if address[2] == PACKET_OUTGOING else size
