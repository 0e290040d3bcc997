"""Ask tshark, the judge of every capture file, what it sees in one.

    import tshark                      # pytest puts tests/ on sys.path

    @tshark.required
    def test_x(tmp_path):
        rows = tshark.fields(path, ["fr.dlci", "ip.src"])   # one dict per frame
        rows[0]["fr.dlci"]          -> ["100"]   (every occurrence, as tshark printed it)
        tshark.value("0x0800")      -> 2048      (numbers in tshark's text as ints)
        tshark.layers(path)[0]["fr"]["fr.dlci"]  -> "100"  (-T json, one dict per frame)

Run a handful of tshark processes per test module, each on a file with many frames: one
tshark start costs about a third of a second.
"""

from __future__ import annotations

import functools
import json
import shutil
import subprocess
from collections.abc import Sequence

import pytest

required = pytest.mark.skipif(shutil.which("tshark") is None, reason="tshark is not installed")

_OCCURRENCES = "\x1f"  # between occurrences of one field; never inside a printed value


def _run(path: str, options: Sequence[str]) -> str:
    """tshark's standard output; its diagnostics (root warning) go to the failure message."""
    done = subprocess.run(
        ["tshark", "-n", "-r", str(path), *options],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        raise RuntimeError(f"tshark failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def fields(
    path: str, names: Sequence[str], display_filter: str | None = None
) -> list[dict[str, list[str]]]:
    """Run `tshark -T fields -e NAME...`: per frame, each name -> all its occurrences.

    A field absent from a frame maps to []; a repeated one (VLAN tags, LMI PVCs) to several
    strings in frame order. Frames removed by `display_filter` are not returned.
    """
    options = ["-T", "fields", "-E", "separator=/t", "-E", f"aggregator={_OCCURRENCES}"]
    options += ["-E", "occurrence=a", "-E", "quote=n"]
    for name in names:
        options += ["-e", name]
    if display_filter:
        options += ["-Y", display_filter]
    rows = []
    for line in _run(path, options).splitlines():
        cells = line.split("\t")
        cells += [""] * (len(names) - len(cells))
        rows.append(
            {name: cell.split(_OCCURRENCES) if cell else [] for name, cell in zip(names, cells)}
        )
    return rows


COLUMNS = ["_ws.col.Source", "_ws.col.Destination", "_ws.col.Protocol", "_ws.col.Info"]


def headline(row: dict[str, list[str]]) -> str:
    """A `fields(path, COLUMNS)` row the way tunnelscope lists a frame Wireshark dissected:
    "10.0.0.1 > 224.0.0.5 OSPF Hello Packet", or "Q.933 STATUS" for one without addresses."""
    source, destination, protocol, info = (row[name][0] if row[name] else "" for name in COLUMNS)
    if {source, destination} <= {"", "N/A", "DTE", "DCE"}:  # no address: at most a direction
        return f"{protocol} {info}"  # (tunnelscope hands frames over without theirs)
    return f"{source or '?'} > {destination or '?'} {protocol} {info}"


@functools.cache
def field_names() -> frozenset[str]:
    """Every display-filter field name this tshark knows (`tshark -G fields`)."""
    out = subprocess.run(["tshark", "-G", "fields"], capture_output=True, text=True, timeout=120)
    return frozenset(
        line.split("\t")[2] for line in out.stdout.splitlines() if line.startswith("F\t")
    )


def layers(path: str) -> list[dict[str, object]]:
    """Run `tshark -T json`: per frame, the `_source.layers` dict (protocol -> fields).

    Values are strings; a field that occurs several times in a layer is a list of them.
    """
    packets = json.loads(_run(path, ["-T", "json", "--no-duplicate-keys"]))
    return [packet["_source"]["layers"] for packet in packets]


def value(text: str) -> int | str:
    """A tshark-printed number ("100", "0x0800") as an int; any other text unchanged."""
    try:
        return int(text, 0)
    except ValueError:
        return text
