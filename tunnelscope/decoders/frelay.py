"""Frame Relay (LINKTYPE 107): Q.922 address, Cisco or IETF (RFC 2427) encapsulation, LMI.

Q.922 address (2 bytes; 3 or 4 when EA = 0 in byte 1):
  byte 0: DLCI high 6 bits | C/R | EA = 0
  byte 1: DLCI low 4 bits | FECN | BECN | DE | EA (1 = last byte)
  3 bytes: byte 2 = DLCI 6 more bits | D/C | EA = 1                        (16-bit DLCI)
  4 bytes: byte 2 = DLCI 7 more bits | EA = 0; byte 3 = DLCI 6 | D/C | EA = 1   (23-bit DLCI)
After the address, either
  Cisco: protocol (2), Cisco HDLC's numbers (0x0800 IPv4, 0x8035 SLARP, 0x2000 CDP), or
  IETF:  control 0x03 | [pad 0x00] | NLPID (1): 0xCC IPv4, 0x8E IPv6, 0xCF PPP, 0x81-0x83 OSI
         (the NLPID is the OSI PDU's first byte: 0x83 IS-IS),
         0x80 SNAP: OUI (3) | PID (2) (OUI 0: an ethertype; OUI 0080C2 PID 1/7: bridged Ethernet
         with/without FCS), 0x08 Q.933 (LMI on DLCI 0), 0x09 Cisco LMI (DLCI 1023)
LMI after the NLPID:
  call reference: Q.933 length (1) = 0; Cisco one byte | message type (1): 0x75 status
  enquiry, 0x7D status | ANSI only: 0x95 = shift to codeset 5 | elements: id (1) | length (1)
  | value. Element ids ANSI / Q.933 Annex A / Cisco:
  report type 0x01 / 0x51 / 0x01 (0 full status, 1 link integrity only)
  link integrity 0x03 / 0x53 / 0x03: send sequence (1) | receive sequence (1)
  PVC status 0x07 / 0x57 / 0x07: DLCI high 6 bits | DLCI low 4 bits << 3 | status bits: new
  0x08, deleted 0x04, active 0x02 (Cisco: 3 more bytes of bandwidth)
"""

from __future__ import annotations

import struct

from tunnelscope.decoders import chdlc, ethernet, isis, l3, ppp
from tunnelscope.decoders.base import Builder, name_of

CONTROL_UI = 0x03
NLPID_Q933 = 0x08
NLPID_CISCO_LMI = 0x09
NLPID_SNAP = 0x80
NLPID_IPV6 = 0x8E
NLPID_IPV4 = 0xCC
NLPID_PPP = 0xCF
_NAMED_NLPIDS = {0x81: ("clnp", "CLNP"), 0x82: ("esis", "ES-IS")}
_BRIDGED_OUI = 0x0080C2
_BRIDGED_ETHERNET = {0x0001: 4, 0x0007: 0}  # PID -> FCS bytes at the end
_SHIFT_ANSI = 0x95  # locking shift to codeset 5: the elements that follow are ANSI T1.617
_ELEMENTS = {  # flavour -> element ids of report type, link integrity, PVC status
    "ansi": (0x01, 0x03, 0x07),
    "q933": (0x51, 0x53, 0x57),
    "cisco": (0x01, 0x03, 0x07),
}
_FLAVOUR_NAMES = {"ansi": "ANSI", "q933": "Q.933", "cisco": "Cisco"}
_MESSAGES = {
    0x02: "Call Proceeding",
    0x05: "Setup",
    0x07: "Connect",
    0x45: "Disconnect",
    0x4D: "Release",
    0x5A: "Release Complete",
    0x75: "Status Enquiry",
    0x7D: "Status",
}
_LMI_MESSAGES = (0x75, 0x7D)
_REPORT_TYPES = {0: "full status", 1: "link integrity", 2: "single PVC"}


def decode(b: Builder, data: bytes) -> None:
    b.layer("fr")
    size = _address(b, data)
    if size is None:
        return
    data = data[size:]
    if not b.need(data, 1, "Frame Relay payload"):
        return
    if data[0] == CONTROL_UI:
        b.fields["fr.control"] = CONTROL_UI
        _ietf(b, data[1:])
        return
    if not b.need(data, 2, "Cisco encapsulation"):
        return
    (proto,) = struct.unpack_from(">H", data)
    b.fields["fr.chdlctype"] = proto
    b.text("Cisco")
    chdlc.protocol(b, proto, data[2:])


def _address(b: Builder, data: bytes) -> int | None:
    """Decode the Q.922 address; return its size, or None when it is not one."""
    b.text("FR")
    if not b.need(data, 2, "Q.922 address"):
        return None
    first, second = data[0], data[1]
    if first & 1:
        b.bad("Q.922 address with EA set in its first byte")
        return None
    dlci = ((first >> 2) << 4) | (second >> 4)
    b.fields.update(
        {
            "fr.cr": bool(first & 0x02),
            "fr.fecn": bool(second & 0x08),
            "fr.becn": bool(second & 0x04),
            "fr.de": bool(second & 0x02),
        }
    )
    b.append("fr.ea", False)
    size = 2
    if not second & 1:
        b.append("fr.ea", False)
        if not b.need(data, 3, "Q.922 address"):
            return None
        if data[2] & 1:
            dlci, last, size = (dlci << 6) | (data[2] >> 2), data[2], 3
        else:
            b.append("fr.ea", False)
            if not b.need(data, 4, "Q.922 address"):
                return None
            if not data[3] & 1:
                b.bad("Q.922 address longer than 4 bytes")
                return None
            dlci, last, size = (((dlci << 7) | (data[2] >> 1)) << 6) | (data[3] >> 2), data[3], 4
        b.fields["fr.dc"] = bool(last & 0x02)
    b.append("fr.ea", True)
    b.fields["fr.dlci"] = dlci
    flags = " ".join(name.upper() for name in ("fecn", "becn", "de") if b.fields[f"fr.{name}"])
    b.text(f"DLCI {dlci} {flags}".rstrip())
    return size


def _ietf(b: Builder, data: bytes) -> None:
    """RFC 2427: an NLPID (after an optional pad byte) says what follows."""
    b.text("IETF")
    if not b.need(data, 1, "NLPID"):
        return
    if data[0] == 0 and len(data) > 1:  # pad byte before the NLPID
        data = data[1:]
    nlpid, data = data[0], data[1:]
    b.fields["fr.nlpid"] = nlpid
    if nlpid == NLPID_IPV4:
        l3.ipv4(b, data)
    elif nlpid == NLPID_IPV6:
        l3.ipv6(b, data)
    elif nlpid == NLPID_PPP:
        ppp.decode(b, data)
    elif nlpid == NLPID_SNAP:
        _snap(b, data)
    elif nlpid == NLPID_Q933:
        _q933(b, data)
    elif nlpid == NLPID_CISCO_LMI:
        _cisco_lmi(b, data)
    elif nlpid == isis.NLPID_ISIS:
        isis.decode(b, bytes([nlpid]) + data)
    elif nlpid in _NAMED_NLPIDS:
        b.layer(*_NAMED_NLPIDS[nlpid])
    else:
        b.text(f"NLPID {nlpid:#04x}, {len(data)} bytes")


def _snap(b: Builder, data: bytes) -> None:
    if not b.need(data, 5, "SNAP header"):
        return
    oui, pid = int.from_bytes(data[:3], "big"), int.from_bytes(data[3:5], "big")
    # as tshark names the PID: an ethertype, a Cisco PID (the LLC dissector's name), or other
    pid_name = (
        "fr.snaptype" if oui == 0 else "llc.cisco_pid" if oui == l3.CISCO_OUI else "fr.snap.pid"
    )
    b.fields.update({"fr.snap.oui": oui, pid_name: pid})
    data = data[5:]
    if oui == _BRIDGED_OUI and pid in _BRIDGED_ETHERNET:
        ethernet.decode(b, data[: len(data) - _BRIDGED_ETHERNET[pid]])
    else:
        l3.snap(b, oui, pid, data)


def _q933(b: Builder, data: bytes) -> None:
    """Q.933 framing: ANSI T1.617 Annex D and ITU Q.933 Annex A LMI (and SVC signalling)."""
    b.layer("q933")
    b.fields["q933.disc"] = NLPID_Q933  # the NLPID doubles as Q.933's protocol discriminator
    if not b.need(data, 1, "Q.933 call reference"):
        return
    ref_len = data[0] & 0x0F
    b.fields["q933.call_ref_len"] = ref_len
    if not b.need(data, 2 + ref_len, "Q.933 header"):
        return
    message, elements = data[1 + ref_len], data[2 + ref_len :]
    b.fields["q933.message_type"] = message
    flavour = "ansi" if elements[:1] == bytes([_SHIFT_ANSI]) else "q933"
    if flavour == "ansi":
        b.fields["q933.locking_shift_to_codeset"] = _SHIFT_ANSI & 0x07
        elements = elements[1:]
    _lmi(b, flavour, message, elements)


def _cisco_lmi(b: Builder, data: bytes) -> None:
    b.layer("lmi")
    if not b.need(data, 2, "LMI header"):
        return
    b.fields.update({"lmi.cmd": data[0], "lmi.msg_type": data[1]})
    _lmi(b, "cisco", data[1], data[2:])


def _lmi(b: Builder, flavour: str, message: int, elements: bytes) -> None:
    """Walk the information elements of an LMI message (or name another Q.933 message)."""
    name = name_of(_MESSAGES, message, "message type")
    if message not in _LMI_MESSAGES:
        b.text(f"Q.933 {name}")
        return
    b.fields["lmi.type"] = flavour
    words = [f"LMI {_FLAVOUR_NAMES[flavour]} {name}"]
    pvcs = []
    report_id, link_id, pvc_id = _ELEMENTS[flavour]
    q933 = flavour != "cisco"
    offset = 0
    while offset < len(elements):
        ident = elements[offset]
        if not b.need(elements, offset + 2, "LMI element"):
            break
        length = elements[offset + 1]
        value = elements[offset + 2 : offset + 2 + length]
        offset += 2 + length
        if len(value) < length:
            b.bad("truncated LMI element")
            break
        if ident == report_id and length >= 1:
            b.fields["q933.report_type" if q933 else "lmi.ele_rcd_type"] = value[0]
            words.append(name_of(_REPORT_TYPES, value[0], "report type"))
        elif ident == link_id and length >= 2:
            send, receive = value[0], value[1]
            if q933:
                b.fields["q933.link_verification.txseq"] = send
                b.fields["q933.link_verification.rxseq"] = receive
            else:
                b.fields.update({"lmi.send_seq": send, "lmi.recv_seq": receive})
            words.append(f"send {send} receive {receive}")
        elif ident == pvc_id and (length == 3 if q933 else length >= 3):  # Q.933: 2-byte DLCI
            pvcs.append(_pvc_status(b, q933, value))
    if pvcs:
        words.append("PVC " + ", ".join(pvcs))
    b.text(" ".join(words))


def _pvc_status(b: Builder, q933: bool, value: bytes) -> str:
    high, low, status = value[0] & 0x3F, (value[1] >> 3) & 0x0F, value[2]
    dlci = (high << 4) | low
    if q933:
        b.append("q933.dlci", dlci)
        b.append("q933.status", (status >> 1) & 0x07)
    else:
        b.append("lmi.dlci_hi", high)
        b.append("lmi.dlci_low", low)
        b.append("lmi.dlci_new", (status >> 3) & 1)
        b.append("lmi.dlci_act", (status >> 1) & 1)
        b.append("lmi.dlci", dlci)
    state = "new " if status & 0x08 else ""
    state += "deleted" if status & 0x04 else "active" if status & 0x02 else "inactive"
    return f"{dlci} {state}"
