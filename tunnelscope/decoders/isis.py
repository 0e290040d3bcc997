"""IS-IS (ISO 10589) and the OSI network layer that carries it on serial links and LANs.

How it arrives: C-HDLC and Frame Relay Cisco protocol 0xFEFE, PPP protocol 0x0023 and LLC
DSAP = SSAP = 0xFE carry an OSI PDU (tshark: "osi") whose first byte, its NLPID, names the
protocol: 0x83 IS-IS, 0x81 CLNP, 0x82 ES-IS (named, not decoded). On Frame Relay IETF the
IS-IS PDU follows control 0x03 directly: its first byte is RFC 2427's NLPID.

Common header (8 bytes):
  NLPID 0x83 | header length (1) | version 1 | ID length (1; 0 means 6) | PDU type (low 5
  bits) | version 1 | reserved (1) | maximum area addresses (1)
LAN Hello (15 L1, 16 L2) and point-to-point Hello (17):
  circuit type (1, low 2 bits) | source ID (6) | holding time (2) | PDU length (2) |
  LAN: priority (1, low 7 bits) | LAN ID (7)          P2P: local circuit ID (1)
LSP (18 L1, 20 L2):
  PDU length (2) | remaining lifetime (2) | LSP ID (8) | sequence number (4) | checksum (2)
  | flags (1): partition repair, attached (4 bits), overload, IS type (low 2 bits)
CSNP (24 L1, 25 L2): PDU length (2) | source ID (7) | start LSP ID (8) | end LSP ID (8)
PSNP (26 L1, 27 L2): PDU length (2) | source ID (7)
then TLVs to the PDU length: type (1) | length (1) | value; 137 = dynamic hostname.

IDs are shown as tshark shows them: system ID `0000.0000.0001`, LAN/source ID with the
pseudonode byte `.01`, LSP ID with the fragment `-00`. Only 6-byte system IDs are decoded.
Parsed with struct: scapy's contrib ISIS takes about 300 us to dissect one PDU (measured on
this machine), some hundred times this module's cost; dpkt has no IS-IS.
"""

from __future__ import annotations

import struct

from tunnelscope.decoders.base import Builder, frame_text, tlvs

NLPID_ISIS = 0x83
_OSI_NAMED = {0x81: ("clnp", "CLNP"), 0x82: ("esis", "ES-IS")}
_HEADER = 8
_SYSTEM_ID = 6
_HOSTNAME_TLV = 137
_PDU_TYPES = {  # PDU type -> (tshark's name in Info, kind)
    15: ("L1 HELLO", "hello"),
    16: ("L2 HELLO", "hello"),
    17: ("P2P HELLO", "hello"),
    18: ("L1 LSP", "lsp"),
    20: ("L2 LSP", "lsp"),
    24: ("L1 CSNP", "csnp"),
    25: ("L2 CSNP", "csnp"),
    26: ("L1 PSNP", "psnp"),
    27: ("L2 PSNP", "psnp"),
}
_P2P_HELLO = 17
_FIXED = {"hello": 19, "lsp": 19, "csnp": 25, "psnp": 9}  # bytes after the common header
_P2P_HELLO_FIXED = 12  # a LAN Hello's 19 without priority and LAN ID, with the circuit ID


def osi(b: Builder, data: bytes) -> None:
    """An OSI network-layer PDU: the NLPID in its first byte says which."""
    b.layer("osi")
    if not b.need(data, 1, "OSI NLPID"):
        return
    if data[0] == NLPID_ISIS:
        decode(b, data)
    elif data[0] in _OSI_NAMED:
        b.layer(*_OSI_NAMED[data[0]])
    else:
        b.text(f"OSI NLPID {data[0]:#04x}, {len(data)} bytes")


def decode(b: Builder, data: bytes) -> None:
    """An IS-IS PDU, from its NLPID byte on."""
    b.layer("isis")
    if not b.need(data, _HEADER, "IS-IS header"):
        b.text("IS-IS")
        return
    irpd, header_length, version, id_length, pdu_type, _, _, max_areas = data[:_HEADER]
    pdu_type &= 0x1F
    b.fields.update(
        {
            "isis.irpd": irpd,
            "isis.len": header_length,
            "isis.version": version,
            "isis.sysid_len": id_length,
            "isis.type": pdu_type,
            "isis.max_area_adr": max_areas,
        }
    )
    name, kind = _PDU_TYPES.get(pdu_type, (f"PDU type {pdu_type}", ""))
    b.text(f"IS-IS {name}")
    if not kind:
        return
    if id_length not in (0, _SYSTEM_ID):
        b.text(f"ID length {id_length}")
        return
    b.layer(f"isis.{kind}")
    body = data[_HEADER:]
    fixed = _P2P_HELLO_FIXED if pdu_type == _P2P_HELLO else _FIXED[kind]
    if not b.need(body, fixed, f"IS-IS {name} header"):
        return
    if kind == "hello":
        length = _hello(b, pdu_type, body)
    elif kind == "lsp":
        length = _lsp(b, body)
    else:
        length = _snp(b, kind, body)
    if length < header_length or length > len(data):
        b.bad(f"IS-IS PDU length {length}")
        return
    _tlvs(b, kind, data[header_length:length])


def _system_id(raw: bytes) -> str:
    return ".".join(raw[i : i + 2].hex() for i in range(0, _SYSTEM_ID, 2))


def _node_id(raw: bytes) -> str:
    """System ID and pseudonode byte: `0000.0000.0001.01`."""
    return f"{_system_id(raw)}.{raw[_SYSTEM_ID]:02x}"


def _lsp_id(raw: bytes) -> str:
    """System ID, pseudonode and fragment: `0000.0000.0001.00-00`."""
    return f"{_node_id(raw)}-{raw[_SYSTEM_ID + 1]:02x}"


def _hello(b: Builder, pdu_type: int, body: bytes) -> int:
    circuit, holding, length = body[0], *struct.unpack_from(">HH", body, 7)
    source = _system_id(body[1:7])
    b.fields.update(
        {
            "isis.hello.circuit_type": circuit & 0x03,
            "isis.hello.source_id": source,
            "isis.hello.holding_timer": holding,
            "isis.hello.pdu_length": length,
        }
    )
    if pdu_type == _P2P_HELLO:
        b.fields["isis.hello.local_circuit_id"] = body[11]
        b.text(f"system-id {source} hold {holding}")
        return length
    lan = _node_id(body[12:19])
    b.fields.update({"isis.hello.priority": body[11] & 0x7F, "isis.hello.lan_id": lan})
    b.text(f"system-id {source} lan-id {lan} hold {holding}")
    return length


def _lsp(b: Builder, body: bytes) -> int:
    length, lifetime = struct.unpack_from(">HH", body)
    lsp_id = _lsp_id(body[4:12])
    sequence, checksum = struct.unpack_from(">IH", body, 12)
    b.fields.update(
        {
            "isis.lsp.pdu_length": length,
            "isis.lsp.remaining_life": lifetime,
            "isis.lsp.lsp_id": lsp_id,
            "isis.lsp.sequence_number": sequence,
            "isis.lsp.checksum": checksum,
            "isis.lsp.is_type": body[18] & 0x03,
        }
    )
    b.text(f"{lsp_id} seq {sequence:#010x} lifetime {lifetime}")
    return length


def _snp(b: Builder, kind: str, body: bytes) -> int:
    (length,) = struct.unpack_from(">H", body)
    b.fields.update(  # tshark's field holds the system ID; its Info shows the pseudonode too
        {f"isis.{kind}.pdu_length": length, f"isis.{kind}.source_id": _system_id(body[2:8])}
    )
    b.text(f"source-id {_node_id(body[2:9])}")
    if kind == "csnp":
        start, end = _lsp_id(body[9:17]), _lsp_id(body[17:25])
        b.fields.update({"isis.csnp.start_lsp_id": start, "isis.csnp.end_lsp_id": end})
        b.text(f"{start} to {end}")
    return length


def _tlvs(b: Builder, kind: str, data: bytes) -> None:
    """Walk the TLVs: their lengths must fit the PDU; an LSP's hostname is kept."""
    for tlv_type, value in tlvs(b, data, "IS-IS TLV", wide=False, length_counts_header=False):
        if kind == "lsp" and tlv_type == _HOSTNAME_TLV:
            b.fields["isis.lsp.hostname"] = value.decode("utf-8", "replace")
            b.text(f"host {frame_text(value)}")
