"""Everything above the link layer, shared by the four link decoders (one copy, no forks).

A link decoder finds a protocol number (ethertype, SNAP OUI/PID, PPP protocol, NLPID) and
hands the payload here. IPv4, ICMP, UDP and TCP are parsed here with struct; IPv6 and its
extension headers by dpkt. This module names the fields the Wireshark way and checks the
lengths against the frame. Routing protocols go to their own modules: IP protocol 88 `eigrp`,
89 `ospf`, 112 `vrrp`; UDP port 520 `rip`, 646 `ldp`, 1985 and 2029 `hsrp`; TCP port 179
`bgp`, 646 `ldp` (the lower of the two ports first, as tshark tries them).

IPv4 (RFC 791), 20 bytes and options:
  version 4 bits | header length 4 bits (in 4-byte words) | TOS (1) | total length (2) |
  identification (2) | flags 3 bits (reserved, DF, MF) | fragment offset 13 bits (in 8-byte
  units) | TTL (1) | protocol (1) | checksum (2) | source (4) | destination (4) | options
  A fragment (MF set or an offset) gets no transport layer, as tshark (which reassembles).
ICMP (RFC 792) and ICMPv6 (RFC 4443): type (1) | code (1) | checksum (2) | then, for echo
  request and reply, identifier (2) | sequence (2) | data
UDP (RFC 768): source port (2) | destination port (2) | length (2, header included) |
  checksum (2)
TCP (RFC 9293), 20 bytes and options: source port (2) | destination port (2) | sequence (4)
  | acknowledgement (4) | data offset 4 bits (in 4-byte words) | reserved 3 bits | flags 9
  bits (NS CWR ECE URG ACK PSH RST SYN FIN) | window (2) | checksum (2) | urgent pointer (2)
These were parsed by dpkt, at about a third of the decoding time of a frame: an object per
header, a setattr per field.

CDP (Cisco; SNAP 00000C/2000, C-HDLC 0x2000, PPP 0x0207):
  version u8 | ttl u8 | checksum u16 | TLVs: type u16, length u16 (header included), value
  TLV 1 device id, 3 port id, 6 platform (strings)
MPLS label stack entry (RFC 3032), repeated until the bottom-of-stack bit:
  label 20 bits | exp 3 | bottom 1 | ttl 8      then IPv4/IPv6 by the version nibble
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Callable

import dpkt

from tunnelscope.decoders import bgp, eigrp, hsrp, ldp, ospf, rip, vrrp
from tunnelscope.decoders.base import Builder, frame_text, name_of, tlvs

# dpkt's IP6 reports short headers with UnpackError; odd option bytes can surface as the others.
# AttributeError: dpkt's IP6 reads `frag_off` of whatever extension header came last when the
# first one is a fragment header (a fragment header followed by hop-by-hop options).
_DPKT_ERRORS = (dpkt.UnpackError, struct.error, IndexError, ValueError, AttributeError)

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_ARP = 0x0806
ETHERTYPE_RARP = 0x8035
ETHERTYPE_IPV6 = 0x86DD
ETHERTYPE_MPLS = (0x8847, 0x8848)
IP_PROTO_ICMP, IP_PROTO_TCP, IP_PROTO_UDP, IP_PROTO_ICMPV6 = 1, 6, 17, 58

_IPV4 = struct.Struct(">BBHHHBBH4s4s")
_UDP = struct.Struct(">HHHH")
_TCP = struct.Struct(">HHIIHHHH")
_ECHO = struct.Struct(">HH")

# Recognised by number only: (tshark protocol name, summary word).
_NAMED_ETHERTYPES = {
    0x8809: ("slow", "Slow Protocols (LACP)"),
    0x8863: ("pppoed", "PPPoE Discovery"),
    0x8864: ("pppoes", "PPPoE Session"),
    0x888E: ("eapol", "EAPOL"),
    0x88CC: ("lldp", "LLDP"),
    0x8902: ("cfm", "CFM"),
    0x9000: ("loop", "Loopback"),
}
_NAMED_IP_PROTOCOLS = {
    2: ("igmp", "IGMP"),
    47: ("gre", "GRE"),
    50: ("esp", "ESP"),
    51: ("ah", "AH"),
    103: ("pim", "PIM"),
}
_IPV6_EXTENSIONS = {
    dpkt.ip6.IP6HopOptsHeader: "ipv6.hopopts",
    dpkt.ip6.IP6RoutingHeader: "ipv6.routing",
    dpkt.ip6.IP6FragmentHeader: "ipv6.fraghdr",
    dpkt.ip6.IP6DstOptsHeader: "ipv6.dstopts",
    dpkt.ip6.IP6AHHeader: "ah",
    dpkt.ip6.IP6ESPHeader: "esp",
}
_ICMP_TYPES = {
    0: "echo reply",
    3: "unreachable",
    5: "redirect",
    8: "echo request",
    11: "time exceeded",
}
_ICMPV6_TYPES = {
    1: "unreachable",
    2: "packet too big",
    3: "time exceeded",
    128: "echo request",
    129: "echo reply",
    133: "router solicitation",
    134: "router advertisement",
    135: "neighbor solicitation",
    136: "neighbor advertisement",
    143: "MLDv2 report",
}
_ARP_OPCODES = {
    1: "request",
    2: "reply",
    3: "RARP request",
    4: "RARP reply",
    8: "InARP request",
    9: "InARP reply",
}
# Routing and first-hop redundancy protocols, each in its own module: by IP protocol, by UDP
# and TCP port.
_ROUTING_IP_PROTOCOLS = {88: eigrp.decode, 89: ospf.decode, 112: vrrp.decode}
_UDP_PORTS = {rip.PORT: rip.decode, ldp.PORT: ldp.decode}
_UDP_PORTS.update(dict.fromkeys(hsrp.PORTS, hsrp.decode))
_TCP_PORTS = {bgp.PORT: bgp.decode, ldp.PORT: ldp.decode}
_TCP_FLAGS = "FSRPAUEC"  # bit 0 upwards, as tcpdump letters them ("A" printed as ".")
_TCP_LETTERS = [  # the letters of each value of the 9 flag bits, made once (NS has none)
    "".join(
        ("." if letter == "A" else letter)
        for bit, letter in enumerate(_TCP_FLAGS)
        if flags & 1 << bit
    )
    for flags in range(0x200)
]
_CDP_STRINGS = {1: ("cdp.deviceid", "device"), 3: ("cdp.portid", "port"), 6: ("cdp.platform", None)}
CISCO_OUI = 0x00000C
CISCO_PID_CDP = 0x2000


def ethertype(b: Builder, etype: int, data: bytes) -> None:
    """Decode what an ethertype announces (Ethernet, VLAN, SNAP, C-HDLC, FR Cisco)."""
    if etype == ETHERTYPE_IPV4:
        ipv4(b, data)
    elif etype == ETHERTYPE_IPV6:
        ipv6(b, data)
    elif etype in (ETHERTYPE_ARP, ETHERTYPE_RARP):
        arp(b, data)
    elif etype in ETHERTYPE_MPLS:
        mpls(b, data)
    elif etype in _NAMED_ETHERTYPES:
        protocol, text = _NAMED_ETHERTYPES[etype]
        b.layer(protocol, f"{text}, {len(data)} bytes")
    else:
        b.text(f"ethertype {etype:#06x}, {len(data)} bytes")


def snap(b: Builder, oui: int, pid: int, data: bytes) -> None:
    """Decode a SNAP payload (802.2 LLC on Ethernet, RFC 2427 on Frame Relay)."""
    if oui == 0:
        ethertype(b, pid, data)
    elif oui == CISCO_OUI and pid == CISCO_PID_CDP:
        cdp(b, data)
    else:
        b.text(f"SNAP OUI {oui:06x} PID {pid:#06x}, {len(data)} bytes")


def ipv4(b: Builder, data: bytes) -> None:
    b.layer("ip")
    if not b.need(data, 20, "IPv4 header"):
        return
    version_ihl, _, length, ident, flags_offset, ttl, proto, _, src, dst = _IPV4.unpack_from(data)
    header = (version_ihl & 0xF) * 4
    if header < 20:
        b.bad("bad IPv4 header length")
        return
    if version_ihl >> 4 != 4:
        b.bad(f"IPv4 version {version_ihl >> 4}")
        return
    if header > len(data):
        b.bad("truncated IPv4 options")
        return
    src, dst = socket.inet_ntoa(src), socket.inet_ntoa(dst)
    offset = flags_offset & 0x1FFF
    more_fragments = bool(flags_offset & 0x2000)
    b.fields.update(
        {
            "ip.src": src,
            "ip.dst": dst,
            "ip.proto": proto,
            "ip.ttl": ttl,
            "ip.len": length,
            "ip.id": ident,
            "ip.flags.df": bool(flags_offset & 0x4000),
            "ip.flags.mf": more_fragments,
            "ip.frag_offset": offset,
        }
    )
    b.text(f"IPv4 {src} > {dst}:")
    if length < header:
        b.bad(f"IPv4 total length {length}")
    elif length > len(data):
        b.bad(f"IPv4 total length {length} past the end of the frame")
    elif offset or more_fragments:  # as tshark (which reassembles): no transport layer per fragment
        b.text(f"fragment id {ident} offset {offset * 8}")
    else:
        _transport(b, proto, data[header:length], v6=False)


def ipv6(b: Builder, data: bytes) -> None:
    b.layer("ipv6")
    if not b.need(data, 40, "IPv6 header"):
        return
    try:
        ip6 = dpkt.ip6.IP6(data)
    except _DPKT_ERRORS:
        b.bad("truncated IPv6 extension header")
        return
    if ip6.v != 6:
        b.bad(f"IPv6 version {ip6.v}")
        return
    src = socket.inet_ntop(socket.AF_INET6, ip6.src)
    dst = socket.inet_ntop(socket.AF_INET6, ip6.dst)
    b.fields.update(
        {
            "ipv6.src": src,
            "ipv6.dst": dst,
            "ipv6.nxt": ip6.nxt,
            "ipv6.hlim": ip6.hlim,
            "ipv6.plen": ip6.plen,
        }
    )
    b.text(f"IPv6 {src} > {dst}:")
    if ip6.plen > len(data) - 40:
        b.bad(f"IPv6 payload length {ip6.plen} past the end of the frame")
        return
    payload = data[40 : 40 + ip6.plen] if ip6.plen else data[40:]  # as dpkt walks it
    for extension in ip6.all_extension_headers:
        b.layer(_IPV6_EXTENSIONS[type(extension)])
        payload = payload[extension.length :]
    if dpkt.ip.IP_PROTO_FRAGMENT in ip6.extension_hdrs:
        b.text("fragment")
    elif hasattr(ip6, "p"):  # dpkt leaves it unset after ESP: the rest is encrypted
        _transport(b, ip6.p, payload, v6=True)


def _transport(b: Builder, proto: int, payload: bytes, v6: bool) -> None:
    """The layer after IPv4/IPv6 (and its extension headers), from the bytes IP carries."""
    if proto == (IP_PROTO_ICMPV6 if v6 else IP_PROTO_ICMP):
        _icmp(b, payload, "icmpv6" if v6 else "icmp")
    elif proto == IP_PROTO_UDP:
        _udp(b, payload)
    elif proto == IP_PROTO_TCP:
        _tcp(b, payload)
    elif proto in _ROUTING_IP_PROTOCOLS:
        _ROUTING_IP_PROTOCOLS[proto](b, payload)
    elif proto in _NAMED_IP_PROTOCOLS:
        name, text = _NAMED_IP_PROTOCOLS[proto]
        b.layer(name, text)
    else:
        b.text(f"protocol {proto}")


def _udp(b: Builder, data: bytes) -> None:
    b.layer("udp")
    if not b.need(data, 8, "UDP header"):
        return
    sport, dport, length, _ = _UDP.unpack_from(data)
    b.fields.update({"udp.srcport": sport, "udp.dstport": dport, "udp.length": length})
    b.text(f"UDP {sport} > {dport} len {length - 8}")
    if not 8 <= length <= len(data):
        b.bad(f"UDP length {length}")
        return
    _application(b, _UDP_PORTS, sport, dport, data[8:length])


def _tcp(b: Builder, data: bytes) -> None:
    b.layer("tcp")
    if not b.need(data, 20, "TCP header"):
        return
    sport, dport, seq, ack, offset_flags, _, _, _ = _TCP.unpack_from(data)
    header = (offset_flags >> 12) * 4
    if not 20 <= header <= len(data):
        b.bad("truncated TCP header")
        return
    flags = offset_flags & 0x1FF
    payload = data[header:]
    b.fields.update(
        {
            "tcp.srcport": sport,
            "tcp.dstport": dport,
            "tcp.flags": flags,
            "tcp.seq_raw": seq,
            "tcp.ack_raw": ack,
            "tcp.len": len(payload),
        }
    )
    b.text(f"TCP {sport} > {dport} [{_TCP_LETTERS[flags]}] seq {seq} len {len(payload)}")
    if payload:
        _application(b, _TCP_PORTS, sport, dport, payload)


def _application(
    b: Builder,
    decoders: dict[int, Callable[[Builder, bytes], None]],
    sport: int,
    dport: int,
    data: bytes,
) -> None:
    """The protocol a well-known port names, the lower port first (as tshark tries them)."""
    decoder = decoders.get(min(sport, dport)) or decoders.get(max(sport, dport))
    if decoder is not None:
        decoder(b, data)


def _icmp(b: Builder, data: bytes, protocol: str) -> None:
    label, names = ("ICMP", _ICMP_TYPES) if protocol == "icmp" else ("ICMPv6", _ICMPV6_TYPES)
    b.layer(protocol)
    if not b.need(data, 4, f"{label} header"):
        return
    kind, code = data[0], data[1]
    b.fields.update({f"{protocol}.type": kind, f"{protocol}.code": code})
    text = f"{label} {name_of(names, kind, 'type')}"
    if names.get(kind, "").startswith("echo"):
        if len(data) < 8:
            b.text(text)
            b.bad(f"truncated {label} echo")
            return
        ident, seq = _ECHO.unpack_from(data, 4)
        if protocol == "icmp":
            b.fields.update({"icmp.ident": ident, "icmp.seq": seq})
        else:
            b.fields.update({"icmpv6.echo.identifier": ident, "icmpv6.echo.sequence_number": seq})
        text += f" id {ident} seq {seq}"
    elif code:
        text += f" code {code}"
    b.text(text)


def arp(b: Builder, data: bytes) -> None:
    """ARP, RARP and Frame Relay Inverse ARP (RFC 2390).

    Parsed here, not by dpkt: dpkt's ARP assumes 6-byte hardware addresses, and InARP on a
    Frame Relay PVC carries 2-byte Q.922 addresses.
    """
    b.layer("arp")
    if not b.need(data, 8, "ARP header"):
        return
    hw_type, proto_type, hw_size, proto_size, opcode = struct.unpack_from(">HHBBH", data)
    b.fields.update({"arp.hw.type": hw_type, "arp.proto.type": proto_type, "arp.opcode": opcode})
    name = name_of(_ARP_OPCODES, opcode, "opcode")
    end = 8 + 2 * (hw_size + proto_size)
    if not b.need(data, end, "ARP addresses"):
        b.text(f"ARP {name}")
        return
    sha, spa = data[8 : 8 + hw_size], data[8 + hw_size : 8 + hw_size + proto_size]
    tha, tpa = data[end - hw_size - proto_size : end - proto_size], data[end - proto_size : end]
    if hw_size == 6:
        b.fields.update({"arp.src.hw_mac": sha.hex(":"), "arp.dst.hw_mac": tha.hex(":")})
    if proto_size != 4:
        b.text(f"ARP {name}")
        return
    src, dst = socket.inet_ntoa(spa), socket.inet_ntoa(tpa)
    b.fields.update({"arp.src.proto_ipv4": src, "arp.dst.proto_ipv4": dst})
    if opcode == 1:
        b.text(f"ARP who-has {dst} tell {src}")
    elif opcode == 2 and hw_size == 6:
        b.text(f"ARP reply {src} is-at {sha.hex(':')}")
    else:
        b.text(f"ARP {name} {src} > {dst}")


def mpls(b: Builder, data: bytes) -> None:
    b.layer("mpls")
    labels = []
    bottom = False
    while not bottom and b.need(data, 4, "MPLS label"):
        (entry,) = struct.unpack_from(">I", data)
        data = data[4:]
        bottom = bool(entry & 0x100)
        labels.append(str(entry >> 12))
        b.append("mpls.label", entry >> 12)
        b.append("mpls.exp", (entry >> 9) & 7)
        b.append("mpls.bottom", int(bottom))
        b.append("mpls.ttl", entry & 0xFF)
    b.text("MPLS " + ",".join(labels))
    if not (bottom and b.need(data, 1, "MPLS payload")):
        return
    version = data[0] >> 4
    if version == 4:
        ipv4(b, data)
    elif version == 6:
        ipv6(b, data)
    else:
        b.text(f"{len(data)} bytes")


def cdp(b: Builder, data: bytes) -> None:
    b.layer("cdp")
    if not b.need(data, 4, "CDP header"):
        return
    version, ttl = data[0], data[1]
    b.fields.update({"cdp.version": version, "cdp.ttl": ttl})
    words = [f"CDPv{version}"]
    for kind, value in tlvs(b, data[4:], "CDP TLV"):
        if kind in _CDP_STRINGS:
            name, word = _CDP_STRINGS[kind]
            b.fields[name] = value.decode("utf-8", "replace")
            if word:
                words.append(f"{word} {frame_text(value)}")
    b.text(" ".join(words))
