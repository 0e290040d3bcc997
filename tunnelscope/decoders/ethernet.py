"""Ethernet II and 802.3/LLC, with 802.1Q and QinQ tag stacks (LINKTYPE 1).

  dst MAC (6) | src MAC (6) | type/length (2) | payload              (no FCS in a tunnel)
  type/length >= 0x0600: an ethertype; <= 1500: an 802.3 length, then 802.2 LLC
  tag: TPID (2) 0x8100, 0x88a8, 0x9100 or 0x9200 | TCI (2): priority 3 bits, DEI 1, VLAN id 12
       | the next type/length (2)
  LLC: DSAP (1) | SSAP (1) | control (1; 2 for I and S frames)
       SNAP (DSAP = SSAP = 0xAA, control 0x03): OUI (3) | PID (2, an ethertype when OUI = 0)
       OSI (DSAP = SSAP = 0xFE, control 0x03): an OSI PDU (IS-IS)

Tags are named as tshark 4.0 names them: a 0x88a8 tag is `ieee8021ad.*`, 0x8100 and 0x9100
tags are `vlan.*`, one list entry per tag, outer first. tshark 4.0 does not decode 0x9200;
tunnelscope reads it as a `vlan` tag (old QinQ switches use it).
"""

from __future__ import annotations

import struct

from tunnelscope.decoders import isis, l3
from tunnelscope.decoders.base import Builder

_TAGS = {0x8100: "vlan", 0x9100: "vlan", 0x9200: "vlan", 0x88A8: "ieee8021ad"}
_MAX_LENGTH = 1500  # 802.3: larger values below 0x0600 are neither a length nor a type
_LLC_SAPS = {0x42: ("stp", "STP")}
_LLC_OSI = 0xFE


def decode(b: Builder, data: bytes) -> None:
    b.layer("eth")
    if len(data) >= 12:
        dst, src = data[:6].hex(":"), data[6:12].hex(":")
        b.fields.update({"eth.dst": dst, "eth.src": src})
        b.text(f"Ethernet {src} > {dst}")
    else:
        b.text("Ethernet")
    if not b.need(data, 14, "Ethernet header"):
        return
    (etype,) = struct.unpack_from(">H", data, 12)
    if etype < 0x0600:
        _length(b, "eth", etype, data[14:])
        return
    b.fields["eth.type"] = etype
    data = data[14:]
    while etype in _TAGS:
        kind = _TAGS[etype]
        b.layer(kind)
        if not b.need(data, 2, "VLAN tag"):
            return
        (tci,) = struct.unpack_from(">H", data)
        vid, dei = tci & 0x0FFF, (tci >> 12) & 1
        b.append(f"{kind}.priority", tci >> 13)
        b.append(f"{kind}.dei", bool(dei) if kind == "vlan" else dei)  # tshark's types differ
        b.append(f"{kind}.id", vid)
        b.text(f"vlan {vid}" if kind == "vlan" else f"s-vlan {vid}")
        if not b.need(data, 4, "VLAN tag"):
            return
        (etype,) = struct.unpack_from(">H", data, 2)
        data = data[4:]
        if etype < 0x0600:
            _length(b, "vlan", etype, data)
            return
        if kind == "vlan":
            b.append("vlan.etype", etype)
    l3.ethertype(b, etype, data)


def _length(b: Builder, prefix: str, length: int, data: bytes) -> None:
    """An 802.3 length field (after the MACs or after a tag): LLC follows."""
    if length > _MAX_LENGTH:
        b.bad(f"invalid length/type {length:#06x}")
        return
    b.fields[f"{prefix}.len"] = length
    if length > len(data):
        b.bad(f"802.3 length {length} past the end of the frame")
    _llc(b, data[:length])


def _llc(b: Builder, data: bytes) -> None:
    b.layer("llc")
    if not b.need(data, 3, "LLC header"):
        return
    dsap, ssap, control = data[0], data[1], data[2]
    size = 3
    if control & 0x03 != 0x03:  # I and S frames: 2 bytes, read little-endian as Wireshark does
        if not b.need(data, 4, "LLC header"):
            return
        control, size = control | (data[3] << 8), 4
    b.fields.update({"llc.dsap": dsap, "llc.ssap": ssap, "llc.control": control})
    if dsap == ssap == 0xAA and control == 0x03:
        if not b.need(data, 8, "SNAP header"):
            return
        oui, pid = int.from_bytes(data[3:6], "big"), int.from_bytes(data[6:8], "big")
        pid_name = "llc.type" if oui == 0 else "llc.cisco_pid" if oui == l3.CISCO_OUI else "llc.pid"
        b.fields.update({"llc.oui": oui, pid_name: pid})
        l3.snap(b, oui, pid, data[8:])
    elif dsap == ssap == _LLC_OSI and control == 0x03:
        isis.osi(b, data[size:])
    elif dsap == ssap and dsap in _LLC_SAPS:
        b.layer(*_LLC_SAPS[dsap])
    else:
        b.text(f"LLC DSAP {dsap:#04x} SSAP {ssap:#04x}, {len(data) - size} bytes")
