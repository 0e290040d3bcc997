"""Opening captures (files, pipes, standard input) and writing them (flush policy, errors)."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import test_pcap
import test_pcapng
import tshark

from tunnelscope.formats import pcap
from tunnelscope.formats.capture import (
    CaptureError,
    CaptureWriter,
    Format,
    RecordSink,
    open_beneath,
    open_capture,
    read_capture,
)
from tunnelscope.formats.linktype import LinkType
from tunnelscope.formats.packet import CaptureFormatError, Direction

TS = 1_700_000_000_000_000_000
FRAMES = [b"\x0f\x00\x08\x00" + bytes(range(n)) for n in (20, 0, 200, 7)]
HEADER = pcap.global_header(LinkType.C_HDLC)


def write_file(path: Path, fmt: Format, frames: list[bytes] = FRAMES) -> bytes:
    writer = CaptureWriter.open(str(path), fmt)
    writer.add_interface(LinkType.C_HDLC, "R1 s1/0", "serial")
    for number, frame in enumerate(frames):
        writer.write(0, TS + number * 1001, frame, Direction(number % 3), f"n{number}")
    writer.close()
    return path.read_bytes()


def run_python(code: str, **kwargs: object) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        **kwargs,
    )


@pytest.mark.parametrize("fmt", [Format(), Format(nanosecond=True), Format(pcapng=True)])
def test_writer_round_trip(tmp_path: Path, fmt: Format) -> None:
    write_file(tmp_path / "out", fmt)
    with open_capture(str(tmp_path / "out")) as reader:
        packets = list(reader)
    assert [p.data for p in packets] == FRAMES
    assert {p.linktype for p in packets} == {104}
    exact = fmt.pcapng or fmt.nanosecond
    assert [p.ts_ns for p in packets] == [
        TS + n * 1001 if exact else (TS + n * 1001) // 1000 * 1000 for n in range(4)
    ]
    if fmt.pcapng:  # pcap has no room for interface names, directions or comments
        assert reader.interfaces[0].name == "R1 s1/0"
        assert [p.direction for p in packets] == [0, 1, 2, 0]
        assert [p.comment for p in packets] == ["n0", "n1", "n2", "n3"]


@pytest.mark.parametrize("pcapng", [False, True])
def test_snaplen_truncates_and_keeps_the_original_length(tmp_path: Path, pcapng: bool) -> None:
    write_file(tmp_path / "out", Format(pcapng=pcapng, snaplen=64))
    with open_capture(str(tmp_path / "out")) as reader:
        packets = list(reader)
    assert [len(p.data) for p in packets] == [24, 4, 64, 11]
    assert [p.orig_len for p in packets] == [24, 4, 204, 11]


@tshark.required
@pytest.mark.parametrize("fmt", [Format(nanosecond=True, snaplen=64), Format(pcapng=True)])
def test_tshark_opens_what_the_writer_writes(tmp_path: Path, fmt: Format) -> None:
    write_file(tmp_path / "out", fmt)
    names = ["frame.time_epoch", "frame.len", "frame.cap_len", "frame.protocols"]
    names += ["frame.interface_name", "frame.p2p_dir", "frame.comment"]
    rows = tshark.fields(str(tmp_path / "out"), names)
    assert [r["frame.time_epoch"] for r in rows] == [
        [f"1700000000.{n * 1001:09d}"] for n in range(4)
    ]
    assert [r["frame.len"] for r in rows] == [[str(len(f))] for f in FRAMES]
    assert [r["frame.protocols"][0].split(":")[0] for r in rows] == ["chdlc"] * 4
    if fmt.pcapng:
        assert [r["frame.interface_name"] for r in rows] == [["R1 s1/0"]] * 4
        assert [r["frame.p2p_dir"] for r in rows] == [[], ["1"], ["0"], []]
        assert [r["frame.comment"] for r in rows] == [["n0"], ["n1"], ["n2"], ["n3"]]
    else:
        assert [r["frame.cap_len"] for r in rows] == [["24"], ["4"], ["64"], ["11"]]


def test_pcapng_interfaces_auto_linktype_and_statistics(tmp_path: Path) -> None:
    writer = CaptureWriter.open(str(tmp_path / "x.pcapng"), Format(pcapng=True))
    writer.add_interface(LinkType.ETHERNET, "R1 f0/0")
    auto = writer.add_interface(None, "R2 s1/0")
    assert writer.linktype_pending
    writer.write(0, TS, bytes(60))
    assert (tmp_path / "x.pcapng").stat().st_size == 0  # no header before every link is known
    writer.set_linktype(auto, LinkType.FRELAY)
    writer.write(auto, TS, b"\x18\x41\x03\xcc")
    writer.write_statistics(auto, TS + 1, 5, "packet_loss=5")
    writer.close()
    with open_capture(str(tmp_path / "x.pcapng")) as reader:
        packets = list(reader)
        assert [(i.linktype, i.name, i.dropped) for i in reader.interfaces] == [
            (1, "R1 f0/0", None),
            (107, "R2 s1/0", 5),
        ]
    assert [(p.interface, p.linktype) for p in packets] == [(0, 1), (1, 107)]


def test_pcap_holds_one_link_and_bad_paths_fail(tmp_path: Path) -> None:
    writer = CaptureWriter.open(str(tmp_path / "one.pcap"), Format())
    writer.add_interface(LinkType.ETHERNET, "a")
    with pytest.raises(CaptureError, match="use pcapng"):
        writer.add_interface(LinkType.ETHERNET, "b")
    with pytest.raises(CaptureError, match="cannot write .*No such file or directory"):
        CaptureWriter.open(str(tmp_path / "missing" / "x.pcap"), Format())


def test_format_for_path() -> None:
    assert Format.for_path("a.PCAPNG").pcapng
    assert not Format.for_path("a.pcap", pcapng_default=True).pcapng
    assert Format.for_path("capture", pcapng_default=True, flush_ms=5).flush_ms == 5


# Reading -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("data", "message"), test_pcap.damaged_files() + test_pcapng.damaged_files()
)
def test_damaged_files_raise_one_line(data: bytes, message: str) -> None:
    with pytest.raises(CaptureFormatError) as info:
        list(read_capture(io.BytesIO(data)))
    assert message in str(info.value)
    assert "\n" not in str(info.value)


def test_open_capture_errors_are_oserrors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError), open_capture(str(tmp_path / "nope.pcap")):
        pass
    with pytest.raises(IsADirectoryError), open_capture(str(tmp_path)):
        pass


def test_open_capture_dash_reads_standard_input(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = write_file(tmp_path / "x.pcapng", Format(pcapng=True))
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))
    with open_capture("-") as reader:
        assert [p.data for p in reader] == FRAMES


@pytest.mark.parametrize("fmt", [Format(), Format(pcapng=True)])
def test_read_from_a_pipe_that_delivers_odd_pieces(tmp_path: Path, fmt: Format) -> None:
    data = write_file(tmp_path / "x", fmt)
    writer = """
        import sys, time
        data = sys.stdin.buffer.read()
        for i in range(0, len(data), 7):
            sys.stdout.buffer.write(data[i : i + 7])
            sys.stdout.buffer.flush()
            time.sleep(0.001)
    """
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(writer)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    proc.stdin.write(data)
    proc.stdin.close()
    assert [p.data for p in read_capture(proc.stdout)] == FRAMES
    assert proc.wait(10) == 0


@pytest.mark.timeout(20)
def test_a_live_reader_sees_each_frame_when_it_is_written() -> None:
    """Flush per frame: the reader gets frame 1 while the writer still holds the pipe open."""
    read_end, write_end = os.pipe()
    writer = CaptureWriter(RecordSink(write_end, close_fd=True), Format(pcapng=True))
    writer.add_interface(LinkType.PPP_SERIAL, "ppp")
    with os.fdopen(read_end, "rb") as stream:
        writer.write(0, TS, b"\xff\x03\xc0\x21")
        frames = iter(read_capture(stream))
        assert next(frames).data == b"\xff\x03\xc0\x21"  # blocks (timeout) if buffered
        writer.write(0, TS + 1, b"\xff\x03\x00\x21")
        assert next(frames).data == b"\xff\x03\x00\x21"
        writer.close()
        assert list(frames) == []


# Flush policy --------------------------------------------------------------------------


def file_sink(path: Path, flush_ms: float | None) -> RecordSink:
    return RecordSink(os.open(path, os.O_WRONLY | os.O_CREAT), flush_ms, close_fd=True)


def test_flush_every_frame(tmp_path: Path) -> None:
    sink = file_sink(tmp_path / "f", None)
    sink.set_header(HEADER)
    assert (tmp_path / "f").stat().st_size == 24
    sink.append(pcap.record(TS, b"abc"))
    assert (tmp_path / "f").stat().st_size == 24 + 19
    sink.close()


def test_flush_ms_writes_when_the_oldest_record_is_due(tmp_path: Path) -> None:
    sink = file_sink(tmp_path / "f", 10_000)
    assert sink.flush_due(time.monotonic()) is None  # nothing waiting
    sink.set_header(HEADER)  # a header goes out at once: readers can attach
    before = time.monotonic()
    sink.append(pcap.record(TS, b"abc"))
    sink.append(pcap.record(TS, b"def"))
    deadline = sink.flush_due(time.monotonic())
    assert deadline is not None
    assert before + 10 <= deadline <= time.monotonic() + 10  # the first record's age counts
    assert (tmp_path / "f").stat().st_size == 24
    assert sink.flush_due(deadline - 0.001) == deadline
    assert (tmp_path / "f").stat().st_size == 24
    assert sink.flush_due(deadline) is None
    assert (tmp_path / "f").stat().st_size == 24 + 2 * 19
    assert sink.frames == 2
    sink.close()


def test_flush_ms_still_writes_large_batches_at_once(tmp_path: Path) -> None:
    sink = file_sink(tmp_path / "f", 10_000)
    sink.set_header(HEADER)
    for _ in range(9):
        sink.append(pcap.record(TS, bytes(120_000)))
    assert (tmp_path / "f").stat().st_size > 1 << 20
    sink.close()


def test_records_wait_for_the_header(tmp_path: Path) -> None:
    sink = file_sink(tmp_path / "f", None)
    record = pcap.record(TS, b"abc")
    sink.append(record)
    assert sink.header_pending
    assert sink.pending() == record
    assert (tmp_path / "f").stat().st_size == 0
    sink.set_header(HEADER)
    sink.close()
    assert (tmp_path / "f").read_bytes() == HEADER + record


# Write errors: the capture stops, nothing raises, the file stays readable --------------


def test_disk_full_sets_the_error_without_raising() -> None:
    sink = RecordSink(os.open("/dev/full", os.O_WRONLY), close_fd=True)
    sink.set_header(HEADER)
    assert sink.error == "capture stopped: No space left on device"
    assert sink.closed
    sink.append(pcap.record(TS, b"abc"))  # a stopped sink ignores records
    sink.close()
    writer = CaptureWriter(RecordSink(os.open("/dev/full", os.O_WRONLY), close_fd=True), Format())
    writer.add_interface(LinkType.C_HDLC, "s0")
    with pytest.raises(CaptureError, match="No space left"):
        writer.write(0, TS, b"abc")


def test_a_reader_that_went_away_sets_the_error() -> None:
    read_end, write_end = os.pipe()
    os.close(read_end)
    sink = RecordSink(write_end, close_fd=True)
    sink.set_header(HEADER)
    assert sink.error == "capture stopped: Broken pipe"


def test_sigpipe_does_not_kill_a_process_writing_to_a_closed_pipe() -> None:
    code = """
        import sys
        from tunnelscope.formats.capture import CaptureWriter, Format
        sys.stdin.read()  # wait until the parent closed our stdout's reader
        writer = CaptureWriter.open("-", Format())
        writer.add_interface(1, "eth")
        writer.announce()
        print(writer.sink.error, file=sys.stderr)
    """
    proc = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    proc.stdout.close()
    _, stderr = proc.communicate("", timeout=30)
    assert (proc.returncode, stderr.strip()) == (0, "capture stopped: Broken pipe")


@pytest.mark.parametrize(
    ("fmt", "written"),
    [(Format(), 8), (Format(pcapng=True), 7), (Format(flush_ms=60_000), 0)],
    ids=["pcap per frame", "pcapng per frame", "pcap batched"],
)
def test_a_failing_write_cuts_the_file_back_to_its_last_record(
    tmp_path: Path, fmt: Format, written: int
) -> None:
    """RLIMIT_FSIZE makes the write that crosses 1000 bytes short, and the next one EFBIG."""
    code = f"""
        import resource, signal
        from tunnelscope.formats.capture import CaptureError, CaptureWriter, Format
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (1000, 1000))
        writer = CaptureWriter.open("out", {fmt!r})
        writer.add_interface(104, "s0")
        try:
            for number in range(20):
                writer.write(0, number, bytes(100))
            writer.close()
        except CaptureError as exc:
            print(exc)
    """
    proc = run_python(code, cwd=tmp_path)
    assert (proc.stdout.strip(), proc.stderr) == ("capture stopped: File too large", "")
    with open_capture(str(tmp_path / "out")) as reader:
        assert len(list(reader)) == written
    assert (tmp_path / "out").stat().st_size <= 1000


def test_open_beneath_creates_and_truncates_a_file_inside(tmp_path: Path) -> None:
    (tmp_path / "sub").mkdir()
    old = tmp_path / "sub" / "r1.pcap"
    old.write_bytes(b"old capture")
    fd = open_beneath(str(tmp_path), str(old))
    os.write(fd, b"new")
    os.close(fd)
    assert old.read_bytes() == b"new"
    fd = open_beneath(str(tmp_path), str(tmp_path / "fresh.pcap"))
    os.close(fd)
    assert (tmp_path / "fresh.pcap").exists()


def test_open_beneath_follows_no_symbolic_link_and_opens_only_regular_files(
    tmp_path: Path,
) -> None:
    root, outside = tmp_path / "captures", tmp_path / "outside"
    root.mkdir()
    outside.mkdir()
    (outside / "victim").write_bytes(b"keep me")
    os.symlink(outside / "victim", root / "link.pcap")  # the file itself
    os.symlink(outside, root / "dir")  # a directory on the way
    os.symlink(outside / "new.pcap", root / "dangling.pcap")  # would create outside
    os.mkfifo(root / "fifo.pcap")  # must not block the open
    os.link(outside / "victim", root / "hard.pcap")  # a second name of an outside file
    refusals = {
        "link.pcap": "symbolic links are not followed",
        "dir/x.pcap": "symbolic links are not followed",
        "dangling.pcap": "symbolic links are not followed",
        "fifo.pcap": "not a regular file of its own",
        "hard.pcap": "not a regular file of its own",
        "../outside/x.pcap": "outside",
    }
    for name, reason in refusals.items():
        with pytest.raises(CaptureError, match=reason):
            open_beneath(str(root), os.path.join(str(root), name))
    assert (outside / "victim").read_bytes() == b"keep me"
    assert sorted(p.name for p in outside.iterdir()) == ["victim"]
