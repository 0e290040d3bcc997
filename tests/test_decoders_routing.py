"""The routing decoders (isis, ospf, eigrp, bgp, rip, ldp) against tshark, on captures/routing-*.

For every frame of every routing capture (one per encapsulation: C-HDLC, PPP, Frame Relay
IETF and Cisco, Ethernet): the built-in decoder finds it well-formed, its `protocols` equal
tshark's frame.protocols (without "ethertype" and "data"), every field it sets is a tshark
field and has tshark's values, and its summary names the protocol and the message type that
tshark's Info column names. One tshark run per file.
"""

from __future__ import annotations

import re
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest
import tshark
from command import TUNNELSCOPE
from test_decoders_tshark import _TSHARK_PSEUDO_PROTOCOLS, _as_tshark

from tunnelscope.decoders import Decoded, decode
from tunnelscope.formats.capture import open_capture

CAPTURES = Path(__file__).resolve().parent.parent / "captures"
ROUTING = sorted(CAPTURES.glob("routing-*.pcap"))
OWN_KEYS = {"lmi.type", "lmi.dlci"}  # tunnelscope's own, see tunnelscope/decoders/__init__.py
NAMING = ["frame.protocols", "_ws.col.Info", "ospf.version", "rip.version", "cdp.deviceid"]
ROUTING_PROTOCOLS = {"ospf", "eigrp", "bgp", "rip", "ldp", "isis", "cdp"}
MESSAGE_TYPES = ["ospf.msg", "eigrp.opcode", "bgp.type", "rip.command", "ldp.msg.type", "isis.type"]


@dataclass
class Case:
    path: Path
    frames: list[bytes]
    decoded: list[Decoded]
    rows: list[dict[str, list[str]]]  # tshark's fields, one dict per frame

    def theirs(self, number: int) -> list[str]:
        protocols = self.rows[number]["frame.protocols"][0].split(":")
        return [p for p in protocols if p not in _TSHARK_PSEUDO_PROTOCOLS]


@pytest.fixture(scope="module", params=ROUTING, ids=lambda path: path.stem)
def case(request: pytest.FixtureRequest) -> Case:
    path = request.param
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


@tshark.required
def test_each_capture_holds_every_routing_protocol(case: Case) -> None:
    """A check on the captures themselves: what the issue asks each one to carry."""
    seen = {p for number in range(len(case.rows)) for p in case.theirs(number)}
    assert seen >= ROUTING_PROTOCOLS
    if "frelay" in case.path.name:
        assert "lmi" in seen or "q933" in seen
    assert {"isis.hello", "isis.lsp"} <= seen
    assert "ipv6" in seen  # OSPFv3
    keys = {key for frame in case.decoded for key in frame.fields}
    assert keys >= set(MESSAGE_TYPES), "a message-type field is never compared"


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
    if top == "ldp":
        return f"LDP {info}"
    if top == "cdp":
        return f"device {row['cdp.deviceid'][0]}"
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
def test_tunnelscope_decode_names_every_frame(case: Case, builtin: list[str]) -> None:
    """The command a user runs: one line per frame, each naming what tshark names."""
    shown = subprocess.run(
        [*TUNNELSCOPE, "decode", *builtin, str(case.path)],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    lines = shown.stdout.splitlines()
    assert len(lines) == len(case.frames)
    for number, (line, row) in enumerate(zip(lines, case.rows)):
        assert _names(line, _name_in_summary(case.theirs(number), row)), (number + 1, line)


@pytest.fixture(scope="module")
def builtin() -> list[str]:
    """`--dissect builtin` once decode has the option (issue 12): these are the built-in's."""
    usage = subprocess.run(
        [*TUNNELSCOPE, "decode", "--help"], capture_output=True, text=True, timeout=60
    )
    return ["--dissect", "builtin"] if "--dissect" in usage.stdout else []
