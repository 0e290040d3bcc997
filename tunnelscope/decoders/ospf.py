"""OSPF, version 2 (RFC 2328, over IPv4) and version 3 (RFC 5340, over IPv6): IP protocol 89.

Header, v2 (24 bytes): version 2 | type (1) | packet length (2) | router ID (4) | area ID (4)
  | checksum (2) | authentication type (2) | authentication (8)
Header, v3 (16 bytes): version 3 | type (1) | packet length (2) | router ID (4) | area ID (4)
  | checksum (2) | instance ID (1) | reserved (1)
type 1 Hello, 2 DB Description, 3 LS Request, 4 LS Update, 5 LS Acknowledge
Hello, v2: network mask (4) | hello interval (2) | options (1) | priority (1) | dead interval
  (4) | DR (4) | BDR (4) | neighbor router IDs (4 each) to the packet length
Hello, v3: interface ID (4) | priority (1) | options (3) | hello interval (2) | dead interval
  (2) | DR (4) | BDR (4) | neighbors (4 each)
LS Update: number of LSAs (4) | LSAs; DB Description (v2): MTU (2) | options (1) | flags (1)
  | sequence (4) | LSA headers; LS Acknowledge: LSA headers. An LSA header (20 bytes, v2):
  age (2) | options (1) | type (1) | link state ID (4) | advertising router (4) | sequence (4)
  | checksum (2) | length (2, header included)

Parsed with struct: dpkt's OSPF knows only the v2 header (no Hello, no LSAs, no v3) and
scapy's contrib OSPF takes about 100 us per packet here, against a few us for this module.
LSA headers are decoded for v2 only (v3 LSAs are counted).
"""

from __future__ import annotations

import socket
import struct

from tunnelscope.decoders.base import Builder, name_of

_MESSAGES = {  # as tshark's Info column names them
    1: "Hello Packet",
    2: "DB Description",
    3: "LS Request",
    4: "LS Update",
    5: "LS Acknowledge",
}
_HELLO, _DB_DESCRIPTION, _LS_UPDATE, _LS_ACK = 1, 2, 4, 5
_HEADER = {2: 24, 3: 16}
_HELLO_FIXED = {2: 20, 3: 20}  # bytes before the neighbor list
_LSA_HEADER = 20
_START = struct.Struct(">BBH")  # version, type, packet length
_IDS = struct.Struct(">4x4s4sH")  # router ID, area ID, checksum
_HELLO_V2 = struct.Struct(">4sHBBI4s4s")  # mask, hello, options, priority, dead, DR, BDR
_HELLO_V3 = struct.Struct(">IB3xHH4s4s")  # interface ID, priority, hello, dead, DR, BDR
_LSA = struct.Struct(">HBB4s4sIHH")  # age, options, type, ID, router, sequence, sum, length
_ip = socket.inet_ntoa


def decode(b: Builder, data: bytes) -> None:
    b.layer("ospf")
    if not b.need(data, 4, "OSPF header"):
        b.text("OSPF")
        return
    version, message, length = _START.unpack_from(data)
    name = name_of(_MESSAGES, message, "type")
    b.text(f"OSPFv{version} {name}")
    b.fields.update({"ospf.version": version, "ospf.msg": message, "ospf.packet_length": length})
    header = _HEADER.get(version)
    if header is None:
        return
    if not b.need(data, header, "OSPF header"):
        return
    router, area, checksum = _IDS.unpack_from(data)
    router, area = _ip(router), _ip(area)
    b.fields.update({"ospf.srcrouter": router, "ospf.area_id": area, "ospf.checksum": checksum})
    if version == 2:
        b.fields["ospf.auth.type"] = data[14] << 8 | data[15]
    else:
        b.fields["ospf.instance_id"] = data[14]
    b.text(f"router {router} area {area}")
    if length < header or length > len(data):
        b.bad(f"OSPF packet length {length}")
        return
    body = data[header:length]
    if message == _HELLO:
        _hello(b, version, body)
    elif message == _LS_UPDATE and b.need(body, 4, "LS Update"):
        (count,) = struct.unpack_from(">I", body)
        b.fields["ospf.ls.number_of_lsas"] = count
        b.text(f"{count} LSA" + ("s" if count != 1 else ""))
        if version == 2:
            _lsa_headers(b, body[4:], count, whole=True)
    elif version == 2 and message in (_DB_DESCRIPTION, _LS_ACK):
        start = 8 if message == _DB_DESCRIPTION else 0
        if b.need(body, start, "DB Description"):
            _lsa_headers(b, body[start:], len(body[start:]) // _LSA_HEADER, whole=False)


def _hello(b: Builder, version: int, body: bytes) -> None:
    if not b.need(body, _HELLO_FIXED[version], "OSPF Hello"):
        return
    if version == 2:
        mask, hello, _, priority, dead, designated, backup = _HELLO_V2.unpack_from(body)
        b.fields["ospf.hello.network_mask"] = _ip(mask)
    else:
        interface, priority, hello, dead, designated, backup = _HELLO_V3.unpack_from(body)
        b.fields["ospf.hello.interface_id"] = interface
    b.fields.update(
        {
            "ospf.hello.hello_interval": hello,
            "ospf.hello.router_priority": priority,
            "ospf.hello.router_dead_interval": dead,
            "ospf.hello.designated_router": _ip(designated),
            "ospf.hello.backup_designated_router": _ip(backup),
        }
    )
    neighbors = [_ip(body[i : i + 4]) for i in range(20, len(body) - 3, 4)]
    if neighbors:
        b.fields["ospf.hello.active_neighbor"] = neighbors
        b.text("neighbors " + ",".join(neighbors))


def _lsa_headers(b: Builder, data: bytes, count: int, whole: bool) -> None:
    """`count` LSA headers (v2); `whole`: each is followed by its LSA body (LS Update)."""
    offset = 0
    for _ in range(count):
        if not b.need(data, offset + _LSA_HEADER, "LSA header"):
            return
        age, _, _, lsa_id, router, sequence, _, length = _LSA.unpack_from(data, offset)
        b.append("ospf.lsa.age", age)
        b.append("ospf.lsa.id", _ip(lsa_id))
        b.append("ospf.advrouter", _ip(router))
        b.append("ospf.lsa.seqnum", sequence)
        if not whole:
            offset += _LSA_HEADER
            continue
        if length < _LSA_HEADER or offset + length > len(data):
            b.bad(f"LSA length {length}")
            return
        offset += length
