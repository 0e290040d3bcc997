"""RIP versions 1 and 2 (RFC 1058, RFC 2453), UDP port 520.

  command (1): 1 Request, 2 Response | version (1) | routing domain (2; zero in v1)
  then 20-byte entries: address family (2) | route tag (2) | address (4) | netmask (4) |
  next hop (4) | metric (4)             (v1: tag, netmask and next hop must be zero)
  an entry with family 0xFFFF is authentication (v2): type (2) | 16 bytes

Route fields are lists, one entry per route, as tshark prints them; the address only for
family 2 (IPv4), tag, netmask and next hop only for version 2 (as tshark shows them).
When several entries are authentication, the last one gives `rip.auth.type`.

Parsed with struct: dpkt's RIP (an object per entry) took about half the decoding time of a
RIP frame.
"""

from __future__ import annotations

import socket
import struct

from tunnelscope.decoders.base import Builder, name_of

PORT = 520
_COMMANDS = {1: "Request", 2: "Response", 3: "Traceon", 4: "Traceoff"}
_HEADER, _ENTRY = 4, 20
_AF_INET = 2  # family 0 (with metric 16: "send the whole table") carries no address
_AUTHENTICATION = 0xFFFF
_ROUTE = struct.Struct(">HH4s4s4sI")  # family, tag (or auth type), address, mask, next hop


def decode(b: Builder, data: bytes) -> None:
    b.layer("rip")
    if not b.need(data, _HEADER, "RIP header"):
        b.text("RIP")
        return
    if (len(data) - _HEADER) % _ENTRY:
        b.bad(f"RIP entries of {len(data) - _HEADER} bytes, not a multiple of {_ENTRY}")
        return
    command, version = data[0], data[1]
    b.fields.update({"rip.command": command, "rip.version": version})
    entries = list(_ROUTE.iter_unpack(data[_HEADER:]))
    authentication = [entry for entry in entries if entry[0] == _AUTHENTICATION]
    if authentication:
        b.fields["rip.auth.type"] = authentication[-1][1]
    routes = [entry for entry in entries if entry[0] != _AUTHENTICATION]
    for family, tag, address, netmask, next_hop, metric in routes:
        b.append("rip.family", family)
        if family == _AF_INET:
            b.append("rip.ip", socket.inet_ntoa(address))
            if version == 2:
                b.append("rip.route_tag", tag)
                b.append("rip.netmask", socket.inet_ntoa(netmask))
                b.append("rip.next_hop", socket.inet_ntoa(next_hop))
        b.append("rip.metric", metric)
    count = len(routes)
    shown = f"{count} route" + ("s" if count != 1 else "")
    b.text(f"RIPv{version} {name_of(_COMMANDS, command, 'command')}, {shown}")
