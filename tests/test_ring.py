"""Ring buffers and autostop (dumpcap's -b, -a, -c) on every backend: exact counts and sizes.

Guarantees tested here (docs/live.md): a file ends before the record that would give it more
than `packets:N` records; a `filesize:KB` file ends once it holds KB*1000 bytes or more, so it
exceeds the limit by less than its last record; no frame is lost or written twice across
files; `files:N` keeps the newest N; `-c N` writes exactly N frames.
"""

from __future__ import annotations

import re
import time
from pathlib import Path

import pytest
from test_bridge import lab, numbered, numbers

from tunnelscope.datapath.engine import available_backends
from tunnelscope.formats.capture import Format, Ring, open_capture
from tunnelscope.formats.linktype import LinkType

pytestmark = pytest.mark.timeout(120)
BACKENDS = pytest.mark.parametrize("backend", available_backends())
NAME = re.compile(r"r_(\d{5})_(\d{14})\.pcap$")


def capture(backend: str, tmp_path: Path, ring: Ring, frames: int, size: int = 100) -> list[Path]:
    """Bridge `frames` numbered frames A -> B into r.pcap with `ring`; the files, in order."""
    with lab(backend) as t:
        t.link.start_capture(
            str(tmp_path / "r.pcap"), LinkType.ETHERNET, "pre", Format(flush_ms=10), None, ring
        )
        assert len(t.transfer(numbered(frames, size=size), frames)) == frames
        t.settle(frames)
        time.sleep(0.3)  # chores rotate between loop runs
        t.link.stop_capture()
    files = sorted(tmp_path.glob("r_*.pcap"))
    assert all(NAME.search(f.name) for f in files), files
    return files


def frames_in(path: Path) -> list[int]:
    with open_capture(str(path)) as reader:
        return numbers([packet.data for packet in reader])


@BACKENDS
def test_packets_and_files_keep_the_newest_files_whole(backend: str, tmp_path: Path) -> None:
    files = capture(backend, tmp_path, Ring(packets=100, files=3), 1000)
    assert [int(NAME.search(f.name)[1]) for f in files] == [8, 9, 10]
    assert [frames_in(f) for f in files] == [
        list(range(701, 801)),
        list(range(801, 901)),
        list(range(901, 1001)),
    ]


@BACKENDS
def test_no_frame_is_lost_or_duplicated_across_files(backend: str, tmp_path: Path) -> None:
    files = capture(backend, tmp_path, Ring(packets=64), 1000)
    counts = [len(frames_in(f)) for f in files]
    assert counts == [64] * 15 + [40]
    assert [n for f in files for n in frames_in(f)] == list(range(1, 1001))


@BACKENDS
def test_filesize_is_never_exceeded_by_a_record(backend: str, tmp_path: Path) -> None:
    files = capture(backend, tmp_path, Ring(filesize_kb=10), 1000, size=150)
    record = 16 + 150  # a classic pcap record: 16-byte header, then the frame
    sizes = [f.stat().st_size for f in files]
    for size in sizes[:-1]:
        assert 10_000 <= size < 10_000 + record
    assert sizes[-1] < 10_000 + record
    assert [n for f in files for n in frames_in(f)] == list(range(1, 1001))


@BACKENDS
def test_count_stops_after_exactly_n_frames(backend: str, tmp_path: Path) -> None:
    with lab(backend) as t:
        state = t.link.start_capture(
            str(tmp_path / "c.pcap"), LinkType.ETHERNET, "pre", None, None, Ring(stop_frames=250)
        )
        assert len(t.transfer(numbered(1000), 1000)) == 1000  # the link goes on
        t.settle(1000)
        deadline = time.monotonic() + 3
        while t.link.captures and time.monotonic() < deadline:
            time.sleep(0.05)
        assert not t.link.captures and state.autostopped and state.error is None
    assert frames_in(tmp_path / "c.pcap") == list(range(1, 251))


@BACKENDS
def test_autostop_after_files(backend: str, tmp_path: Path) -> None:
    with lab(backend) as t:
        t.link.start_capture(
            str(tmp_path / "r.pcap"),
            LinkType.ETHERNET,
            "pre",
            None,
            None,
            Ring(packets=100, stop_files=2),
        )
        t.transfer(numbered(500), 500)
        t.settle(500)
        time.sleep(0.3)
        assert not t.link.captures
    files = sorted(tmp_path.glob("r_*.pcap"))
    assert [frames_in(f) for f in files] == [list(range(1, 101)), list(range(101, 201))]


@BACKENDS
def test_duration_rotates_between_loop_runs(backend: str, tmp_path: Path) -> None:
    with lab(backend) as t:
        t.link.start_capture(
            str(tmp_path / "r.pcap"), LinkType.ETHERNET, "pre", None, None, Ring(duration=0.3)
        )
        for n in range(1, 9):
            t.transfer(numbered(10, start=n * 100), 10)
            time.sleep(0.15)
        t.settle(80)
        t.link.stop_capture()
    files = sorted(tmp_path.glob("r_*.pcap"))
    assert 3 <= len(files) <= 6
    assert sorted(n for f in files for n in frames_in(f)) == [
        n * 100 + i for n in range(1, 9) for i in range(10)
    ]


@pytest.mark.parametrize(
    ("ring", "autostop", "message"),
    [(("size:3",), (), "-b size:3"), (("files:x",), (), "> 0"), ((), ("packets:0",), "> 0")],
)
def test_bad_ring_options(ring: tuple, autostop: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=re.escape(message)):
        Ring.parse(ring, autostop)
