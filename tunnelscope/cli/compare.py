"""`tunnelscope compare A [B]`: which frames of A never reached B, and why."""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from typing import Callable

import click

from tunnelscope.analysis.compare import (
    DEFAULT_LIMIT,
    DEFAULT_WINDOW,
    IGNORABLE,
    TUNNELSCOPE_WORDS,
    CompareError,
    Frame,
    Listing,
    Report,
    Selection,
    SideReport,
    StreamReport,
    compare,
    parse_ignore,
)
from tunnelscope.cli.common import POSITIVE, Failure, dissect_option, dissector_for, echo_json
from tunnelscope.decoders.wireshark import DissectError


@click.command(name="compare")
@click.argument("a", metavar="A")
@click.argument("b", metavar="[B]", required=False)
@click.option(
    "--window",
    type=POSITIVE,
    default=DEFAULT_WINDOW,
    show_default=True,
    metavar="SECONDS",
    help="A frame of A not seen at B within this time is missing.",
)
@click.option(
    "--ignore",
    multiple=True,
    metavar="WHAT",
    help=f"Normalise frames before matching: {', '.join(IGNORABLE)} (repeat or comma-separate).",
)
@click.option(
    "--limit",
    type=click.IntRange(min=0),
    default=DEFAULT_LIMIT,
    show_default=True,
    metavar="N",
    help="List at most N frames per kind and direction (0: all); counts are always complete.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
@dissect_option("describe the listed frames and count losses per protocol")
def compare_command(
    a: str,
    b: str | None,
    window: float,
    ignore: tuple[str, ...],
    limit: int,
    as_json: bool,
    dissect: str,
) -> None:
    """Match the frames of two captures of the same traffic taken at two points of a path.

    A and B are pcap or pcapng files (one may be - for standard input), each
    FILE[#INTERFACE][@DIRECTION]: INTERFACE is an interface name, its last word (#pre picks
    `r1-r2 pre`) or a 0-based number; DIRECTION is out (= a2b) or in (= b2a), and applies to
    both sides unless each names its own. With A alone, A is a tunnelscope capture taken at
    both points (`capture ... both`): its `<link> pre` interface is compared with its `<link>
    post` one (FILE#LINK picks a link when it holds several).

    Frames match by content, first in first out, within --window seconds. When both
    captures record directions, each direction is compared on its own. The report lists,
    per direction: the frames of A missing at B (decoded, grouped by flow and protocol,
    with the cause: the impairment named in tunnelscope's `dropped by` comments, `outside
    tunnelscope` for a tunnelscope pre capture compared with another point, `before B
    started`/`after B stopped` at the edges of B's capture), loss bursts, frames only at B,
    duplicates, reordering and the delay distribution from A to B. With Wireshark's
    dissectors (--dissect, the default when tshark is installed) each listed frame shows
    Wireshark's summary ("OSPF Hello Packet", "BGP KEEPALIVE Message") and the missing
    frames are counted per protocol (`lost: OSPF 12, ICMP 3`).

    --ignore rewrites both sides before matching: l2 compares from the L3 header (also
    across link types; Ethernet padding is cut), vlan strips 802.1Q/QinQ tags, fr-address
    zeroes the Frame Relay address (DLCI and flags), ttl zeroes the IPv4 TTL and header
    checksum and the IPv6 hop limit.

    Exit status: 0 when both captures were compared in full; 1 when one ends in a damaged
    record (compared up to there) or the captures have no frame in common (a warning says
    so on stderr); 2 when they cannot be compared (unreadable, different link types
    without --ignore l2, a bad selection), with one line `tunnelscope: error: REASON`.

    \b
    Examples:
      tunnelscope compare link.pcapng                      # tunnelscope pre vs post
      tunnelscope compare lab.pcapng#r1-r2 --json | jq '.directions[].missing.count'
      tunnelscope compare link.pcapng#pre@a2b link.pcapng#post
      tunnelscope compare access.pcap trunk.pcap --ignore vlan
      tunnelscope compare r1-eth.pcap r1-serial.pcap --ignore l2,ttl
    """
    dissector = dissector_for(dissect)
    try:
        selections = [Selection.parse(text) for text in (a, b) if text is not None]
        with _progress() as progress:
            report = compare(
                selections[0],
                selections[1] if b is not None else None,
                window,
                parse_ignore(list(ignore)),
                limit,
                progress,
                dissector,
            )
    except (CompareError, DissectError) as exc:
        raise Failure(str(exc)) from None
    if as_json:
        echo_json(report.as_dict())
    else:
        click.echo("\n".join(_text(report)))
    warnings = report.warnings()
    for warning in warnings:
        click.echo(f"tunnelscope: warning: {warning}", err=True)
    if warnings:
        sys.exit(1)


@contextlib.contextmanager
def _progress() -> Iterator[Callable[[int, int | None], None] | None]:
    """A progress bar on stderr, only when stderr is a terminal."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn

    columns = (TextColumn("compare"), BarColumn(), TaskProgressColumn())
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task("", total=None)
        yield lambda done, total: bar.update(task, completed=done, total=total)


# ------------------------------------------------------------------------------ text report


def _text(report: Report) -> list[str]:
    lines = [_side("A", report.a), _side("B", report.b)]
    if report.a.statistics_dropped:
        lines.append(
            f"A's statistics: {report.a.statistics_dropped} frames dropped by impairments "
            "(both directions)"
        )
    ignoring = f"ignoring {', '.join(sorted(report.ignore))}" if report.ignore else "byte for byte"
    lines.append(f"window {report.window_ns / 1e9:g} s, frames compared {ignoring}")
    for stream in report.streams:
        lines.append("")
        lines += _stream(stream, report.tunnelscope_pair or bool(stream.commented))
    if not report.streams:
        lines.append("no frames to compare")
    return lines


def _side(role: str, side: SideReport) -> str:
    text = f"{role}: {side.selection.label()}"
    if side.interface and side.selection.interface != side.interface:
        text += f" (interface {side.interface!r})"
    return text + f", {side.linktype_name}, {side.frames} frames"


def _stream(stream: StreamReport, tunnelscope: bool) -> list[str]:
    name = stream.name
    if tunnelscope and stream.direction in TUNNELSCOPE_WORDS:
        name += f" ({TUNNELSCOPE_WORDS[stream.direction]})"
    lines = [
        f"{name}: {stream.a_frames} frames at A, {stream.b_frames} at B: {stream.matched} "
        f"matched, {stream.missing.count} missing at B, {stream.only_b.count} only at B, "
        f"{stream.duplicates.count} duplicated, {stream.reordered.count} reordered"
    ]
    if any(stream.causes):
        causes = ", ".join(f"{cause or 'unknown'} {n}" for cause, n in stream.causes.most_common())
        lines.append(f"  missing at B by cause: {causes}")
    if stream.lost:
        lost = ", ".join(f"{protocol} {n}" for protocol, n in stream.lost.most_common())
        lines.append(f"  lost: {lost}")
    if stream.commented or (tunnelscope and stream.missing.count):
        lines.append(
            f"  drop comments: {stream.commented} frames of A marked dropped, "
            f"{stream.commented_missing} of them missing at B; "
            f"{stream.uncommented_missing} missing without one"
        )
    if stream.bursts:
        lengths = ", ".join(f"{_frames(n)} x{stream.bursts[n]}" for n in sorted(stream.bursts))
        lines.append(
            f"  loss bursts: {sum(stream.bursts.values())}; lengths {lengths}; longest "
            f"{_frames(max(stream.bursts))} from A #{stream.longest_burst_at}"
        )
    lines += _missing(stream)
    lines += _listing("only at B", stream.only_b, lambda f: "")
    lines += _listing("duplicated at B", stream.duplicates, lambda f: f"(copy of A #{f.original})")
    lines += _listing(
        "reordered at B", stream.reordered, lambda f: f"(A #{f.original}, after A #{f.behind})"
    )
    lines += _delays(stream)
    return lines


def _missing(stream: StreamReport) -> list[str]:
    """The missing frames under their flow and protocol, largest group first."""
    if not stream.missing.count:
        return []
    listed: dict[tuple[str, str], list[Frame]] = {}
    for frame in stream.missing.frames:
        listed.setdefault((frame.protocol, frame.flow), []).append(frame)
    lines = ["  missing at B, by flow and protocol:"]
    for (protocol, flow), count in stream.groups.most_common():
        lines.append(f"    {protocol} {flow}: {count}")
        frames = listed.get((protocol, flow), [])
        lines += [_frame_line(f, f"[{f.cause}]" if f.cause else "", "      ") for f in frames]
    return lines + _more(stream.missing)


def _listing(title: str, listing: Listing, note: Callable[[Frame], str]) -> list[str]:
    if not listing.count:
        return []
    lines = [f"  {title}:"]
    lines += [_frame_line(frame, note(frame), "    ") for frame in listing.frames]
    return lines + _more(listing)


def _frame_line(frame: Frame, note: str, indent: str) -> str:
    words = [f"{indent}#{frame.number}", _clock(frame.ts_ns), note, frame.summary]
    return " ".join(word for word in words if word)


def _more(listing: Listing) -> list[str]:
    unlisted = listing.count - len(listing.frames)
    return [f"    ... {unlisted} more not listed (--limit)"] if unlisted else []


def _frames(count: int) -> str:
    return f"{count} frame" + ("" if count == 1 else "s")


def _delays(stream: StreamReport) -> list[str]:
    delays = stream.delays
    if not delays.count:
        return []
    figures = {
        "min": delays.minimum,
        "median": delays.quantile(0.5) or 0,
        "p90": delays.quantile(0.9) or 0,
        "p99": delays.quantile(0.99) or 0,
        "max": delays.maximum,
        "mean": delays.total // delays.count,
    }
    spread = [
        f"{'<0' if bound == -1 else '>=10 s' if bound is None else '<' + _duration(bound)} {n}"
        for bound, n in delays.decades()
    ]
    return [
        f"  delay A->B: {', '.join(f'{name} {_duration(ns)}' for name, ns in figures.items())}",
        f"  delay distribution: {', '.join(spread)}",
    ]


def _duration(ns: int) -> str:
    magnitude = abs(ns)
    for unit, scale in (("s", 10**9), ("ms", 10**6), ("us", 10**3)):
        if magnitude >= scale:
            return f"{ns / scale:.3g} {unit}"
    return f"{ns} ns"


def _clock(ts_ns: int) -> str:
    seconds, fraction = divmod(ts_ns, 1_000_000_000)
    return time.strftime("%H:%M:%S", time.localtime(seconds)) + f".{fraction // 1000:06d}"
