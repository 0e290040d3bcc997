"""Decode one tunnel frame into a tcpdump-like line and Wireshark-named fields.

One short module per protocol, each with its header layout in its docstring: the link layers
(`ethernet`, `chdlc`, `ppp`, `frelay`); `l3` with what they share above the link layer (IP,
ARP, ICMP, UDP, TCP, MPLS, CDP); the routing protocols router labs carry, each named by
message type: `isis` (the OSI network layer and IS-IS: C-HDLC/FR Cisco 0xFEFE, PPP 0x0023,
LLC FE FE, FR IETF NLPID 0x83), `ospf` (v2, v3), `eigrp`, `bgp` (every message of a TCP
segment), `rip`, `ldp`; `base` the result type and its conventions (field names, value
types, repeated fields). `decode` never raises: a frame is decoded as far as its bytes are
valid and the rest is reported as malformed.

Where tunnelscope knowingly differs from tshark 4.0 (the full list: docs/decoders.md):
0x9200 VLAN tags are decoded; an 802.3 length/type in 1501..1535 is malformed;
`fr.chdlctype` is set for every Cisco-encapsulated frame (tshark only when it knows the
protocol); `fr.nlpid` is the NLPID after an RFC 2427 pad byte, not the pad; BGP and LDP are
decoded one TCP segment at a time, without reassembly. Keys Wireshark has no name for:
`lmi.type` ("ansi", "q933" or "cisco") and `lmi.dlci` (Cisco LMI PVC DLCIs,
`lmi.dlci_hi << 4 | lmi.dlci_low`).
"""

from __future__ import annotations

from tunnelscope.decoders import chdlc, ethernet, frelay, ppp
from tunnelscope.decoders.base import Builder, Decoded
from tunnelscope.formats.linktype import LinkType

__all__ = ["Decoded", "decode"]

_DECODERS = {
    LinkType.ETHERNET: ethernet.decode,
    LinkType.C_HDLC: chdlc.decode,
    LinkType.PPP_SERIAL: ppp.decode,
    LinkType.PPP: ppp.decode,
    LinkType.FRELAY: frelay.decode,
}
_WITH_DIRECTION = frozenset(
    {LinkType.PPP_WITH_DIR, LinkType.C_HDLC_WITH_DIR, LinkType.FRELAY_WITH_DIR}
)  # a set of ints: looking up members of the enum class costs more than the C-HDLC layer


def decode(linktype: int, data: bytes) -> Decoded:
    """Decode one frame of the given pcap link type (204-206: the direction byte first).

    The direction byte becomes `frame.p2p_dir` as Wireshark sets it: 0 sent (byte non-zero),
    1 received (byte 0); PPP (204) also gets `ppp.direction` with the same value.
    """
    data = bytes(data)
    b = Builder()
    link = linktype
    if link in _WITH_DIRECTION:
        if not b.need(data, 1, "direction byte"):
            return b.build(int(linktype))
        direction = 0 if data[0] else 1
        b.fields["frame.p2p_dir"] = direction
        if link == LinkType.PPP_WITH_DIR:
            b.fields["ppp.direction"] = direction
        b.text("Out" if data[0] else "In")
        data = data[1:]
        link = LinkType(link).without_direction
    decoder = _DECODERS.get(link)  # type: ignore[call-overload]
    if decoder is None:
        b.text(f"link type {link} not decoded, {len(data)} bytes")
    else:
        decoder(b, data)
    return b.build(int(linktype))
