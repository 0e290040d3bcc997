"""`compare` with Wireshark's dissectors: a real bridge drops OSPF and BGP frames of a
C-HDLC link; the report names each lost frame as Wireshark does and counts the losses per
protocol, as tshark counts the frames the bridge marked dropped in the same capture."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import tshark
from test_bridge import lab
from test_compare import run
from test_wireshark import routing_frames

from tunnelscope.analysis.compare import Selection, compare
from tunnelscope.datapath.engine import available_backends
from tunnelscope.formats.linktype import LinkType

pytestmark = pytest.mark.timeout(120)
DROPPED = 'frame.comment contains "dropped by"'


@pytest.fixture(scope="module")
def dropped_capture(tmp_path_factory: pytest.TempPathFactory) -> str:
    """21 routing frames through a link that drops every third one (a2b freq_drop 3)."""
    path = tmp_path_factory.mktemp("compare") / "link.pcapng"
    frames = [frame for ident in (1, 2, 3) for frame in routing_frames(ident)]
    with lab(available_backends()[0], "a2b freq_drop 3") as t:
        t.link.start_capture(str(path), LinkType.C_HDLC, "both")
        t.send(t.peer_a, frames)
        t.settle(len(frames))
        t.link.stop_capture()
    return str(path)


@tshark.required
def test_lost_frames_have_wiresharks_summaries_and_a_per_protocol_table(
    dropped_capture: str, tmp_path: Path
) -> None:
    numbers = tshark.fields(dropped_capture, ["frame.number"], DROPPED)
    # tshark on the dropped frames alone, as tunnelscope hands them over: in the whole file a
    # BGP frame seen again at the post point would be called a TCP retransmission
    alone = tmp_path / "dropped.pcapng"
    subprocess.run(
        ["tshark", "-r", dropped_capture, "-Y", DROPPED, "-w", str(alone)],
        capture_output=True,
        timeout=60,
        check=True,
    )
    rows = tshark.fields(str(alone), tshark.COLUMNS)
    theirs = [{"frame.number": n["frame.number"], **row} for n, row in zip(numbers, rows)]
    assert len(theirs) == len(rows) == 7
    expected_lines = {int(r["frame.number"][0]): tshark.headline(r) for r in theirs}
    expected_table = Counter(r["_ws.col.Protocol"][0] for r in theirs)
    assert {"OSPF", "BGP"} <= set(expected_table)

    report = compare(Selection(dropped_capture), dissector="wireshark")
    (stream,) = [s for s in report.streams if s.missing.count]
    assert {f.number: f.summary for f in stream.missing.frames} == expected_lines
    assert stream.lost == expected_table
    assert any(line.endswith(" OSPF Hello Packet") for line in expected_lines.values())

    result = run(dropped_capture)  # auto: Wireshark's
    assert result.exit_code == 0, result.stderr
    table = ", ".join(f"{p} {n}" for p, n in expected_table.most_common())
    assert f"  lost: {table}" in result.stdout
    for number, line in expected_lines.items():
        assert f"#{number} " in result.stdout and line in result.stdout
    data = json.loads(run(dropped_capture, "--json").stdout)
    (direction,) = [d for d in data["directions"] if d["missing"]["count"]]
    assert direction["missing"]["by_protocol"] == dict(expected_table)


def test_without_tshark_the_builtin_decoders_name_the_losses(
    dropped_capture: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    builtin = compare(Selection(dropped_capture))
    (stream,) = [s for s in builtin.streams if s.missing.count]
    assert sum(stream.lost.values()) == stream.missing.count == 7
    summaries = [f.summary for f in stream.missing.frames]  # built-in: "OSPFv2 Hello Packet"
    assert any("OSPFv2 Hello Packet" in s for s in summaries), summaries
    assert all("OSPF Hello Packet" not in s for s in summaries), summaries
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "python").symlink_to(sys.executable)
    monkeypatch.setenv("PATH", str(bin_dir))
    from tunnelscope.decoders.wireshark import find_tshark

    find_tshark.cache_clear()
    try:
        result = run(dropped_capture)
        assert result.exit_code == 0 and "  lost: " in result.stdout
        assert "OSPFv2 Hello Packet" in result.stdout  # Wireshark's is "OSPF Hello Packet"
        assert "OSPF Hello Packet" not in result.stdout
        failed = run(dropped_capture, "--dissect", "wireshark")
        assert failed.exit_code == 2 and "tshark is not installed" in failed.stderr
    finally:
        find_tshark.cache_clear()
    assert os.environ["PATH"] == str(bin_dir)
