"""Wireshark's dissectors for tunnel frames: one tshark, fed in batches, read as it dissects.

Each frame comes back as a `Decoded`, the shape of the built-in decoders: `summary` is
Wireshark's Info column, `protocols` is frame.protocols as tshark prints it (with its
"ethertype" and "data" entries), `fields` holds every field of the dissection under its
display-filter name plus the `_ws.col.Info`, `_ws.col.Protocol`, `_ws.col.Source` and
`_ws.col.Destination` columns; `malformed` is set when Wireshark added its "Malformed
Packet" layer. Values follow tshark: integer fields are ints, booleans bools, everything
else tshark's text; a field is a list when it occurs several times in the frame (as
`tshark -T json --no-duplicate-keys` groups it), else one value.

Two ways in, one tshark each, started once and kept for the life of the caller:
- `FileDissection`: tshark reads a capture file itself, or a copy of a pipe (standard input)
  that this process reads too, so frame numbers, interfaces and comments are the file's own.
- `Dissector`: frames in memory, of one link type, written to tshark as a pcap stream through
  a bounded queue; a full queue drops the frame and counts it instead of blocking a link.

Why tshark's `-T ek -P -V` output is parsed here rather than pyshark's packet objects
(measured by benchmarks/decode.py, figures in docs/decoders.md): pyshark's JSON and EK modes
alone take 1.4-2.3x the time of `tshark -T json` on the same file and carry no Info column,
which a second tshark pass over every frame would have to add (its only_summaries mode took
35x and returned 1 packet for 10,000). `-T ek -P -V` gives fields and Info in one JSON line
per frame and costs tshark no more than `-T json`. pyshark supplies what it is good at:
finding tshark (`get_process_path`), its version, the display-filter option for that
version, and its per-version cache folder, where the field-name table below is kept.

EK names a field `<protocol it is shown in>_<abbrev>` with dots turned into underscores
(`ip_ip_flags_df`, `ipv6_ip_version`); `tshark -G fields` lists every abbrev and its type, so
the names are mapped back (`ip.flags.df`; should two abbrevs differ only in a dot against an
underscore, the first listed wins) and integer fields are made ints, bytes fields hex text
as -T fields prints them.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import queue
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from operator import itemgetter
from typing import TYPE_CHECKING, BinaryIO

from tunnelscope.decoders.base import Decoded, top_protocol
from tunnelscope.formats.pcap import global_header, record

if TYPE_CHECKING:
    from packaging.version import Version  # what pyshark's get_tshark_version returns

DISSECTORS = ("auto", "wireshark", "builtin")
QUEUE_FRAMES = 4096  # frames waiting for tshark before `Dissector.submit` drops
_BATCH = 256  # frames written to tshark per system call, at most
_CHUNK = 1 << 16
_INT_TYPES = frozenset(
    [f"FT_UINT{bits}" for bits in (8, 16, 24, 32, 40, 48, 56, 64)]
    + [f"FT_INT{bits}" for bits in (8, 16, 24, 32, 40, 48, 56, 64)]
    + ["FT_FRAMENUM"]
)
_PLANS = 4096  # layer shapes remembered
_NAMES_FILE = "tunnelscope-ek-names-4.sqlite"  # the number changes with its layout
_NOISE = ("Running as user", "running as root", "Dumpcap", "This could be dangerous")


class DissectError(Exception):
    """tshark is missing, refused the request or stopped early (one line, shown as is)."""


@dataclass(frozen=True)
class Tshark:
    path: str
    version: Version


@lru_cache(maxsize=1)
def find_tshark() -> Tshark | None:
    """The tshark on PATH (as pyshark finds it) and its version; None when there is none.

    pyshark is imported here, not with this module: it takes 45 ms (asyncio, lxml) of the
    start of every command, whether it uses tshark or not (`decode --dissect builtin`)."""
    from pyshark.tshark.tshark import (
        TSharkNotFoundException,
        get_process_path,
        get_tshark_version,
    )

    try:
        path = get_process_path()
        return Tshark(path, get_tshark_version(path))
    except (TSharkNotFoundException, OSError, subprocess.CalledProcessError):
        return None


def choose(dissector: str) -> str:
    """ "wireshark" or "builtin" for a --dissect choice; DissectError when tshark is needed."""
    if dissector == "builtin":
        return "builtin"
    if find_tshark() is not None:
        return "wireshark"
    if dissector == "auto":
        return "builtin"
    raise DissectError("--dissect wireshark: tshark is not installed (apt install tshark)")


def _tshark() -> Tshark:
    found = find_tshark()
    if found is None:
        raise DissectError("tshark is not installed (apt install tshark)")
    return found


# --------------------------------------------------------------------------- field names


def _integer(text: str) -> int | str:
    try:
        return int(text, 0)
    except ValueError:
        try:
            return int(text)  # leading zeros
        except ValueError:
            return text  # a custom-formatted integer field: tshark's text as is


def _hex(text: str) -> str:
    """Bytes as -T fields prints them (EK separates the octets with colons)."""
    return text.replace(":", "")


_CONVERTERS: dict[str, Callable[[str], object]] = {"integer": _integer, "bytes": _hex}


def _kind(field_type: str) -> str | None:
    """How a field of this FT_ type is shown: "integer", "bytes", "label" (no value: EK
    writes null), or None: tshark's text as is."""
    if field_type in _INT_TYPES:
        return "integer"
    if field_type == "FT_BYTES":
        return "bytes"
    if field_type in ("FT_NONE", "FT_PROTOCOL"):
        return "label"
    return None


class _Plan:
    """How to turn the members of one layer shape into fields."""

    __slots__ = ("names", "converted", "pick", "labels")

    def __init__(self, names: list[str], kinds: list[str | None]) -> None:
        kept = [i for i, kind in enumerate(kinds) if kind != "label"]
        # positions of labels: null, or a protocol nested in this one (data in icmp)
        self.labels = tuple(i for i, kind in enumerate(kinds) if kind == "label")
        self.names = tuple(names[i] for i in kept)  # the field name of each member kept
        self.converted = tuple(  # (position, converter) of members shown otherwise than EK
            (i, _CONVERTERS[kind]) for i, kind in enumerate(kinds) if kind in _CONVERTERS
        )
        picker = itemgetter(*kept) if kept else (lambda _values: ())
        self.pick = picker if len(kept) != 1 else lambda values: (values[kept[0]],)


class _Names:
    """EK member name -> Wireshark field name, and the kind (`_kind`) of each field.

    The table (about 240,000 names from `tshark -G fields`) is an SQLite file in pyshark's
    per-version cache folder, asked only when a new layer shape needs a plan: loaded into
    dicts it cost 0.4 s and 120 MB at every start. Without a writable cache it is built in
    memory.
    """

    def __init__(self, tshark: Tshark) -> None:
        self.plans: dict[tuple[str, ...], _Plan] = {}
        self._lock = threading.Lock()  # one connection, shared by the dissection threads
        self._db = self._open(tshark)

    def plan(self, layer: str, shape: tuple[str, ...]) -> _Plan:
        """How to name the members of a layer of this shape (bounded: layer shapes repeat).

        A member is `<layer>_<abbrev>`; a protocol nested in the layer is named as itself.
        """
        if len(self.plans) >= _PLANS:
            self.plans.clear()
        with self._lock:
            names = [self._name(layer, member) for member in shape]
            kinds = [self._lookup("SELECT kind FROM kinds WHERE name = ?", n) for n in names]
        plan = self.plans[shape] = _Plan(names, kinds)
        return plan

    def _name(self, layer: str, member: str) -> str:
        query = "SELECT name FROM names WHERE ek = ?"
        if member.startswith(layer) and (name := self._lookup(query, member[len(layer) + 1 :])):
            return name
        return self._lookup(query, member) or member

    def _lookup(self, query: str, key: str) -> str | None:
        row = self._db.execute(query, (key,)).fetchone()
        return row[0] if row else None

    @classmethod
    def _open(cls, tshark: Tshark) -> sqlite3.Connection:
        from pyshark.cache import get_cache_dir  # see find_tshark

        tables, discard = None, None  # discard: a file to remove if this fails
        try:
            path = get_cache_dir(str(tshark.version)) / _NAMES_FILE
            if not path.exists():
                tables = cls._ask(tshark)
                if not tables[0]:  # never keep an empty table for this version
                    raise sqlite3.DataError("tshark -G fields listed no fields")
                discard = path.with_name(f"{path.name}.{os.getpid()}")
                with contextlib.closing(sqlite3.connect(discard)) as db:
                    cls._fill(db, *tables)
                os.replace(discard, path)  # whole or absent, for concurrent starts
            db = sqlite3.connect(f"file:{path}?mode=ro", uri=True, check_same_thread=False)
            try:
                db.execute("SELECT name FROM names LIMIT 1").fetchall()  # a damaged file?
            except sqlite3.Error:
                db.close()
                discard = path  # the next start builds it again
                raise
            return db
        except (OSError, sqlite3.Error):
            if discard is not None:
                with contextlib.suppress(OSError):
                    discard.unlink()
            db = sqlite3.connect(":memory:", check_same_thread=False)
            cls._fill(db, *(tables or cls._ask(tshark)))
            return db

    @staticmethod
    def _ask(tshark: Tshark) -> tuple[dict[str, str], dict[str, str]]:
        """EK name -> field name, and field name -> kind, from `tshark -G fields`."""
        try:
            listing = subprocess.run(
                [tshark.path, "-G", "fields"], capture_output=True, text=True, timeout=120
            ).stdout
        except (OSError, subprocess.TimeoutExpired) as exc:
            raise DissectError(f"tshark -G fields: {exc}") from None
        names: dict[str, str] = {}
        kinds: dict[str, str] = {}
        for line in listing.splitlines():
            cells = line.split("\t")
            if cells[0] == "P" and len(cells) >= 3:
                names.setdefault(cells[2].replace(".", "_"), cells[2])
                kinds[cells[2]] = "label"
            elif cells[0] == "F" and len(cells) >= 4:
                abbrev, kind = cells[2], _kind(cells[3])
                names.setdefault(abbrev.replace(".", "_"), abbrev)
                if kind is not None:
                    kinds[abbrev] = kind
        return names, kinds

    @staticmethod
    def _fill(db: sqlite3.Connection, names: dict[str, str], kinds: dict[str, str]) -> None:
        db.execute("CREATE TABLE names (ek TEXT PRIMARY KEY, name TEXT) WITHOUT ROWID")
        db.execute("CREATE TABLE kinds (name TEXT PRIMARY KEY, kind TEXT) WITHOUT ROWID")
        db.executemany("INSERT INTO names VALUES (?, ?)", names.items())
        db.executemany("INSERT INTO kinds VALUES (?, ?)", kinds.items())
        db.commit()


@lru_cache(maxsize=1)
def _names() -> _Names:
    return _Names(_tshark())


def _joined(before: object, value: object) -> list[object]:
    """Two occurrences of a field as one list, in frame order."""
    return (before if isinstance(before, list) else [before]) + (
        value if isinstance(value, list) else [value]
    )


def _grouped(pairs: list[tuple[str, object]]) -> dict[str, object]:
    """A JSON object whose repeated members become one list (EK repeats eth.addr, say)."""
    members = dict(pairs)
    if len(members) == len(pairs):
        return members
    members = {}
    for key, value in pairs:
        members[key] = _joined(members[key], value) if key in members else value
    return members


def _collect(
    layers: Iterable[tuple[str, object]], fields: dict[str, object], names: _Names
) -> None:
    """Add the fields of EK layers: (protocol, its members, or a list when it occurs twice)."""
    plans = names.plans
    for name, layer in layers:
        for members in layer if isinstance(layer, list) else (layer,):
            if not isinstance(members, dict):
                continue
            shape = tuple(members)
            plan = plans.get(shape) or names.plan(name, shape)
            values = list(members.values())
            for index, convert in plan.converted:
                value = values[index]
                if isinstance(value, str):
                    values[index] = convert(value)
                elif isinstance(value, list):
                    values[index] = [convert(v) if isinstance(v, str) else v for v in value]
            named = dict(zip(plan.names, plan.pick(values)))
            for field in fields.keys() & named.keys():  # a protocol seen twice (IP in IP)
                named[field] = _joined(fields[field], named[field])
            fields.update(named)
            nested = [(shape[i], values[i]) for i in plan.labels if values[i] is not None]
            if nested:
                _collect(nested, fields, names)


def parse(line: bytes, linktype: int, names: _Names) -> tuple[int, Decoded]:
    """One EK line (`tshark -T ek -P -V`): tshark's frame number and the frame.

    The hot path of a Wireshark dissection, kept to a few C-level calls per layer: how to
    name a layer's members is worked out once per layer shape (its tuple of member names).
    """
    packet = json.loads(line, object_pairs_hook=_grouped)
    fields: dict[str, object] = {}
    layers = packet.get("layers", {})
    _collect(layers.items(), fields, names)
    info, column = packet.get("info", ""), packet.get("protocol", "")
    fields["_ws.col.Info"], fields["_ws.col.Protocol"] = info, column
    fields["_ws.col.Source"] = packet.get("source", "")
    fields["_ws.col.Destination"] = packet.get("destination", "")
    protocols = str(fields.get("frame.protocols", "")).split(":")
    number = fields.get("frame.number", 0)
    # Wireshark's exception handler adds the _ws.malformed layer (frame.protocols may not)
    malformed = "_ws_malformed" in layers or "_ws.malformed" in protocols
    return int(number) if isinstance(number, int) else 0, Decoded(
        linktype, info, fields, protocols, malformed
    )


_NO_ADDRESS = (None, "", "N/A")  # Wireshark's Source/Destination when a frame has none


def headline(fields: dict[str, object], summary: str) -> str:
    """A frame in one line as Wireshark lists it, "10.0.0.1 > 224.0.0.5 OSPF Hello Packet"
    (Source, Destination, Protocol and Info columns; a frame without addresses, such as LMI,
    starts at its protocol), for a Wireshark dissection; the built-in summary unchanged
    otherwise."""
    column = fields.get("_ws.col.Protocol")
    if not column:
        return summary
    source, destination = fields.get("_ws.col.Source"), fields.get("_ws.col.Destination")
    if source not in _NO_ADDRESS or destination not in _NO_ADDRESS:
        return f"{source or '?'} > {destination or '?'} {column} {summary}"
    return f"{column} {summary}"


def protocol_column(decoded: Decoded) -> str:
    """The protocol a frame carries, for per-protocol counts: Wireshark's Protocol column
    ("OSPF"), or for a built-in decoding its top protocol in capitals ("ICMP")."""
    column = decoded.fields.get("_ws.col.Protocol")
    return str(column) if column else top_protocol(decoded).upper()


# ------------------------------------------------------------------------------- process


class _Process:
    """A tshark writing EK lines; its diagnostics go to a file read when it ends."""

    def __init__(
        self, source: list[str], display_filter: str | None, stdin: int | None, live: bool
    ) -> None:
        tshark = _tshark()
        self.names = _names()
        # -l (flush after each frame) costs tshark half as much again: only for live input
        arguments = [tshark.path, *(["-l"] if live else []), "-n", "-T", "ek", "-P", "-V", *source]
        if display_filter:
            from pyshark.tshark.tshark import get_tshark_display_filter_flag  # see find_tshark

            arguments += [get_tshark_display_filter_flag(tshark.version), display_filter]
        self.popen = subprocess.Popen(
            arguments, stdin=stdin, stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self.frames = 0
        self._said: deque[str] = deque(maxlen=8)  # tshark's last diagnostics
        self._listener = threading.Thread(target=self._listen, daemon=True)
        self._listener.start()

    def _listen(self) -> None:
        assert self.popen.stderr is not None
        for raw in self.popen.stderr:
            line = raw.decode("utf-8", "replace").strip()
            if line and not any(noise in line for noise in _NOISE):
                self._said.append(line)

    def lines(self) -> Iterator[bytes]:
        assert self.popen.stdout is not None
        for line in self.popen.stdout:
            if not line.endswith(b"\n"):  # cut short: tshark died writing it
                break
            if line.startswith(b'{"timestamp"'):  # not the {"index": ...} lines for Elastic
                self.frames += 1
                yield line

    def failure(self) -> str | None:
        """Why tshark stopped, in one line; None when it read everything."""
        code = self.popen.wait()
        if code == 0:
            return None
        self._listener.join(timeout=5)
        said = list(self._said)
        if code < 0:
            name = signal.Signals(-code).name
            return f"tshark was killed ({name}) after {self.frames} frames"
        if said:
            return "tshark: " + " ".join(said).removeprefix("tshark: ")
        return f"tshark exited with status {code} after {self.frames} frames"

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.kill()
        self.popen.wait()
        self._listener.join(timeout=5)
        for stream in (self.popen.stdin, self.popen.stdout, self.popen.stderr):
            if stream is not None:
                with contextlib.suppress(OSError):
                    stream.close()


class FileDissection:
    """tshark dissecting a capture file (a path, or "-" for standard input), frame by frame.

    tshark reads a regular file itself. For standard input or a FIFO, a thread copies what
    arrives to tshark and to `input`, from which the caller reads the same capture itself
    (timestamps, interfaces, comments); for a file the caller opens it too. Iterating gives
    (tshark's frame number, Decoded with linktype 0) for each frame the display filter keeps;
    when tshark stops early, iteration ends and `failure()` says why.
    """

    def __init__(self, path: str, display_filter: str | None = None) -> None:
        self.input: BinaryIO | None = None
        mode = os.stat(path).st_mode if path != "-" else stat.S_IFIFO
        if stat.S_ISDIR(mode):
            raise IsADirectoryError(errno.EISDIR, os.strerror(errno.EISDIR), path)
        if stat.S_ISREG(mode):
            self._process = _Process(["-r", path], display_filter, None, False)
            return
        source = sys.stdin.fileno() if path == "-" else os.open(path, os.O_RDONLY)
        self._process = _Process(["-r", "-"], display_filter, subprocess.PIPE, True)
        ours, theirs = os.pipe()
        self.input = os.fdopen(ours, "rb")
        copier = threading.Thread(target=self._copy, args=(source, theirs), daemon=True)
        copier.start()

    def _copy(self, source: int, ours: int) -> None:
        """A pipe's bytes to tshark and to `input`; either may go away first."""
        tshark = self._process.popen.stdin
        assert tshark is not None
        try:
            while chunk := _read_some(source):
                for write in (tshark.write, lambda data: os.write(ours, data)):
                    with contextlib.suppress(OSError, ValueError):
                        write(chunk)
                with contextlib.suppress(OSError, ValueError):
                    tshark.flush()
        finally:
            closing = [tshark.close, lambda: os.close(ours)]
            if source != sys.stdin.fileno():
                closing.append(lambda: os.close(source))
            for close in closing:
                with contextlib.suppress(OSError, ValueError):
                    close()

    def __iter__(self) -> Iterator[tuple[int, Decoded]]:
        for line in self._process.lines():
            yield parse(line, 0, self._process.names)

    def failure(self) -> str | None:
        return self._process.failure()

    def close(self) -> None:
        self._process.stop()
        if self.input is not None:
            self.input.close()

    def __enter__(self) -> FileDissection:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


def _read_some(fd: int) -> bytes:
    """The next bytes of a pipe; b"" at its end or when it fails (the caller's own reader of
    the copy reports why)."""
    try:
        return os.read(fd, _CHUNK)
    except OSError:
        return b""


Result = Callable[[object, Decoded], None]


class Dissector:
    """One tshark for frames of one link type, in memory: started once, fed in batches.

    `submit` never blocks unless asked to: with `QUEUE_FRAMES` frames already waiting (tshark
    is slower than the link) the frame is dropped and counted in `dropped`. A thread writes
    the queue to tshark as a pcap stream, another reads tshark's answers and calls
    `on_result(tag, decoded)` for each frame, in order. `close()` waits for every submitted
    frame; `failure` then says why tshark stopped early, if it did.
    """

    def __init__(
        self,
        linktype: int,
        on_result: Result,
        queue_frames: int = QUEUE_FRAMES,
        live: bool = True,
    ) -> None:
        """`live` False: frames come in bulk and only `close()` needs every answer."""
        self.linktype = linktype
        self.on_result = on_result
        self.dropped = 0
        self.failure: str | None = None
        self._queue: queue.Queue[tuple[object, int, bytes] | None] = queue.Queue(queue_frames)
        self._tags: deque[object] = deque()
        self._process = _Process(["-r", "-"], None, subprocess.PIPE, live)
        self._writer = threading.Thread(target=self._write, daemon=True)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._writer.start()
        self._reader.start()

    def submit(self, data: bytes, tag: object = None, ts_ns: int = 0, block: bool = False) -> bool:
        """Queue a frame; False when it was dropped (queue full, or tshark gone)."""
        if self.failure is None and self._process.popen.poll() is None:
            try:
                self._queue.put((tag, ts_ns, bytes(data)), block=block)
                return True
            except queue.Full:
                pass
        self.dropped += 1
        return False

    def _write(self) -> None:
        stdin = self._process.popen.stdin
        assert stdin is not None
        ended = False
        with contextlib.suppress(OSError, ValueError):  # tshark went away: the reader says why
            stdin.write(global_header(self.linktype))
            stdin.flush()
            while not ended:
                item = self._queue.get()
                batch = [item]
                while item is not None and len(batch) < _BATCH:
                    try:
                        item = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    batch.append(item)
                chunk = []
                for entry in batch:
                    if entry is not None:
                        tag, ts_ns, data = entry
                        self._tags.append(tag)
                        chunk.append(record(ts_ns, data))
                ended = batch[-1] is None
                stdin.write(b"".join(chunk))
                stdin.flush()
        with contextlib.suppress(OSError, ValueError):
            stdin.close()
        while not ended:  # tshark failed: take what submitters still queue, up to close()
            ended = self._queue.get() is None

    def _read(self) -> None:
        names = self._process.names
        for line in self._process.lines():
            _, decoded = parse(line, self.linktype, names)
            self.on_result(self._tags.popleft() if self._tags else None, decoded)
        self.failure = self._process.failure()

    def close(self, timeout: float = 60.0) -> None:
        """Dissect what was submitted, then stop tshark; a tshark that takes or answers
        nothing for `timeout` seconds is killed (`failure` says so), never waited for."""
        deadline = time.monotonic() + timeout
        try:
            self._queue.put(None, timeout=timeout)
        except queue.Full:  # tshark takes nothing: killed, the writer drains the queue
            self._process.popen.kill()
            self._queue.put(None)
        self._reader.join(max(0.0, deadline - time.monotonic()))
        if self._reader.is_alive():
            self._process.popen.kill()
            self._reader.join(5)
            self.failure = f"tshark gave no answer in {timeout:g} s"
        self._writer.join(timeout=5)
        self._process.stop()

    def __enter__(self) -> Dissector:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class Dissectors:
    """A `Dissector` per link type, each started when its first frame comes; for reports
    over captures that hold several link types. Frames wait for tshark rather than drop."""

    def __init__(self, on_result: Result) -> None:
        self.on_result = on_result
        self.by_linktype: dict[int, Dissector] = {}

    def submit(self, linktype: int, data: bytes, tag: object = None) -> None:
        dissector = self.by_linktype.get(linktype)
        if dissector is None:
            dissector = Dissector(linktype, self.on_result, live=False)
            self.by_linktype[linktype] = dissector
        dissector.submit(data, tag, block=True)

    def close(self) -> str | None:
        """Wait for every answer; why a tshark stopped early, if one did."""
        for dissector in self.by_linktype.values():
            dissector.close()
        return next((d.failure for d in self.by_linktype.values() if d.failure), None)


def dissect(linktype: int, frames: list[bytes]) -> list[Decoded]:
    """Frames in memory, one batch, one tshark: the Decoded of each, in order."""
    results: list[Decoded] = []
    with Dissector(
        linktype, lambda _tag, decoded: results.append(decoded), live=False
    ) as dissector:
        for frame in frames:
            dissector.submit(frame, block=True)
    if dissector.failure:
        raise DissectError(dissector.failure)
    return results
