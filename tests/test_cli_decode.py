"""`tunnelscope decode`: agrees with tshark, reads files and pipes, never shows a traceback."""

from __future__ import annotations

import json
import os
import random
import subprocess
from pathlib import Path

import pytest
import tshark
from click.testing import CliRunner, Result
from command import TUNNELSCOPE

from tunnelscope.cli import cli
from tunnelscope.formats import pcap, pcapng
from tunnelscope.formats.capture import open_capture
from tunnelscope.formats.linktype import LinkType

CAPTURES = Path(__file__).resolve().parent.parent / "captures"
REFERENCE = ["ethernet.pcap", "chdlc.pcap", "ppp.pcap", "frelay.pcap", "mixed.pcapng"]
REFERENCE += sorted(path.name for path in CAPTURES.glob("routing-*.pcap"))
JSON_KEYS = ["number", "time", "interface", "linktype", "direction", "summary", "fields"]
JSON_KEYS += ["protocols", "malformed", "comment"]
ENV = {**os.environ, "TZ": "UTC"}


def run(*args: str, stdin: bytes | None = None) -> Result:
    """Run `tunnelscope decode --dissect builtin ARGS` in process (this module is about the
    built-in decoders; tests/test_wireshark.py has Wireshark's); an exception fails the test."""
    result = CliRunner().invoke(cli, ["decode", "--dissect", "builtin", *args], input=stdin)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    assert "Traceback" not in result.stderr
    return result


def decode_json(*args: str, stdin: bytes | None = None) -> list[dict]:
    result = run("--json", *args, stdin=stdin)
    assert result.exit_code == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def reference_frames(name: str) -> list[bytes]:
    with open_capture(str(CAPTURES / name)) as reader:
        return [p.data for p in reader]


def write_pcap(path: Path, linktype: int, frames: list[bytes]) -> str:
    data = pcap.global_header(linktype)
    data += b"".join(pcap.record(n * 1000, frame) for n, frame in enumerate(frames))
    path.write_bytes(data)
    return str(path)


# Agreement with tshark ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tshark_field_names() -> frozenset[str]:
    return tshark.field_names()


def assert_agrees_with_tshark(path: str, tshark_field_names: frozenset[str]) -> list[dict]:
    """Every field both tunnelscope and tshark know has the same values in every frame."""
    frames = decode_json(path)
    names = sorted({key for frame in frames for key in frame["fields"]} & tshark_field_names)
    rows = tshark.fields(path, names)
    assert len(rows) == len(frames)
    compared = 0
    for frame, row in zip(frames, rows):
        for key, ours in frame["fields"].items():
            if key not in tshark_field_names:
                continue  # tunnelscope's own keys (lmi.type, lmi.dlci)
            theirs = [tshark.value(text) for text in row[key]]
            if key == "fr.nlpid":  # tshark counts the RFC 2427 pad byte as an NLPID too
                theirs = theirs[-1:]
            assert (ours if isinstance(ours, list) else [ours]) == theirs, (frame["number"], key)
            compared += 1
    assert compared >= 2 * len(frames)
    return frames


@tshark.required
@pytest.mark.parametrize("name", REFERENCE)
def test_json_fields_agree_with_tshark(name: str, tshark_field_names: frozenset[str]) -> None:
    assert_agrees_with_tshark(str(CAPTURES / name), tshark_field_names)


@tshark.required
@pytest.mark.parametrize("linktype", [9, 204])
def test_ppp_link_types_agree_with_tshark(
    tmp_path: Path, tshark_field_names: frozenset[str], linktype: int
) -> None:
    """PPP without FF 03 (9), and with a direction byte (204; tshark 4.0 refuses 205, 206)."""
    if linktype == 9:
        frames = [frame[2:] for frame in reference_frames("ppp.pcap")]
    else:
        frames = [bytes([n % 2 == 0]) + f for n, f in enumerate(reference_frames("ppp.pcap"))]
    path = write_pcap(tmp_path / "x.pcap", linktype, frames)
    decoded = assert_agrees_with_tshark(path, tshark_field_names)
    assert [f["direction"] for f in decoded[:2]] == (
        [None, None] if linktype == 9 else ["out", "in"]
    )


@tshark.required
def test_the_comparison_covers_each_link_layer(tshark_field_names: frozenset[str]) -> None:
    keys = {k for name in REFERENCE for f in decode_json(str(CAPTURES / name)) for k in f["fields"]}
    wanted = {"eth.src", "vlan.id", "ieee8021ad.id", "chdlc.protocol", "slarp.mysequence"}
    wanted |= {"ppp.protocol", "ppp.code", "fr.dlci", "q933.dlci", "ip.src"}
    assert wanted <= keys & tshark_field_names


def test_json_objects() -> None:
    frames = decode_json(str(CAPTURES / "mixed.pcapng"))
    assert [list(f) for f in frames] == [JSON_KEYS] * 12
    first, dropped = frames[0], frames[5]
    assert (first["number"], first["time"], first["linktype"]) == (1, 1_700_000_000.0, "ethernet")
    assert (first["interface"], first["direction"]) == ("R1 f0/0 - SW1 e1", "out")
    assert first["protocols"] == ["eth", "arp"]
    assert (dropped["interface"], dropped["linktype"]) == ("R1 s1/0 - R2 s1/0", "hdlc")
    assert (dropped["direction"], dropped["comment"]) == ("in", "dropped by packet_loss")
    assert dropped["fields"]["slarp.address"] == "10.1.1.1"
    assert dropped["malformed"] is False
    frelay = decode_json(str(CAPTURES / "frelay.pcap"))
    assert (frelay[0]["interface"], frelay[0]["direction"]) == (None, None)
    assert frelay[3]["fields"]["q933.dlci"] == [100, 200, 300]


# Reading ----------------------------------------------------------------------------------


def test_lines_from_a_pipe() -> None:
    with subprocess.Popen(["cat", str(CAPTURES / "mixed.pcapng")], stdout=subprocess.PIPE) as cat:
        done = subprocess.run(
            [*TUNNELSCOPE, "decode", "--dissect", "builtin", "-"],
            stdin=cat.stdout,
            capture_output=True,
            text=True,
            env=ENV,
            timeout=60,
        )
    assert (done.returncode, done.stderr) == (0, "")
    lines = done.stdout.splitlines()
    assert len(lines) == 12
    assert lines[0].startswith("22:13:20.000000000 R1 f0/0 - SW1 e1 > ")
    assert lines[5].startswith("22:13:21.250000000 R1 s1/0 - R2 s1/0 < ")
    assert lines[5].endswith(" # dropped by packet_loss")
    assert "SLARP" in lines[5]


def test_standard_input_and_count() -> None:
    data = (CAPTURES / "chdlc.pcap").read_bytes()
    assert len(decode_json("-", stdin=data)) == 8
    lines = run("-c", "3", str(CAPTURES / "chdlc.pcap")).stdout.splitlines()
    assert [line.split()[1] for line in lines] == ["hdlc"] * 3
    # -c stops before a damaged record further on
    assert run("-c", "3", "-", stdin=data[:-1]).exit_code == 0


@pytest.mark.timeout(30)
def test_a_live_pipe_prints_each_frame_at_once() -> None:
    proc = subprocess.Popen(
        [*TUNNELSCOPE, "decode", "--dissect", "builtin", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=ENV,
    )
    proc.stdin.write(pcapng.section_header() + pcapng.interface_description(104, "s0"))
    proc.stdin.write(pcapng.enhanced_packet(0, 0, reference_frames("chdlc.pcap")[2]))
    proc.stdin.flush()
    assert b"s0 C-HDLC broadcast SLARP keepalive" in proc.stdout.readline()  # pipe still open
    proc.stdin.close()
    assert proc.wait(10) == 0
    assert proc.stderr.read() == b""


def test_a_reader_that_goes_away_ends_quietly(tmp_path: Path) -> None:
    path = write_pcap(tmp_path / "big.pcap", 104, reference_frames("chdlc.pcap") * 3000)
    proc = subprocess.Popen(
        [*TUNNELSCOPE, "decode", "--dissect", "builtin", path],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdout.readline()
    proc.stdout.close()
    assert proc.wait(30) == 0
    assert proc.stderr.read() == b""


def test_direction_byte_link_types(tmp_path: Path) -> None:
    keepalive = reference_frames("chdlc.pcap")[2]
    path = write_pcap(tmp_path / "dir.pcap", 205, [b"\x01" + keepalive, b"\x00" + keepalive])
    frames = decode_json(path)
    assert [f["direction"] for f in frames] == ["out", "in"]
    assert [f["fields"]["slarp.mysequence"] for f in frames] == [1, 1]
    assert [line.split()[2] for line in run(path).stdout.splitlines()] == [">", "<"]


def test_linktype_override_repairs_a_mislabelled_file(tmp_path: Path) -> None:
    path = write_pcap(tmp_path / "eth.pcap", LinkType.ETHERNET, reference_frames("chdlc.pcap"))
    assert decode_json(path)[2]["protocols"][0] == "eth"
    for name in ("hdlc", "104"):
        frames = decode_json("--linktype", name, path)
        assert frames[2]["linktype"] == "hdlc"
        assert frames[2]["protocols"] == ["chdlc", "slarp"]
        assert frames[2]["fields"]["slarp.mysequence"] == 1
    result = run("--linktype", "token-ring", path)
    assert result.exit_code == 2
    assert result.stderr.startswith("tunnelscope: error: --linktype: unknown link type")


def test_unknown_link_types_and_empty_frames_are_read(tmp_path: Path) -> None:
    frames = decode_json(write_pcap(tmp_path / "x.pcap", 147, [b"\x01\x02\x03"]))
    assert (frames[0]["linktype"], frames[0]["protocols"]) == ("linktype 147", [])
    assert "not decoded" in frames[0]["summary"]
    frames = decode_json(write_pcap(tmp_path / "empty.pcap", LinkType.C_HDLC, [b"", b""]))
    assert [f["malformed"] for f in frames] == [True, True]


def test_damaged_frames_of_every_link_type_are_decoded_without_failing(tmp_path: Path) -> None:
    """Every prefix of every reference frame, and random bit flips, under every decoder."""
    rng = random.Random(7)
    frames = [f for name in REFERENCE[:4] for f in reference_frames(name)]
    damaged = [frame[:cut] for frame in frames for cut in range(len(frame))]
    for frame in frames * 20:
        flipped = bytearray(frame)
        for _ in range(3):
            flipped[rng.randrange(len(flipped))] ^= 1 << rng.randrange(8)
        damaged.append(bytes(flipped))
    path = write_pcap(tmp_path / "fuzz.pcap", LinkType.ETHERNET, damaged)
    for linktype in ("ethernet", "hdlc", "ppp", "fr", "204", "205", "206"):
        decoded = decode_json("--linktype", linktype, path)
        assert len(decoded) == len(damaged)
        assert all(isinstance(d["summary"], str) for d in decoded)
        assert any(d["malformed"] for d in decoded)


# Files that cannot be read, or stop being readable ---------------------------------------


def damaged_files() -> list:
    """(file bytes, exit status, stderr, frames printed), with an id."""
    hdlc = (CAPTURES / "chdlc.pcap").read_bytes()  # 24 + 38 * 5 + 120 * 2 + 116 bytes
    mixed = (CAPTURES / "mixed.pcapng").read_bytes()  # ... 12 EPBs, then 4 ISBs
    garbage_caplen = hdlc[: 24 + 38 * 2 + 8] + b"\xff\xff\xff\x7f" + hdlc[24 + 38 * 2 + 12 :]
    head = pcapng.section_header() + pcapng.interface_description(104, "s0")
    bad_interface = head + pcapng.enhanced_packet(9, 0, hdlc[-100:])
    bad_length = head + b"\x06\x00\x00\x00\x0d\x00\x00\x00" + bytes(8)
    return [
        pytest.param(b"", 2, "empty or truncated file", 0, id="empty"),
        pytest.param(b"hello, world\n", 2, "not a pcap or pcapng file", 0, id="text"),
        pytest.param(hdlc[:20], 2, "truncated pcap file header", 0, id="pcap header"),
        pytest.param(hdlc[:4] + b"\x03" + hdlc[5:], 2, "unsupported pcap version 3", 0, id="ver"),
        pytest.param(mixed[:8] + bytes(4) + mixed[12:], 2, "byte-order magic", 0, id="bom"),
        pytest.param(mixed[:20], 2, "truncated pcapng section header", 0, id="shb"),
        pytest.param(hdlc[:-1], 1, "frame 8: truncated record (99 of 100 bytes)", 7, id="record"),
        pytest.param(hdlc[: 24 + 38 + 5], 1, "frame 2: truncated record header", 1, id="rhead"),
        pytest.param(garbage_caplen, 1, "frame 3: caplen 2147483647 above", 2, id="caplen"),
        pytest.param(mixed[:-3], 1, "truncated pcapng block after frame 12", 12, id="block"),
        pytest.param(mixed[:-4] + bytes(4), 1, "lengths differ", 12, id="trailer"),
        pytest.param(bad_interface, 1, "frame 1: interface 9 was never described", 0, id="ifc"),
        pytest.param(bad_length, 1, "bad pcapng block length 13", 0, id="blen"),
    ]


@pytest.mark.parametrize(("data", "status", "message", "printed"), damaged_files())
def test_damaged_files(
    tmp_path: Path, data: bytes, status: int, message: str, printed: int
) -> None:
    """From a file and from standard input: one line on stderr, the frames before the damage."""
    (tmp_path / "capture").write_bytes(data)
    for args, stdin in (([str(tmp_path / "capture")], None), (["-"], data)):
        result = run(*args, stdin=stdin)
        assert result.exit_code == status
        assert len(result.stdout.splitlines()) == printed
        level = "error" if status == 2 else "warning"
        assert result.stderr.startswith(f"tunnelscope: {level}: ")
        assert message in result.stderr
        assert result.stderr.count("\n") == 1


def test_missing_files_and_directories(tmp_path: Path) -> None:
    for path, reason in (
        (tmp_path / "nope.pcap", "No such file or directory"),
        (tmp_path, "Is a directory"),
    ):
        result = run(str(path))
        assert (result.exit_code, result.stdout, result.stderr) == (
            2,
            "",
            f"tunnelscope: error: {path}: {reason}\n",
        )


def test_no_traceback_from_the_real_command(tmp_path: Path) -> None:
    (tmp_path / "bad").write_bytes(b"\x0a\x0d\x0d\x0a" + bytes(30))  # pcapng, then zeros
    done = subprocess.run(
        [*TUNNELSCOPE, "decode", "--dissect", "builtin", str(tmp_path / "bad")],
        capture_output=True,
        text=True,
    )
    assert done.returncode == 2
    assert done.stderr == "tunnelscope: error: " + str(tmp_path / "bad") + (
        ": bad pcapng byte-order magic 00000000\n"
    )


def test_an_output_that_fails_is_one_error_line() -> None:
    with open("/dev/full", "w") as full:
        done = subprocess.run(
            [*TUNNELSCOPE, "decode", "--dissect", "builtin", str(CAPTURES / "chdlc.pcap")],
            stdout=full,
            stderr=subprocess.PIPE,
            text=True,
        )
    assert (done.returncode, done.stderr) == (
        2,
        "tunnelscope: error: standard output: No space left on device\n",
    )
