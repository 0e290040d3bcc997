"""RIP versions 1 and 2 (RFC 1058, RFC 2453), UDP port 520. Parsed by dpkt.

  command (1): 1 Request, 2 Response | version (1) | routing domain (2; zero in v1)
  then 20-byte entries: address family (2) | route tag (2) | address (4) | netmask (4) |
  next hop (4) | metric (4)             (v1: tag, netmask and next hop must be zero)
  an entry with family 0xFFFF is authentication (v2): type (2) | 16 bytes

Route fields are lists, one entry per route, as tshark prints them; the address only for
family 2 (IPv4), tag, netmask and next hop only for version 2 (as tshark shows them).
"""

from __future__ import annotations

import socket
import struct

import dpkt

from tunnelscope.decoders.base import Builder, name_of

PORT = 520
_COMMANDS = {1: "Request", 2: "Response", 3: "Traceon", 4: "Traceoff"}
_HEADER, _ENTRY = 4, 20
_AF_INET = 2  # family 0 (with metric 16: "send the whole table") carries no address


def decode(b: Builder, data: bytes) -> None:
    b.layer("rip")
    if not b.need(data, _HEADER, "RIP header"):
        b.text("RIP")
        return
    if (len(data) - _HEADER) % _ENTRY:
        b.bad(f"RIP entries of {len(data) - _HEADER} bytes, not a multiple of {_ENTRY}")
        return
    rip = dpkt.rip.RIP(data)
    b.fields.update({"rip.command": rip.cmd, "rip.version": rip.v})
    if rip.auth is not None:
        b.fields["rip.auth.type"] = rip.auth.type
    for route in rip.rtes:
        b.append("rip.family", route.family)
        if route.family == _AF_INET:
            b.append("rip.ip", _ip(route.addr))
            if rip.v == 2:
                b.append("rip.route_tag", route.route_tag)
                b.append("rip.netmask", _ip(route.subnet))
                b.append("rip.next_hop", _ip(route.next_hop))
        b.append("rip.metric", route.metric)
    count = len(rip.rtes)
    routes = f"{count} route" + ("s" if count != 1 else "")
    b.text(f"RIPv{rip.v} {name_of(_COMMANDS, rip.cmd, 'command')}, {routes}")


def _ip(address: int) -> str:
    return socket.inet_ntoa(struct.pack(">I", address))
