"""What tshark cannot judge: summaries, 205/206 direction bytes, tunnelscope's own choices."""

from __future__ import annotations

import struct

from test_decoders_frames import (
    ACTIVE,
    MAC_A,
    MAC_B,
    NEW,
    chdlc,
    chdlc_frames,
    ethernet_frames,
    fr_cisco,
    fr_frames,
    lmi,
    ping,
    ppp_frames,
    q922,
    slarp_keepalive,
)

from tunnelscope.decoders import decode
from tunnelscope.formats.linktype import LinkType


def test_summary_reads_like_tcpdump() -> None:
    assert decode(LinkType.C_HDLC, chdlc(0x0800, ping())).summary == (
        "C-HDLC unicast IPv4 10.0.0.1 > 10.0.0.2: ICMP echo request id 7 seq 1"
    )
    assert decode(LinkType.C_HDLC, slarp_keepalive(7, 6)).summary == (
        "C-HDLC unicast SLARP keepalive mysequence 7 yoursequence 6"
    )
    assert decode(LinkType.PPP_SERIAL, ppp_frames()[0]).summary == (
        "PPP LCP Configure-Request id 5 mru 1500 magic 0x00000007"
    )
    assert decode(LinkType.FRELAY, fr_frames()[6]).summary == (
        "FR DLCI 0 IETF LMI ANSI Status full status send 6 receive 5"
        " PVC 102 active, 201 active, 305 new inactive"
    )
    assert decode(LinkType.ETHERNET, ethernet_frames()[1]).summary == (
        f"Ethernet {MAC_A} > {MAC_B} s-vlan 10 vlan 20"
        " IPv4 10.0.0.1 > 10.0.0.2: UDP 40000 > 9 len 5"
    )


def test_lmi_flavour_and_pvc_lists() -> None:
    ansi = decode(LinkType.FRELAY, lmi("ansi", 0x7D, 0, 6, 5, ((102, ACTIVE), (305, NEW))))
    assert ansi.fields["lmi.type"] == "ansi"
    assert ansi.fields["q933.dlci"] == [102, 305]
    assert ansi.fields["q933.status"] == [1, 4]
    q933 = decode(LinkType.FRELAY, lmi("q933", 0x75, 1, 9, 8))
    assert q933.fields["lmi.type"] == "q933"
    assert q933.fields["q933.report_type"] == 1
    assert "q933.dlci" not in q933.fields
    cisco = decode(LinkType.FRELAY, lmi("cisco", 0x7D, 0, 4, 3, ((1000, ACTIVE),)))
    assert (cisco.fields["lmi.type"], cisco.fields["fr.dlci"]) == ("cisco", 1023)
    assert (cisco.fields["lmi.dlci"], cisco.fields["lmi.dlci_act"]) == ([1000], [1])
    parts = zip(cisco.fields["lmi.dlci_hi"], cisco.fields["lmi.dlci_low"])  # tshark's fields
    assert cisco.fields["lmi.dlci"] == [high << 4 | low for high, low in parts]
    assert (cisco.fields["lmi.send_seq"], cisco.fields["lmi.recv_seq"]) == (4, 3)


def test_repeated_fields_are_lists_even_when_they_occur_once() -> None:
    single = decode(LinkType.ETHERNET, ethernet_frames()[0])
    assert (single.fields["vlan.id"], single.fields["vlan.priority"]) == ([100], [3])
    assert single.fields["vlan.etype"] == [0x0800]
    assert decode(LinkType.FRELAY, fr_frames()[0]).fields["fr.ea"] == [False, True]
    stacked = decode(LinkType.ETHERNET, ethernet_frames()[3])
    assert stacked.fields["vlan.id"] == [1, 2, 3]
    assert stacked.fields["vlan.etype"] == [0x8100, 0x8100, 0x0800]


def test_9200_tag_is_a_vlan_tag() -> None:
    """tshark 4.0 leaves 0x9200 undecoded; old QinQ switches use it as the outer TPID."""
    frame = ethernet_frames()[2].replace(b"\x91\x00", b"\x92\x00", 1)
    decoded = decode(LinkType.ETHERNET, frame)
    assert decoded.protocols == ["eth", "vlan", "vlan", "ip", "udp"]
    assert (decoded.fields["eth.type"], decoded.fields["vlan.id"]) == (0x9200, [11, 21])


def test_direction_byte_link_types() -> None:
    """205 and 206 (tshark 4.0 cannot read them): byte 0 received, non-zero sent."""
    received = decode(LinkType.C_HDLC_WITH_DIR, b"\x00" + slarp_keepalive(3, 2))
    assert received.fields["frame.p2p_dir"] == 1
    assert received.fields["slarp.mysequence"] == 3
    assert received.summary.startswith("In C-HDLC unicast SLARP")
    assert received.linktype == LinkType.C_HDLC_WITH_DIR
    sent = decode(LinkType.FRELAY_WITH_DIR, b"\x07" + fr_frames()[5])
    assert (sent.fields["frame.p2p_dir"], sent.fields["fr.dlci"]) == (0, 0)
    assert sent.summary.startswith("Out FR DLCI 0")
    assert "ppp.direction" not in sent.fields
    assert decode(LinkType.PPP_WITH_DIR, b"\x01" + ppp_frames()[0]).fields["ppp.direction"] == 0


def test_ppp_without_address_and_control() -> None:
    """LINKTYPE 9, and ACFC/PFC frames on 50: the protocol comes first."""
    lcp = ppp_frames()[0][2:]
    assert decode(LinkType.PPP, lcp).fields["ppp.code"] == 1
    assert "ppp.address" not in decode(LinkType.PPP, lcp).fields
    compressed = decode(LinkType.PPP_SERIAL, b"\x21" + ping())  # PFC: one-byte protocol
    assert (compressed.fields["ppp.protocol"], compressed.protocols) == (
        0x21,
        ["ppp", "ip", "icmp"],
    )


def test_cisco_hdlc_inside_ppp_link_type() -> None:
    """libpcap's PPP_SERIAL also carries Cisco framing; Wireshark shows it as ppp:chdlc."""
    decoded = decode(LinkType.PPP_SERIAL, chdlc_frames()[1])
    assert decoded.protocols == ["ppp", "chdlc", "slarp"]
    assert decoded.fields["slarp.mysequence"] == 7


def test_frame_relay_longer_addresses_and_flags() -> None:
    three = bytes([0x18, 0x40, 0x05]) + b"\x08\x00" + ping()  # DLCI 100 << 6 | 1
    decoded = decode(LinkType.FRELAY, three)
    assert (decoded.fields["fr.dlci"], decoded.fields["fr.ea"]) == (6401, [False, False, True])
    flags = decode(LinkType.FRELAY, q922(16, becn=True, de=True) + b"\x08\x00" + ping())
    assert flags.summary.startswith("FR DLCI 16 BECN DE Cisco IPv4")


def test_inverse_arp_on_a_pvc() -> None:
    decoded = decode(LinkType.FRELAY, fr_frames()[4])
    assert decoded.protocols == ["fr", "arp"]
    assert (decoded.fields["arp.opcode"], decoded.fields["arp.src.proto_ipv4"]) == (8, "10.0.0.1")
    assert "arp.src.hw_mac" not in decoded.fields  # 2-byte Q.922 hardware address


def test_malformed_frames_keep_what_was_valid() -> None:
    cut = decode(LinkType.C_HDLC, slarp_keepalive(7, 6)[:-3])
    assert cut.malformed and cut.protocols == ["chdlc", "slarp"]
    assert cut.fields["chdlc.protocol"] == 0x8035 and "slarp.mysequence" not in cut.fields
    assert cut.summary.endswith("[malformed: truncated SLARP keepalive]")
    bad_ip = decode(LinkType.FRELAY, fr_cisco(100, 0x0800, ping()[:30]))
    assert bad_ip.malformed and bad_ip.fields["ip.src"] == "10.0.0.1"
    assert "past the end of the frame" in bad_ip.summary
    ea = decode(LinkType.FRELAY, b"\x0f\x00\x08\x00" + ping())  # C-HDLC read as FR
    assert ea.malformed and "fr.dlci" not in ea.fields
    lcp = bytearray(ppp_frames()[0])
    lcp[7] = 0xFF  # LCP length past the end
    assert decode(LinkType.PPP_SERIAL, bytes(lcp)).malformed
    invalid = bytes(12) + struct.pack(">H", 0x05FF) + bytes(46)
    assert "invalid length/type 0x05ff" in decode(LinkType.ETHERNET, invalid).summary


def test_unknown_link_type_and_unknown_payloads() -> None:
    unknown = decode(147, b"\x01\x02\x03")
    assert unknown.summary == "link type 147 not decoded, 3 bytes"
    assert (unknown.protocols, unknown.malformed) == ([], False)
    other = decode(LinkType.C_HDLC, chdlc(0x1234, b"abc"))
    assert (other.protocols, other.malformed) == (["chdlc"], False)
    assert other.summary == "C-HDLC unicast ethertype 0x1234, 3 bytes"
