"""Cisco HDLC (LINKTYPE 104) and SLARP, its keepalive and address protocol.

  address (1): 0x0F unicast, 0x8F broadcast | control (1): 0x00 | protocol (2): an ethertype
  protocol 0x8035 SLARP, 0x2000 CDP, 0xFEFE OSI (IS-IS), otherwise as on Ethernet (0x0800
  IPv4, 0x86DD IPv6)

SLARP (after the 4-byte header):
  packet type u32: 0 request, 1 reply, 2 line keepalive
  request/reply: address (4) | netmask (4) | 2 unused bytes
  keepalive:     my sequence u32 | your sequence u32 | reliability u16 (0xFFFF)

The protocol table is shared: Frame Relay with Cisco encapsulation uses the same numbers.
"""

from __future__ import annotations

import socket
import struct

from tunnelscope.decoders import isis, l3
from tunnelscope.decoders.base import Builder

PROTOCOL_SLARP = 0x8035
PROTOCOL_CDP = 0x2000
PROTOCOL_OSI = 0xFEFE
_ADDRESSES = {0x0F: "unicast", 0x8F: "broadcast"}
_HEADER = struct.Struct(">BBH")  # address, control, protocol


def decode(b: Builder, data: bytes) -> None:
    if not data:
        b.layer("chdlc", "C-HDLC")
        b.bad("truncated C-HDLC header")
        return
    b.layer("chdlc", "C-HDLC " + (_ADDRESSES.get(data[0]) or f"address {data[0]:#04x}"))
    b.fields["chdlc.address"] = data[0]
    if not b.need(data, 4, "C-HDLC header"):
        return
    _, control, proto = _HEADER.unpack_from(data)
    b.fields["chdlc.control"] = control
    b.fields["chdlc.protocol"] = proto
    protocol(b, proto, data[4:])


def protocol(b: Builder, proto: int, data: bytes) -> None:
    """Decode what a Cisco HDLC protocol number announces (also used by FR Cisco encapsulation)."""
    if proto == PROTOCOL_SLARP:
        _slarp(b, data)
    elif proto == PROTOCOL_CDP:
        l3.cdp(b, data)
    elif proto == PROTOCOL_OSI:
        isis.osi(b, data)
    else:
        l3.ethertype(b, proto, data)


def _slarp(b: Builder, data: bytes) -> None:
    b.layer("slarp")
    if not b.need(data, 4, "SLARP header"):
        return
    (ptype,) = struct.unpack_from(">I", data)
    b.fields["slarp.ptype"] = ptype
    if ptype in (0, 1):
        kind = "request" if ptype == 0 else "reply"
        if not b.need(data, 12, f"SLARP {kind}"):
            b.text(f"SLARP {kind}")
            return
        address, netmask = socket.inet_ntoa(data[4:8]), socket.inet_ntoa(data[8:12])
        b.fields.update({"slarp.address": address, "slarp.netmask": netmask})
        b.text(f"SLARP {kind} {address} mask {netmask}")
    elif ptype == 2:
        if not b.need(data, 14, "SLARP keepalive"):
            b.text("SLARP keepalive")
            return
        mine, yours, reliability = struct.unpack_from(">IIH", data, 4)
        b.fields.update(
            {
                "slarp.mysequence": mine,
                "slarp.yoursequence": yours,
                "slarp.reliability": reliability,
            }
        )
        b.text(f"SLARP keepalive mysequence {mine} yoursequence {yours}")
    else:
        b.text(f"SLARP packet type {ptype}")
