"""Everything above the link layer, shared by the four link decoders (one copy, no forks).

A link decoder finds a protocol number (ethertype, SNAP OUI/PID, PPP protocol, NLPID) and
hands the payload here. IPv4, IPv6, ARP, ICMP, ICMPv6, UDP and TCP are parsed by dpkt; this
module only checks what dpkt lets through (lengths past the end of the frame) and names the
fields the Wireshark way. Routing protocols go to their own modules: IP protocol 88 `eigrp`,
89 `ospf`, 112 `vrrp`; UDP port 520 `rip`, 646 `ldp`, 1985 and 2029 `hsrp`; TCP port 179
`bgp`, 646 `ldp` (the lower of the two ports first, as tshark tries them).

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

# dpkt reports short headers with UnpackError; odd option bytes can surface as the others.
# AttributeError: dpkt's IP6 reads `frag_off` of whatever extension header came last when the
# first one is a fragment header (a fragment header followed by hop-by-hop options).
_DPKT_ERRORS = (dpkt.UnpackError, struct.error, IndexError, ValueError, AttributeError)

ETHERTYPE_IPV4 = 0x0800
ETHERTYPE_ARP = 0x0806
ETHERTYPE_RARP = 0x8035
ETHERTYPE_IPV6 = 0x86DD
ETHERTYPE_MPLS = (0x8847, 0x8848)

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
    try:
        ip = dpkt.ip.IP(data)
    except _DPKT_ERRORS:
        b.bad("bad IPv4 header length")
        return
    if ip.v != 4:
        b.bad(f"IPv4 version {ip.v}")
        return
    header = ip.hl * 4
    if header > len(data):
        b.bad("truncated IPv4 options")
        return
    src, dst = socket.inet_ntoa(ip.src), socket.inet_ntoa(ip.dst)
    b.fields.update(
        {
            "ip.src": src,
            "ip.dst": dst,
            "ip.proto": ip.p,
            "ip.ttl": ip.ttl,
            "ip.len": ip.len,
            "ip.id": ip.id,
            "ip.flags.df": bool(ip.df),
            "ip.flags.mf": bool(ip.mf),
            "ip.frag_offset": ip.offset,
        }
    )
    b.text(f"IPv4 {src} > {dst}:")
    if ip.len < header:
        b.bad(f"IPv4 total length {ip.len}")
    elif ip.len > len(data):
        b.bad(f"IPv4 total length {ip.len} past the end of the frame")
    elif ip.offset or ip.mf:  # as tshark (which reassembles): no transport layer per fragment
        b.text(f"fragment id {ip.id} offset {ip.offset * 8}")
    else:
        _transport(b, ip.p, ip.data, data[header : ip.len], v6=False)


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
    for extension in ip6.all_extension_headers:
        b.layer(_IPV6_EXTENSIONS[type(extension)])
    if dpkt.ip.IP_PROTO_FRAGMENT in ip6.extension_hdrs:
        b.text("fragment")
    elif hasattr(ip6, "p"):  # dpkt leaves it unset after ESP: the rest is encrypted
        extensions = sum(map(len, ip6.all_extension_headers))
        _transport(b, ip6.p, ip6.data, data[40 + extensions : 40 + ip6.plen], v6=True)


def _transport(b: Builder, proto: int, payload: object, raw: bytes, v6: bool) -> None:
    """The layer after IPv4/IPv6: dpkt has parsed it already (`payload`), or left bytes if
    it could not; `raw` is its bytes as the frame carries them, for the routing modules."""
    if proto == (dpkt.ip.IP_PROTO_ICMP6 if v6 else dpkt.ip.IP_PROTO_ICMP):
        _icmp(b, payload, "icmpv6" if v6 else "icmp")
    elif proto == dpkt.ip.IP_PROTO_UDP:
        b.layer("udp")
        if isinstance(payload, bytes):
            b.bad("truncated UDP header")
            return
        b.fields.update(
            {"udp.srcport": payload.sport, "udp.dstport": payload.dport, "udp.length": payload.ulen}
        )
        b.text(f"UDP {payload.sport} > {payload.dport} len {payload.ulen - 8}")
        if not 8 <= payload.ulen <= 8 + len(payload.data):
            b.bad(f"UDP length {payload.ulen}")
            return
        _application(b, _UDP_PORTS, payload.sport, payload.dport, payload.data[: payload.ulen - 8])
    elif proto == dpkt.ip.IP_PROTO_TCP:
        _tcp(b, payload)
    elif proto in _ROUTING_IP_PROTOCOLS:
        _ROUTING_IP_PROTOCOLS[proto](b, raw)
    elif proto in _NAMED_IP_PROTOCOLS:
        name, text = _NAMED_IP_PROTOCOLS[proto]
        b.layer(name, text)
    else:
        b.text(f"protocol {proto}")


def _tcp(b: Builder, tcp: object) -> None:
    b.layer("tcp")
    if isinstance(tcp, bytes) or len(tcp.opts) < tcp.off * 4 - 20:
        b.bad("truncated TCP header")
        return
    flags = tcp.flags
    letters = "".join(
        ("." if letter == "A" else letter)
        for bit, letter in enumerate(_TCP_FLAGS)
        if flags & (1 << bit)
    )
    b.fields.update(
        {
            "tcp.srcport": tcp.sport,
            "tcp.dstport": tcp.dport,
            "tcp.flags": flags,
            "tcp.seq_raw": tcp.seq,
            "tcp.ack_raw": tcp.ack,
            "tcp.len": len(tcp.data),
        }
    )
    b.text(f"TCP {tcp.sport} > {tcp.dport} [{letters}] seq {tcp.seq} len {len(tcp.data)}")
    if tcp.data:
        _application(b, _TCP_PORTS, tcp.sport, tcp.dport, tcp.data)


def _application(
    b: Builder,
    decoders: dict[int, Callable[[Builder, bytes], None]],
    sport: int,
    dport: int,
    data: bytes,
) -> None:
    """The protocol a well-known port names, the lower port first (as tshark tries them)."""
    for port in sorted((sport, dport)):
        if port in decoders:
            decoders[port](b, data)
            return


def _icmp(b: Builder, message: object, protocol: str) -> None:
    label, names = ("ICMP", _ICMP_TYPES) if protocol == "icmp" else ("ICMPv6", _ICMPV6_TYPES)
    b.layer(protocol)
    if isinstance(message, bytes):
        b.bad(f"truncated {label} header")
        return
    b.fields.update({f"{protocol}.type": message.type, f"{protocol}.code": message.code})
    text = f"{label} {name_of(names, message.type, 'type')}"
    if names.get(message.type, "").startswith("echo"):
        echo = message.data
        if isinstance(echo, bytes):
            b.text(text)
            b.bad(f"truncated {label} echo")
            return
        if protocol == "icmp":
            b.fields.update({"icmp.ident": echo.id, "icmp.seq": echo.seq})
        else:
            b.fields.update(
                {"icmpv6.echo.identifier": echo.id, "icmpv6.echo.sequence_number": echo.seq}
            )
        text += f" id {echo.id} seq {echo.seq}"
    elif message.code:
        text += f" code {message.code}"
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
