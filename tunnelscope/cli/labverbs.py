"""Dynagen's verbs against a running `tunnelscope serve`: capture, filter, links, stats.

Each command is one or two requests on the control protocol (docs/control.md); the served
process does the work, so a verb can never leave the lab half-configured.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import socket
import sys
import time
from collections.abc import Callable
from typing import Any, TypeVar

import click
from rich.console import Console
from rich.live import Live
from rich.table import Table

from tunnelscope.analysis.protocols import Tally
from tunnelscope.cli.common import COUNT, POSITIVE, Address, Failure, echo_json
from tunnelscope.cli.stream import to_file, to_wireshark
from tunnelscope.datapath.engine import CAPTURE_POINTS
from tunnelscope.lab.control import CONTROL_ENV, DEFAULT_CONTROL, ControlError, ControlUnavailable
from tunnelscope.lab.hosts import LabHosts
from tunnelscope.lab.stream import Request, StreamedCapture, StreamError, tunnel_linktype
from tunnelscope.lab.stream import connect as open_stream

F = TypeVar("F", bound=Callable[..., Any])
T = TypeVar("T")


def control_option(function: F) -> F:
    return click.option(
        "--control",
        metavar="[NAME=]HOST:PORT",
        type=Address(named=True),
        envvar=CONTROL_ENV,
        multiple=True,
        default=[DEFAULT_CONTROL],
        show_default=True,
        help="The control address of the running `tunnelscope serve`; several (repeated, or"
        f" blank-separated in ${CONTROL_ENV}) for a lab spanning hosts, one per host.",
    )(function)


def connect(control: tuple[str, ...]) -> LabHosts:
    try:
        return LabHosts(list(control))
    except (ControlUnavailable, ValueError) as exc:
        raise Failure(str(exc)) from None


def ask(client: LabHosts, *words: str) -> list[str]:
    """One request; an error reply or a lost connection is the command's one-line error."""
    try:
        return client.request(*words)
    except (ControlError, ControlUnavailable, ValueError) as exc:
        raise Failure(str(exc)) from None


def fetch_links(client: LabHosts) -> list[dict[str, Any]]:
    try:
        return client.links()
    except (ControlError, ControlUnavailable) as exc:
        raise Failure(str(exc)) from None


@click.command()
@click.argument("device")
@click.argument("interface")
@click.argument("file", required=False)
@click.argument("linktype", required=False, metavar="[ETH|HDLC|PPP|FR]")
@click.option("--stop", is_flag=True, help="Stop the capture on DEVICE INTERFACE.")
@click.option(
    "--at",
    "point",
    type=click.Choice(CAPTURE_POINTS),
    default="post",
    show_default=True,
    help="post: frames as delivered (Dynagen, ubridge); pre: as received, drops marked"
    " in pcapng; both: two pcapng interfaces.",
)
@click.option("--pcapng", is_flag=True, help="Write pcapng whatever FILE is called.")
@click.option(
    "--remote-file",
    is_flag=True,
    help="A link another host relays: write FILE there, in its captures directory (default:"
    " streamed here, into FILE, until Ctrl-C).",
)
@click.option(
    "--wireshark",
    is_flag=True,
    help="Watch the link live in Wireshark instead of writing FILE, wherever it is relayed.",
)
@control_option
def capture(
    device: str,
    interface: str,
    file: str | None,
    linktype: str | None,
    stop: bool,
    point: str,
    pcapng: bool,
    remote_file: bool,
    wireshark: bool,
    control: tuple[str, ...],
) -> None:
    """Capture the link on DEVICE INTERFACE into FILE, in the lab's captures directory.

    The encapsulation is detected from the first frames when LINKTYPE is omitted. FILE is
    relative to the captures directory of the served lab; names leaving it are refused. In a
    lab spanning hosts (one --control per host), a link another host relays is streamed from
    it into FILE here until Ctrl-C, or written there with --remote-file. FILE - and
    --wireshark watch the link live (served by `serve --stream`) on stdout or in Wireshark.

    \b
    Examples:
      tunnelscope capture R1 s1/0 r1.cap HDLC
      tunnelscope capture R1 f0/0 r1.pcapng --at both
      tunnelscope capture R2 s1/0 --wireshark         # wherever R2 s1/0 is relayed
      tunnelscope capture R1 s1/0 - | tshark -r -
      tunnelscope capture --stop R1 s1/0
    """
    with connect(control) as client:
        if stop:
            if file or linktype:
                raise Failure("capture --stop takes DEVICE INTERFACE only")
            click.echo(ask(client, "lab", "stop_capture", device, interface)[-1])
            return
        if wireshark and file:
            raise Failure("capture --wireshark takes no FILE")
        if not (file or wireshark):
            raise Failure("give the capture FILE, - or --wireshark (or --stop)")
        if wireshark or file == "-":
            _, address, link, token = _source(client.stream_source, device, interface)
        else:
            remote = None if remote_file else _source(client.remote_stream, device, interface)
            if remote is None:
                words = [file, linktype or "auto", point] + (["pcapng"] if pcapng else [])
                click.echo(ask(client, "lab", "capture", device, interface, *words)[-1])
                return
            host, address, link, token = remote
    pcapng = pcapng or wireshark or (file or "").endswith(".pcapng")
    request = stream_request(link, token, linktype, point, pcapng)
    if file is None or file == "-":
        with connect_stream(address, request) as sock:
            to_wireshark(sock) if wireshark else to_file(sock, "-")
        return
    streamed = stream_capture(address, request, file)
    click.echo(f"capturing {device} {interface} (relayed on {host.name}) into {file}; Ctrl-C stops")
    signal.signal(signal.SIGTERM, lambda *_: streamed.stop())
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C ends the capture, not the lab
        streamed.wait()
    streamed.stop()
    if streamed.error:
        raise Failure(f"{file}: {streamed.error}")
    click.echo(f"stopped: {streamed.bytes} bytes in {file}")


def _source(find: Callable[[str, str], T], device: str, interface: str) -> T:
    """Where a link's live stream is (LabHosts.stream_source or remote_stream), or Failure."""
    try:
        return find(device, interface)
    except (ControlError, ControlUnavailable, ValueError) as exc:
        raise Failure(str(exc)) from None


def stream_request(
    link: str, token: str | None, linktype: str | None, point: str, pcapng: bool
) -> Request:
    """The stream request for a console's capture (pcapng always for `--at both`)."""
    try:
        return Request(
            link=link,
            points=point,
            pcapng=pcapng or point == "both",
            linktype=tunnel_linktype(linktype) if linktype and linktype != "auto" else None,
            token=token,
        )
    except StreamError as exc:
        raise Failure(str(exc)) from None


def connect_stream(address: str, request: Request) -> socket.socket:
    try:
        return open_stream(address, request)
    except StreamError as exc:
        raise Failure(str(exc)) from None


def stream_capture(address: str, request: Request, path: str) -> StreamedCapture:
    """A capture of a link another host relays, streamed into `path` here."""
    try:
        return StreamedCapture(address, request, path)
    except StreamError as exc:
        raise Failure(str(exc)) from None


@click.command(name="filter", context_settings={"ignore_unknown_options": True})
@click.argument("device")
@click.argument("interface")
@click.argument("words", nargs=-1, required=True, metavar="TYPE in|out|both [ARGS]... | none")
@control_option
def filter_(device: str, interface: str, words: tuple[str, ...], control: tuple[str, ...]) -> None:
    """Set an impairment on DEVICE INTERFACE, as Dynagen's `filter` did; `none` removes them.

    in, out and both are the directions as DEVICE sees them: in is what it receives. Every
    impairment works (freq_drop, packet_loss, burst_loss, delay, rate, corrupt, duplicate,
    reorder); setting the same one again in the same direction replaces it.

    \b
    Examples:
      tunnelscope filter R1 s1/0 freq_drop in 50      # drop every 50th frame R1 receives
      tunnelscope filter R1 s1/0 delay both 20 5
      tunnelscope filter R1 s1/0 none
    """
    with connect(control) as client:
        click.echo(ask(client, "lab", "filter", device, interface, *words)[-1])


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the links as JSON.")
@control_option
def links(as_json: bool, control: tuple[str, ...]) -> None:
    """List the served links: ends, endpoints, encapsulation, rates, drops, captures.

    \b
    Examples:
      tunnelscope links
      tunnelscope links --json | jq '.[].capture'
    """
    with connect(control) as client:
        data = fetch_links(client)
    if as_json:
        echo_json(data)
        return
    _console().print(links_table(data))


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print one snapshot as JSON and exit.")
@click.option("--count", type=COUNT, metavar="N", help="Stop after N refreshes.")
@click.option("--interval", type=POSITIVE, default=1.0, show_default=True, help="Seconds.")
@control_option
def stats(as_json: bool, count: int | None, interval: float, control: tuple[str, ...]) -> None:
    """Show every link's per-direction rates, drops by cause and capture state, live.

    \b
    Examples:
      tunnelscope stats                   # refreshes every second; Ctrl-C quits
      tunnelscope stats --json | jq '.[] | {name, rates}'
    """
    with connect(control) as client:
        if as_json:
            echo_json(fetch_links(client))
            return
        console = _console()
        shown = 0
        try:
            with Live(
                stats_table(fetch_links(client)), console=console, auto_refresh=False
            ) as live:
                while count is None or shown < count:
                    live.update(stats_table(fetch_links(client)), refresh=True)
                    shown += 1
                    if count is None or shown < count:
                        time.sleep(interval)
        except KeyboardInterrupt:
            pass


# --- tables, shared with the console ----------------------------------------------------------


def _console() -> Console:
    """Wide enough not to wrap when the output is a pipe or a file."""
    width = None if sys.stdout.isatty() else max(shutil.get_terminal_size().columns, 200)
    return Console(width=width, highlight=False)


def link_title(link: dict[str, Any]) -> str:
    ends = link.get("ends")
    return f"{ends[0]} -- {ends[1]}" if ends else link["name"]


def _rate(link: dict[str, Any], direction: str, key: str = "forwarded") -> str:
    value = link.get("rates", {}).get(direction, {}).get(key)
    return "-" if value is None else f"{value:.1f}"


def _drops(stats: dict[str, Any] | None) -> str:
    if not stats:
        return "-"
    dropped = stats["dropped"]
    if not dropped:
        return "0"
    causes = ", ".join(f"{cause} {n}" for cause, n in sorted(dropped.items()))
    return f"{sum(dropped.values())} ({causes})"


def _capture(link: dict[str, Any]) -> str:
    capture = link.get("capture")
    if not capture:
        return "-"
    if capture.get("pending"):
        return f"{capture['path']} (starts with the link)"
    return f"{capture['path']} ({capture['frames']} frames, {capture['point']})"


def _hosts(data: list[dict[str, Any]]) -> bool:
    """Links of several hosts: tables get a HOST column."""
    return any("host" in link for link in data)


def _unreachable(table: Table, link: dict[str, Any]) -> bool:
    """A host that did not answer: one row saying so."""
    if "unreachable" not in link:
        return False
    cells = [link["host"], f"unreachable: {link['unreachable']}"]
    table.add_row(*cells, *[""] * (len(table.columns) - 2))
    return True


def links_table(data: list[dict[str, Any]]) -> Table:
    table = Table(box=None, pad_edge=False)
    columns = ("LINK", "ENDPOINTS", "ENCAP", "FILTERS", "FWD/S A>B", "FWD/S B>A", "DROPS")
    for column in ("HOST", *columns, "CAPTURE") if _hosts(data) else (*columns, "CAPTURE"):
        table.add_column(column)
    for link in data:
        if _unreachable(table, link):
            continue
        stats = link.get("stats") or {}
        drops = [_drops(stats.get(d)) for d in ("a2b", "b2a")] if stats else ["stopped"]
        host = [link["host"]] if "host" in link else []
        table.add_row(
            *host,
            link_title(link),
            "\n".join(link["endpoints"]),
            link.get("encapsulation") or "auto",
            "\n".join(f"{f['direction']} {f['impairment']}" for f in link["filters"]) or "-",
            _rate(link, "a2b"),
            _rate(link, "b2a"),
            " / ".join(drops),
            _capture(link),
        )
    return table


def protocols_table(tallies: list[Tally]) -> Table:
    """The console's `stats protocols`: per link, its sampled frames per protocol."""
    table = Table(box=None, pad_edge=False, title=time.strftime("%H:%M:%S"), title_justify="left")
    for column in ("LINK", "FRAMES", "PROTOCOLS"):
        table.add_column(column, justify="right" if column == "FRAMES" else "left")
    for tally in tallies:
        words = ", ".join(f"{protocol} {n}" for protocol, n in tally.protocols.most_common())
        if tally.undissected:
            words += f" (+{tally.undissected} not dissected: tshark behind)"
        if tally.error:
            words = f"error: {tally.error}"
        table.add_row(tally.link, str(tally.frames), words or "-")
    return table


def stats_table(data: list[dict[str, Any]]) -> Table:
    table = Table(box=None, pad_edge=False, title=time.strftime("%H:%M:%S"), title_justify="left")
    columns = ("LINK", "DIRECTION", "RX/S", "FWD/S", "RECEIVED", "FORWARDED", "DROPPED", "QUEUED")
    for column in ("HOST", *columns, "CAPTURE") if _hosts(data) else (*columns, "CAPTURE"):
        table.add_column(column, justify="right" if column.endswith(("/S", "ED")) else "left")
    for link in data:
        if _unreachable(table, link):
            continue
        host = [link["host"]] if "host" in link else []
        stats = link.get("stats")
        if not stats:
            table.add_row(*host, link_title(link), "stopped", *["-"] * 6, _capture(link))
            continue
        ends = link.get("ends") or ["a", "b"]
        for direction, (src, dst) in (("a2b", ends), ("b2a", ends[::-1])):
            counters = stats[direction]
            table.add_row(
                *(host if direction == "a2b" else [""] * len(host)),
                link_title(link) if direction == "a2b" else "",
                f"{src} > {dst}",
                _rate(link, direction, "received"),
                _rate(link, direction),
                str(counters["received"]),
                str(counters["forwarded"]),
                _drops(counters),
                str(counters["queued"]),
                _capture(link) if direction == "a2b" else "",
            )
    return table
