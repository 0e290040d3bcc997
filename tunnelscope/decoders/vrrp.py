"""VRRP, the standard first-hop redundancy protocol: IP protocol 112, to 224.0.0.18 / ff02::12.

  version (4 bits; 2 RFC 3768, 3 RFC 5798) | type (4 bits; 1 Advertisement) |
  virtual router ID (1) | priority (1) | address count (1) |
  v2: authentication type (1) | advertisement interval (1, s)
  v3: reserved (4 bits) | maximum advertisement interval (12 bits, centiseconds)
  | checksum (2) | addresses: count x 4 bytes (IPv4) or 16 (VRRPv3 over IPv6)
  | v2 only: authentication data (8)

Parsed with struct (dpkt's VRRP knows only version 2). A VRRPv3 message does not say its
address family: it is IPv6 when the addresses fill the rest of the message at 16 bytes each.
"""

from __future__ import annotations

import socket
import struct

from tunnelscope.decoders.base import Builder, name_of

_HEADER = struct.Struct(">BBBBBBH")
_TYPES = {1: "Announcement"}  # tshark's Info word for an Advertisement


def decode(b: Builder, data: bytes) -> None:
    b.layer("vrrp")
    if not b.need(data, _HEADER.size, "VRRP header"):
        b.text("VRRP")
        return
    typever, router_id, priority, count, byte4, byte5, checksum = _HEADER.unpack_from(data)
    version, kind = typever >> 4, typever & 0x0F
    b.fields.update(
        {
            "vrrp.version": version,
            "vrrp.type": kind,
            "vrrp.virt_rtr_id": router_id,
            "vrrp.prio": priority,
            "vrrp.addr_count": count,
            "vrrp.checksum": checksum,
        }
    )
    if version == 3:
        b.fields["vrrp.short_adver_int"] = (byte4 << 8 | byte5) & 0x0FFF
    else:
        b.fields.update({"vrrp.auth_type": byte4, "vrrp.adver_int": byte5})
    addresses = data[_HEADER.size :]
    family, size, key = socket.AF_INET, 4, "vrrp.ip_addr"
    if version == 3 and len(addresses) == 16 * count:
        family, size, key = socket.AF_INET6, 16, "vrrp.ipv6_addr"
    words = [f"VRRP {name_of(_TYPES, kind, 'type')} (v{version}) router {router_id}"]
    words.append(f"priority {priority}")
    for offset in range(0, count * size, size):
        if offset + size > len(addresses):
            b.bad(f"VRRP address {offset // size + 1} of {count} past the message end")
            break
        words.append(socket.inet_ntop(family, addresses[offset : offset + size]))
        b.append(key, words[-1])
    b.text(" ".join(words))
