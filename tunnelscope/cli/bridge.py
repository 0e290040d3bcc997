"""`tunnelscope bridge A B`: sit in the middle of a lab link, forward, impair, capture."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
from typing import Any

import click

from tunnelscope.cli.common import (
    COUNT,
    NON_NEGATIVE,
    POSITIVE,
    Address,
    Failure,
    capture_at_option,
    direction_text,
    echo_json,
)
from tunnelscope.datapath.engine import Engine, Link, parse_conditional
from tunnelscope.datapath.impairments import ImpairmentError
from tunnelscope.formats.capture import CaptureError, Format, Ring
from tunnelscope.formats.linktype import LinkType
from tunnelscope.lab.control import parse_address
from tunnelscope.lab.stream import Instance, StreamServer, registered, required_token
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
@capture_at_option("capture_at")
@click.option("--pcapng", is_flag=True, help="Write pcapng whatever the file name says.")
@click.option(
    "-f", "--filter", "capture_filter", metavar="EXPR", help="Capture filter (tcpdump syntax)."
)
@click.option(
    "-b",
    "--ring-buffer",
    "ring",
    multiple=True,
    metavar="KEY:VALUE",
    help="Split the capture as dumpcap: filesize:KB, duration:S, files:N, packets:N.",
)
@click.option(
    "-a",
    "--autostop",
    multiple=True,
    metavar="KEY:VALUE",
    help="Stop capturing (and bridging) on duration:S, filesize:KB, files:N, packets:N.",
)
@click.option("-c", "count", type=COUNT, metavar="N", help="Stop after N frames.")
@click.option(
    "--wireshark", "viewer", flag_value="wireshark", help="Watch live in Wireshark (pcapng)."
)
@click.option("--tshark", "viewer", flag_value="tshark", help="Watch live with tshark.")
@click.option(
    "-I",
    "--impair",
    "impairments",
    multiple=True,
    metavar='"[a2b|b2a|both] NAME ARGS"',
    help="Add an impairment (repeatable), e.g. -I 'a2b freq_drop 3' or, only for the frames a "
    "filter matches, -I 'a2b packet_loss 100 if icmp' (needs --linktype).",
)
@click.option("--seed", type=int, help="Seed of the random impairments (printed on exit).")
@click.option(
    "--stats",
    "stats_every",
    type=POSITIVE,
    is_flag=False,
    flag_value=1.0,
    metavar="[SECONDS]",
    help="Print a status line every SECONDS (default 1).",
)
@click.option("--duration", type=POSITIVE, metavar="SECONDS", help="Stop after SECONDS.")
@click.option("--name", default="link", show_default=True, help="The link's name in captures.")
@click.option(
    "--flush-ms",
    type=NON_NEGATIVE,
    default=10.0,
    show_default=True,
    metavar="MS",
    help="Write the capture at least every MS milliseconds.",
)
@click.option(
    "--backend", type=click.Choice(["auto", "c", "python"]), default="auto", show_default=True
)
@click.option(
    "--gso",
    is_flag=True,
    help="Send runs of equal-size UDP frames as one GSO (UDP_SEGMENT) send: up to a third less "
    "CPU per frame. Receivers still get one datagram per frame, but a sniffer on lo (Wireshark, "
    "tunnelscope sniff) sees merged super-packets, hence off by default (docs/pipeline.md). "
    "C backend only.",
)
@click.option(
    "--stream",
    metavar="HOST:PORT|off",
    type=Address(listen=True, off=True),
    default="127.0.0.1:0",
    show_default=True,
    help="Serve live captures of this link over TCP (`tunnelscope stream`, the Wireshark"
    " extcap, nc); any address other than loopback needs a token.",
)
@click.option(
    "--stream-token",
    metavar="TOKEN",
    envvar="TUNNELSCOPE_STREAM_TOKEN",
    help="The token stream clients must give (generated off loopback when not given).",
)
@click.option(
    "--no-token",
    is_flag=True,
    help="Serve the stream off loopback without a token: anyone who reaches it may watch.",
)
@click.option("--json", "as_json", is_flag=True, help="Print a JSON summary on exit.")
def bridge(
    a: str,
    b: str,
    path: str | None,
    linktype: str,
    capture_at: str,
    pcapng: bool,
    capture_filter: str | None,
    ring: tuple[str, ...],
    autostop: tuple[str, ...],
    count: int | None,
    viewer: str | None,
    impairments: tuple[str, ...],
    seed: int | None,
    stats_every: float | None,
    duration: float | None,
    name: str,
    flush_ms: float,
    backend: str,
    gso: bool,
    stream: str,
    stream_token: str | None,
    no_token: bool,
    as_json: bool,
) -> None:
    """Bridge endpoint A to endpoint B, impairing and capturing on the way.

    Endpoints are written as dynamips and ubridge spell them: udp:LPORT:RHOST:RPORT,
    unix:LOCAL:REMOTE, tap:IFNAME[@NETNS], eth:IFNAME. Directions: a2b is what A sends.
    Ctrl-C or SIGTERM stops cleanly: the capture is closed valid and a summary printed.
    -w may name a FIFO: every reader that opens it gets its own stream from a fresh header.
    Capture options follow dumpcap (-f, -b, -a, -c); see docs/live.md.

    \b
    Examples:
      # R1 uses udp 10000->10001, R2 udp 10003->10002: put tunnelscope in the middle
      tunnelscope bridge udp:10001:127.0.0.1:10000 udp:10002:127.0.0.1:10003 -w r1.pcap
      # drop every 3rd frame R1 sends (dynamips freq_drop), capture before and after
      tunnelscope bridge udp:10001:127.0.0.1:10000 udp:10002:127.0.0.1:10003 \\
          -I "a2b freq_drop 3" -w link.pcapng --capture-at both
      # 10 ms +- 2 ms each way, 5 % loss towards B, watch it live in Wireshark
      tunnelscope bridge udp:10001:127.0.0.1:10000 udp:10002:127.0.0.1:10003 \\
          -I "both delay 10 2" -I "a2b packet_loss 5" --wireshark
      # only ICMP, in files of 1000 frames, keeping the last 5
      tunnelscope bridge udp:10001:127.0.0.1:10000 udp:10002:127.0.0.1:10003 \\
          -f icmp -w icmp.pcapng -b packets:1000 -b files:5
    """
    try:
        parsed = [parse_conditional(text) for text in impairments]
        chosen_linktype = None if linktype == "auto" else LinkType.parse(linktype)
        limits = Ring.parse(ring, autostop, count or 0)
        if viewer and path:
            raise ValueError(f"--{viewer} and -w cannot be used together")
        if viewer and not shutil.which(viewer):
            raise ValueError(f"{viewer} is not installed (needed by --{viewer})")
        if (ring or autostop or count) and not path:
            raise ValueError("-b, -a and -c need a capture file (-w FILE)")
        if stream != "off":  # a token refused stops everything; other stream failures warn
            required_token(parse_address(stream)[0], stream_token, no_token)
        engine = Engine(backend, gso=gso)
    except (ImpairmentError, ValueError) as exc:
        raise Failure(str(exc)) from None
    try:
        link = engine.add_link(name, a, b, seed)
    except (EndpointError, ValueError) as exc:
        engine.close()
        raise Failure(str(exc)) from None
    process = None
    try:
        link.linktype = chosen_linktype
        link.set_impairments([i for i, _ in parsed], [condition for _, condition in parsed])
        if path:
            fmt = Format.for_path(path, pcapng_default=pcapng, flush_ms=flush_ms)
            fmt.pcapng = fmt.pcapng or pcapng
            link.start_capture(path, chosen_linktype, capture_at, fmt, capture_filter, limits)
        elif viewer:
            process = _start_viewer(viewer, name)
            fd = os.dup(process.stdin.fileno())  # type: ignore[union-attr]
            process.stdin.close()  # type: ignore[union-attr]
            os.set_blocking(fd, False)
            fmt = Format(pcapng=True, flush_ms=flush_ms)
            link.attach_fd(fd, fmt, capture_at, capture_filter, chosen_linktype)
    except (CaptureError, ImpairmentError) as exc:
        engine.close()
        raise Failure(str(exc)) from None
    engine.stop_on_autostop = True

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: engine.stop())
    report = sys.stderr if path == "-" else sys.stdout
    with contextlib.ExitStack() as exits:
        streams = _serve_streams(engine, stream, stream_token, no_token, f"{a}--{b}", exits)
        engine.run(
            duration=duration,
            every=stats_every,
            on_tick=lambda: click.echo(_status_line(link), file=sys.stderr),
            on_news=lambda news: click.echo(f"tunnelscope: warning: {news}", err=True),
        )
        if streams:
            streams.close()  # before the link's captures close
    summary = _summary(engine, link)
    capture = link.stop_capture() or link.finished
    engine.close()
    if process:
        process.wait()
    if capture:
        summary["capture"] = {"path": capture.path, "frames": capture.writer.sink.frames}
        if capture.error:
            summary["capture"]["error"] = capture.error
    if as_json:
        echo_json(summary, report)
    else:
        click.echo(_summary_text(summary), file=report)


def _start_viewer(viewer: str, name: str) -> subprocess.Popen:
    """wireshark or tshark reading the live stream on its standard input."""
    if viewer == "wireshark":
        command = ["wireshark", "-k", "-i", "-", "-o", f"gui.window_title:{name}"]
    else:
        command = ["tshark", "-l", "-i", "-"]
    return subprocess.Popen(command, stdin=subprocess.PIPE)


def _serve_streams(
    engine: Engine,
    where: str,
    token: str | None,
    no_token: bool,
    name: str,
    exits: contextlib.ExitStack,
) -> StreamServer | None:
    """Live captures over TCP, announced to the Wireshark extcap; a failure only warns."""
    if where == "off":
        return None
    try:
        streams = StreamServer(engine, parse_address(where), token, no_token=no_token).start()
        exits.enter_context(
            registered(Instance(os.getpid(), "bridge", streams.where, None, streams.token, name))
        )
    except (OSError, ValueError) as exc:
        click.echo(f"tunnelscope: warning: no live stream on {where}: {exc}", err=True)
        return None
    if where != "127.0.0.1:0":
        click.echo(f"tunnelscope: stream on {streams.where}", err=True)
        if streams.token and not token:
            click.echo(f"tunnelscope: stream token {streams.token}", err=True)
        if streams.exposure_warning:
            click.echo(f"tunnelscope: warning: {streams.exposure_warning}", err=True)
    return streams


def _summary(engine: Engine, link: Link) -> dict[str, Any]:
    return {
        "link": link.name,
        "backend": engine.backend,
        "seed": link.seed,
        "linktype": link.linktype.short_name if link.linktype else None,
        "impairments": [
            f"{i} if {condition}" if condition else str(i)
            for i, condition in zip(link.impairments, link.conditions)
        ],
        **{k: v for k, v in link.stats().items() if k in ("a2b", "b2a")},
    }


def _status_line(link: Link) -> str:
    stats = link.stats()
    return f"{link.name}: a2b {direction_text(stats['a2b'])} | b2a {direction_text(stats['b2a'])}"


def _summary_text(summary: dict[str, Any]) -> str:
    lines = [
        f"{summary['link']} ({summary['backend']} backend, seed {summary['seed']}):",
        f"  a2b {direction_text(summary['a2b'])}",
        f"  b2a {direction_text(summary['b2a'])}",
    ]
    capture = summary.get("capture")
    if capture:
        linktype = summary["linktype"] or "unknown"
        lines.append(f"  capture {capture['path']}: {capture['frames']} frames, {linktype}")
        if capture.get("error"):
            lines.append(f"  capture error: {capture['error']}")
    return "\n".join(lines)
