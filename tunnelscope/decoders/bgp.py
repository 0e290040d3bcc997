"""BGP-4 (RFC 4271) messages in one TCP segment to or from port 179.

A segment can hold several messages, each:
  marker (16 bytes of 0xFF) | length (2, header included, 19..4096) | type (1) | body
type 1 OPEN: version (1) | my AS (2) | hold time (2) | BGP identifier (4) | optional
  parameters length (1) | parameters
type 2 UPDATE: withdrawn routes length (2) | withdrawn prefixes | path attributes length (2)
  | path attributes | NLRI prefixes to the message end; a prefix is its length (1) and
  then only its significant bytes
type 3 NOTIFICATION: error code (1) | subcode (1, its field named after the code) | data
type 4 KEEPALIVE: the header alone;  type 5 ROUTE-REFRESH: AFI (2) | reserved (1) | SAFI (1)

Every field is a list, one entry per message (or per prefix), in segment order: a segment
with an UPDATE and a KEEPALIVE has `bgp.type` [2, 4]. tshark reassembles messages split
across segments; tunnelscope decodes one segment at a time, so a message that continues in
the next segment is named ("continues") but not decoded, and a segment that does not start
with a marker is shown as a continuation.

Parsed with struct: dpkt's BGP builds an object per path attribute (about 30 us for one
small UPDATE here) and raises on the first odd byte; this walk costs a few us.
"""

from __future__ import annotations

import socket
import struct

from tunnelscope.decoders.base import Builder, ipv4_prefixes, name_of

PORT = 179
_MARKER = b"\xff" * 16
_HEADER = 19
_MAX_LENGTH = 4096
_LENGTH_TYPE = struct.Struct(">HB")  # after the marker
_TYPES = {1: "OPEN", 2: "UPDATE", 3: "NOTIFICATION", 4: "KEEPALIVE", 5: "ROUTE-REFRESH"}
_OPEN, _UPDATE, _NOTIFICATION = 1, 2, 3
# NOTIFICATION: tshark names the subcode field after the error code
_SUBCODE_FIELDS = {
    1: "bgp.notify.minor_error",  # message header error
    2: "bgp.notify.minor_error_open",
    3: "bgp.notify.minor_error_update",
    4: "bgp.notify.minor_error_expired",  # hold timer expired
    5: "bgp.notify.minor_error_state",  # finite state machine error
    6: "bgp.notify.minor_error_cease",
    7: "bgp.notify.minor_error_capability",
}


def decode(b: Builder, data: bytes) -> None:
    b.layer("bgp")
    if not data.startswith(_MARKER):
        b.text(f"BGP continuation, {len(data)} bytes")
        return
    names = []
    offset = 0
    while offset < len(data):
        message = data[offset:]
        if len(message) < _HEADER or not message.startswith(_MARKER):
            names.append("continues")
            break
        length, kind = _LENGTH_TYPE.unpack_from(message, 16)
        b.append("bgp.length", length)
        b.append("bgp.type", kind)
        names.append(name_of(_TYPES, kind, "type"))
        if not _HEADER <= length <= _MAX_LENGTH:
            b.bad(f"BGP message length {length}")
            break
        if length > len(message):
            names[-1] += " (continues)"
            break
        body = message[_HEADER:length]
        if kind == _OPEN:
            _open(b, body)
        elif kind == _UPDATE:
            _update(b, body)
        elif kind == _NOTIFICATION and b.need(body, 2, "BGP NOTIFICATION"):
            b.append("bgp.notify.major_error", body[0])
            b.append(_SUBCODE_FIELDS.get(body[0], "bgp.notify.minor_error_unknown"), body[1])
        offset += length
    b.text("BGP " + ", ".join(names))


def _open(b: Builder, body: bytes) -> None:
    if not b.need(body, 10, "BGP OPEN"):
        return
    version, my_as, hold_time = struct.unpack_from(">BHH", body)
    b.append("bgp.open.version", version)
    b.append("bgp.open.myas", my_as)
    b.append("bgp.open.holdtime", hold_time)
    b.append("bgp.open.identifier", socket.inet_ntoa(body[5:9]))
    b.append("bgp.open.opt.len", body[9])


def _update(b: Builder, body: bytes) -> None:
    if not b.need(body, 2, "BGP UPDATE"):
        return
    (withdrawn_length,) = struct.unpack_from(">H", body)
    b.append("bgp.update.withdrawn_routes.length", withdrawn_length)
    attributes_at = 2 + withdrawn_length
    if not b.need(body, attributes_at + 2, "BGP UPDATE"):
        return
    (attributes_length,) = struct.unpack_from(">H", body, attributes_at)
    b.append("bgp.update.path_attributes.length", attributes_length)
    nlri_at = attributes_at + 2 + attributes_length
    if nlri_at > len(body):
        b.bad(f"BGP path attributes length {attributes_length}")
        return
    ipv4_prefixes(b, body[2:attributes_at], "bgp.prefix_length", "bgp.withdrawn_prefix")
    ipv4_prefixes(b, body[nlri_at:], "bgp.prefix_length", "bgp.nlri_prefix")
