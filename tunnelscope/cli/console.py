"""`tunnelscope console`: Dynagen's interactive console, on a running `tunnelscope serve`.

Every command is a request on the control protocol; nothing typed here reaches a shell or
Python. Device and interface names complete with Tab (readline), history is kept.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from typing import Any

import click
from rich.console import Console

from tunnelscope.analysis.protocols import SAMPLE_FRAMES, SAMPLE_SECONDS, sample_links
from tunnelscope.cli.common import Failure
from tunnelscope.cli.labverbs import (
    connect,
    connect_stream,
    control_option,
    link_title,
    links_table,
    protocols_table,
    stats_table,
    stream_capture,
    stream_request,
)
from tunnelscope.datapath.impairments import NAMES
from tunnelscope.decoders.wireshark import choose
from tunnelscope.lab.control import Code, ControlError, ControlUnavailable, tokenize
from tunnelscope.lab.hosts import LabHosts
from tunnelscope.lab.stream import StreamedCapture

PROMPT = "=> "  # Dynagen's
MAX_SAMPLE_SECONDS = 30
LINKTYPES = ("ETH", "HDLC", "PPP", "FR")
DIRECTIONS = ("in", "out", "both")
HELP = {
    "list": ("list", "the links: ends, endpoints, encapsulation, filters, captures"),
    "show": ("show [DEVICE]", "the lab, or the interfaces of DEVICE"),
    "capture": (
        "capture DEVICE INTERFACE FILE [ETH|HDLC|PPP|FR]",
        "capture into FILE in the lab's captures directory (link type detected if omitted)",
    ),
    "no": ("no capture DEVICE INTERFACE", "stop that capture"),
    "filter": (
        "filter DEVICE INTERFACE TYPE in|out|both [ARGS]...  |  filter DEVICE INTERFACE none",
        f"impair what DEVICE receives (in), sends (out) or both; TYPE: {', '.join(NAMES)}",
    ),
    "stats": (
        "stats  |  stats protocols [SECONDS]",
        "counters, rates, drops and captures of every link; or the protocols each link"
        f" carries, from a live sample (SECONDS, default {SAMPLE_SECONDS:g}, at most"
        f" {SAMPLE_FRAMES} frames a link)",
    ),
    "help": ("help [COMMAND]", "this text"),
    "exit": ("exit | quit | Ctrl-D", "leave the console; the lab keeps running"),
}


class ConsoleSession:
    """Reads commands, sends requests, prints replies; one session per console."""

    def __init__(self, client: LabHosts, console: Console) -> None:
        self.client = client
        self.out = console
        self.devices = client.devices()
        self.streamed: dict[tuple[str, str], StreamedCapture] = {}  # links of other hosts
        self.handlers: dict[str, Callable[[list[str]], None]] = {
            "list": self._list,
            "show": self._show,
            "capture": self._capture,
            "no": self._no,
            "filter": self._filter,
            "stats": self._stats,
            "help": self._help,
            "?": self._help,
        }

    def run_line(self, line: str) -> bool:
        """Do one command line; False when the session should end."""
        if line.lstrip().startswith("!"):
            self.out.print("error: there is no shell escape here")
            return True
        try:
            words = tokenize(line)
        except ControlError as exc:
            self.out.print(f"error: {exc.text}")
            return True
        if not words:
            return True
        if words[0] in ("exit", "quit"):
            return False
        handler = self.handlers.get(words[0])
        if handler is None:
            self.out.print(f"error: unknown command {words[0]!r} (try help)")
            return True
        try:
            handler(words[1:])
        except ControlError as exc:
            self.out.print(f"error: {exc.text}")
        return True

    def _ask(self, *words: str) -> list[str]:
        return self.client.request(*words)

    def _list(self, args: list[str]) -> None:
        self._usage(args, 0, 0, "list")
        self.out.print(links_table(self.client.links()))

    def _show(self, args: list[str]) -> None:
        self._usage(args, 0, 1, "show")
        if not args:
            for line in self._ask("lab", "show")[:-1]:
                self.out.print(line)
            return
        device = args[0]
        if device not in self.devices:
            raise ControlError(
                Code.UNK_OBJ, f"unknown device {device!r} (devices: {', '.join(self.devices)})"
            )
        for link in self.client.links():
            ends = link.get("ends") or []
            for side, end in enumerate(ends):
                if end.split()[0] == device:
                    self.out.print(_interface_line(end, link, side))

    def _capture(self, args: list[str]) -> None:
        self._usage(args, 3, 4, "capture")
        linktype = args[3] if len(args) == 4 else "auto"
        remote = self.client.remote_stream(args[0], args[1])
        if remote is None:
            self.out.print(self._ask("lab", "capture", *args[:3], linktype)[-1])
            return
        key = (args[0], args[1])
        if key in self.streamed and self.streamed[key].running:
            raise ControlError(Code.START, f"{args[0]} {args[1]} is already being captured here")
        host, address, link, token = remote
        try:
            request = stream_request(link, token, linktype, "post", args[2].endswith(".pcapng"))
            self.streamed[key] = stream_capture(address, request, args[2])
        except Failure as exc:
            raise ControlError(Code.FILE, exc.format_message()) from None
        self.out.print(
            f"capturing {args[0]} {args[1]} (relayed on {host.name}) into {args[2]} here"
        )

    def _no(self, args: list[str]) -> None:
        if not args or args[0] != "capture":
            raise ControlError(Code.UNK_CMD, "usage: no capture DEVICE INTERFACE")
        self._usage(args[1:], 2, 2, "no")
        streamed = self.streamed.pop((args[1], args[2]), None)
        if streamed is None:
            self.out.print(self._ask("lab", "stop_capture", *args[1:])[-1])
            return
        streamed.stop()
        self.out.print(f"stopped: {streamed.bytes} bytes in {streamed.path}")

    def close(self) -> None:
        """Streams into files here end with the console; the lab goes on."""
        for streamed in self.streamed.values():
            streamed.stop()

    def _filter(self, args: list[str]) -> None:
        self._usage(args, 3, 14, "filter")
        self.out.print(self._ask("lab", "filter", *args)[-1])

    def _stats(self, args: list[str]) -> None:
        self._usage(args, 0, 2, "stats")
        if not args:
            self.out.print(stats_table(self.client.links()))
            return
        if args[0] != "protocols":
            raise ControlError(Code.UNK_CMD, "usage: stats  |  stats protocols [SECONDS]")
        try:
            seconds = float(args[1]) if len(args) == 2 else SAMPLE_SECONDS
        except ValueError:
            seconds = -1.0
        if not 0 < seconds <= MAX_SAMPLE_SECONDS:
            raise ControlError(
                Code.INV_PARAM, f"SECONDS must be above 0 and at most {MAX_SAMPLE_SECONDS}"
            )
        dissector = choose("auto")
        sources: dict[str, Any] = {}
        try:
            for link in self.client.links():
                ends = link.get("ends") or []
                if not ends or not link.get("stats"):
                    continue
                device, interface = ends[0].split(" ", 1)
                _, address, name, token = self.client.stream_source(device, interface)
                request = stream_request(name, token, None, "pre", False)
                sources[link_title(link)] = connect_stream(address, request)
        except (Failure, ControlError) as exc:
            for sock in sources.values():
                sock.close()
            text = exc.format_message() if isinstance(exc, Failure) else exc.text
            raise ControlError(Code.FILE, text) from None
        self.out.print(f"sampling {len(sources)} links for {seconds:g} s ({dissector})")
        tallies = sample_links(sources, dissector, seconds, SAMPLE_FRAMES)
        self.out.print(protocols_table(tallies))

    def _help(self, args: list[str]) -> None:
        topics = [a for a in args if a in HELP] or list(HELP)
        for topic in topics:
            usage, text = HELP[topic]
            self.out.print(f"{usage}\n    {text}", highlight=False, markup=False)

    @staticmethod
    def _usage(args: list[str], low: int, high: int, command: str) -> None:
        if not low <= len(args) <= high:
            raise ControlError(Code.BAD_PARAM, f"usage: {HELP[command][0]}")

    # -- completion -------------------------------------------------------------------------

    def candidates(self, before: list[str], text: str) -> list[str]:
        """Words that may follow `before` (the complete words typed so far) and start `text`."""
        options: tuple[str, ...] | list[str] = ()
        position = len(before)
        command = before[0] if before else ""
        if position == 0:
            options = [*HELP, "quit"]
        elif command == "no":
            options = {1: ["capture"], 2: list(self.devices)}.get(position, ())
            options = self._interfaces(before, 2) if position == 3 else options
        elif command in ("capture", "filter", "show") and position == 1:
            options = list(self.devices)
        elif command in ("capture", "filter") and position == 2:
            options = self._interfaces(before, 1)
        elif command == "capture" and position == 4:
            options = LINKTYPES
        elif command == "filter" and position == 3:
            options = (*NAMES, "none")
        elif command == "filter" and position == 4 and before[3] != "none":
            options = DIRECTIONS
        elif command == "help" and position == 1:
            options = list(HELP)
        return [option for option in options if option.startswith(text)]

    def _interfaces(self, before: list[str], index: int) -> list[str]:
        return self.devices.get(before[index], []) if len(before) > index else []


def _interface_line(end: str, link: dict[str, Any], side: int) -> str:
    ends = link["ends"]
    capture = link.get("capture")
    parts = [
        f"{end}: to {ends[1 - side]} via {link['endpoints'][side]}",
        f"encapsulation {link.get('encapsulation') or 'auto'}",
        "running" if link["running"] else "stopped",
    ]
    filters = ", ".join(f"{f['direction']} {f['impairment']}" for f in link["filters"])
    if filters:
        parts.append(f"filters {filters}")
    if capture:
        parts.append(f"capture {capture['path']} ({capture['frames']} frames)")
    return f"{parts[0]} ({link_title(link)}); " + "; ".join(parts[1:])


@contextlib.contextmanager
def _readline(session: ConsoleSession, history: str | None) -> Any:
    """Tab completion and history when readline exists (it does not everywhere)."""
    try:
        import readline
    except ImportError:
        yield
        return

    def complete(text: str, state: int) -> str | None:
        line = readline.get_line_buffer()
        before = line[: readline.get_begidx()].split()
        matches = session.candidates(before, text)
        return matches[state] + " " if state < len(matches) else None

    readline.set_completer_delims(" \t\n")
    readline.set_completer(complete)
    if "libedit" in (readline.__doc__ or ""):
        readline.parse_and_bind("bind ^I rl_complete")
    else:
        readline.parse_and_bind("tab: complete")
    path = os.path.expanduser(history) if history else None
    if path and os.path.exists(path):
        with contextlib.suppress(OSError):
            readline.read_history_file(path)
    try:
        yield
    finally:
        readline.set_completer(None)
        if path:
            with contextlib.suppress(OSError):
                readline.set_history_length(1000)
                readline.write_history_file(path)


@click.command()
@click.option(
    "--history",
    default="~/.tunnelscope_history",
    show_default=True,
    metavar="FILE",
    help="Command history file ('' keeps none).",
)
@control_option
def console(history: str, control: tuple[str, ...]) -> None:
    """An interactive console on the running lab, in Dynagen's style.

    list, show, capture / no capture, filter, stats, help; Tab completes commands, device and
    interface names. No shell escape, no Python: only these commands exist.

    \b
    Examples:
      tunnelscope console
      => capture R1 s1/0 r1.cap HDLC
      => filter R1 s1/0 freq_drop in 50
      => no capture R1 s1/0
    """
    with connect(control) as client:
        try:
            session = ConsoleSession(client, Console(highlight=False))
        except (ControlError, ControlUnavailable) as exc:
            raise Failure(str(exc)) from None
        click.echo(f"tunnelscope console on {client.address}: help lists the commands")
        with _readline(session, history or None), contextlib.closing(session):
            while True:
                try:
                    line = input(PROMPT)
                except EOFError:
                    click.echo()
                    break
                except KeyboardInterrupt:
                    click.echo()
                    continue
                try:
                    if not session.run_line(line):
                        break
                except ControlUnavailable as exc:
                    click.echo(f"error: {exc}", err=True)
                    break
