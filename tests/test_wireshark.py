"""Wireshark's dissectors through `tunnelscope.decoders.wireshark`, judged by tshark itself.

`decode --dissect wireshark --json` must give, frame for frame, what `tshark -T fields`
prints for frame.protocols, _ws.col.Info and every other field both show, over every capture
in captures/ (so new reference captures join by being there) and over routing frames built
here with scapy. Then the in-memory service, its bounded queue, and bad input: no tshark,
tshark killed, a bad display filter, malformed frames.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import tshark
from command import TUNNELSCOPE
from scapy.contrib.bgp import BGPHeader, BGPOpen
from scapy.contrib.eigrp import EIGRP, EIGRPParam
from scapy.contrib.isis import ISIS_CommonHdr, ISIS_P2P_Hello
from scapy.contrib.ospf import OSPF_Hdr, OSPF_Hello, OSPF_LSUpd, OSPF_Router_LSA
from scapy.layers.inet import IP, TCP, UDP
from scapy.layers.rip import RIP, RIPEntry
from test_cli_decode import damaged_files
from test_decoders_frames import write_pcap
from test_decoders_tshark import _as_tshark

from tunnelscope.decoders import wireshark
from tunnelscope.decoders.wireshark import Dissector, FileDissection, dissect
from tunnelscope.formats.capture import open_capture
from tunnelscope.formats.linktype import LinkType

CAPTURES = Path(__file__).resolve().parent.parent / "captures"
CHDLC_IPV4 = b"\x0f\x00\x08\x00"
CHDLC_OSI = b"\x8f\x00\xfe\xfe"
PROTOCOL_FIELDS = {  # fields each protocol must show when it is in a frame (not vacuous)
    "chdlc": ["chdlc.address", "chdlc.protocol"],
    "ppp": ["ppp.protocol"],
    "fr": ["fr.dlci"],
    "eth": ["eth.src", "eth.dst"],
    "ip": ["ip.src", "ip.dst", "ip.proto", "ip.ttl"],
    "ospf": ["ospf.msg", "ospf.srcrouter", "ospf.area_id"],
    "bgp": ["bgp.type", "bgp.length"],
    "eigrp": ["eigrp.opcode", "eigrp.as"],
    "rip": ["rip.command", "rip.version"],
    "isis": ["isis.irpd", "isis.type"],
    "cdp": ["cdp.deviceid"],
    "slarp": ["slarp.ptype"],
}


def _ip(dst: str, ident: int = 1) -> IP:
    return IP(src="10.0.0.1", dst=dst, ttl=1, id=ident)


def routing_frames(ident: int = 1) -> list[bytes]:
    """C-HDLC frames of the routing protocols router labs carry, as scapy builds them;
    `ident` (IP ID, IS-IS circuit ID, TCP sequence) makes each set differ from another."""
    hello = _ip("224.0.0.5", ident) / OSPF_Hdr(src="1.1.1.1") / OSPF_Hello()
    lsa = OSPF_Router_LSA(id="1.1.1.1", adrouter="1.1.1.1")
    update = _ip("224.0.0.5", ident) / OSPF_Hdr(src="1.1.1.1") / OSPF_LSUpd(lsalist=[lsa])
    keepalive = TCP(sport=179, dport=40000, flags="PA", seq=ident, ack=1) / BGPHeader(type=4)
    opening = TCP(sport=40001, dport=179, flags="PA", seq=ident, ack=1) / BGPHeader(type=1)
    return [
        CHDLC_IPV4 + bytes(hello),
        CHDLC_IPV4 + bytes(update),
        CHDLC_IPV4 + bytes(_ip("10.0.0.2", ident) / keepalive),
        CHDLC_IPV4
        + bytes(_ip("10.0.0.2", ident) / opening / BGPOpen(my_as=65001, bgp_id="1.1.1.1")),
        CHDLC_IPV4
        + bytes(_ip("224.0.0.10", ident) / EIGRP(opcode=5, asn=100, tlvlist=[EIGRPParam()])),
        CHDLC_IPV4
        + bytes(
            _ip("224.0.0.9", ident)
            / UDP(sport=520, dport=520)
            / RIP(cmd=2, version=2)
            / RIPEntry(addr="10.1.0.0", mask="255.255.0.0", metric=1)
        ),
        CHDLC_OSI
        + b"\x03"
        + bytes(
            ISIS_CommonHdr()
            / ISIS_P2P_Hello(circuittype=3, sourceid="0000.0000.0001", localcircuitid=ident % 256)
        ),
    ]


def malformed_frame() -> bytes:
    """An OSPF Hello cut short: Wireshark adds its Malformed Packet layer."""
    return CHDLC_IPV4 + bytes(_ip("224.0.0.5") / OSPF_Hdr(src="1.1.1.1") / OSPF_Hello())[:40]


@pytest.fixture(scope="module")
def routing_capture(tmp_path_factory: pytest.TempPathFactory) -> str:
    path = tmp_path_factory.mktemp("routing") / "routing.pcap"
    return write_pcap(str(path), LinkType.C_HDLC, [*routing_frames(), malformed_frame()])


@pytest.fixture(scope="module")
def field_types() -> dict[str, str]:
    listing = subprocess.run(
        ["tshark", "-G", "fields"], capture_output=True, text=True, timeout=120
    ).stdout
    return {c[2]: c[3] for c in (line.split("\t") for line in listing.splitlines()) if c[0] == "F"}


def decode_json(*args: str, env: dict[str, str] | None = None) -> list[dict]:
    done = subprocess.run(
        [*TUNNELSCOPE, "decode", "--json", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
    )
    assert done.returncode == 0, done.stderr
    assert "Traceback" not in done.stderr
    return [json.loads(line) for line in done.stdout.splitlines()]


def assert_dissection_is_tsharks(path: str, field_types: dict[str, str]) -> int:
    """Every field of every frame equals tshark -T fields' value; the number compared."""
    frames = decode_json("--dissect", "wireshark", path)
    # EK writes absolute times as ISO 8601 where -T fields writes "Nov 14, 2023 ..."
    names = sorted(
        {key for frame in frames for key in frame["fields"]}
        - {name for name, kind in field_types.items() if kind == "FT_ABSOLUTE_TIME"}
        & set(field_types)
    )
    rows = tshark.fields(path, [*names, "frame.protocols", "_ws.col.Info"])
    assert len(rows) == len(frames) > 0
    compared = 0
    for frame, row in zip(frames, rows):
        where = (path, frame["number"])
        assert frame["protocols"] == row["frame.protocols"][0].split(":"), where
        assert frame["summary"] == frame["fields"]["_ws.col.Info"] == row["_ws.col.Info"][0]
        assert frame["malformed"] == ("[Malformed Packet" in frame["summary"]), where
        for protocol in set(frame["protocols"]) & set(PROTOCOL_FIELDS):
            for name in PROTOCOL_FIELDS[protocol]:
                assert name in frame["fields"], (where, protocol, name)
        for name in names:
            theirs = [tshark.value(text) for text in row[name]]
            value = frame["fields"].get(name)
            assert _as_tshark(value) == theirs, (where, name)
            if field_types[name].startswith(("FT_UINT", "FT_INT")) and theirs:
                assert all(type(v) is int for v in _as_tshark(value)), (where, name, value)
            compared += bool(theirs)
    return compared


@tshark.required
@pytest.mark.parametrize(
    "name", sorted(p.name for p in [*CAPTURES.glob("*.pcap"), *CAPTURES.glob("*.pcapng")])
)
def test_decode_json_is_tsharks_dissection_of_every_reference_capture(
    name: str, field_types: dict[str, str]
) -> None:
    assert assert_dissection_is_tsharks(str(CAPTURES / name), field_types) >= 20


@tshark.required
def test_routing_protocols_are_dissected_as_tshark_does(
    routing_capture: str, field_types: dict[str, str]
) -> None:
    assert assert_dissection_is_tsharks(routing_capture, field_types) >= 100
    frames = decode_json(routing_capture)  # auto: Wireshark, since tshark is here
    lines = [f"{f['fields']['_ws.col.Protocol']} {f['summary']}" for f in frames]
    assert lines[:4] == [
        "OSPF Hello Packet",
        "OSPF LS Update",
        "BGP KEEPALIVE Message",
        "BGP OPEN Message",
    ]
    assert frames[4]["fields"]["eigrp.as"] == 100 and "isis" in frames[6]["protocols"]
    assert frames[-1]["malformed"] and "[Malformed Packet]" in frames[-1]["summary"]
    assert not any(frame["malformed"] for frame in frames[:-1])


@tshark.required
def test_text_lines_show_wiresharks_protocol_and_info(routing_capture: str) -> None:
    shown = subprocess.run(
        [*TUNNELSCOPE, "decode", "-Y", "bgp", routing_capture],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "TZ": "UTC"},
    )
    assert shown.returncode == 0, shown.stderr
    assert shown.stdout.splitlines() == [
        "22:13:20.002000 hdlc 10.0.0.1 > 10.0.0.2 BGP KEEPALIVE Message",
        "22:13:20.003000 hdlc 10.0.0.1 > 10.0.0.2 BGP OPEN Message",
    ]


@tshark.required
def test_display_filter_keeps_frame_numbers_and_reads_pipes(field_types: dict[str, str]) -> None:
    path = str(CAPTURES / "mixed.pcapng")
    everything = decode_json("--dissect", "wireshark", path)
    wanted = [
        f["number"] for f in everything if "icmp" in f["protocols"] or "lcp" in f["protocols"]
    ]
    assert len(wanted) >= 2
    with open(path, "rb") as source:
        done = subprocess.run(
            [*TUNNELSCOPE, "decode", "--json", "-Y", "icmp || lcp", "-"],
            stdin=source,
            capture_output=True,
            text=True,
            timeout=60,
        )
    piped = [json.loads(line) for line in done.stdout.splitlines()]
    assert [f["number"] for f in piped] == wanted
    kept = [f for f in everything if f["number"] in wanted]
    for ours, theirs in zip(piped, kept):  # the same frames, with the file's own interfaces
        assert ours["interface"] == theirs["interface"] and ours["interface"]
        assert ours["summary"] == theirs["summary"] and ours["time"] == theirs["time"]


@tshark.required
def test_count_stops_tshark_early(routing_capture: str) -> None:
    assert [f["number"] for f in decode_json("-c", "2", routing_capture)] == [1, 2]


# The service in memory --------------------------------------------------------------------


def _reference(name: str) -> tuple[int, list[bytes]]:
    with open_capture(str(CAPTURES / name)) as reader:
        packets = list(reader)
    return int(packets[0].linktype), [p.data for p in packets]


@tshark.required
@pytest.mark.parametrize("name", ["chdlc.pcap", "ppp.pcap", "frelay.pcap", "ethernet.pcap"])
def test_frames_in_memory_are_dissected_as_the_file_is(name: str) -> None:
    linktype, frames = _reference(name)
    with FileDissection(str(CAPTURES / name)) as from_file:
        expected = [decoded for _, decoded in from_file]
    got = dissect(linktype, frames)
    assert [d.summary for d in got] == [d.summary for d in expected]
    assert [d.protocols for d in got] == [d.protocols for d in expected]
    assert all(d.linktype == linktype for d in got)


@tshark.required
def test_one_tshark_serves_many_batches_in_order() -> None:
    results: list[tuple[object, str]] = []
    frames = routing_frames()
    with Dissector(LinkType.C_HDLC, lambda tag, d: results.append((tag, d.summary))) as dissector:
        pid = dissector._process.popen.pid
        for batch in range(3):
            for number, frame in enumerate(frames):
                assert dissector.submit(frame, tag=(batch, number), block=True)
            deadline = time.monotonic() + 30
            while len(results) < (batch + 1) * len(frames) and time.monotonic() < deadline:
                time.sleep(0.01)  # answers arrive while tshark keeps running (-l)
            assert len(results) == (batch + 1) * len(frames)
            assert dissector._process.popen.pid == pid and dissector._process.popen.poll() is None
    assert [tag for tag, _ in results] == [(b, n) for b in range(3) for n in range(len(frames))]
    assert results[2][1] == "KEEPALIVE Message"
    assert dissector.dropped == 0 and dissector.failure is None


@tshark.required
def test_a_stalled_tshark_never_blocks_the_submitter() -> None:
    """tshark stopped (SIGSTOP): submit returns at once, drops and counts; nothing is lost
    of what it accepted once tshark runs again."""
    answers: list[str] = []
    frame = routing_frames()[0]
    dissector = Dissector(LinkType.C_HDLC, lambda _tag, d: answers.append(d.summary), 64)
    tshark_pid = dissector._process.popen.pid
    os.kill(tshark_pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        accepted = sum(dissector.submit(frame) for _ in range(20_000))
        assert time.monotonic() - started < 10
    finally:
        os.kill(tshark_pid, signal.SIGCONT)
    dissector.close()
    assert dissector.dropped > 0 and accepted + dissector.dropped == 20_000
    assert len(answers) == accepted and set(answers) == {"Hello Packet"}


# Bad input ----------------------------------------------------------------------------------


def _without_tshark(tmp_path: Path) -> dict[str, str]:
    """PATH holding only this interpreter: no tshark to be found."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    return {**os.environ, "PATH": str(bin_dir)}


def test_without_tshark_auto_falls_back_and_wireshark_is_one_error(tmp_path: Path) -> None:
    env = _without_tshark(tmp_path)
    path = str(CAPTURES / "chdlc.pcap")
    assert decode_json(path, env=env) == decode_json("--dissect", "builtin", path)
    for args in (["--dissect", "wireshark", path], ["-Y", "ip", path]):
        done = subprocess.run(
            [*TUNNELSCOPE, "decode", *args], capture_output=True, text=True, timeout=60, env=env
        )
        assert done.returncode == 2 and done.stdout == ""
        assert len(done.stderr.splitlines()) == 1 and "tshark" in done.stderr, done.stderr
    done = subprocess.run(
        [*TUNNELSCOPE, "info"], capture_output=True, text=True, timeout=60, env=env
    )
    assert "dissector: builtin (tshark not found)" in done.stdout


@tshark.required
def test_a_display_filter_with_a_syntax_error_is_tsharks_message_in_one_line() -> None:
    done = subprocess.run(
        [*TUNNELSCOPE, "decode", "-Y", "ip.src ==", str(CAPTURES / "chdlc.pcap")],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert done.stderr.startswith("tunnelscope: error: tshark: ")
    assert "filter" in done.stderr and len(done.stderr.splitlines()) == 1, done.stderr


@tshark.required
def test_tshark_killed_mid_run_ends_with_the_frames_so_far_and_one_line(tmp_path: Path) -> None:
    frames = routing_frames() * 6000
    path = write_pcap(str(tmp_path / "big.pcap"), LinkType.C_HDLC, frames)
    command = subprocess.Popen(
        [*TUNNELSCOPE, "decode", "--dissect", "wireshark", path],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert command.stdout is not None
        first = command.stdout.readline()  # tshark is running and answering
        assert "OSPF Hello Packet" in first
        children = subprocess.run(
            ["pgrep", "-P", str(command.pid), "-x", "tshark"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.split()
        assert len(children) == 1
        os.kill(int(children[0]), signal.SIGKILL)
        rest, stderr = command.communicate(timeout=60)
    finally:
        command.kill()
        command.wait()
    assert command.returncode == 2
    assert 1 + len(rest.splitlines()) < len(frames)
    assert stderr.startswith("tunnelscope: error: tshark was killed (SIGKILL) after ")
    assert len(stderr.splitlines()) == 1


@tshark.required
@pytest.mark.parametrize(("data", "status", "message", "printed"), damaged_files())
def test_damaged_files_end_as_with_the_builtin_decoders(
    tmp_path: Path, data: bytes, status: int, message: str, printed: int
) -> None:
    """The same exit status and message as test_cli_decode's; tshark sees the same damage."""
    path = tmp_path / "capture"
    path.write_bytes(data)
    for args, stdin in (([str(path)], None), (["-"], data)):
        done = subprocess.run(
            [*TUNNELSCOPE, "decode", "--dissect", "wireshark", *args],
            input=stdin,
            capture_output=True,
            timeout=60,
        )
        stderr = done.stderr.decode()
        assert (done.returncode, stderr.count("\n")) == (status, 1), (args, stderr)
        assert message in stderr and "Traceback" not in stderr
        assert len(done.stdout.splitlines()) <= printed


@tshark.required
def test_a_tshark_that_never_answers_is_killed_on_close_not_waited_for() -> None:
    dissector = Dissector(LinkType.C_HDLC, lambda _tag, _d: None, 8)
    os.kill(dissector._process.popen.pid, signal.SIGSTOP)
    for _ in range(5000):
        dissector.submit(routing_frames()[0])
    started = time.monotonic()
    dissector.close(timeout=2)
    assert time.monotonic() - started < 15
    assert dissector.failure and dissector.dropped > 0


@tshark.required
def test_linktype_override_feeds_tshark_the_frames_as_that_link_type(tmp_path: Path) -> None:
    """A C-HDLC capture labelled Ethernet: tshark reads it as Ethernet; --linktype hdlc hands
    the frames over as C-HDLC, as the correctly labelled file is dissected."""
    _, frames = _reference("chdlc.pcap")
    mislabelled = write_pcap(str(tmp_path / "wrong.pcap"), LinkType.ETHERNET, frames)
    right = write_pcap(str(tmp_path / "right.pcap"), LinkType.C_HDLC, frames)
    fed = decode_json("--dissect", "wireshark", "--linktype", "hdlc", mislabelled)
    read = decode_json("--dissect", "wireshark", right)
    assert [f["protocols"] for f in fed] == [f["protocols"] for f in read]
    assert [f["summary"] for f in fed] == [f["summary"] for f in read]
    assert [f["fields"]["frame.time_epoch"] for f in fed] == [
        f["fields"]["frame.time_epoch"] for f in read
    ]
    assert {f["linktype"] for f in fed} == {"hdlc"}
    assert decode_json("--dissect", "wireshark", mislabelled)[0]["protocols"][0] == "eth"


@tshark.required
def test_missing_files_and_directories_are_the_builtin_errors(tmp_path: Path) -> None:
    for path, reason in ((tmp_path / "nope.pcap", "No such file or directory"),
                         (tmp_path, "Is a directory")):  # fmt: skip
        done = subprocess.run(
            [*TUNNELSCOPE, "decode", "--dissect", "wireshark", str(path)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert (done.returncode, done.stdout) == (2, "")
        assert done.stderr == f"tunnelscope: error: {path}: {reason}\n"


@tshark.required
@pytest.mark.parametrize("cache", ["writable", "unwritable"])
def test_the_field_name_table_is_cached_or_kept_in_memory(
    cache: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """EK names map back to Wireshark's (ip_ip_flags_df -> ip.flags.df) from an SQLite file in
    the cache folder, built once; a cache that cannot be written costs only the file."""
    folder = tmp_path / "cache"
    if cache == "unwritable":
        folder.write_text("a file where the folder should be")
    else:
        folder.mkdir()
    monkeypatch.setattr("pyshark.cache.get_cache_dir", lambda _version: folder)
    tool = wireshark.find_tshark()
    assert tool is not None
    for _ in range(2):  # built, then read back (or built again in memory)
        plan = wireshark._Names(tool).plan("ip", ("ip_ip_flags_df", "ip_ip_src", "ip_nosuch"))
        assert plan.names == ("ip.flags.df", "ip.src", "ip_nosuch")
    files = sorted(p.name for p in folder.iterdir()) if folder.is_dir() else []
    assert files == ([wireshark._NAMES_FILE] if cache == "writable" else [])


@tshark.required
def test_a_tshark_that_lists_no_fields_is_not_cached(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed `tshark -G fields` leaves names as EK spells them for this run only, so the
    next start asks again instead of reading an empty table for good."""
    monkeypatch.setattr("pyshark.cache.get_cache_dir", lambda _version: tmp_path)
    tool = wireshark.find_tshark()
    assert tool is not None
    silent = wireshark.Tshark("/bin/true", tool.version)  # exits 0, lists nothing
    assert wireshark._Names(silent).plan("ip", ("ip_ip_src",)).names == ("ip_ip_src",)
    assert list(tmp_path.iterdir()) == []
    assert wireshark._Names(tool).plan("ip", ("ip_ip_src",)).names == ("ip.src",)
    assert [p.name for p in tmp_path.iterdir()] == [wireshark._NAMES_FILE]


@tshark.required
def test_a_damaged_field_name_cache_is_rebuilt(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("pyshark.cache.get_cache_dir", lambda _version: tmp_path)
    (tmp_path / wireshark._NAMES_FILE).write_bytes(b"not a database, " * 512)
    tool = wireshark.find_tshark()
    assert tool is not None
    assert wireshark._Names(tool).plan("ip", ("ip_ip_src",)).names == ("ip.src",)  # in memory
    assert list(tmp_path.iterdir()) == []  # the damaged file is gone
    assert wireshark._Names(tool).plan("ip", ("ip_ip_src",)).names == ("ip.src",)
    assert [p.name for p in tmp_path.iterdir()] == [wireshark._NAMES_FILE]
