"""Frames of every tunnel link type, for the decoder and detector tests.

Built with scapy where it has the layers (Ethernet, 802.1Q, IP, ICMP, ARP, IPv6, PPP, CDP) and
by hand where nobody has them (Cisco HDLC, SLARP, Frame Relay, LMI); the tests at the bottom
pin the hand-built bytes to published ones so the builders cannot drift.
"""

from __future__ import annotations

import struct

from scapy.contrib.cdp import CDPMsgDeviceID, CDPMsgPlatform, CDPMsgPortID, CDPv2_HDR
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.layers.inet6 import ICMPv6EchoReply, ICMPv6EchoRequest, IPv6, IPv6ExtHdrFragment
from scapy.layers.l2 import ARP, Dot1Q, Ether
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

from tunnelscope.formats.capture import CaptureWriter, Format

MAC_A, MAC_B = "c4:01:0a:1b:00:00", "c4:02:0a:1b:00:01"  # dynamips-style router MACs


def write_pcap(path: str, linktype: int, frames: list[bytes]) -> str:
    """Write frames to a classic pcap with tunnelscope's writer, 1 ms apart."""
    writer = CaptureWriter.open(str(path), Format(pcapng=False))
    interface = writer.add_interface(linktype, "test0")
    for number, frame in enumerate(frames):
        writer.write(interface, 1_700_000_000_000_000_000 + number * 1_000_000, frame)
    writer.close()
    return str(path)


def ping(src: str = "10.0.0.1", dst: str = "10.0.0.2", seq: int = 1) -> bytes:
    return bytes(IP(src=src, dst=dst, ttl=254) / ICMP(id=7, seq=seq) / (b"x" * 32))


def ping6(seq: int = 1) -> bytes:
    return bytes(IPv6(src="2001:db8::1", dst="2001:db8::2") / ICMPv6EchoRequest(id=9, seq=seq))


# --- Cisco HDLC and SLARP ------------------------------------------------------------------
def chdlc(protocol: int, payload: bytes, broadcast: bool = False) -> bytes:
    return struct.pack(">BBH", 0x8F if broadcast else 0x0F, 0, protocol) + payload


def slarp_keepalive(mine: int, yours: int) -> bytes:
    return chdlc(0x8035, struct.pack(">IIIH", 2, mine, yours, 0xFFFF))


def slarp_request(address: bytes, netmask: bytes) -> bytes:
    return chdlc(0x8035, struct.pack(">I4s4sH", 0, address, netmask, 0), broadcast=True)


def cdp(device: bytes = b"R1", port: bytes = b"Serial1/0") -> bytes:
    message = CDPv2_HDR(
        msg=[CDPMsgDeviceID(val=device), CDPMsgPortID(iface=port), CDPMsgPlatform(val=b"7200")]
    )
    return bytes(message)


# --- Frame Relay and LMI ------------------------------------------------------------------
def q922(dlci: int, cr: bool = False, fecn: bool = False, becn: bool = False, de: bool = False):
    """The 2-byte Q.922 address."""
    first = ((dlci >> 4) << 2) | (cr << 1)
    second = ((dlci & 0x0F) << 4) | (fecn << 3) | (becn << 2) | (de << 1) | 1
    return bytes([first, second])


def fr_cisco(dlci: int, protocol: int, payload: bytes) -> bytes:
    return q922(dlci) + struct.pack(">H", protocol) + payload


def fr_ietf(dlci: int, nlpid: int, payload: bytes, **flags: bool) -> bytes:
    return q922(dlci, **flags) + bytes([0x03, nlpid]) + payload


def fr_snap(dlci: int, oui: int, pid: int, payload: bytes) -> bytes:
    return fr_ietf(dlci, 0x80, oui.to_bytes(3, "big") + pid.to_bytes(2, "big") + payload)


ACTIVE, NEW = 0x02, 0x08


def _element(ident: int, value: bytes) -> bytes:
    return bytes([ident, len(value)]) + value


def _pvc(dlci: int, status: int, cisco: bool = False) -> bytes:
    """PVC status value: DLCI high 6 bits, low 4 bits << 3 (extension bit set), status."""
    value = bytes([(dlci >> 4) & 0x3F, 0x80 | ((dlci & 0x0F) << 3), 0x80 | status])
    return value + bytes(3) if cisco else value


def lmi(
    flavour: str,
    message: int,
    report: int,
    send: int,
    receive: int,
    pvcs: tuple[tuple[int, int], ...] = (),
) -> bytes:
    """An LMI frame: "ansi" / "q933" on DLCI 0 (NLPID 0x08), "cisco" on DLCI 1023 (0x09)."""
    report_id, link_id, pvc_id = (0x51, 0x53, 0x57) if flavour == "q933" else (1, 3, 7)
    cisco = flavour == "cisco"
    body = bytes([0x00, message]) + (b"\x95" if flavour == "ansi" else b"")
    body += _element(report_id, bytes([report])) + _element(link_id, bytes([send, receive]))
    body += b"".join(_element(pvc_id, _pvc(dlci, status, cisco)) for dlci, status in pvcs)
    return fr_ietf(1023 if cisco else 0, 0x09 if cisco else 0x08, body)


def inarp(dlci: int, address: str) -> bytes:
    """Frame Relay Inverse ARP request (RFC 2390): hardware type 15, 2-byte Q.922 addresses."""
    arp = struct.pack(">HHBBH", 15, 0x0800, 2, 4, 8)
    arp += q922(dlci) + bytes(int(part) for part in address.split(".")) + bytes(2) + bytes(4)
    return fr_snap(dlci, 0, 0x0806, arp)


# --- the frame sets -------------------------------------------------------------------------
def chdlc_frames() -> list[bytes]:
    return [
        chdlc(0x0800, ping()),
        slarp_keepalive(7, 6),
        slarp_keepalive(8, 7),
        slarp_request(bytes([10, 0, 0, 1]), bytes([255, 255, 255, 252])),
        chdlc(0x2000, cdp(), broadcast=True),
        chdlc(0x86DD, ping6()),
        chdlc(0x0800, bytes(IP(src="10.0.0.1", dst="224.0.0.10", proto=88) / (b"\0" * 20))),
    ]


def ppp_frames() -> list[bytes]:
    options = [PPP_LCP_MRU_Option(max_recv_unit=1500), PPP_LCP_Magic_Number_Option(magic_number=7)]
    name, ip = {"optional_name": b"R2"}, {"data": "10.0.0.1"}
    return [
        bytes(HDLC() / PPP() / PPP_LCP_Configure(id=5, options=options)),
        bytes(HDLC() / PPP() / PPP_LCP_Configure(code=2, id=5, options=options)),
        bytes(HDLC() / PPP() / PPP_LCP_Echo(code=9, id=6, magic_number=0x1234ABCD)),
        bytes(HDLC() / PPP() / PPP_PAP_Request(id=1, username=b"R1", password=b"cisco")),
        bytes(HDLC() / PPP() / PPP_CHAP_ChallengeResponse(code=1, id=2, value=b"0" * 16, **name)),
        bytes(HDLC() / PPP() / PPP_IPCP(code=1, id=3, options=[PPP_IPCP_Option_IPAddress(**ip)])),
        bytes(HDLC() / PPP(proto=0x0021) / ping()),
        bytes(HDLC() / PPP(proto=0x0057) / ping6()),
    ]


def fr_frames() -> list[bytes]:
    return [
        fr_cisco(102, 0x0800, ping()),
        fr_ietf(201, 0xCC, ping(), cr=True, fecn=True, de=True),
        fr_ietf(202, 0x8E, ping6(), becn=True),
        fr_snap(203, 0, 0x0800, ping()),
        inarp(204, "10.0.0.1"),
        lmi("ansi", 0x75, 1, 5, 4),
        lmi("ansi", 0x7D, 0, 6, 5, ((102, ACTIVE), (201, ACTIVE), (305, NEW))),
        lmi("q933", 0x7D, 0, 9, 8, ((16, ACTIVE), (991, 0))),
        lmi("cisco", 0x75, 1, 3, 2),
        lmi("cisco", 0x7D, 0, 4, 3, ((100, ACTIVE), (200, NEW | ACTIVE))),
        fr_cisco(1007, 0x8035, struct.pack(">IIIH", 2, 1, 0, 0xFFFF)),
    ]


def ethernet_frames() -> list[bytes]:
    base = Ether(src=MAC_A, dst=MAC_B)
    udp = IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=40000, dport=9) / b"hello"
    labels = struct.pack(">II", 16 << 12 | 64, 17 << 12 | 0x100 | 63)  # MPLS 16, 17 (bottom)
    return [
        bytes(base / Dot1Q(vlan=100, prio=3) / IP(src="10.0.0.1", dst="10.0.0.2") / ICMP()),
        bytes(
            Ether(src=MAC_A, dst=MAC_B, type=0x88A8)
            / Dot1Q(vlan=10, prio=1, type=0x8100)
            / Dot1Q(vlan=20, prio=5, dei=1)
            / udp
        ),
        bytes(Ether(src=MAC_A, dst=MAC_B, type=0x9100) / Dot1Q(vlan=11) / Dot1Q(vlan=21) / udp),
        bytes(base / Dot1Q(vlan=1) / Dot1Q(vlan=2) / Dot1Q(vlan=3) / udp),
        bytes(Ether(src=MAC_A, dst="ff:ff:ff:ff:ff:ff") / ARP(psrc="10.0.0.1", pdst="10.0.0.2")),
        bytes(base / ARP(op=2, hwsrc=MAC_B, psrc="10.0.0.2", hwdst=MAC_A, pdst="10.0.0.1")),
        bytes(base / IPv6(src="fe80::1", dst="fe80::2") / ICMPv6EchoReply(id=3, seq=4)),
        bytes(base / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=179, dport=40000, flags="SA")),
        bytes(base / udp),
        # 802.3 + LLC: CDP over SNAP, and an STP BPDU
        bytes.fromhex("01000ccccccc")
        + bytes.fromhex(MAC_A.replace(":", ""))
        + struct.pack(">H", 8 + len(cdp()))
        + bytes.fromhex("aaaa0300000c2000")
        + cdp(),
        bytes.fromhex("0180c2000000")
        + bytes.fromhex(MAC_A.replace(":", ""))
        + struct.pack(">H", 38)
        + b"\x42\x42\x03"
        + bytes(35),
        bytes(base)[:12] + b"\x88\x47" + labels + ping(),
        # first fragments: tshark (and tunnelscope) decode no transport layer from them
        bytes(base / IP(src="10.0.0.1", dst="10.0.0.2", flags="MF", id=9) / UDP() / bytes(40)),
        bytes(base / IPv6() / IPv6ExtHdrFragment(m=1, id=3) / UDP() / bytes(16)),
    ]


# --- the builders against published bytes --------------------------------------------------
def test_q922_matches_the_addresses_routers_send() -> None:
    assert q922(0) == b"\x00\x01"  # LMI, ANSI and Q.933
    assert q922(1023) == b"\xfc\xf1"  # Cisco LMI
    assert q922(100) == b"\x18\x41"


def test_ansi_status_enquiry_is_the_one_the_dynamips_switch_accepts() -> None:
    expected = bytes.fromhex("000103080075950101010302") + bytes([5, 4])  # REFERENCE section 2
    assert lmi("ansi", 0x75, 1, 5, 4) == expected


def test_ansi_pvc_status_element_is_07_03_dlci_82() -> None:
    frame = lmi("ansi", 0x7D, 0, 6, 5, ((100, ACTIVE),))
    assert frame.endswith(bytes([0x07, 0x03, 0x06, 0xA0, 0x82]))


def test_slarp_keepalive_is_18_bytes_with_reliability_ffff() -> None:
    expected = bytes.fromhex("0f008035 00000002 00000001 00000002 ffff")
    assert slarp_keepalive(1, 2) == expected
