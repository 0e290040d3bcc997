"""LDP (RFC 5036): discovery Hellos on UDP port 646, sessions on TCP port 646.

PDU header (10 bytes): version (2) | PDU length (2, the bytes after this field) | LSR ID (4)
  | label space (2); a TCP segment can hold several PDUs, a PDU several messages:
message: U bit and type (2; type in the low 15 bits) | length (2, after this field) |
  message ID (4) | TLVs: U F bits and type (2) | length (2) | value
types 0x0001 Notification, 0x0100 Hello, 0x0200 Initialization, 0x0201 Keep Alive,
  0x0300 Address, 0x0301 Address Withdraw, 0x0400 Label Mapping, 0x0401 Label Request,
  0x0402 Label Withdraw, 0x0403 Label Release, 0x0404 Label Abort Request
Hello's Common Hello Parameters TLV (0x0400): hold time (2) | flags T R G (1) | reserved

Every field is a list, one entry per PDU or message, in frame order.
"""

from __future__ import annotations

import socket
import struct

from tunnelscope.decoders.base import Builder, name_of, tlvs

PORT = 646
_HEADER = 10
_MESSAGE_HEADER = 8
_MESSAGES = {  # as tshark's Info column names them, without " Message"
    0x0001: "Notification",
    0x0100: "Hello",
    0x0200: "Initialization",
    0x0201: "Keep Alive",
    0x0300: "Address",
    0x0301: "Address Withdrawal",
    0x0400: "Label Mapping",
    0x0401: "Label Request",
    0x0402: "Label Withdrawal",
    0x0403: "Label Release",
    0x0404: "Label Abort Request",
}
_HELLO = 0x0100
_COMMON_HELLO_PARAMETERS = 0x0400


def decode(b: Builder, data: bytes) -> None:
    b.layer("ldp")
    names = []
    offset = 0
    while offset < len(data) and b.need(data, offset + _HEADER, "LDP header"):
        version, length = struct.unpack_from(">HH", data, offset)
        lsr, space = socket.inet_ntoa(data[offset + 4 : offset + 8]), data[offset + 8 : offset + 10]
        b.append("ldp.hdr.version", version)
        b.append("ldp.hdr.pdu_len", length)
        b.append("ldp.hdr.ldpid.lsr", lsr)
        b.append("ldp.hdr.ldpid.lsid", int.from_bytes(space, "big"))
        end = offset + 4 + length
        if length < _HEADER - 4 or end > len(data):
            b.bad(f"LDP PDU length {length}")
            break
        names += _messages(b, data[offset + _HEADER : end])
        offset = end
    b.text("LDP " + (", ".join(names) or "PDU"))


def _messages(b: Builder, data: bytes) -> list[str]:
    names = []
    offset = 0
    while offset < len(data):
        if not b.need(data, offset + _MESSAGE_HEADER, "LDP message"):
            break
        kind, length, ident = struct.unpack_from(">HHI", data, offset)
        b.append("ldp.msg.ubit", bool(kind & 0x8000))
        b.append("ldp.msg.type", kind & 0x7FFF)
        b.append("ldp.msg.len", length)
        b.append("ldp.msg.id", ident)
        names.append(name_of(_MESSAGES, kind & 0x7FFF, "message type") + " Message")
        end = offset + 4 + length
        if length < 4 or end > len(data):
            b.bad(f"LDP message length {length}")
            break
        if kind & 0x7FFF == _HELLO:
            _hello(b, data[offset + _MESSAGE_HEADER : end])
        offset = end
    return names


def _hello(b: Builder, data: bytes) -> None:
    """The hold time from a Hello's Common Hello Parameters TLV (the other TLVs are skipped)."""
    for kind, value in tlvs(b, data, "LDP TLV", length_counts_header=False):
        if kind & 0x3FFF == _COMMON_HELLO_PARAMETERS and len(value) >= 2:
            b.append("ldp.msg.tlv.hello.hold", struct.unpack_from(">H", value)[0])
