"""The routing decoders (isis, ospf, eigrp, bgp, rip, ldp, hsrp, vrrp) against tshark, on
captures/routing-*.

For every frame of every routing capture (one per encapsulation: C-HDLC, PPP, Frame Relay
IETF and Cisco, Ethernet): the built-in decoder finds it well-formed, its `protocols` equal
tshark's frame.protocols (without "ethertype" and "data"), every field it sets is a tshark
field and has tshark's values, and its summary names the protocol and the message type that
tshark's Info column names. One tshark run per file.
"""

from __future__ import annotations

import re
import struct
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import tshark
from command import TUNNELSCOPE
from scapy.contrib.bgp import (
    BGPHeader,
    BGPNLRI_IPv4,
    BGPNotification,
    BGPRouteRefresh,
    BGPUpdate,
)
from scapy.contrib.eigrp import EIGRP, EIGRPIntRoute
from scapy.contrib.isis import (
    ISIS_L1_PSNP,
    ISIS_L2_CSNP,
    ISIS_CommonHdr,
    ISIS_LspEntry,
    ISIS_LspEntryTlv,
    ISIS_P2P_Hello,
)
from scapy.contrib.ldp import LDP, LDPAddress, LDPKeepAlive
from scapy.contrib.ospf import (
    OSPF_DBDesc,
    OSPF_Hdr,
    OSPF_LSA_Hdr,
    OSPF_LSAck,
    OSPF_LSReq,
    OSPF_LSReq_Item,
)
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.l2 import Ether
from scapy.layers.rip import RIP, RIPAuth, RIPEntry
from test_decoders_frames import write_pcap
from test_decoders_tshark import _TSHARK_PSEUDO_PROTOCOLS, _as_tshark

from tunnelscope.decoders import Decoded, decode
from tunnelscope.formats.capture import open_capture
from tunnelscope.formats.linktype import LinkType

CAPTURES = Path(__file__).resolve().parent.parent / "captures"
ROUTING = sorted(CAPTURES.glob("routing-*.pcap"))
OWN_KEYS = {"lmi.type", "lmi.dlci"}  # tunnelscope's own, see tunnelscope/decoders/__init__.py
NAMING = ["frame.protocols", "_ws.col.Info", "ospf.version", "rip.version", "cdp.deviceid"]
NAMING += ["hsrp2.version"]
ROUTING_PROTOCOLS = {"ospf", "eigrp", "bgp", "rip", "ldp", "isis", "cdp"}
MESSAGE_TYPES = ["ospf.msg", "eigrp.opcode", "bgp.type", "rip.command", "ldp.msg.type", "isis.type"]
LAN_PROTOCOLS = {"hsrp", "vrrp"}  # first-hop redundancy runs on Ethernet segments only
LAN_MESSAGE_TYPES = ["hsrp.opcode", "hsrp2.opcode", "vrrp.type"]


@dataclass
class Case:
    path: Path
    frames: list[bytes]
    decoded: list[Decoded]
    rows: list[dict[str, list[str]]]  # tshark's fields, one dict per frame

    def theirs(self, number: int) -> list[str]:
        protocols = self.rows[number]["frame.protocols"][0].split(":")
        return [p for p in protocols if p not in _TSHARK_PSEUDO_PROTOCOLS]


def more_messages() -> list[bytes]:
    """C-HDLC frames with the messages the reference captures lack: IS-IS CSNP and PSNP and a
    Hello without TLVs, OSPF
    DB Description, LS Request and LS Acknowledge, an EIGRP Hello ACK and a Query, BGP
    NOTIFICATION and ROUTE-REFRESH, a RIPv1 whole-table request, a RIPv2 Response with an
    authentication entry, two LDP PDUs in a segment."""
    lsp = ISIS_LspEntry(lifetime=1199, lspid="0000.0000.0001.00-00", seqnum=3, checksum=0x6C85)
    entries = ISIS_LspEntryTlv(entries=[lsp])
    csnp = ISIS_L2_CSNP(
        sourceid="0000.0000.0002.00",
        startlspid="0000.0000.0000.00-00",
        endlspid="ffff.ffff.ffff.ff-ff",
        tlvs=[entries],
    )
    psnp = ISIS_L1_PSNP(sourceid="0000.0000.0002.00", tlvs=[entries])
    unicast = IP(src="10.0.0.2", dst="10.0.0.1", ttl=1, tos=0xC0)
    header = OSPF_LSA_Hdr(id="1.1.1.1", adrouter="1.1.1.1", seq=0x80000002)
    ospf = [
        OSPF_DBDesc(mtu=1500, options=0x02, dbdescr=0x07, ddseq=5000),
        OSPF_DBDesc(mtu=1500, options=0x02, dbdescr=0x02, ddseq=5001, lsaheaders=[header]),
        OSPF_LSReq(requests=[OSPF_LSReq_Item(id="1.1.1.1", adrouter="1.1.1.1")]),
        OSPF_LSAck(lsaheaders=[header]),
    ]
    route = EIGRPIntRoute(nexthop="0.0.0.0", prefixlen=16, dst="172.16.0.0")
    to_r1 = IP(src="10.0.0.2", dst="10.0.0.1", ttl=255)
    refresh = bytes(BGPHeader(type=5) / BGPRouteRefresh(afi=1, safi=1))
    notification = bytes(BGPHeader(type=3) / BGPNotification(error_code=6, error_subcode=2))
    ldp = to_r1 / TCP(sport=646, dport=40001, flags="PA", seq=1)
    two_pdus = bytes(LDP(id="2.2.2.2") / LDPKeepAlive())
    two_pdus += bytes(LDP(id="2.2.2.2") / LDPAddress(address=["10.0.0.2"]))
    rip = RIP(cmd=2, version=2) / RIPAuth(authtype=2, password="cisco")
    rip /= RIPEntry(addr="10.2.0.0", mask="255.255.0.0", metric=2)
    packets = [
        (0xFEFE, ISIS_CommonHdr() / csnp),
        (0xFEFE, ISIS_CommonHdr() / psnp),
        (0xFEFE, ISIS_CommonHdr() / ISIS_P2P_Hello(sourceid="0000.0000.0002")),  # no TLVs
        *[(0x0800, unicast / OSPF_Hdr(src="2.2.2.2") / message) for message in ospf],
        (0x0800, unicast / EIGRP(opcode=5, asn=100, ack=1)),
        (0x0800, unicast / EIGRP(opcode=3, asn=100, seq=2, tlvlist=[route])),
        (0x0800, to_r1 / TCP(sport=179, dport=40000, flags="PA", seq=1) / refresh),
        # the stream's next bytes: a segment with the same seq is a retransmission to tshark
        (0x0800, to_r1 / TCP(sport=179, dport=40000, flags="PA", seq=24) / notification),
        (
            0x0800,
            unicast / UDP(sport=520, dport=520) / RIP(cmd=1, version=1) / RIPEntry(AF=0, metric=16),
        ),
        (0x0800, unicast / UDP(sport=520, dport=520) / rip),
        (0x0800, ldp / two_pdus),
    ]
    return [struct.pack("!BBH", 0x8F, 0, protocol) + bytes(packet) for protocol, packet in packets]


@pytest.fixture(
    scope="module", params=[*ROUTING, "more-messages"], ids=lambda p: getattr(p, "stem", p)
)
def case(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Case:
    path = request.param
    if path == "more-messages":
        path = tmp_path_factory.mktemp("routing") / "more-messages.pcap"
        write_pcap(path, LinkType.C_HDLC, more_messages())
    with open_capture(str(path)) as reader:
        packets = list(reader)
    decoded = [decode(p.linktype, p.data) for p in packets]
    keys = {key for frame in decoded for key in frame.fields} - OWN_KEYS
    rows = tshark.fields(str(path), sorted(keys | set(NAMING)))
    return Case(path, [p.data for p in packets], decoded, rows)


def test_the_captures_exist() -> None:
    names = {path.name for path in ROUTING}
    assert {"routing-chdlc.pcap", "routing-ppp.pcap", "routing-ethernet.pcap"} <= names
    assert {"routing-frelay-ietf.pcap", "routing-frelay-cisco.pcap"} <= names


@tshark.required
def test_every_key_is_a_tshark_field(case: Case) -> None:
    keys = {key for frame in case.decoded for key in frame.fields}
    assert keys - tshark.field_names() <= OWN_KEYS


@tshark.required
def test_protocols_and_fields_agree_with_tshark(case: Case) -> None:
    assert len(case.rows) == len(case.frames)
    for number, (decoded, row) in enumerate(zip(case.decoded, case.rows)):
        assert not decoded.malformed, (number + 1, decoded.summary)
        assert decoded.protocols == case.theirs(number), (number + 1, decoded.summary)
        for key, value in decoded.fields.items():
            if key in OWN_KEYS:
                continue
            theirs = [tshark.value(text) for text in row[key]]
            if key == "fr.nlpid":  # tshark counts the RFC 2427 pad byte as an NLPID too
                theirs = theirs[-1:]
            assert _as_tshark(value) == theirs, (number + 1, key)


@pytest.mark.parametrize("path", ROUTING, ids=lambda path: path.stem)
def test_each_capture_holds_every_routing_protocol(path: Path) -> None:
    """A check on the captures themselves: what the issue asks each one to carry (protocols
    as decoded; that they are tshark's is checked above)."""
    with open_capture(str(path)) as reader:
        decoded = [decode(p.linktype, p.data) for p in reader]
    seen = {p for frame in decoded for p in frame.protocols}
    assert seen >= ROUTING_PROTOCOLS | {"isis.hello", "isis.lsp", "ipv6"}  # ipv6: OSPFv3
    if "frelay" in path.name:
        assert "lmi" in seen or "q933" in seen
    keys = {key for frame in decoded for key in frame.fields}
    assert keys >= set(MESSAGE_TYPES), "a message-type field is never compared"
    if "ethernet" in path.name:
        assert seen >= LAN_PROTOCOLS and keys >= set(LAN_MESSAGE_TYPES)
        assert {"vrrp.ip_addr", "vrrp.ipv6_addr", "hsrp.virt_ip", "hsrp2.virt_ip"} <= keys


def _name_in_summary(protocols: list[str], row: dict[str, list[str]]) -> str | re.Pattern[str]:
    """What the built-in summary must say for a frame, made from tshark's Info column."""
    info = row["_ws.col.Info"][0].strip()
    top = protocols[-1]
    if top == "ospf":
        return f"OSPFv{row['ospf.version'][0]} {info}"
    if top == "eigrp":
        return f"EIGRP {info}"
    if top == "bgp":  # "UPDATE Message, KEEPALIVE Message"
        return "BGP " + info.replace(" Message", "")
    if top.startswith("isis."):  # "P2P HELLO, System-ID: 0000.0000.0001"
        return "IS-IS " + info.split(",")[0]
    if top == "rip":
        return f"RIPv{row['rip.version'][0]} {info}"
    if top == "ldp":  # tshark names the last PDU's message of a segment; the summary all
        return re.compile(rf"LDP ([^,]+, )*{re.escape(info)}")
    if top == "cdp":
        return f"device {row['cdp.deviceid'][0]}"
    if top == "hsrp":  # "Hello (state Active)", for both versions
        return f"HSRP{'v2' if row['hsrp2.version'] else ''} {info}"
    if top == "vrrp":  # "Announcement (v3)"
        return f"VRRP {info}"
    assert top in ("lmi", "q933"), protocols
    return re.compile(rf"LMI \S+ {re.escape(info)}( |$)", re.IGNORECASE)  # "STATUS ENQUIRY"


def _names(summary: str, expected: str | re.Pattern[str]) -> bool:
    return expected in summary if isinstance(expected, str) else bool(expected.search(summary))


@tshark.required
def test_summaries_name_the_message_tshark_names(case: Case) -> None:
    for number, (decoded, row) in enumerate(zip(case.decoded, case.rows)):
        expected = _name_in_summary(case.theirs(number), row)
        assert _names(decoded.summary, expected), (number + 1, decoded.summary, expected)


@tshark.required
def test_tunnelscope_decode_names_every_frame(case: Case) -> None:
    """The command a user runs: one line per frame, each naming what tshark names."""
    shown = subprocess.run(
        [*TUNNELSCOPE, "decode", "--dissect", "builtin", str(case.path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = shown.stdout.splitlines()
    assert len(lines) == len(case.frames)
    for number, (line, row) in enumerate(zip(lines, case.rows)):
        assert _names(line, _name_in_summary(case.theirs(number), row)), (number + 1, line)


def _bgp_segment(payload: bytes) -> bytes:
    segment = IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=40000, dport=179, flags="PA")
    return b"\x0f\x00\x08\x00" + bytes(segment / payload)


def test_a_bgp_message_split_across_segments_is_named_not_malformed() -> None:
    """No TCP reassembly (docs/decoders.md): each part says what it is, neither is damage."""
    update = BGPHeader(type=2) / BGPUpdate(nlri=[BGPNLRI_IPv4(prefix="192.168.1.0/24")])
    message = bytes(BGPHeader(type=4)) + bytes(update)  # 19 + 27 bytes
    cut = 19 + 20  # the UPDATE's header and 1 byte of its body in the first segment
    first, rest = decode(LinkType.C_HDLC, _bgp_segment(message[:cut])), message[cut:]
    second = decode(LinkType.C_HDLC, _bgp_segment(rest))
    assert not first.malformed and not second.malformed
    assert first.summary.endswith("BGP KEEPALIVE, UPDATE (continues)")
    assert first.fields["bgp.type"] == [4, 2]
    assert second.summary.endswith(f"BGP continuation, {len(rest)} bytes")
    assert second.protocols[-1] == "bgp" and "bgp.type" not in second.fields


def test_a_bgp_length_below_the_header_is_malformed() -> None:
    bad = b"\xff" * 16 + struct.pack("!HB", 5, 4)
    decoded = decode(LinkType.C_HDLC, _bgp_segment(bad))
    assert decoded.malformed and "BGP message length 5" in decoded.summary


def _cut_lan_message(number: int, keep: int) -> bytes:
    """Frame NUMBER (1-based) of captures/routing-ethernet.pcap with only the first KEEP bytes
    of its HSRP or VRRP message, and the IP and UDP lengths and checksums to match."""
    with open_capture(str(CAPTURES / "routing-ethernet.pcap")) as reader:
        frame = Ether([packet.data for packet in reader][number - 1])
    outer = frame[UDP] if UDP in frame else frame[IP]
    message = bytes(outer.payload)[:keep]
    outer.remove_payload()
    del frame[IP].len, frame[IP].chksum
    if UDP in frame:
        del frame[UDP].len, frame[UDP].chksum
    return bytes(frame / message)


@tshark.required
@pytest.mark.parametrize(
    ("number", "keep", "problem", "tshark_agrees"),
    [
        (15, 10, "truncated HSRP message", True),  # HSRP v1: 20 bytes
        # tshark reads a cut Group State TLV without a word; a TLV longer than its message is
        # still damage, so the built-in decoder says so
        (16, 30, "HSRPv2 TLV 1 of 40 bytes past the message end", False),
        (17, 10, "VRRP address 1 of 1 past the message end", True),  # VRRPv2: 8 + 4 + 8 bytes
    ],
)
def test_cut_fhrp_messages_are_marked_malformed(
    number: int, keep: int, problem: str, tshark_agrees: bool, tmp_path: Path
) -> None:
    """A cut message keeps what it has and is marked, where tshark marks the same bytes."""
    frame = _cut_lan_message(number, keep)
    decoded = decode(LinkType.ETHERNET, frame)
    assert decoded.malformed and problem in decoded.summary, decoded.summary
    assert decoded.protocols[-1] in ("hsrp", "vrrp")
    path = write_pcap(tmp_path / "cut.pcap", LinkType.ETHERNET, [frame])
    (row,) = tshark.fields(str(path), ["_ws.expert.message"])
    assert ("Malformed Packet (Exception occurred)" in row["_ws.expert.message"]) == tshark_agrees
