"""HSRP, Cisco's first-hop redundancy protocol: UDP port 1985 (IPv4), 2029 (IPv6).

Version 1 (RFC 2281), to 224.0.0.2; 20 bytes, parsed by dpkt:
  version (1; 0) | opcode (1) | state (1) | hellotime (1, s) | holdtime (1, s) |
  priority (1) | group (1) | reserved (1) | authentication data (8; "cisco") | virtual IP (4)
Version 2 (to 224.0.0.102, or ff02::66 on port 2029), TLVs: type (1) | length (1) | value;
  dpkt has no version 2, so it is parsed with struct:
  1 Group State (40): version (1; 2) | opcode (1) | state (1) | IP version (1) | group (2) |
    identifier (6, the sender's MAC) | priority (4) | hellotime (4, ms) | holdtime (4, ms) |
    virtual IP (16; an IPv4 address in its first 4 bytes)
  3 Text Authentication (8): the key; 4 MD5 Authentication
opcode 0 Hello, 1 Coup, 2 Resign, 3 Advertise. Version 1 states 0 Initial, 1 Learn, 2 Listen,
  4 Speak, 8 Standby, 16 Active; version 2 states 1 Initial to 6 Active.

tshark tells the versions apart by destination address; this decoder, which sees only the UDP
payload, by the first byte: 0 is version 1's version field, a version 2 message starts with a
TLV type (1 to 4). Fields are named as tshark names them (hsrp.*, and hsrp2.* for version 2).
"""

from __future__ import annotations

import socket
import struct

import dpkt

from tunnelscope.decoders.base import Builder, frame_text, name_of

PORTS = (1985, 2029)
_V1_SIZE = 20
_OPCODES = {0: "Hello", 1: "Coup", 2: "Resign", 3: "Advertise"}
_V1_STATES = {0: "Initial", 1: "Learn", 2: "Listen", 4: "Speak", 8: "Standby", 16: "Active"}
_V2_STATES = {1: "Initial", 2: "Learn", 3: "Listen", 4: "Speak", 5: "Standby", 6: "Active"}
_GROUP_STATE, _TEXT_AUTH = 1, 3
_GROUP_STATE_TLV = struct.Struct(">BBBBH6sIII16s")


def decode(b: Builder, data: bytes) -> None:
    b.layer("hsrp")
    if not b.need(data, 2, "HSRP header"):
        b.text("HSRP")
    elif data[0] == 0:
        _version1(b, data)
    else:
        _version2(b, data)


def _version1(b: Builder, data: bytes) -> None:
    if not b.need(data, _V1_SIZE, "HSRP message"):
        b.text("HSRP")
        return
    hsrp = dpkt.hsrp.HSRP(data)
    b.fields.update(
        {
            "hsrp.version": hsrp.version,
            "hsrp.opcode": hsrp.opcode,
            "hsrp.state": hsrp.state,
            "hsrp.hellotime": hsrp.hello,
            "hsrp.holdtime": hsrp.hold,
            "hsrp.priority": hsrp.priority,
            "hsrp.group": hsrp.group,
            "hsrp.reserved": hsrp.rsvd,
            "hsrp.auth_data": frame_text(hsrp.auth.rstrip(b"\0")),
            "hsrp.virt_ip": socket.inet_ntoa(hsrp.vip),
        }
    )
    b.text(
        f"HSRP {_message(hsrp.opcode, hsrp.state, _V1_STATES)} group {hsrp.group}"
        f" priority {hsrp.priority} virtual IP {socket.inet_ntoa(hsrp.vip)}"
    )


def _version2(b: Builder, data: bytes) -> None:
    offset, words = 0, ["HSRPv2"]
    while offset + 2 <= len(data):
        tlv_type, length = data[offset], data[offset + 1]
        value = data[offset + 2 : offset + 2 + length]
        if len(value) < length:
            b.bad(f"HSRPv2 TLV {tlv_type} of {length} bytes past the message end")
            break
        if tlv_type == _GROUP_STATE and length >= _GROUP_STATE_TLV.size:
            words.append(_group_state(b, value))
        elif tlv_type == _TEXT_AUTH:
            b.fields["hsrp2.auth_data"] = frame_text(value.rstrip(b"\0"))
        offset += 2 + length
    if "hsrp2.version" not in b.fields:
        b.bad("HSRPv2 message without a Group State TLV")
    b.text(" ".join(words))


def _group_state(b: Builder, value: bytes) -> str:
    version, opcode, state, ip_version, group, identifier, priority, hello, hold, address = (
        _GROUP_STATE_TLV.unpack_from(value)
    )
    if ip_version == 6:
        virtual_ip, key = socket.inet_ntop(socket.AF_INET6, address), "hsrp2.virt_ip_v6"
    else:
        virtual_ip, key = socket.inet_ntoa(address[:4]), "hsrp2.virt_ip"
    b.fields.update(
        {
            "hsrp2.version": version,
            "hsrp2.opcode": opcode,
            "hsrp2.state": state,
            "hsrp2.ipversion": ip_version,
            "hsrp2.group": group,
            "hsrp2.identifier": identifier.hex(":"),
            "hsrp2.priority": priority,
            "hsrp2.hellotime": hello,
            "hsrp2.holdtime": hold,
            key: virtual_ip,
        }
    )
    return (
        f"{_message(opcode, state, _V2_STATES)} group {group} priority {priority}"
        f" virtual IP {virtual_ip}"
    )


def _message(opcode: int, state: int, states: dict[int, str]) -> str:
    """As tshark's Info column: "Hello (state Active)"."""
    return f"{name_of(_OPCODES, opcode, 'opcode')} (state {name_of(states, state, 'state')})"
