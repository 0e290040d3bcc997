"""PPP in HDLC-like framing (LINKTYPE 50), also without address and control (LINKTYPE 9).

address (1) 0xFF | control (1) 0x03 | protocol (2, or 1 when its first byte is odd: PFC) | info
FF 03 may be absent (ACFC). A frame starting 0x0F/0x8F is Cisco HDLC: libpcap's PPP_SERIAL
link type carries Cisco serial framing too, and Wireshark decodes it as such ("ppp:chdlc").
protocol 0x0021 IPv4, 0x0023 OSI (IS-IS), 0x0057 IPv6, 0x0207 CDP, 0x0281 MPLS
control protocols (LCP 0xC021, IPCP 0x8021, IPV6CP 0x8057, CCP 0x80FD, ...):
    code (1) | identifier (1) | length (2, header included) | data
    LCP Echo-Request/Echo-Reply/Discard-Request data start with the magic number (4)
PAP 0xC023, CHAP 0xC223: code (1) | identifier (1) | length (2) | data
    PAP Authenticate-Request: peer-id length (1) | peer-id | password length (1) | password
    CHAP Challenge/Response:  value size (1) | value | name (to the end of the packet)
"""

from __future__ import annotations

import socket
import struct

from tunnelscope.decoders import chdlc, isis, l3
from tunnelscope.decoders.base import Builder, frame_text, name_of, tlvs

PROTOCOL_LCP = 0xC021
_CONTROL_PROTOCOLS = {
    PROTOCOL_LCP: ("lcp", "LCP"),
    0x8021: ("ipcp", "IPCP"),
    0x8023: ("osinlcp", "OSINLCP"),
    0x8057: ("ipv6cp", "IPV6CP"),
    0x80FD: ("ccp", "CCP"),
    0x8207: ("cdpcp", "CDPCP"),
    0x8281: ("mplscp", "MPLSCP"),
}
_CONTROL_CODES = {
    1: "Configure-Request",
    2: "Configure-Ack",
    3: "Configure-Nak",
    4: "Configure-Reject",
    5: "Terminate-Request",
    6: "Terminate-Ack",
    7: "Code-Reject",
    8: "Protocol-Reject",
    9: "Echo-Request",
    10: "Echo-Reply",
    11: "Discard-Request",
    12: "Identification",
    13: "Time-Remaining",
    14: "Reset-Request",
    15: "Reset-Ack",
}
_CONFIGURE_CODES = (1, 2, 3, 4)
_LCP_MAGIC_CODES = (9, 10, 11)
# (protocol, option type) -> (field, value size, summary); the IPCP ones are IPv4 addresses.
_OPTIONS = {
    ("lcp", 1): ("lcp.opt.mru", 2, "mru {}"),
    ("lcp", 3): ("lcp.opt.auth_protocol", 2, "auth {:#06x}"),
    ("lcp", 5): ("lcp.opt.magic_number", 4, "magic {:#010x}"),
    ("ipcp", 3): ("ipcp.opt.ip_address", 4, "address {}"),
    ("ipcp", 129): ("ipcp.opt.pri_dns_address", 4, "dns {}"),
    ("ipcp", 131): ("ipcp.opt.sec_dns_address", 4, "dns {}"),
}
_PAP_CODES = {1: "Authenticate-Request", 2: "Authenticate-Ack", 3: "Authenticate-Nak"}
_AUTH_PROTOCOLS = {
    0xC023: ("pap", "PAP", _PAP_CODES),
    0xC223: ("chap", "CHAP", {1: "Challenge", 2: "Response", 3: "Success", 4: "Failure"}),
}


def decode(b: Builder, data: bytes) -> None:
    b.layer("ppp")
    if data[:1] in (b"\x0f", b"\x8f"):
        chdlc.decode(b, data)
        return
    b.text("PPP")
    if data[:1] == b"\xff":
        if not b.need(data, 2, "PPP header"):
            return
        b.fields.update({"ppp.address": data[0], "ppp.control": data[1]})
        data = data[2:]
    if not b.need(data, 1, "PPP protocol"):
        return
    size = 1 if data[0] & 1 else 2
    if not b.need(data, size, "PPP protocol"):
        return
    proto = int.from_bytes(data[:size], "big")
    b.fields["ppp.protocol"] = proto
    protocol(b, proto, data[size:])


def protocol(b: Builder, proto: int, data: bytes) -> None:
    """Decode what a PPP protocol number announces."""
    if proto == 0x0021:
        l3.ipv4(b, data)
    elif proto == 0x0023:
        isis.osi(b, data)
    elif proto == 0x0057:
        l3.ipv6(b, data)
    elif proto == 0x0207:
        l3.cdp(b, data)
    elif proto == 0x0281:
        l3.mpls(b, data)
    elif proto in _CONTROL_PROTOCOLS:
        _control(b, proto, data)
    elif proto in _AUTH_PROTOCOLS:
        _auth(b, proto, data)
    else:
        b.text(f"protocol {proto:#06x}, {len(data)} bytes")


def _header(b: Builder, prefix: str, name: str, codes: dict[int, str], data: bytes) -> bytes | None:
    """The code/identifier/length header control and authentication protocols share.

    Returns the data after it, up to the length it gives; None when the header is bad.
    """
    if not b.need(data, 4, f"{name} header"):
        b.text(name)
        return None
    code, identifier, length = struct.unpack_from(">BBH", data)
    b.fields.update(
        {f"{prefix}.code": code, f"{prefix}.identifier": identifier, f"{prefix}.length": length}
    )
    b.text(f"{name} {name_of(codes, code, 'code')} id {identifier}")
    if length < 4:
        b.bad(f"{name} length {length}")
        return None
    if length > len(data):
        b.bad(f"{name} length {length} past the end of the frame")
        return None
    return data[4:length]


def _control(b: Builder, proto: int, data: bytes) -> None:
    protocol_name, name = _CONTROL_PROTOCOLS[proto]
    b.layer(protocol_name)
    body = _header(b, "ppp", name, _CONTROL_CODES, data)
    if body is None:
        return
    code = data[0]
    if code in _CONFIGURE_CODES:
        _options(b, protocol_name, body)
    elif proto == PROTOCOL_LCP and code in _LCP_MAGIC_CODES and b.need(body, 4, "LCP magic"):
        (magic,) = struct.unpack_from(">I", body)
        b.fields["lcp.magic_number"] = magic
        b.text(f"magic {magic:#010x}")


def _options(b: Builder, protocol_name: str, body: bytes) -> None:
    """Configure-Request/Ack/Nak/Reject options: type (1) | length (1, header included) | value."""
    for kind, value in tlvs(b, body, "option", wide=False):
        b.append(f"{protocol_name}.opt.type", kind)
        known = _OPTIONS.get((protocol_name, kind))
        if known and len(value) >= known[1]:
            field, size, summary = known
            raw = value[:size]
            shown = socket.inet_ntoa(raw) if protocol_name == "ipcp" else int.from_bytes(raw, "big")
            b.fields[field] = shown
            b.text(summary.format(shown))


def _auth(b: Builder, proto: int, data: bytes) -> None:
    prefix, name, codes = _AUTH_PROTOCOLS[proto]
    b.layer(prefix)
    body = _header(b, prefix, name, codes, data)
    if body is None or (prefix, data[0]) not in (("pap", 1), ("chap", 1), ("chap", 2)):
        return
    what = "PAP peer-id" if prefix == "pap" else "CHAP value"
    if not (b.need(body, 1, what) and b.need(body, 1 + body[0], what)):
        return
    if prefix == "pap":
        peer = body[1 : 1 + body[0]]
        b.fields["pap.peer_id"] = peer.decode("utf-8", "replace")
        b.text(f"peer-id {frame_text(peer)}")
    else:
        chap_name = body[1 + body[0] :]
        b.fields["chap.name"] = chap_name.decode("utf-8", "replace")
        b.text(f"name {frame_text(chap_name)}")
