"""Write the reference captures: one file per tunnel link type and a mixed pcapng.

    python captures/make_captures.py [OUTDIR]      (default: this folder)

Frames come from scapy where it has the layers (Ethernet, 802.1Q/802.1ad, IPv4/IPv6, ARP,
ICMP, UDP, TCP, PPP and its control protocols, CDP) and are built by hand where it has none
(Cisco HDLC, SLARP, Frame Relay, LMI). Timestamps are fixed, so the files are reproducible
byte for byte; tests/test_captures.py checks that, and what tshark decodes from them.
`FRAMES` is importable: tests and demos reuse the frames without the files.
"""

from __future__ import annotations

import socket
import struct
import sys
from pathlib import Path
from typing import NamedTuple

from scapy.contrib.cdp import (
    CDPMsgCapabilities,
    CDPMsgDeviceID,
    CDPMsgPlatform,
    CDPMsgPortID,
    CDPMsgSoftwareVersion,
    CDPv2_HDR,
)
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import IPv6
from scapy.layers.l2 import ARP, LLC, SNAP, Dot1AD, Dot1Q, Dot3, Ether
from scapy.layers.ppp import (
    HDLC,
    PPP,
    PPP_IPCP,
    PPP_CHAP_ChallengeResponse,
    PPP_IPCP_Option_IPAddress,
    PPP_LCP_Configure,
    PPP_LCP_Echo,
    PPP_LCP_Magic_Number_Option,
    PPP_LCP_MRU_Option,
    PPP_PAP_Request,
)
from scapy.packet import Packet

from tunnelscope.formats.capture import CaptureWriter, Format
from tunnelscope.formats.linktype import LinkType
from tunnelscope.formats.packet import Direction

HERE = Path(__file__).resolve().parent
START_NS = 1_700_000_000_000_000_000  # 2023-11-14 22:13:20 UTC
STEP_NS = 250_000_000  # a frame every 250 ms

R1_MAC, R2_MAC = "c2:01:0b:ad:00:00", "c2:02:0b:ad:00:00"
BROADCAST = "ff:ff:ff:ff:ff:ff"
CDP_MULTICAST = "01:00:0c:cc:cc:cc"


def _icmp_echo(src: str, dst: str, reply: bool = False) -> Packet:
    """An IPv4 ping as IOS sends it (100 bytes: 72 bytes of abcd pattern after the headers)."""
    icmp = ICMP(type=0 if reply else 8, id=0x1234, seq=1)
    return IP(src=src, dst=dst, id=1) / icmp / (b"\xab\xcd" * 36)


def _cdp(device: str, port: str) -> Packet:
    return CDPv2_HDR(
        vers=2,
        ttl=180,
        msg=[
            CDPMsgDeviceID(val=device.encode()),
            CDPMsgSoftwareVersion(val=b"Cisco IOS Software, 7200 Software, 15.2(4)S7"),
            CDPMsgPlatform(val=b"Cisco 7206VXR"),
            CDPMsgPortID(iface=port.encode()),
            CDPMsgCapabilities(cap=0x01),  # router
        ],
    )


def ethernet_frames() -> list[bytes]:
    """ARP (unpadded as from a TAP, padded to 60 as from VPCS), ping, VLANs, IPv6, CDP."""
    arp_request = Ether(dst=BROADCAST, src=R1_MAC) / ARP(
        op=1, hwsrc=R1_MAC, psrc="10.0.0.1", hwdst="00:00:00:00:00:00", pdst="10.0.0.2"
    )
    arp_reply = Ether(dst=R1_MAC, src=R2_MAC) / ARP(
        op=2, hwsrc=R2_MAC, psrc="10.0.0.2", hwdst=R1_MAC, pdst="10.0.0.1"
    )
    to_r2 = Ether(dst=R2_MAC, src=R1_MAC)
    return [
        bytes(arp_request),
        bytes(arp_reply).ljust(60, b"\0"),
        bytes(to_r2 / _icmp_echo("10.0.0.1", "10.0.0.2")),
        bytes(Ether(dst=R1_MAC, src=R2_MAC) / _icmp_echo("10.0.0.2", "10.0.0.1", reply=True)),
        bytes(
            to_r2
            / Dot1Q(prio=5, vlan=10)
            / IP(src="10.10.0.1", dst="10.10.0.2", id=7)
            / UDP(sport=10001, dport=10002)
            / b"tunnelscope"
        ),
        # QinQ, 802.1ad: S-tag 100 (0x88a8), C-tag 20 (0x8100)
        bytes(to_r2 / Dot1AD(vlan=100) / Dot1Q(vlan=20) / _icmp_echo("10.20.0.1", "10.20.0.2")),
        # QinQ, pre-standard outer tag 0x9100 over a 0x8100 tag
        bytes(
            Ether(dst=R2_MAC, src=R1_MAC, type=0x9100)
            / Dot1Q(vlan=200)
            / Dot1Q(vlan=30)
            / _icmp_echo("10.30.0.1", "10.30.0.2")
        ),
        bytes(
            to_r2
            / IPv6(src="2001:db8::1", dst="2001:db8::2", hlim=64)
            / TCP(sport=40000, dport=179, flags="S", seq=1000, window=16384)
        ),
        bytes(
            Dot3(dst=CDP_MULTICAST, src=R1_MAC)
            / LLC(dsap=0xAA, ssap=0xAA, ctrl=3)
            / SNAP(OUI=0x00000C, code=0x2000)
            / _cdp("R1", "FastEthernet0/0")
        ),
    ]


# Cisco HDLC: address (0x0F unicast, 0x8F broadcast), control 0x00, ethertype u16
CHDLC_UNICAST, CHDLC_BROADCAST = 0x0F, 0x8F
ETHERTYPE_IP, ETHERTYPE_SLARP, ETHERTYPE_CDP = 0x0800, 0x8035, 0x2000


def chdlc(address: int, ethertype: int, payload: bytes) -> bytes:
    return struct.pack("!BBH", address, 0x00, ethertype) + payload


# SLARP (18 bytes, as IOS and Linux hdlc_cisco send it):
#   code u32 (0 request, 1 reply, 2 keepalive)
#   request/reply: address u32, mask u32    keepalive: mysequence u32, yoursequence u32
#   reliability u16 (0xFFFF), uptime u32 (ms; keepalives only, 0 otherwise)
SLARP_REQUEST, SLARP_REPLY, SLARP_KEEPALIVE = 0, 1, 2


def slarp(code: int, first: int, second: int, uptime_ms: int = 0) -> bytes:
    return chdlc(
        CHDLC_BROADCAST,
        ETHERTYPE_SLARP,
        struct.pack("!IIIHI", code, first, second, 0xFFFF, uptime_ms),
    )


def _ipv4(text: str) -> int:
    return struct.unpack("!I", socket.inet_aton(text))[0]


def chdlc_frames() -> list[bytes]:
    """SLARP address resolution, keepalives from both ends, a ping, CDP."""
    return [
        slarp(SLARP_REQUEST, 0, 0),
        slarp(SLARP_REPLY, _ipv4("10.1.1.1"), _ipv4("255.255.255.252")),
        slarp(SLARP_KEEPALIVE, 1, 0, 10_000),  # R1: mine 1, yours 0
        slarp(SLARP_KEEPALIVE, 1, 1, 10_020),  # R2: mine 1, yours 1
        slarp(SLARP_KEEPALIVE, 2, 1, 20_000),  # R1: mine 2, yours 1
        chdlc(CHDLC_UNICAST, ETHERTYPE_IP, bytes(_icmp_echo("10.1.1.1", "10.1.1.2"))),
        chdlc(CHDLC_UNICAST, ETHERTYPE_IP, bytes(_icmp_echo("10.1.1.2", "10.1.1.1", reply=True))),
        chdlc(CHDLC_BROADCAST, ETHERTYPE_CDP, bytes(_cdp("R1", "Serial1/0"))),
    ]


def ppp_frames() -> list[bytes]:
    """LCP negotiation and echo, PAP, CHAP, IPCP, then IPv4 (HDLC-like framing, FF 03)."""
    hdlc = HDLC(address=0xFF, control=0x03)
    lcp_options = [
        PPP_LCP_MRU_Option(max_recv_unit=1500),
        PPP_LCP_Magic_Number_Option(magic_number=0x0BADCAFE),
    ]
    return [
        bytes(hdlc / PPP(proto=0xC021) / PPP_LCP_Configure(code=1, id=1, options=lcp_options)),
        bytes(hdlc / PPP(proto=0xC021) / PPP_LCP_Configure(code=2, id=1, options=lcp_options)),
        bytes(hdlc / PPP(proto=0xC021) / PPP_LCP_Echo(code=9, id=2, magic_number=0x0BADCAFE)),
        bytes(hdlc / PPP(proto=0xC023) / PPP_PAP_Request(id=1, username=b"R1", password=b"lab")),
        bytes(
            hdlc
            / PPP(proto=0xC223)
            / PPP_CHAP_ChallengeResponse(code=1, id=1, value=bytes(range(16)), optional_name=b"R2")
        ),
        bytes(
            hdlc
            / PPP(proto=0x8021)
            / PPP_IPCP(code=1, id=1, options=[PPP_IPCP_Option_IPAddress(data="10.2.2.1")])
        ),
        bytes(hdlc / PPP(proto=0x0021) / _icmp_echo("10.2.2.1", "10.2.2.2")),
    ]


def q922(dlci: int, fecn: bool = False, becn: bool = False, de: bool = False) -> bytes:
    """The 2-byte Q.922 address.

    byte 0: DLCI bits 9-4 (6 bits), C/R, EA=0
    byte 1: DLCI bits 3-0 (4 bits), FECN, BECN, DE, EA=1
    """
    return bytes(
        [
            (dlci >> 4) << 2,
            (dlci & 0xF) << 4 | fecn << 3 | becn << 2 | de << 1 | 1,
        ]
    )


# LMI messages: address, control 0x03 (UI), protocol discriminator (0x08 Q.933, 0x09 Cisco),
# call reference 0x00, message type (0x75 status enquiry, 0x7D status), then elements.
#   ANSI T1.617 Annex D (DLCI 0): locking shift 0x95, report type 0x01, link integrity 0x03,
#                                 PVC status 0x07
#   ITU Q.933 Annex A (DLCI 0):  report type 0x51, link integrity 0x53, PVC status 0x57
#   Cisco LMI (DLCI 1023):       as ANSI without the locking shift; PVC status is 6 bytes
# report type: 0 full status, 1 link integrity only; link integrity: send seq, receive seq.
# PVC status: DLCI bits 9-4 | 1, DLCI bits 3-0 << 3 | 1 ext, new 0x08 | active 0x02
LMI_ENQUIRY, LMI_STATUS = 0x75, 0x7D
FULL_STATUS, LINK_INTEGRITY = 0, 1


class Dialect(NamedTuple):
    dlci: int
    discriminator: int
    shift: bytes  # ANSI's locking shift to codeset 5
    report_id: int
    integrity_id: int
    pvc_id: int
    bandwidth: bool  # Cisco's PVC status carries 3 bytes of bandwidth


ANSI = Dialect(0, 0x08, b"\x95", 0x01, 0x03, 0x07, False)
Q933 = Dialect(0, 0x08, b"", 0x51, 0x53, 0x57, False)
CISCO = Dialect(1023, 0x09, b"", 0x01, 0x03, 0x07, True)


def lmi(
    dialect: Dialect,
    message: int,
    report: int,
    send_seq: int,
    receive_seq: int,
    pvcs: tuple[int, ...] = (),
) -> bytes:
    frame = q922(dialect.dlci) + bytes([0x03, dialect.discriminator, 0x00, message])
    frame += dialect.shift + bytes([dialect.report_id, 1, report])
    frame += bytes([dialect.integrity_id, 2, send_seq, receive_seq])
    for dlci in pvcs:
        status = bytes([(dlci >> 4) & 0x3F, 0x80 | (dlci & 0xF) << 3, 0x82])  # active
        if dialect.bandwidth:
            status += b"\x00\x00\x00"
        frame += bytes([dialect.pvc_id, len(status)]) + status
    return frame


def frelay_frames() -> list[bytes]:
    """LMI in the three dialects, then IPv4 in both encapsulations and bridged Ethernet."""
    bridged = bytes(Ether(dst=BROADCAST, src=R1_MAC) / ARP(psrc="10.3.3.1", pdst="10.3.3.2"))
    return [
        # REFERENCE.md section 2: 00 01 03 08 00 75 95 01 01 01 03 02 <ssn> <rsn>
        lmi(ANSI, LMI_ENQUIRY, LINK_INTEGRITY, 1, 0),
        lmi(ANSI, LMI_STATUS, LINK_INTEGRITY, 1, 1),
        lmi(ANSI, LMI_ENQUIRY, FULL_STATUS, 2, 1),
        lmi(ANSI, LMI_STATUS, FULL_STATUS, 2, 2, pvcs=(100, 200, 300)),
        lmi(Q933, LMI_ENQUIRY, FULL_STATUS, 5, 4),
        lmi(Q933, LMI_STATUS, FULL_STATUS, 5, 5, pvcs=(102, 201)),
        lmi(CISCO, LMI_ENQUIRY, FULL_STATUS, 7, 6),
        lmi(CISCO, LMI_STATUS, FULL_STATUS, 7, 7, pvcs=(110,)),
        # Cisco encapsulation: address, ethertype
        q922(100) + struct.pack("!H", ETHERTYPE_IP) + bytes(_icmp_echo("10.3.1.1", "10.3.1.2")),
        q922(100, becn=True)
        + struct.pack("!H", ETHERTYPE_IP)
        + bytes(_icmp_echo("10.3.1.2", "10.3.1.1", reply=True)),
        # IETF (RFC 2427): address, control 0x03, NLPID 0xCC (IPv4)
        q922(200, fecn=True, de=True) + b"\x03\xcc" + bytes(_icmp_echo("10.3.2.1", "10.3.2.2")),
        # IETF SNAP: address, 0x03, pad 0x00, NLPID 0x80, OUI 00-80-C2, PID 0x0007 (bridged
        # Ethernet without FCS)
        q922(300) + b"\x03\x00\x80\x00\x80\xc2\x00\x07" + bridged,
    ]


FRAMES: dict[LinkType, list[bytes]] = {
    LinkType.ETHERNET: ethernet_frames(),
    LinkType.C_HDLC: chdlc_frames(),
    LinkType.PPP_SERIAL: ppp_frames(),
    LinkType.FRELAY: frelay_frames(),
}

FILES = {
    LinkType.ETHERNET: "ethernet.pcap",
    LinkType.C_HDLC: "chdlc.pcap",
    LinkType.PPP_SERIAL: "ppp.pcap",
    LinkType.FRELAY: "frelay.pcap",
}
MIXED = "mixed.pcapng"
# mixed.pcapng: one interface per link type, named as a GNS3 link would be
INTERFACES = {
    LinkType.ETHERNET: ("R1 f0/0 - SW1 e1", "udp 10000 <-> 10001, ethernet"),
    LinkType.C_HDLC: ("R1 s1/0 - R2 s1/0", "udp 10002 <-> 10003, cisco hdlc"),
    LinkType.PPP_SERIAL: ("R2 s1/1 - R3 s1/1", "udp 10004 <-> 10005, ppp"),
    LinkType.FRELAY: ("R3 s1/2 - FR1 port 1", "udp 10006 <-> 10007, frame relay"),
}
MIXED_DROPS = {LinkType.ETHERNET: 0, LinkType.C_HDLC: 3, LinkType.PPP_SERIAL: 0, LinkType.FRELAY: 1}
MIXED_COMMENT = "dropped by packet_loss"


def write_all(outdir: Path = HERE) -> list[Path]:
    outdir.mkdir(parents=True, exist_ok=True)
    paths = []
    for linktype, name in FILES.items():
        writer = CaptureWriter.open(str(outdir / name), Format())
        writer.add_interface(linktype, name)
        for number, frame in enumerate(FRAMES[linktype]):
            writer.write(0, START_NS + number * STEP_NS, frame)
        writer.close()
        paths.append(outdir / name)

    writer = CaptureWriter.open(str(outdir / MIXED), Format(pcapng=True))
    for linktype, (name, description) in INTERFACES.items():
        writer.add_interface(linktype, name, description)
    # the first three frames of each link, interleaved; even frames leave R1's side
    for number in range(3):
        for interface, linktype in enumerate(INTERFACES):
            writer.write(
                interface,
                START_NS + (number * len(INTERFACES) + interface) * STEP_NS,
                FRAMES[linktype][number],
                Direction.OUTBOUND if number % 2 == 0 else Direction.INBOUND,
                MIXED_COMMENT if (number, linktype) == (1, LinkType.C_HDLC) else None,
            )
    end_ns = START_NS + 3 * len(INTERFACES) * STEP_NS
    for interface, linktype in enumerate(INTERFACES):
        drops = MIXED_DROPS[linktype]
        writer.write_statistics(interface, end_ns, drops, f"packet_loss={drops}" if drops else "")
    writer.close()
    paths.append(outdir / MIXED)
    return paths


if __name__ == "__main__":
    for path in write_all(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE):
        print(path)
