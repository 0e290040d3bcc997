"""`tunnelscope bridge A B`: sit in the middle of a lab link, forward, impair, capture."""

from __future__ import annotations

import signal
import sys
from typing import Any

import click

from tunnelscope.capture import CaptureError, Format
from tunnelscope.cli.common import Failure, echo_json
from tunnelscope.engine import CAPTURE_POINTS, Engine, Link
from tunnelscope.impairments import ImpairmentError, parse_impairment
from tunnelscope.linktype import LinkType
from tunnelscope.nio import EndpointError


@click.command()
@click.argument("a", metavar="A")
@click.argument("b", metavar="B")
@click.option("-w", "--write", "path", metavar="FILE", help="Capture to FILE ('-' = stdout).")
@click.option(
    "--linktype",
    default="auto",
    show_default=True,
    help="auto (detected from the first frames), ethernet, hdlc, ppp or fr.",
)
@click.option(
    "--capture-at",
    type=click.Choice(CAPTURE_POINTS),
    default="pre",
    show_default=True,
    help="Before the impairments, after them, or both (pcapng).",
)
@click.option("--pcapng", is_flag=True, help="Write pcapng whatever the file name says.")
@click.option(
    "-I",
    "--impair",
    "impairments",
    multiple=True,
    metavar='"[a2b|b2a|both] NAME ARGS"',
    help="Add an impairment (repeatable), e.g. -I 'a2b freq_drop 3'.",
)
@click.option("--seed", type=int, help="Seed of the random impairments (printed on exit).")
@click.option(
    "--stats",
    "stats_every",
    type=float,
    is_flag=False,
    flag_value=1.0,
    metavar="[SECONDS]",
    help="Print a status line every SECONDS (default 1).",
)
@click.option("--duration", type=float, metavar="SECONDS", help="Stop after SECONDS.")
@click.option("--name", default="link", show_default=True, help="The link's name in captures.")
@click.option(
    "--flush-ms", type=float, default=10.0, show_default=True, help="Capture flush timer."
)
@click.option(
    "--backend", type=click.Choice(["auto", "c", "python"]), default="auto", show_default=True
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on exit.")
def bridge(
    a: str,
    b: str,
    path: str | None,
    linktype: str,
    capture_at: str,
    pcapng: bool,
    impairments: tuple[str, ...],
    seed: int | None,
    stats_every: float | None,
    duration: float | None,
    name: str,
    flush_ms: float,
    backend: str,
    as_json: bool,
) -> None:
    """Bridge endpoint A to endpoint B, impairing and capturing on the way.

    Endpoints are written as dynamips and ubridge spell them: udp:LPORT:RHOST:RPORT,
    unix:LOCAL:REMOTE, tap:IFNAME[@NETNS], eth:IFNAME. Directions: a2b is what A sends.
    Ctrl-C or SIGTERM stops cleanly: the capture is closed valid and a summary printed.

    \b
    Examples:
      # R1 uses udp 10000->10001, R2 udp 10003->10002: put tunnelscope in the middle
      tunnelscope bridge udp:10001:127.0.0.1:10000 udp:10002:127.0.0.1:10003 -w r1.pcap
      # drop every 3rd frame R1 sends (dynamips freq_drop), capture before and after
      tunnelscope bridge udp:10001:127.0.0.1:10000 udp:10002:127.0.0.1:10003 \\
          -I "a2b freq_drop 3" -w link.pcapng --capture-at both
      # 10 ms +- 2 ms each way, 5 % loss towards B, watch it live in Wireshark
      tunnelscope bridge udp:10001:127.0.0.1:10000 udp:10002:127.0.0.1:10003 \\
          -I "both delay 10 2" -I "a2b packet_loss 5" -w - | wireshark -k -i -
    """
    try:
        parsed = [parse_impairment(text) for text in impairments]
        chosen_linktype = None if linktype == "auto" else LinkType.parse(linktype)
        engine = Engine(backend)
    except (ImpairmentError, ValueError) as exc:
        raise Failure(str(exc)) from None
    try:
        link = engine.add_link(name, a, b, seed)
    except (EndpointError, ValueError) as exc:
        engine.close()
        raise Failure(str(exc)) from None
    try:
        link.set_impairments(parsed)
        if path:
            fmt = Format.for_path(path, pcapng_default=pcapng, flush_ms=flush_ms)
            fmt.pcapng = fmt.pcapng or pcapng
            link.start_capture(path, chosen_linktype, capture_at, fmt)
    except CaptureError as exc:
        engine.close()
        raise Failure(str(exc)) from None

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: engine.stop())
    report = sys.stderr if path == "-" else sys.stdout
    engine.run(
        duration=duration,
        every=stats_every,
        on_tick=lambda: click.echo(_status_line(link), file=sys.stderr),
        on_news=lambda news: click.echo(f"tunnelscope: warning: {news}", err=True),
    )
    summary = _summary(engine, link)
    capture = link.stop_capture()
    engine.close()
    if capture:
        summary["capture"] = {"path": capture.path, "frames": capture.writer.sink.frames}
        if capture.error:
            summary["capture"]["error"] = capture.error
    if as_json:
        echo_json(summary, report)
    else:
        click.echo(_summary_text(summary), file=report)


def _summary(engine: Engine, link: Link) -> dict[str, Any]:
    return {
        "link": link.name,
        "backend": engine.backend,
        "seed": link.seed,
        "linktype": link.linktype.short_name if link.linktype else None,
        "impairments": [str(i) for i in link.impairments],
        **{k: v for k, v in link.stats().items() if k in ("a2b", "b2a")},
    }


def _direction_text(stats: dict[str, Any]) -> str:
    text = f"received {stats['received']} forwarded {stats['forwarded']}"
    dropped = stats["dropped"]
    if dropped:
        causes = ", ".join(f"{cause} {n}" for cause, n in sorted(dropped.items()))
        text += f" dropped {sum(dropped.values())} ({causes})"
    for key in ("corrupted", "duplicated", "reordered", "queued", "send_errors"):
        if stats.get(key):
            text += f" {key} {stats[key]}"
    return text


def _status_line(link: Link) -> str:
    stats = link.stats()
    return f"{link.name}: a2b {_direction_text(stats['a2b'])} | b2a {_direction_text(stats['b2a'])}"


def _summary_text(summary: dict[str, Any]) -> str:
    lines = [
        f"{summary['link']} ({summary['backend']} backend, seed {summary['seed']}):",
        f"  a2b {_direction_text(summary['a2b'])}",
        f"  b2a {_direction_text(summary['b2a'])}",
    ]
    capture = summary.get("capture")
    if capture:
        linktype = summary["linktype"] or "unknown"
        lines.append(f"  capture {capture['path']}: {capture['frames']} frames, {linktype}")
        if capture.get("error"):
            lines.append(f"  capture error: {capture['error']}")
    return "\n".join(lines)
