"""Write the reference captures: one file per tunnel link type, a mixed pcapng, and one
routing capture per encapsulation (routing-*.pcap).

    python captures/make_captures.py [OUTDIR]      (default: this folder)

Frames come from scapy where it has the layers (Ethernet, 802.1Q/802.1ad, IPv4/IPv6, ARP,
ICMP, UDP, TCP, PPP and its control protocols, CDP, OSPF, EIGRP, BGP, RIP, LDP, IS-IS, HSRP,
VRRP) and are built by hand where it has none (Cisco HDLC, SLARP, Frame Relay, LMI, HSRPv2).
Timestamps are fixed, so the files are reproducible byte for byte; tests/test_captures.py
checks that, and what tshark decodes from them. `FRAMES` (per link type) and `ROUTING` (per
routing file) are importable: tests and demos reuse the frames without the files.
"""

from __future__ import annotations

import socket
import struct
import sys
from pathlib import Path
from typing import NamedTuple

from scapy.contrib.bgp import (
    BGPHeader,
    BGPKeepAlive,
    BGPNLRI_IPv4,
    BGPOpen,
    BGPPAASPath,
    BGPPANextHop,
    BGPPAOrigin,
    BGPPathAttr,
    BGPUpdate,
)
from scapy.contrib.cdp import (
    CDPMsgCapabilities,
    CDPMsgDeviceID,
    CDPMsgPlatform,
    CDPMsgPortID,
    CDPMsgSoftwareVersion,
    CDPv2_HDR,
)
from scapy.contrib.eigrp import EIGRP, EIGRPIntRoute, EIGRPParam, EIGRPSwVer
from scapy.contrib.isis import (
    ISIS_L2_LSP,
    ISIS_AreaEntry,
    ISIS_AreaTlv,
    ISIS_CommonHdr,
    ISIS_DynamicHostnameTlv,
    ISIS_ExtendedIpPrefix,
    ISIS_ExtendedIpReachabilityTlv,
    ISIS_IpInterfaceAddressTlv,
    ISIS_L1_LAN_Hello,
    ISIS_P2P_Hello,
    ISIS_P2PAdjacencyStateTlv,
    ISIS_ProtocolsSupportedTlv,
)
from scapy.contrib.ldp import LDP, LDPHello
from scapy.contrib.ospf import (
    OSPF_Hdr,
    OSPF_Hello,
    OSPF_Link,
    OSPF_LSUpd,
    OSPF_Router_LSA,
    OSPFv3_Hdr,
    OSPFv3_Hello,
)
from scapy.layers.hsrp import HSRP
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
from scapy.layers.rip import RIP, RIPEntry
from scapy.layers.vrrp import VRRP, VRRPv3
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


# Routing protocols as router labs carry them. One set of packets (OSPF, EIGRP, BGP, RIPv2,
# LDP over IPv4, OSPFv3 over IPv6, IS-IS over OSI, CDP), wrapped in each encapsulation:
#   C-HDLC  ethertype 0x0800 / 0x86DD / 0xFEFE (OSI) / 0x2000 (CDP); 0x8F for multicast
#   PPP     protocol 0x0021 / 0x0057 / 0x0023 (OSI network layer) / 0x0207 (CDP)
#   FR IETF control 0x03, NLPID 0xCC / 0x8E / the IS-IS PDU itself (its first byte, 0x83, is
#           the NLPID) / pad 0x00 + SNAP 0x80 00000C 2000 (CDP)
#   FR Cisco ethertype as C-HDLC's
#   Ethernet type 0x0800 / 0x86DD, 802.3 + LLC FE FE 03 (OSI), 802.3 + SNAP (CDP)
# IS-IS sends a point-to-point Hello on serial links and an L1 LAN Hello on Ethernet.
R1_ID, R2_ID = "1.1.1.1", "2.2.2.2"
R1_SYSTEM = "0000.0000.0001"
BGP_R1, BGP_R2 = ("10.0.0.1", 40000), ("10.0.0.2", 179)
ALL_L1_ISS = "01:80:c2:00:00:14"


def _ospf() -> list[Packet]:
    """OSPFv2 Hello and a Link State Update with R1's router LSA, to AllSPFRouters."""
    to_all = IP(src="10.0.0.1", dst="224.0.0.5", ttl=1, tos=0xC0, id=10)
    link = OSPF_Link(id="10.0.0.0", data="255.255.255.252", type=3, metric=64)
    lsa = OSPF_Router_LSA(id=R1_ID, adrouter=R1_ID, seq=0x80000002, linklist=[link])
    return [
        to_all
        / OSPF_Hdr(src=R1_ID)
        / OSPF_Hello(mask="255.255.255.252", options=0x02, prio=0, neighbors=[R2_ID]),
        to_all / OSPF_Hdr(src=R1_ID) / OSPF_LSUpd(lsalist=[lsa]),
    ]


def _ospfv3() -> Packet:
    return (
        IPv6(src="fe80::1", dst="ff02::5", hlim=1, tc=0xE0)
        / OSPFv3_Hdr(src=R1_ID)
        / OSPFv3_Hello(intid=3, options=0x13, neighbors=[R2_ID])
    )


def _eigrp() -> list[Packet]:
    """EIGRP AS 100 Hello (K values, software version) and an Update with one route."""
    to_all = IP(src="10.0.0.1", dst="224.0.0.10", ttl=1, tos=0xC0, id=20)
    route = EIGRPIntRoute(nexthop="0.0.0.0", delay=20000, bandwidth=40000, prefixlen=24)
    route.dst = "192.168.1.0"
    return [
        to_all / EIGRP(opcode=5, asn=100, tlvlist=[EIGRPParam(), EIGRPSwVer()]),
        to_all / EIGRP(opcode=1, asn=100, seq=1, tlvlist=[route]),
    ]


def _bgp() -> list[Packet]:
    """One BGP session's first messages, R1 to R2: OPEN, KEEPALIVE, UPDATE, then a segment
    with two messages (an UPDATE withdrawing a route and a KEEPALIVE)."""
    attributes = [
        BGPPathAttr(type_flags=0x40, type_code=1, attribute=BGPPAOrigin(origin=0)),
        BGPPathAttr(type_flags=0x40, type_code=2, attribute=BGPPAASPath()),
        BGPPathAttr(type_flags=0x40, type_code=3, attribute=BGPPANextHop(next_hop="10.0.0.1")),
    ]
    update = BGPHeader(type=2) / BGPUpdate(
        path_attr=attributes, nlri=[BGPNLRI_IPv4(prefix="192.168.1.0/24")]
    )
    withdraw = BGPHeader(type=2) / BGPUpdate(
        withdrawn_routes=[BGPNLRI_IPv4(prefix="192.168.2.0/24")]
    )
    messages = [
        BGPHeader(type=1) / BGPOpen(my_as=65001, hold_time=180, bgp_id=R1_ID),
        BGPKeepAlive(),
        update,
        bytes(withdraw) + bytes(BGPKeepAlive()),
    ]
    segments, seq = [], 1000
    for number, message in enumerate(messages):
        payload = bytes(message)  # a Packet, or two already joined as bytes
        ip = IP(src=BGP_R1[0], dst=BGP_R2[0], ttl=255, tos=0xC0, id=30 + number)
        tcp = TCP(sport=BGP_R1[1], dport=BGP_R2[1], flags="PA", seq=seq, ack=5000, window=16384)
        segments.append(ip / tcp / payload)
        seq += len(payload)
    return segments


def _rip_and_ldp() -> list[Packet]:
    rip = RIP(cmd=2, version=2) / RIPEntry(addr="192.168.1.0", mask="255.255.255.0", metric=1)
    hello = LDP(id=R1_ID) / LDPHello(params=[15, 0, 0])  # hold time 15 s, not targeted
    return [
        IP(src="10.0.0.1", dst="224.0.0.9", ttl=1, id=40) / UDP(sport=520, dport=520) / rip,
        IP(src="10.0.0.1", dst="224.0.0.2", ttl=1, id=41) / UDP(sport=646, dport=646) / hello,
    ]


def _isis(lan: bool) -> list[Packet]:
    """An IS-IS Hello (point-to-point, or L1 LAN on Ethernet) and R1's L2 LSP, area 49.0001."""
    area = ISIS_AreaTlv(areas=[ISIS_AreaEntry(areaid="49.0001")])
    protocols = ISIS_ProtocolsSupportedTlv(nlpids=["IPv4"])
    address = ISIS_IpInterfaceAddressTlv(addresses=["10.0.0.1"])
    if lan:
        hello = ISIS_L1_LAN_Hello(
            circuittype="L1",
            sourceid=R1_SYSTEM,
            priority=64,
            lanid=R1_SYSTEM + ".01",
            tlvs=[area, protocols, address],
        )
    else:
        hello = ISIS_P2P_Hello(
            circuittype="L2",
            sourceid=R1_SYSTEM,
            tlvs=[
                area,
                protocols,
                address,
                ISIS_P2PAdjacencyStateTlv(  # RFC 5303: Up, with R2 as neighbour
                    len=15,
                    state=0,
                    extlocalcircuitid=1,
                    neighboursystemid="0000.0000.0002",
                    neighbourextlocalcircuitid=1,
                ),
            ],
        )
    prefix = ISIS_ExtendedIpPrefix(metric=10, pfx="10.0.0.0/30")
    lsp = ISIS_L2_LSP(
        lspid=R1_SYSTEM + ".00-00",
        seqnum=3,
        typeblock="L1+L2",
        tlvs=[
            area,
            protocols,
            ISIS_DynamicHostnameTlv(hostname=b"R1"),
            address,
            ISIS_ExtendedIpReachabilityTlv(pfxs=[prefix]),
        ],
    )
    return [ISIS_CommonHdr() / hello, ISIS_CommonHdr() / lsp]


def routing_packets(lan: bool = False) -> list[tuple[str, bytes]]:
    """(kind, packet): kind "ipv4", "ipv6", "osi" or "cdp" says how a link carries it."""
    ipv4 = _ospf() + _eigrp() + _bgp() + _rip_and_ldp()
    packets = [("ipv4", bytes(p)) for p in ipv4] + [("ipv6", bytes(_ospfv3()))]
    packets += [("osi", bytes(p)) for p in _isis(lan)]
    return packets + [("cdp", bytes(_cdp("R1", "Ethernet0/0" if lan else "Serial1/0")))]


def _multicast(kind: str, packet: bytes) -> bool:
    return kind != "ipv4" or packet[16] >= 224  # IPv4 destination's first byte


ETHERTYPES = {"ipv4": ETHERTYPE_IP, "ipv6": 0x86DD, "osi": 0xFEFE, "cdp": ETHERTYPE_CDP}
PPP_PROTOCOLS = {"ipv4": 0x0021, "ipv6": 0x0057, "osi": 0x0023, "cdp": 0x0207}
FR_IETF = {"ipv4": b"\x03\xcc", "ipv6": b"\x03\x8e", "osi": b"\x03"}
FR_IETF["cdp"] = b"\x03\x00\x80\x00\x00\x0c\x20\x00"
ROUTING_DLCI = 102


def routing_chdlc_frames() -> list[bytes]:
    return [
        chdlc(CHDLC_BROADCAST if _multicast(kind, p) else CHDLC_UNICAST, ETHERTYPES[kind], p)
        for kind, p in routing_packets()
    ]


def routing_ppp_frames() -> list[bytes]:
    return [
        b"\xff\x03" + struct.pack("!H", PPP_PROTOCOLS[kind]) + p for kind, p in routing_packets()
    ]


def routing_frelay_ietf_frames() -> list[bytes]:
    """RFC 2427 NLPIDs on DLCI 102, then ANSI and Q.933 Annex A LMI on DLCI 0."""
    frames = [q922(ROUTING_DLCI) + FR_IETF[kind] + p for kind, p in routing_packets()]
    return frames + [
        lmi(ANSI, LMI_ENQUIRY, FULL_STATUS, 11, 10),
        lmi(ANSI, LMI_STATUS, FULL_STATUS, 11, 11, pvcs=(ROUTING_DLCI,)),
        lmi(Q933, LMI_ENQUIRY, LINK_INTEGRITY, 12, 11),
        lmi(Q933, LMI_STATUS, LINK_INTEGRITY, 12, 12),
    ]


def routing_frelay_cisco_frames() -> list[bytes]:
    """Cisco encapsulation on DLCI 102, then Cisco LMI on DLCI 1023."""
    frames = [
        q922(ROUTING_DLCI) + struct.pack("!H", ETHERTYPES[kind]) + p
        for kind, p in routing_packets()
    ]
    return frames + [
        lmi(CISCO, LMI_ENQUIRY, FULL_STATUS, 13, 12),
        lmi(CISCO, LMI_STATUS, FULL_STATUS, 13, 13, pvcs=(ROUTING_DLCI,)),
    ]


def routing_ethernet_frames() -> list[bytes]:
    frames = []
    for kind, packet in routing_packets(lan=True):
        if kind == "osi":
            frame = Dot3(dst=ALL_L1_ISS, src=R1_MAC) / LLC(dsap=0xFE, ssap=0xFE, ctrl=3) / packet
        elif kind == "cdp":
            frame = Dot3(dst=CDP_MULTICAST, src=R1_MAC) / LLC(dsap=0xAA, ssap=0xAA, ctrl=3)
            frame = frame / SNAP(OUI=0x00000C, code=0x2000) / packet
        else:
            dst = _ethernet_multicast(packet) if _multicast(kind, packet) else R2_MAC
            frame = Ether(dst=dst, src=R1_MAC, type=ETHERTYPES[kind]) / packet
        frames.append(bytes(frame))
    return frames + fhrp_frames()


def fhrp_frames() -> list[bytes]:
    """First-hop redundancy on the LAN, R1 active for 10.0.0.254: HSRP version 1 and 2 Hellos,
    VRRPv2 and VRRPv3 Advertisements (IPv4), and a VRRPv3 Advertisement over IPv6."""
    group_state = struct.pack(  # HSRPv2 Group State TLV (see tunnelscope/decoders/hsrp.py)
        "!BBBBBBH6sIII16s", 1, 40, 2, 0, 6, 4, 10, bytes.fromhex(R1_MAC.replace(":", "")),
        110, 3000, 10000, socket.inet_aton("10.0.0.254") + bytes(12),
    )  # fmt: skip
    text_auth = struct.pack("!BB8s", 3, 8, b"cisco")
    hsrp = UDP(sport=1985, dport=1985)
    to_vrrp = IP(src="10.0.0.1", dst="224.0.0.18", ttl=255, id=50)
    packets = [
        IP(src="10.0.0.1", dst="224.0.0.2", ttl=1, id=51)
        / hsrp
        / HSRP(state=16, priority=110, group=1, virtualIP="10.0.0.254"),
        IP(src="10.0.0.1", dst="224.0.0.102", ttl=255, id=52) / hsrp / (group_state + text_auth),
        to_vrrp / VRRP(vrid=1, priority=110, addrlist=["10.0.0.253"]),
        to_vrrp / VRRPv3(vrid=2, priority=110, addrlist=["10.0.0.252"]),
        IPv6(src="fe80::1", dst="ff02::12", hlim=255)
        / VRRPv3(vrid=3, priority=110, ipcount=1, addrlist=["fe80::fe"]),
    ]
    return [bytes(Ether(dst=_ethernet_multicast(bytes(p)), src=R1_MAC) / p) for p in packets]


def _ethernet_multicast(packet: bytes) -> str:
    """The Ethernet address of an IPv4 or IPv6 multicast packet's destination group."""
    if packet[0] >> 4 == 6:
        return "33:33:" + packet[36:40].hex(":")
    return "01:00:5e:" + bytes([packet[17] & 0x7F, packet[18], packet[19]]).hex(":")


# file name -> (link type, frames): the routing captures, one per encapsulation
ROUTING: dict[str, tuple[LinkType, list[bytes]]] = {
    "routing-chdlc.pcap": (LinkType.C_HDLC, routing_chdlc_frames()),
    "routing-ppp.pcap": (LinkType.PPP_SERIAL, routing_ppp_frames()),
    "routing-frelay-ietf.pcap": (LinkType.FRELAY, routing_frelay_ietf_frames()),
    "routing-frelay-cisco.pcap": (LinkType.FRELAY, routing_frelay_cisco_frames()),
    "routing-ethernet.pcap": (LinkType.ETHERNET, routing_ethernet_frames()),
}


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


def write_pcap(path: Path, linktype: LinkType, frames: list[bytes]) -> Path:
    writer = CaptureWriter.open(str(path), Format())
    writer.add_interface(linktype, path.name)
    for number, frame in enumerate(frames):
        writer.write(0, START_NS + number * STEP_NS, frame)
    writer.close()
    return path


def write_all(outdir: Path = HERE) -> list[Path]:
    outdir.mkdir(parents=True, exist_ok=True)
    paths = [
        write_pcap(outdir / name, linktype, FRAMES[linktype]) for linktype, name in FILES.items()
    ]
    paths += [write_pcap(outdir / name, *ROUTING[name]) for name in ROUTING]

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
