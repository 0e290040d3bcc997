"""A built-in demo lab: emulated hosts whose links run through tunnelscope on loopback.

Two PCs on an Ethernet link (ARP, ICMP echo) and two routers on a Cisco HDLC serial link
(SLARP keepalives, ICMP echo over HDLC) behave like the VPCS and dynamips nodes of a real lab:
each end is a UDP tunnel endpoint. No external program is needed, so the demo runs anywhere.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading
import time
from dataclasses import dataclass, field

from scapy.layers.inet import ICMP, IP
from scapy.layers.l2 import ARP, Ether

ETH_IPV4 = 0x0800
ETH_ARP = 0x0806
CHDLC_UNICAST = 0x0F
SLARP = 0x8035
SLARP_KEEPALIVE = 2


def free_udp_ports(count: int) -> list[int]:
    """Ports the kernel just handed out (and released) on 127.0.0.1."""
    sockets = [socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(count)]
    try:
        for sock in sockets:
            sock.bind(("127.0.0.1", 0))
        return [sock.getsockname()[1] for sock in sockets]
    finally:
        for sock in sockets:
            sock.close()


@dataclass
class EmulatedHost:
    """An IPv4 host on one tunnel: answers ARP and pings, sends pings and keepalives.

    `encapsulation` is "ethernet" (frames are Ethernet II, ARP resolves the peer) or "hdlc"
    (Cisco HDLC, SLARP keepalives every `keepalive` seconds, as IOS sends them on serial).
    """

    name: str
    ip: str
    local_port: int
    remote_port: int
    encapsulation: str = "ethernet"
    mac: str = "00:50:79:66:68:00"
    keepalive: float = 0.25
    replies: dict[int, float] = field(default_factory=dict)  # icmp seq -> round trip (s)

    def __post_init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", self.local_port))
        self.sock.connect(("127.0.0.1", self.remote_port))
        self.sock.settimeout(0.05)
        self.peer_mac: str | None = None
        self._sent: dict[int, float] = {}
        self._slarp_sequence = 0
        self._peer_sequence = 0  # the peer's last SLARP mysequence, echoed as yoursequence
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name=self.name, daemon=True)

    def __enter__(self) -> EmulatedHost:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)
        self.sock.close()

    def ping(self, ip: str, count: int, interval: float = 0.1, timeout: float = 1.0) -> list[bool]:
        """Send `count` echo requests; return which got a reply (like VPCS' ping lines)."""
        if self.encapsulation == "ethernet":
            self._resolve(ip, timeout)
        for seq in range(1, count + 1):
            self._sent[seq] = time.monotonic()
            echo = IP(src=self.ip, dst=ip) / ICMP(type=8, id=0x1234, seq=seq) / (b"tunnelscope" * 4)
            self._send_ip(bytes(echo), self.peer_mac or "ff:ff:ff:ff:ff:ff")
            time.sleep(interval)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.replies) < count:
            time.sleep(0.01)
        return [seq in self.replies for seq in range(1, count + 1)]

    def _resolve(self, ip: str, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while self.peer_mac is None and time.monotonic() < deadline:
            arp = Ether(dst="ff:ff:ff:ff:ff:ff", src=self.mac) / ARP(
                op=1, hwsrc=self.mac, psrc=self.ip, pdst=ip
            )
            self._send(bytes(arp).ljust(60, b"\0"))  # padded to 60 bytes, as VPCS does
            time.sleep(0.2)

    def _send(self, frame: bytes) -> None:
        with contextlib.suppress(OSError):  # the bridge may not be up yet: like a real NIO
            self.sock.send(frame)

    def _send_ip(self, packet: bytes, dst_mac: str) -> None:
        if self.encapsulation == "ethernet":
            self._send(bytes(Ether(dst=dst_mac, src=self.mac, type=ETH_IPV4)) + packet)
        else:
            self._send(struct.pack("!BBH", CHDLC_UNICAST, 0, ETH_IPV4) + packet)

    def _send_keepalive(self) -> None:
        self._slarp_sequence += 1
        body = struct.pack(
            "!IIIH", SLARP_KEEPALIVE, self._slarp_sequence, self._peer_sequence, 0xFFFF
        )
        self._send(struct.pack("!BBH", 0x8F, 0, SLARP) + body)

    def _serve(self) -> None:
        next_keepalive = time.monotonic()
        while not self._stop.is_set():
            if self.encapsulation == "hdlc" and time.monotonic() >= next_keepalive:
                self._send_keepalive()
                next_keepalive += self.keepalive
            try:
                frame = self.sock.recv(65535)
            except (TimeoutError, socket.timeout, ConnectionRefusedError):
                continue
            except OSError:
                return
            self._receive(frame)

    def _receive(self, frame: bytes) -> None:
        if self.encapsulation == "ethernet":
            eth = Ether(frame)
            if eth.type == ETH_ARP and ARP in eth:
                self._arp(eth[ARP])
                return
            if eth.type != ETH_IPV4:
                return
            src_mac, packet = eth.src, bytes(eth.payload)
        else:
            protocol = struct.unpack("!H", frame[2:4])[0] if len(frame) >= 4 else 0
            if protocol == SLARP and len(frame) >= 12:
                self._peer_sequence = struct.unpack("!I", frame[8:12])[0]
            if protocol != ETH_IPV4:
                return
            src_mac, packet = "", frame[4:]
        ip = IP(packet)
        if ICMP not in ip or ip.dst != self.ip:
            return
        icmp = ip[ICMP]
        if icmp.type == 8:
            reply = IP(src=self.ip, dst=ip.src) / ICMP(type=0, id=icmp.id, seq=icmp.seq)
            self._send_ip(bytes(reply / icmp.payload), src_mac)
        elif icmp.type == 0 and icmp.seq in self._sent:
            self.replies[icmp.seq] = time.monotonic() - self._sent[icmp.seq]

    def _arp(self, arp: ARP) -> None:
        if arp.op == 1 and arp.pdst == self.ip:
            reply = Ether(dst=arp.hwsrc, src=self.mac) / ARP(
                op=2, hwsrc=self.mac, psrc=self.ip, hwdst=arp.hwsrc, pdst=arp.psrc
            )
            self._send(bytes(reply).ljust(60, b"\0"))
        elif arp.op == 2 and arp.pdst == self.ip:
            self.peer_mac = arp.hwsrc


def serial_samples(count: int = 4) -> dict[str, list[tuple[bool, bytes]]]:
    """PPP and Frame Relay conversations, (sent by the lower port?, frame), as routers send.

    PPP: LCP Configure-Requests with a magic number, then ICMP over IPv4 (FF 03 00 21).
    Frame Relay: ANSI T1.617 Annex D status enquiries on DLCI 0 answered by link-integrity
    status, then ICMP over IETF encapsulation (Q.922 DLCI 100, control 03, NLPID CC).
    """

    def echo(seq: int, reply: bool) -> bytes:
        src, dst = ("10.2.2.2", "10.2.2.1") if reply else ("10.2.2.1", "10.2.2.2")
        return bytes(IP(src=src, dst=dst) / ICMP(type=0 if reply else 8, id=7, seq=seq))

    ppp: list[tuple[bool, bytes]] = []
    frelay: list[tuple[bool, bytes]] = []
    for seq in range(1, count + 1):
        for outbound in (True, False):
            magic = struct.pack("!I", 0x1000 + seq + outbound)
            lcp = struct.pack("!BBH", 1, seq, 10) + bytes([5, 6]) + magic
            ppp.append((outbound, bytes.fromhex("ff03c021") + lcp))
            ppp.append((outbound, bytes.fromhex("ff030021") + echo(seq, not outbound)))
        enquiry = bytes.fromhex("0001030800759501010103 02") + bytes([seq, seq - 1])
        status = bytes.fromhex("00010308007d 950101 0103 02") + bytes([seq, seq])
        frelay.append((True, enquiry))
        frelay.append((False, status))
        frelay.append((True, bytes.fromhex("184103cc") + echo(seq, False)))
        frelay.append((False, bytes.fromhex("184103cc") + echo(seq, True)))
    return {"ppp": ppp, "fr": frelay}


def write_host_capture(path: str, links: dict[tuple[int, int], list[tuple[bool, bytes]]]) -> int:
    """A loopback capture as `tcpdump -i lo -w` writes it, holding the given tunnels.

    Each link is (lower port, higher port); frames go lower -> higher when `outbound`. A DNS
    query is mixed in: decap must leave it out.
    """
    from scapy.layers.dns import DNS, DNSQR
    from scapy.layers.inet import UDP

    from tunnelscope.formats.capture import CaptureWriter, Format

    writer = CaptureWriter.open(path, Format())
    interface = writer.add_interface(1, "lo")
    ts = 1_700_000_000_000_000_000
    mac = "00:00:00:00:00:00"

    def datagram(sport: int, dport: int, payload: bytes) -> bytes:
        outer = Ether(src=mac, dst=mac) / IP(src="127.0.0.1", dst="127.0.0.1")
        return bytes(outer / UDP(sport=sport, dport=dport) / payload)

    written = 0
    for (low, high), frames in links.items():
        for outbound, frame in frames:
            ports = (low, high) if outbound else (high, low)
            ts += 1_000_000
            writer.write(interface, ts, datagram(*ports, frame))
            written += 1
    query = bytes(DNS(rd=1, qd=DNSQR(qname="gns3.com")))
    writer.write(interface, ts + 1_000_000, datagram(40000, 53, query))
    writer.close()
    return written
