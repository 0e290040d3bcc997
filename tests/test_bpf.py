"""Capture filters: libpcap compiles for the link's own link type, both interpreters agree.

The C interpreter is reached through the loop (a capture's filter); the Python one directly.
tshark is the judge of what an ICMP frame is.
"""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from command import TUNNELSCOPE
from scapy.layers.inet import ICMP, IP, TCP, UDP
from test_bridge import Lab, lab, numbered, records_without_timestamps

from tunnelscope.datapath import bpf
from tunnelscope.datapath.engine import available_backends, parse_conditional
from tunnelscope.formats.capture import CaptureError, Format, open_capture
from tunnelscope.formats.linktype import LinkType

pytestmark = pytest.mark.timeout(120)
BACKENDS = pytest.mark.parametrize("backend", available_backends())
ADDRS = socket.inet_aton("10.0.0.1") + socket.inet_aton("10.0.0.2")


def ipv4(proto: int, payload: bytes = bytes(8)) -> bytes:
    header = struct.pack("!BBHHHBBH", 0x45, 0, 20 + len(payload), 0, 0x4000, 64, proto, 0)
    checksum = sum(struct.unpack("!10H", header + ADDRS))
    checksum = ~((checksum & 0xFFFF) + (checksum >> 16)) & 0xFFFF
    return header[:10] + struct.pack("!H", checksum) + ADDRS + payload


HEADS = {  # link type: the header in front of an IPv4 packet
    LinkType.ETHERNET: b"\x02" * 12 + b"\x08\x00",
    LinkType.parse("hdlc"): b"\x0f\x00\x08\x00",
    LinkType.parse("ppp"): b"\xff\x03\x00\x21",
}


@pytest.mark.parametrize("linktype", list(HEADS), ids=lambda t: t.name)
def test_icmp_compiles_for_each_link_type(linktype: LinkType) -> None:
    program = bpf.compile_filter("icmp", int(linktype))
    head = HEADS[linktype]
    assert bpf.run(program, head + ipv4(1))
    assert not bpf.run(program, head + ipv4(17))
    assert not bpf.run(program, head[:2])  # a load past the end rejects


def test_frame_relay_ip_looks_at_the_nlpid() -> None:
    """libpcap matches IPv4 on Frame Relay by its RFC 2427 NLPID (03 cc after the address)."""
    program = bpf.compile_filter("ip", int(LinkType.parse("fr")))
    assert bpf.run(program, b"\x18\x41\x03\xcc" + ipv4(1))
    assert not bpf.run(program, b"\x18\x41\x03\x8e" + ipv4(1))


def test_invalid_expression_names_the_problem() -> None:
    with pytest.raises(bpf.FilterError, match="invalid capture filter 'icmpp'.*syntax error"):
        bpf.compile_filter("icmpp", 1)


def test_the_interpreter_covers_arithmetic_and_memory() -> None:
    frame = bytes(range(64))
    program = bpf.compile_filter("ip[2:2] * 3 + len - 5 / 1 % 7 >= 10 and ether[20] & 4 != 0", 1)
    assert bpf.run(program, frame) == bpf.run(program, frame)
    assert bpf.run(bpf.compile_filter("len > 60", 1), frame)
    assert not bpf.run(bpf.compile_filter("len > 64", 1), frame)
    assert bpf.run(bpf.compile_filter("ether[12:2] = 0x0c0d", 1), frame)


@pytest.mark.skipif("c" not in available_backends(), reason="needs the C backend")
@pytest.mark.parametrize(
    ("program", "why"),
    [
        ([(0x05, 0, 0, 5), (0x06, 0, 0, 0)], "jump out of the program"),
        ([(0x15, 3, 0, 1), (0x06, 0, 0, 0)], "jump out of the program"),
        ([(0x00, 0, 0, 1)], "does not end with a return"),
        ([(0x60, 0, 0, 16), (0x06, 0, 0, 0)], "bad load"),
        ([(0x34, 0, 0, 0), (0x06, 0, 0, 0)], "division by zero"),
        ([], "empty"),
    ],
)
def test_the_c_loop_refuses_programs_that_could_misbehave(program: list, why: str) -> None:
    from tunnelscope.nio import _fastpath as fp

    loop = fp.Loop()
    a, b = (socket.socket(socket.AF_INET, socket.SOCK_DGRAM) for _ in range(2))
    bridge = loop.add_bridge(a.fileno(), fp.KIND_DGRAM, b.fileno(), fp.KIND_DGRAM)
    sink = fp.Capture(b.fileno(), False, False, 65535, None)
    with pytest.raises(ValueError, match=why):
        loop.add_capture(bridge, sink, 0, -1, program)
    a.close()
    b.close()


def chdlc_traffic() -> list[bytes]:
    """200 C-HDLC frames: ICMP, UDP, TCP, ICMP, UDP, ..."""
    layers = [ICMP, lambda seq: UDP(sport=seq), lambda seq: TCP(sport=seq)]
    kinds = [0, 1, 2, 0, 1]
    return [
        b"\x0f\x00\x08\x00"
        + bytes(IP(src="10.0.0.1", dst="10.0.0.2") / layers[kinds[i % 5]](seq=i))
        for i in range(200)
    ]


@BACKENDS
@pytest.mark.skipif(shutil.which("tshark") is None, reason="needs tshark")
def test_icmp_filter_on_c_hdlc_keeps_exactly_the_icmp_frames(backend: str, tmp_path: Path) -> None:
    path = tmp_path / "icmp.pcap"
    frames = chdlc_traffic()
    with lab(backend) as t:
        t.link.start_capture(str(path), LinkType.parse("hdlc"), "pre", Format(), "icmp")
        assert len(t.transfer(frames, 200)) == 200  # the filter never touches forwarding
        t.settle(200)
        state = t.link.stop_capture()
    assert state and state.frames == 80
    out = subprocess.run(
        ["tshark", "-r", str(path), "-T", "fields", "-e", "chdlc.protocol", "-e", "ip.proto"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.splitlines()
    assert out == ["0x0800\t1"] * 80
    with open_capture(str(path)) as reader:
        assert [p.data for p in reader] == [f for f in frames if f[4 + 9] == 1]


@BACKENDS
def test_auto_link_type_compiles_the_filter_once_detected(backend: str, tmp_path: Path) -> None:
    path = tmp_path / "auto.pcap"
    with lab(backend) as t:
        state = t.link.start_capture(str(path), None, "pre", Format(), "icmp")
        t.transfer(chdlc_traffic(), 200)
        t.settle(200)
        deadline = time.monotonic() + 5
        while state.detector and time.monotonic() < deadline:
            time.sleep(0.05)
        t.transfer(chdlc_traffic(), 200)
        t.settle(400)
        t.link.stop_capture()
    assert t.link.linktype == LinkType.parse("hdlc")
    assert state.frames == 160


@BACKENDS
def test_an_invalid_filter_refuses_the_capture(backend: str, tmp_path: Path) -> None:
    with lab(backend) as t, pytest.raises(CaptureError, match="syntax error"):
        t.link.start_capture(str(tmp_path / "x.pcap"), LinkType.ETHERNET, "pre", None, "icmpp")
    assert not (tmp_path / "x.pcap").exists() or (tmp_path / "x.pcap").stat().st_size == 0


def test_bridge_cli_invalid_filter_is_one_line_exit_2() -> None:
    done = subprocess.run(
        [*TUNNELSCOPE, "bridge", "udp:40001:127.0.0.1:40002", "udp:40003:127.0.0.1:40004"]
        + ["-w", "/dev/null", "--linktype", "hdlc", "-f", "icmp and", "--duration", "1"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("tunnelscope: error: invalid capture filter")


@pytest.mark.skipif(len(available_backends()) < 2, reason="needs both backends")
def test_both_backends_filter_several_captures_alike(tmp_path: Path) -> None:
    """Two filtered captures and an unfiltered one on the same link: same bytes on C and Python."""
    frames = numbered(500, size=80)
    for i in range(0, 500, 3):
        frames[i] = frames[i][:12] + b"\x08\x00" + ipv4(1, frames[i][:4])
    outputs = {}
    for name in available_backends():
        paths = [tmp_path / f"{name}-{kind}.pcapng" for kind in ("icmp", "not", "all")]
        with lab(name, "a2b freq_drop 4", seed=5) as t:
            for path, expression in zip(paths, ("icmp", "not icmp", None)):
                t.link.attach_fd(
                    _open(path), Format(pcapng=True), "both", expression, LinkType.ETHERNET
                )
            t.transfer(frames, 375)
            t.settle(500)
            for state in list(t.link.captures):
                t.link.stop_capture(state)
        outputs[name] = [records_without_timestamps(path) for path in paths]
    for c, python in zip(outputs["c"], outputs["python"]):
        assert c[0] == python[0] and c[1] == python[1]
    icmp, other, every = outputs["c"]
    assert len(icmp[0]) - 1 == 167 and len(other[0]) - 1 == 333 and len(every[0]) - 1 == 500


def _open(path: Path) -> int:
    import os

    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)


# --- impairments restricted by a filter: -I "a2b packet_loss 100 if icmp" ------------------


@contextmanager
def conditional_lab(backend: str, *impairments: str) -> Iterator[Lab]:
    """A C-HDLC lab whose impairments may end in "if EXPR"."""
    with lab(backend, seed=3) as t:
        t.link.linktype = LinkType.parse("hdlc")
        parsed = [parse_conditional(text) for text in impairments]
        t.link.set_impairments([i for i, _ in parsed], [c for _, c in parsed])
        yield t


@BACKENDS
def test_an_impairment_touches_only_the_frames_its_filter_matches(backend: str) -> None:
    frames = chdlc_traffic()
    with conditional_lab(backend, "a2b packet_loss 100 if icmp") as t:
        received = t.transfer(frames, 120)
        stats = t.settle(200)
    assert received == [f for f in frames if f[4 + 9] != 1]
    assert stats["dropped"] == {"packet_loss": 80}


@BACKENDS
def test_bpf_drops_what_its_expression_matches_counted_as_bpf(backend: str) -> None:
    frames = chdlc_traffic()
    with conditional_lab(backend, "a2b bpf icmp", "a2b freq_drop 0 if udp") as t:
        received = t.transfer(frames, 120)
        stats = t.settle(200)
    assert received == [f for f in frames if f[4 + 9] != 1]
    assert stats["dropped"] == {"bpf": 80}


@pytest.mark.skipif(len(available_backends()) < 2, reason="needs both backends")
def test_both_backends_take_the_same_conditional_decisions(tmp_path: Path) -> None:
    impairments = ("a2b packet_loss 50 if udp", "a2b corrupt 40 if not icmp", "a2b freq_drop 3")
    outputs = {}
    for name in available_backends():
        path = tmp_path / f"{name}.pcapng"
        with conditional_lab(name, *impairments) as t:
            t.link.start_capture(str(path), None, "both", Format(pcapng=True))
            t.transfer(chdlc_traffic(), 60, timeout=3)
            t.settle(200)
            t.link.stop_capture()
        outputs[name] = records_without_timestamps(path)
    assert outputs["c"][0] == outputs["python"][0] and outputs["c"][1] == outputs["python"][1]


@pytest.mark.parametrize(
    ("impairment", "fragment"),
    [
        ("a2b packet_loss 100 if icmp", "needs the link type"),
        ("a2b packet_loss 100 if", "must follow 'if'"),
        ("a2b bpf icmp", "needs the link type"),
        ("a2b bpf", "expected bpf EXPRESSION"),
    ],
)
def test_bad_conditions_are_one_line_exit_2(impairment: str, fragment: str) -> None:
    done = subprocess.run(
        [*TUNNELSCOPE, "bridge", "udp:40011:127.0.0.1:40012", "udp:40013:127.0.0.1:40014"]
        + ["-I", impairment, "--duration", "1"],
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert done.returncode == 2 and fragment in done.stderr, done.stderr
    assert len(done.stderr.strip().splitlines()) == 1
