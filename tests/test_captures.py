"""The committed reference captures: reproducible, and decoded by tshark as intended."""

from __future__ import annotations

import importlib.util
import subprocess
from pathlib import Path

import pytest
import tshark

from tunnelscope.formats.capture import open_capture
from tunnelscope.formats.linktype import LinkType

CAPTURES = Path(__file__).resolve().parent.parent / "captures"


def _load_script():
    spec = importlib.util.spec_from_file_location("make_captures", CAPTURES / "make_captures.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


make_captures = _load_script()
FIRST_PROTOCOL = {
    LinkType.ETHERNET: "eth",
    LinkType.C_HDLC: "chdlc",
    LinkType.PPP_SERIAL: "ppp",
    LinkType.FRELAY: "fr",
}


def test_regenerating_gives_the_committed_bytes(tmp_path: Path) -> None:
    written = make_captures.write_all(tmp_path)
    assert sorted(p.name for p in written) == sorted(p.name for p in CAPTURES.glob("*.pcap*"))
    for path in written:
        assert path.read_bytes() == (CAPTURES / path.name).read_bytes(), path.name


FILE_FRAMES = {
    name: (linktype, make_captures.FRAMES[linktype])
    for linktype, name in make_captures.FILES.items()
}
FILE_FRAMES.update(make_captures.ROUTING)


@pytest.mark.parametrize("name", list(FILE_FRAMES))
def test_files_hold_the_frames_with_the_link_type(name: str) -> None:
    linktype, frames = FILE_FRAMES[name]
    with open_capture(str(CAPTURES / name)) as reader:
        packets = list(reader)
    assert [p.data for p in packets] == frames
    assert {p.linktype for p in packets} == {linktype}


@tshark.required
@pytest.mark.parametrize("linktype", list(make_captures.FILES))
def test_tshark_decodes_every_frame_with_the_link_type(linktype: LinkType) -> None:
    rows = tshark.fields(str(CAPTURES / make_captures.FILES[linktype]), ["frame.protocols"])
    assert len(rows) == len(make_captures.FRAMES[linktype])
    for number, row in enumerate(rows, 1):
        protocols = row["frame.protocols"][0].split(":")
        assert protocols[0] == FIRST_PROTOCOL[linktype], number
        assert len(protocols) > 1, f"frame {number}: nothing decoded after the link layer"
        assert "_ws.malformed" not in protocols, f"frame {number}: {protocols}"


@tshark.required
def test_tshark_ethernet_vlans_and_cdp() -> None:
    names = ["vlan.id", "vlan.priority", "ieee8021ad.id", "ip.dst", "cdp.deviceid", "arp.opcode"]
    rows = tshark.fields(str(CAPTURES / "ethernet.pcap"), names)
    assert [r["arp.opcode"] for r in rows[:2]] == [["1"], ["2"]]
    assert rows[4]["vlan.id"] == ["10"]
    assert rows[4]["vlan.priority"] == ["5"]
    assert (rows[5]["ieee8021ad.id"], rows[5]["vlan.id"]) == (["100"], ["20"])
    assert rows[6]["vlan.id"] == ["200", "30"]  # 0x9100 outer tag, 0x8100 inner
    assert rows[6]["ip.dst"] == ["10.30.0.2"]
    assert rows[8]["cdp.deviceid"] == ["R1"]


@tshark.required
def test_tshark_cisco_hdlc_slarp_and_ip() -> None:
    names = ["chdlc.address", "chdlc.protocol", "slarp.ptype", "slarp.mysequence"]
    names += ["slarp.yoursequence", "slarp.address", "ip.src", "cdp.portid"]
    rows = tshark.fields(str(CAPTURES / "chdlc.pcap"), names)
    assert [r["slarp.ptype"] for r in rows[:5]] == [["0"], ["1"], ["2"], ["2"], ["2"]]
    assert rows[1]["slarp.address"] == ["10.1.1.1"]
    sequences = [(r["slarp.mysequence"], r["slarp.yoursequence"]) for r in rows[2:5]]
    assert sequences == [(["1"], ["0"]), (["1"], ["1"]), (["2"], ["1"])]
    assert (rows[5]["chdlc.address"], rows[5]["chdlc.protocol"]) == (["0x0f"], ["0x0800"])
    assert rows[5]["ip.src"] == ["10.1.1.1"]
    assert rows[7]["cdp.portid"] == ["Serial1/0"]


@tshark.required
def test_tshark_ppp_control_protocols() -> None:
    names = ["ppp.protocol", "ppp.code", "lcp.opt.mru", "lcp.opt.magic_number", "pap.peer_id"]
    names += ["chap.name", "ipcp.opt.ip_address", "ip.dst"]
    rows = tshark.fields(str(CAPTURES / "ppp.pcap"), names)
    assert [tshark.value(r["ppp.protocol"][0]) for r in rows] == [
        0xC021,
        0xC021,
        0xC021,
        0xC023,
        0xC223,
        0x8021,
        0x0021,
    ]
    assert (rows[0]["ppp.code"], rows[1]["ppp.code"]) == (["1"], ["2"])
    assert (rows[0]["lcp.opt.mru"], rows[0]["lcp.opt.magic_number"]) == (["1500"], ["0x0badcafe"])
    assert rows[3]["pap.peer_id"] == ["R1"]
    assert rows[4]["chap.name"] == ["R2"]
    assert rows[5]["ipcp.opt.ip_address"] == ["10.2.2.1"]
    assert rows[6]["ip.dst"] == ["10.2.2.2"]


@tshark.required
def test_tshark_frame_relay_dlcis_encapsulations_and_lmi() -> None:
    names = ["fr.dlci", "fr.becn", "fr.fecn", "fr.de", "ip.src", "q933.message_type"]
    names += ["q933.report_type", "q933.link_verification.txseq", "q933.dlci", "lmi.msg_type"]
    names += ["lmi.dlci_hi", "lmi.dlci_low", "arp.src.proto_ipv4"]
    rows = tshark.fields(str(CAPTURES / "frelay.pcap"), names)
    assert [r["fr.dlci"] for r in rows] == [["0"]] * 6 + [["1023"]] * 2 + [
        ["100"],
        ["100"],
        ["200"],
        ["300"],
    ]
    assert [r["q933.message_type"] for r in rows[:4]] == [["0x75"], ["0x7d"], ["0x75"], ["0x7d"]]
    assert [r["q933.report_type"] for r in rows[:4]] == [["1"], ["1"], ["0"], ["0"]]
    assert rows[3]["q933.link_verification.txseq"] == ["2"]
    assert rows[3]["q933.dlci"] == ["100", "200", "300"]  # ANSI full status
    assert rows[5]["q933.dlci"] == ["102", "201"]  # Q.933 Annex A full status
    assert rows[7]["lmi.msg_type"] == ["0x7d"]  # Cisco LMI status, PVC 110 = 6 << 4 | 14
    assert (rows[7]["lmi.dlci_hi"], rows[7]["lmi.dlci_low"]) == (["6"], ["14"])
    assert rows[8]["ip.src"] == ["10.3.1.1"]  # Cisco encapsulation
    assert rows[9]["fr.becn"] == ["1"]
    assert (rows[10]["ip.src"], rows[10]["fr.fecn"], rows[10]["fr.de"]) == (
        ["10.3.2.1"],
        ["1"],
        ["1"],
    )  # IETF, NLPID 0xCC
    assert rows[11]["arp.src.proto_ipv4"] == ["10.3.3.1"]  # IETF SNAP, bridged Ethernet


@tshark.required
def test_tshark_reads_the_mixed_pcapng_from_a_pipe() -> None:
    names = ["frame.interface_name", "frame.interface_description", "frame.p2p_dir"]
    names += ["frame.comment", "frame.time_epoch", "frame.protocols"]
    command = f"cat {CAPTURES / 'mixed.pcapng'} | tshark -n -r - -T fields"
    command += "".join(f" -e {name}" for name in names)
    done = subprocess.run(command, shell=True, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    rows = [dict(zip(names, line.split("\t"))) for line in done.stdout.splitlines()]
    interfaces = [name for name, _ in make_captures.INTERFACES.values()]
    assert [r["frame.interface_name"] for r in rows] == interfaces * 3
    assert rows[1]["frame.interface_description"] == "udp 10002 <-> 10003, cisco hdlc"
    assert [r["frame.protocols"].split(":")[0] for r in rows[:4]] == ["eth", "chdlc", "ppp", "fr"]
    # epb_flags outbound -> p2p_dir 0 (sent), inbound -> 1 (received)
    assert [r["frame.p2p_dir"] for r in rows] == ["0"] * 4 + ["1"] * 4 + ["0"] * 4
    assert [r["frame.comment"] for r in rows if r["frame.comment"]] == ["dropped by packet_loss"]
    assert rows[5]["frame.interface_name"] == "R1 s1/0 - R2 s1/0"
    assert rows[5]["frame.comment"] == "dropped by packet_loss"
    assert rows[-1]["frame.time_epoch"] == "1700000002.750000000"


def test_mixed_pcapng_statistics() -> None:
    with open_capture(str(CAPTURES / "mixed.pcapng")) as reader:
        assert len(list(reader)) == 12
        assert [i.dropped for i in reader.interfaces] == [0, 3, 0, 1]
        assert [i.linktype for i in reader.interfaces] == list(make_captures.INTERFACES)


EXPERT_CHAT = 0x00200000  # tshark's lowest severity (PI_CHAT): LDP notes every Hello's GTSM bit


def _routing_info(name: str) -> list[str]:
    """tshark's Info column for each frame the script wrote, in its order."""
    lan = name == "routing-ethernet.pcap"
    hello = "L1 HELLO" if lan else "P2P HELLO"
    infos = ["Hello Packet", "LS Update", "Hello", "Update", "OPEN Message"]
    infos += ["KEEPALIVE Message", "UPDATE Message", "UPDATE Message, KEEPALIVE Message"]
    infos += ["Response", "Hello Message", "Hello Packet", f"{hello}, System-ID: 0000.0000.0001"]
    infos += ["L2 LSP, LSP-ID: 0000.0000.0001.00-00, Sequence: 0x00000003, Lifetime:  1199s"]
    infos += [f"Device ID: R1  Port ID: {'Ethernet0/0' if lan else 'Serial1/0'}"]
    if lan:  # first-hop redundancy: HSRP v1 and v2, VRRPv2, VRRPv3 over IPv4 and IPv6
        infos += ["Hello (state Active)"] * 2 + ["Announcement (v2)"] + ["Announcement (v3)"] * 2
    if name == "routing-frelay-ietf.pcap":  # ANSI and Q.933 Annex A (tshark's q933)
        infos += ["STATUS ENQUIRY", "STATUS"] * 2
    elif name == "routing-frelay-cisco.pcap":  # Cisco LMI
        infos += ["Status Enquiry", "Status"]
    return infos


@tshark.required
@pytest.mark.parametrize("name", list(make_captures.ROUTING))
def test_tshark_names_every_routing_message_without_warnings(name: str) -> None:
    names = ["frame.protocols", "_ws.col.Info", "_ws.expert.severity", "_ws.expert.message"]
    rows = tshark.fields(str(CAPTURES / name), names)
    assert [row["_ws.col.Info"][0].strip() for row in rows] == _routing_info(name)
    for number, row in enumerate(rows, 1):
        assert "_ws.malformed" not in row["frame.protocols"][0], number
        severities = [int(text) for text in row["_ws.expert.severity"]]
        assert all(s <= EXPERT_CHAT for s in severities), (number, row["_ws.expert.message"])
