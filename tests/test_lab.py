"""Lab files: TOML and Dynagen .net parsing, Dynagen's port allocation, the port plan, and
one-line errors that name the line and the reason."""

from __future__ import annotations

import json
import os
import socket
import subprocess
from pathlib import Path

import pytest
from command import TUNNELSCOPE

from tunnelscope.formats.linktype import LinkType
from tunnelscope.lab import labfile as labmodule
from tunnelscope.lab.labfile import LabError, canonical_interface, load_lab, resolve_capture_path

LABS = Path(__file__).resolve().parent.parent / "labs"


def write(tmp_path: Path, name: str, text: str) -> str:
    path = tmp_path / name
    path.write_text(text)
    return str(path)


def tunnelscope(*args: str, cwd: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TUNNELSCOPE, *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=cwd,
    )


def test_example_labs_describe_the_same_two_vpcs_lab() -> None:
    toml, net = load_lab(str(LABS / "two-vpcs.toml")), load_lab(str(LABS / "two-vpcs.net"))
    for lab in (toml, net):
        assert lab.devices() == {"PC1": ["e0"], "PC2": ["e0"]}
        assert [e.endpoint for e in lab.links[0].ends] == [
            "udp:20001:127.0.0.1:20000",
            "udp:20003:127.0.0.1:20002",
        ]
        assert lab.links[0].encapsulation is LinkType.ETHERNET
        assert lab.captures == str(LABS / "captures")
    plan = net.plan()
    assert [(r.device, r.emulator_port, r.emulator_remote) for r in plan] == [
        ("PC1", 20000, "127.0.0.1:20001"),
        ("PC2", 20002, "127.0.0.1:20003"),
    ]
    assert plan[0].hint == "vpcs -s 20000 -c 20001 -t 127.0.0.1"


def test_net_file_allocates_ports_like_dynagen_per_end_in_file_order() -> None:
    lab = load_lab(str(LABS / "serial-frame-relay.net"))
    summary = [
        (link.name, [e.endpoint.split(":")[1] for e in link.ends], link.encapsulation)
        for link in lab.links
    ]
    assert summary == [
        ("R1:s1/0--R2:s1/0", ["10001", "10003"], None),  # HDLC or PPP: detected
        ("R1:s1/1--F1:1", ["10005", "10007"], LinkType.FRELAY),
        ("R2:f0/0--R3:f0/0", ["10009", "10011"], LinkType.ETHERNET),  # LAN 1
        ("R3:s1/0--F1:2", ["10013", "10015"], LinkType.FRELAY),
    ]
    rows = {(r.device, r.interface): r for r in lab.plan()}
    assert rows["R1", "s1/0"].hint == "NIO_udp:10000:127.0.0.1:10001"
    assert rows["F1", "1"].hint == "nio create_udp NIO 10006 127.0.0.1 10007"


def test_a_link_written_on_both_sides_is_one_link(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "both.net",
        "[localhost]\n udp = 30000\n [[ROUTER R1]]\n  FastEthernet0/0 = R2 f0/0\n"
        " [[ROUTER R2]]\n  f0/0 = R1 fa0/0\n",
    )
    lab = load_lab(path)
    assert [link.name for link in lab.links] == ["R1:f0/0--R2:f0/0"]
    assert lab.find("R1", "fastethernet0/0")[1] == 0
    assert lab.find("R2", "f0/0")[1] == 1


def test_ethernet_switch_ports_are_link_ends(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "sw.net",
        "[127.0.0.1:7200]\n udp = 32000\n [[ROUTER R1]]\n  f1/0 = S1 1\n [[ROUTER R2]]\n"
        "  e0/0 = S1 2\n [[ETHSW S1]]\n  1 = access 1\n  2 = dot1q 1\n [[ATMSW A1]]\n"
        "  1:10:100 = 2:20:200\n",
    )
    lab = load_lab(path)
    assert [(link.name, link.encapsulation) for link in lab.links] == [
        ("R1:f1/0--S1:1", LinkType.ETHERNET),
        ("R2:e0/0--S1:2", LinkType.ETHERNET),
    ]
    assert lab.devices() == {"R1": ["f1/0"], "S1": ["1", "2"], "R2": ["e0/0"]}
    with pytest.raises(LabError, match="S1 has no port 3"):
        load_lab(write(tmp_path, "sw3.net", Path(path).read_text().replace("S1 2", "S1 3")))


def test_toml_ends_without_endpoints_get_ports_from_the_base(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "lab.toml",
        'udp = 41000\ncaptures = "caps"\n[[link]]\na = "R1 s1/0"\nb = "R2 s1/0"\n'
        'impairments = ["a2b freq_drop 3", "delay 10"]\ncapture = "r1.pcap"\n',
    )
    lab = load_lab(path)
    link = lab.links[0]
    assert [e.endpoint for e in link.ends] == [
        "udp:41001:127.0.0.1:41000",
        "udp:41003:127.0.0.1:41002",
    ]
    assert [str(i) for i in link.impairments] == ["a2b freq_drop 3", "both delay 10"]
    assert link.encapsulation is None and link.capture == "r1.pcap"
    assert lab.captures == str(tmp_path / "caps")


TOML_ERRORS = [
    ('[[link]]\na = "R1 f0/0"\nb = \n', ":3: ", "Invalid value"),
    ('name = "x"\ncolour = "red"\n[[link]]\na = "R1 f0/0"\nb = "R2 f0/0"\n', ":2: ", "'colour'"),
    ('\n[[link]]\na = "R1 f0/0"\n', ":2: ", "needs 'b'"),
    ('[[link]]\na = "R1"\nb = "R2 f0/0"\n', ":2: ", "not a link end"),
    (
        '[[link]]\na = "R1 f0/0"\nb = "R2 f0/0"\n\na_endpoint = "udp:99999:127.0.0.1:1"\n',
        ":5: ",
        "99999",
    ),
    (
        '[[link]]\na = "R1 f0/0"\nb = "R2 f0/0"\nimpairments = ["packet_loss 150"]\n',
        ":4: ",
        "out of range",
    ),
    (
        '[[link]]\na = "R1 f0/0"\nb = "R2 f0/0"\nencapsulation = "atm"\n',
        ":4: ",
        "unknown link type",
    ),
    ('[[link]]\na = "R1 f0/0"\nb = "R2 f0/0"\ncapture_at = "middle"\n', ":4: ", "capture_at"),
    ('[[link]]\na = "R1 f0/0"\nb = "R2 f0/0"\ncapture = "../out.pcap"\n', ":1: ", "outside"),
    (
        '[[link]]\na = "R1 f0/0"\nb = "R2 f0/0"\n[[link]]\na = "R1 f0/0"\nb = "R3 f0/0"\n',
        ":4: ",
        "R1 f0/0 is linked twice (here and at line 1)",
    ),
    (
        '[[link]]\na = "R1 f0/0"\nb = "R2 f0/0"\na_endpoint = "udp:5000:127.0.0.1:5001"\n'
        'b_endpoint = "udp:5001:127.0.0.1:5002"\n',
        ":1: ",
        "UDP port 5001 is used twice",
    ),
    ('udp = "many"\n[[link]]\na = "R1 f0/0"\nb = "R2 f0/0"\n', ":1: ", "'udp' must be an integer"),
    ('name = "empty"\n', "", "no [[link]]"),
]


@pytest.mark.parametrize(("text", "where", "reason"), TOML_ERRORS)
def test_malformed_toml_labs_name_the_line_and_the_reason(
    tmp_path: Path, text: str, where: str, reason: str
) -> None:
    path = write(tmp_path, "bad.toml", text)
    with pytest.raises(LabError) as caught:
        load_lab(path)
    message = str(caught.value)
    assert message.startswith(path + where), message
    assert reason in message
    assert "\n" not in message


NET_ERRORS = [
    ("[localhost]\n [[ROUTER R1]]\n  f0/0 = R2 f0/0\n  this is garbage\n", ":4: ", "Invalid line"),
    ("[localhost]\n [[ROUTER R1]]\n  f0/0 = R9 f0/0\n", ":3: ", "unknown device 'R9'"),
    ("[localhost]\n [[SWITCH S1]]\n", ":2: ", "unknown device type"),
    (
        "[localhost]\n [[ROUTER R1]]\n  s1/0 = F1 7\n [[FRSW F1]]\n  1:102 = 2:201\n",
        ":3: ",
        "F1 has no port 7 (ports: 1, 2)",
    ),
    ("[localhost]\n [[ROUTER R1]]\n  f0/0 = NIO_udp:3000:127.0.0.1:3001\n", ":3: ", "NIO"),
    (
        "[localhost]\n [[ROUTER R1]]\n  f0/0 = R2 f0/0\n [[ROUTER R2]]\n [[ROUTER R3]]\n"
        "  f0/0 = R2 f0/0\n",
        ":6: ",
        "R2 f0/0 is connected twice (first at line 3)",
    ),
    ("[localhost]\n [[ROUTER R1]]\n  f0/0 = R2 f0/0\n  f0/0 = R3 f0/0\n", ":4: ", "Duplicate"),
    ("[localhost]\n udp = lots\n [[ROUTER R1]]\n", ":2: ", "not a port number"),
    (
        "[localhost]\n [[ROUTER R1]]\n  f0/0 = LAN 1\n [[ROUTER R2]]\n  f0/0 = LAN 1\n"
        " [[ROUTER R3]]\n  f0/0 = LAN 1\n",
        ":3: ",
        "LAN 1 has 3 member(s)",
    ),
    ("[localhost]\n [[ROUTER R1]]\n  f0/0 = R1 f0/0\n", ":3: ", "connected to itself"),
    ("[localhost]\n [[ROUTER R1]]\n  model = 7200\n", "", "no links"),
    (
        "[localhost]\n udp = 30000\n [[ROUTER R1]]\n  f0/0 = R2 f0/0\n [[ROUTER R2]]\n"
        "[127.0.0.1:7201]\n udp = 30002\n [[ROUTER R3]]\n  f0/0 = R4 f0/0\n [[ROUTER R4]]\n",
        ":9: ",
        "UDP port 30003 is used twice: by tunnelscope's end for R2 f0/0 (line 4)",
    ),
]


@pytest.mark.parametrize(("text", "where", "reason"), NET_ERRORS)
def test_malformed_net_files_name_the_line_and_the_reason(
    tmp_path: Path, text: str, where: str, reason: str
) -> None:
    path = write(tmp_path, "bad.net", text)
    with pytest.raises(LabError) as caught:
        load_lab(path)
    message = str(caught.value)
    assert message.startswith(path + where), message
    assert reason in message


def test_unknown_devices_and_interfaces_are_named() -> None:
    lab = load_lab(str(LABS / "serial-frame-relay.net"))
    with pytest.raises(LabError, match=r"unknown device 'R9' \(devices: R1, R2, F1, R3\)"):
        lab.find("R9", "s1/0")
    with pytest.raises(LabError, match=r"R1 has no linked interface 'f9/9' \(linked: s1/0, s1/1\)"):
        lab.find("R1", "f9/9")


def test_other_files_and_unreadable_ones_are_one_line_errors(tmp_path: Path) -> None:
    with pytest.raises(LabError, match="unknown lab file type"):
        load_lab(write(tmp_path, "lab.yaml", "links: []\n"))
    with pytest.raises(LabError, match="cannot read"):
        load_lab(str(tmp_path / "missing.toml"))
    (tmp_path / "binary.net").write_bytes(b"\xff\xfe\x00")
    with pytest.raises(LabError, match="not UTF-8"):
        load_lab(str(tmp_path / "binary.net"))


def test_toml_without_tomllib_says_why(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(labmodule, "tomllib", None)
    with pytest.raises(LabError, match="need Python 3.11 or newer"):
        load_lab(str(LABS / "two-vpcs.toml"))


def test_capture_names_stay_inside_the_captures_directory(tmp_path: Path) -> None:
    captures = tmp_path / "captures"
    (captures / "sub").mkdir(parents=True)
    os.symlink("/etc", captures / "escape")
    assert resolve_capture_path(str(captures), "r1.pcap") == str(captures / "r1.pcap")
    assert resolve_capture_path(str(captures), "sub/r1.pcap") == str(captures / "sub/r1.pcap")
    inside = str(captures / "abs.pcap")
    assert resolve_capture_path(str(captures), inside) == inside
    for name in ("../r1.pcap", "/etc/passwd", "sub/../../x", "escape/passwd", "", "sub", "a\0b"):
        with pytest.raises(LabError):
            resolve_capture_path(str(captures), name)


def test_interface_spellings_are_dynagens_short_form() -> None:
    assert canonical_interface("FastEthernet0/0") == "f0/0"
    assert canonical_interface("Serial1/0") == "s1/0"
    assert canonical_interface("gi0/1") == "g0/1"
    assert canonical_interface("e0") == "e0"
    assert canonical_interface("eth0") == "eth0"  # not a Cisco name: kept
    assert canonical_interface("1") == "1"


def test_serve_dry_run_prints_the_port_plan() -> None:
    done = tunnelscope("serve", str(LABS / "two-vpcs.net"), "--dry-run")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("lab two-vpcs")
    assert lines[2].split()[:4] == ["PC1", "e0", "20000", "127.0.0.1:20001"]
    assert "vpcs -s 20002 -c 20003 -t 127.0.0.1" in lines[3]
    plan = json.loads(
        tunnelscope("serve", str(LABS / "two-vpcs.toml"), "--dry-run", "--json").stdout
    )
    assert plan["links"][0]["ends"] == ["PC1 e0", "PC2 e0"]
    assert [row["emulator_port"] for row in plan["plan"]] == [20000, 20002]


def test_serve_refuses_a_bad_lab_with_one_line_and_status_2(tmp_path: Path) -> None:
    path = write(tmp_path, "bad.toml", '[[link]]\na = "R1 f0/0"\nb = "R2"\n')
    done = tunnelscope("serve", path)
    assert done.returncode == 2
    assert done.stderr.strip() == f"tunnelscope: error: {path}:3: 'R2' is not a link end" + (
        ' (expected "DEVICE INTERFACE", e.g. "R1 f0/0")'
    )


def test_serve_refuses_a_port_already_in_use(tmp_path: Path) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as taken:
        taken.bind(("127.0.0.1", 0))
        port = taken.getsockname()[1]
        path = write(
            tmp_path,
            "lab.toml",
            f'[[link]]\na = "R1 f0/0"\nb = "R2 f0/0"\na_endpoint = "udp:{port}:127.0.0.1:1"\n'
            f'b_endpoint = "udp:{port + 1 if port < 65535 else port - 1}:127.0.0.1:2"\n',
        )
        done = tunnelscope("serve", path, "--control", "127.0.0.1:0")
    assert done.returncode == 2
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "R1:f0/0--R2:f0/0" in lines[0] and "in use" in lines[0], lines


# Labs spanning hosts (Dynagen's multi-server .net files) -------------------------------------


def plan_of(path: str) -> list[tuple[str, str, str, int | None, str | None, str]]:
    return [
        (row.host, row.device, row.endpoint, row.emulator_port, row.emulator_remote, row.relay)
        for row in load_lab(path).plan()
    ]


@pytest.mark.parametrize("bender", ["[bender:7200]", "[bender]"])  # tutorial, sample file
def test_the_tutorials_multiserver_lab_plans_each_host_from_its_own_base(
    tmp_path: Path, bender: str
) -> None:
    text = (LABS / "multiserver.net").read_text().replace("[bender:7200]", bender)
    path = write(tmp_path, "multiserver.net", text)
    assert plan_of(path) == [
        ("xplt", "R1", "udp:10001:127.0.0.1:10000", 10000, "127.0.0.1:10001", "xplt"),
        ("bender", "R2", "udp:10002:bender:10000", 10000, "xplt:10002", "xplt"),
    ]
    lab = load_lab(path)
    assert lab.hosts == ["xplt", "bender"]
    assert [link.name for link in lab.part("xplt").links] == ["R1:s1/0--R2:s1/0"]
    assert lab.part("BENDER").links == []
    with pytest.raises(LabError, match="spans hosts xplt, bender; say which one"):
        lab.part(None)
    with pytest.raises(LabError, match="'elsewhere' is not a host of multiserver"):
        lab.part("elsewhere")


def test_a_multi_host_plan_is_printed_per_host() -> None:
    done = tunnelscope("serve", str(LABS / "multiserver.net"), "--dry-run")
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[1].split()[0] == "HOST" and lines[1].split()[-2:] == ["RELAYED", "ON"]
    assert lines[3].split()[:2] == ["bender", "R2"] and "NIO_udp:10000:xplt:10002" in lines[3]
    assert lines[4] == (
        "on xplt: `tunnelscope serve multiserver.net --host xplt` relays R1:s1/0--R2:s1/0"
    )
    assert lines[5] == "on bender: nothing to relay"
    done = tunnelscope("serve", str(LABS / "multiserver.net"), "--dry-run", "--json")
    plan = json.loads(done.stdout)
    assert plan["hosts"] == {"xplt": ["R1:s1/0--R2:s1/0"], "bender": []}


TWO_HOSTS = (
    "[192.0.2.1:7200]\n udp = 10000\n{relay1} [[ROUTER R1]]\n  s1/0 = R2 s1/0\n{link_relay}"
    "  f0/0 = R3 f0/0\n"
    "[192.0.2.2:7200]\n udp = 10000\n{relay2} [[ROUTER R2]]\n [[ROUTER R3]]\n"
)


def test_the_same_base_on_two_hosts_is_fine_and_relays_go_where_they_are_told(
    tmp_path: Path,
) -> None:
    path = write(tmp_path, "two.net", TWO_HOSTS.format(relay1="", relay2="", link_relay=""))
    assert plan_of(path) == [  # neither host is this one: relayed on end a's host
        ("192.0.2.1", "R1", "udp:10001:127.0.0.1:10000", 10000, "127.0.0.1:10001", "192.0.2.1"),
        ("192.0.2.2", "R2", "udp:10004:192.0.2.2:10000", 10000, "192.0.2.1:10004", "192.0.2.1"),
        ("192.0.2.1", "R1", "udp:10003:127.0.0.1:10002", 10002, "127.0.0.1:10003", "192.0.2.1"),
        ("192.0.2.2", "R3", "udp:10005:192.0.2.2:10002", 10002, "192.0.2.1:10005", "192.0.2.1"),
    ]
    told = TWO_HOSTS.format(relay1="", relay2=" relay = 192.0.2.2\n", link_relay="")
    rows = plan_of(write(tmp_path, "told.net", told))
    assert {row[-1] for row in rows} == {"192.0.2.2"}
    assert rows[0][2:5] == ("udp:10004:192.0.2.1:10000", 10000, "192.0.2.2:10004")
    per_link = TWO_HOSTS.format(relay1="", relay2="", link_relay="  s1/0 relay = 192.0.2.2\n")
    relays = [row[-1] for row in plan_of(write(tmp_path, "per-link.net", per_link))]
    assert relays == ["192.0.2.2", "192.0.2.2", "192.0.2.1", "192.0.2.1"]
    disagree = TWO_HOSTS.format(
        relay1=" relay = 192.0.2.1\n", relay2=" relay = 192.0.2.2\n", link_relay=""
    )
    with pytest.raises(LabError, match=r"two.net:5: R1 s1/0 = R2 s1/0: its ends disagree"):
        load_lab(write(tmp_path, "two.net", disagree))


def test_an_end_on_this_host_named_localhost_cannot_be_reached_from_another(
    tmp_path: Path,
) -> None:
    text = "[localhost]\n relay = bender\n [[ROUTER R1]]\n  s1/0 = R2 s1/0\n"
    text += "[bender]\n [[ROUTER R2]]\n"
    with pytest.raises(LabError, match=r":4: R1 s1/0 is on \[localhost\], which bender cannot"):
        load_lab(write(tmp_path, "local.net", text))
    here = write(tmp_path, "here.net", text.replace(" relay = bender\n", ""))
    assert [row[-1] for row in plan_of(here)] == ["localhost", "localhost"]  # relayed here
    assert [link.name for link in load_lab(here).part(None).links] == ["R1:s1/0--R2:s1/0"]


def test_serving_a_part_names_what_cannot_run(tmp_path: Path) -> None:
    text = (LABS / "multiserver.net").read_text().replace("[bender:7200]", "[bender.invalid]")
    path = write(tmp_path, "multiserver.net", text)
    done = tunnelscope("serve", path, "--host", "xplt", "--control", "127.0.0.1:0")
    assert done.returncode == 2
    assert done.stderr.startswith("tunnelscope: error: R1:s1/0--R2:s1/0: udp:10002:bender.invalid")
    assert "cannot resolve remote host 'bender.invalid'" in done.stderr
    assert len(done.stderr.splitlines()) == 1
    done = tunnelscope("serve", path, "--control", "127.0.0.1:0")
    assert (done.returncode, done.stderr) == (
        2,
        "tunnelscope: error: multiserver spans hosts xplt, bender.invalid; say which one this is"
        " with --host\n",
    )
