"""tunnelscope's decoders against tshark, field for field, on files tunnelscope wrote.

One pcap per link type holds many frames; tshark runs once per file. For every frame, every
listed field must have the same values in tshark's output and in `decode()` (absent in both
counts as equal, but each listed field must appear in at least one frame), and `protocols`
must equal tshark's frame.protocols without its "ethertype" and "data" entries.
"""

from __future__ import annotations

import re
import subprocess

import pytest
import tshark
from command import TUNNELSCOPE
from scapy.layers.ppp import HDLC, PPP, PPP_CHAP_ChallengeResponse, PPP_PAP_Request
from test_decoders_frames import (
    chdlc_frames,
    ethernet_frames,
    fr_frames,
    ppp_frames,
    write_pcap,
)

from tunnelscope.decoders import decode
from tunnelscope.formats.linktype import LinkType


def _names(text: str) -> list[str]:
    return text.split()


L3_FIELDS = _names("""
    ip.src ip.dst ip.proto ip.ttl ip.len ip.id ip.flags.df ip.flags.mf ip.frag_offset
    icmp.type icmp.code icmp.ident icmp.seq ipv6.src ipv6.dst ipv6.nxt ipv6.hlim ipv6.plen
    icmpv6.type icmpv6.code icmpv6.echo.identifier icmpv6.echo.sequence_number
""")
CASES = {  # file name -> (link type, frames, the tshark fields compared besides L3_FIELDS)
    "chdlc": (
        LinkType.C_HDLC,
        chdlc_frames,
        _names("""
            chdlc.address chdlc.control chdlc.protocol slarp.ptype slarp.address slarp.netmask
            slarp.mysequence slarp.yoursequence slarp.reliability
            cdp.version cdp.ttl cdp.deviceid cdp.portid cdp.platform
        """),
    ),
    "ppp": (
        LinkType.PPP_SERIAL,
        ppp_frames,
        _names("""
            ppp.address ppp.control ppp.protocol ppp.code ppp.identifier ppp.length
            lcp.opt.type lcp.opt.mru lcp.opt.magic_number lcp.magic_number
            ipcp.opt.type ipcp.opt.ip_address pap.code pap.identifier pap.length pap.peer_id
            chap.code chap.identifier chap.length chap.name
        """),
    ),
    "fr": (
        LinkType.FRELAY,
        fr_frames,
        _names("""
            fr.dlci fr.cr fr.fecn fr.becn fr.de fr.ea fr.control fr.nlpid fr.chdlctype
            fr.snap.oui fr.snaptype q933.disc q933.call_ref_len q933.message_type
            q933.locking_shift_to_codeset q933.report_type q933.link_verification.txseq
            q933.link_verification.rxseq q933.dlci q933.status lmi.cmd lmi.msg_type
            lmi.ele_rcd_type lmi.send_seq lmi.recv_seq lmi.dlci_hi lmi.dlci_low lmi.dlci_new
            lmi.dlci_act arp.hw.type arp.proto.type arp.opcode arp.src.proto_ipv4
            arp.dst.proto_ipv4 slarp.mysequence
        """),
    ),
    "ethernet": (
        LinkType.ETHERNET,
        ethernet_frames,
        _names("""
            eth.dst eth.src eth.type eth.len vlan.id vlan.priority vlan.dei vlan.etype
            ieee8021ad.id ieee8021ad.priority ieee8021ad.dei llc.dsap llc.ssap llc.control
            llc.oui llc.cisco_pid cdp.deviceid arp.opcode arp.src.hw_mac arp.src.proto_ipv4
            arp.dst.hw_mac arp.dst.proto_ipv4 udp.srcport udp.dstport udp.length tcp.srcport
            tcp.dstport tcp.flags tcp.seq_raw tcp.len mpls.label mpls.exp mpls.bottom mpls.ttl
        """),
    ),
}
_TSHARK_PSEUDO_PROTOCOLS = ("ethertype", "data")


def _as_tshark(value: object) -> list[object]:
    """A decoded value as `tshark.value` reads tshark's text: booleans 0/1, "7200" 7200."""
    values = value if isinstance(value, list) else [] if value is None else [value]
    return [tshark.value(v) if isinstance(v, str) else int(v) for v in values]


@tshark.required
@pytest.mark.parametrize("name", CASES)
def test_decode_agrees_with_tshark(tmp_path, name: str) -> None:
    linktype, make_frames, names = CASES[name]
    frames = make_frames()
    names = names + L3_FIELDS
    path = write_pcap(tmp_path / f"{name}.pcap", linktype, frames)
    rows = tshark.fields(path, [*names, "frame.protocols"])
    assert len(rows) == len(frames)
    for field in names:
        assert any(row[field] for row in rows), f"{field} never appears: a vacuous check"
    for number, (frame, row) in enumerate(zip(frames, rows), 1):
        decoded = decode(linktype, frame)
        assert not decoded.malformed, (number, decoded.summary)
        protocols = row["frame.protocols"][0].split(":")
        theirs = [p for p in protocols if p not in _TSHARK_PSEUDO_PROTOCOLS]
        assert decoded.protocols == theirs, (number, decoded.summary)
        for field in names:
            expected = [tshark.value(text) for text in row[field]]
            assert _as_tshark(decoded.fields.get(field)) == expected, (number, field)


@tshark.required
def test_ppp_direction_byte_agrees_with_tshark(tmp_path) -> None:
    """LINKTYPE 204: tshark 4.0 reads it (205 and 206 it does not, see test_decoders_links)."""
    frames = [b"\x00" + ppp_frames()[0], b"\x01" + ppp_frames()[6], b"\x05" + chdlc_frames()[1]]
    names = ["frame.p2p_dir", "ppp.protocol", "ppp.code", "ip.src", "slarp.mysequence"]
    rows = tshark.fields(write_pcap(tmp_path / "dir.pcap", LinkType.PPP_WITH_DIR, frames), names)
    for frame, row in zip(frames, rows):
        decoded = decode(LinkType.PPP_WITH_DIR, frame)
        for field in names:
            expected = [tshark.value(text) for text in row[field]]
            assert _as_tshark(decoded.fields.get(field)) == expected, field
    assert [decode(204, frame).fields["frame.p2p_dir"] for frame in frames] == [1, 0, 0]


HOSTILE = b"R1\nfake line\x1b[31m\x07\x7f\xc2\x85\xff caf\xc3\xa9"


@tshark.required
def test_names_from_frames_are_escaped_as_tshark_escapes_them(tmp_path) -> None:
    """A PAP peer-id or CHAP name with a newline would split a line; ANSI escapes would
    reach the terminal. Both are shown as tshark's Info column shows them."""
    frames = [
        bytes(HDLC() / PPP() / PPP_PAP_Request(id=1, username=HOSTILE, password=b"pw")),
        bytes(HDLC() / PPP() / PPP_CHAP_ChallengeResponse(id=2, value=b"0", optional_name=HOSTILE)),
    ]
    path = write_pcap(tmp_path / "hostile.pcap", LinkType.PPP_SERIAL, frames)
    infos = [row["_ws.col.Info"][0] for row in tshark.fields(path, ["_ws.col.Info"])]
    theirs = [re.search(r"(?:Peer-ID|NAME)='(.*?)'", info)[1] for info in infos]  # type: ignore[index]
    assert theirs[0] == "R1\\nfake line\\033[31m\\a\\177\\u0085\ufffd café"
    assert theirs[1].endswith("...")  # tshark cuts the CHAP name short in Info
    for frame, name, word in zip(frames, theirs, ["peer-id", "name"]):
        decoded = decode(LinkType.PPP_SERIAL, frame)
        assert f"{word} {name.removesuffix('...')[:-1]}" in decoded.summary  # cut mid-character
        assert decoded.summary.isprintable()
    assert decode(LinkType.PPP_SERIAL, frames[0]).fields["pap.peer_id"] == HOSTILE.decode(
        "utf-8", "replace"
    )  # fields keep the value; only what is printed as a line is escaped
    shown = subprocess.run(
        [*TUNNELSCOPE, "decode", path], capture_output=True, text=True, timeout=60, check=True
    )
    assert len(shown.stdout.splitlines()) == 2 and "\x1b" not in shown.stdout
