"""What every command shares: the one-line error, the option types, the JSON output."""

from __future__ import annotations

import contextlib
import json
import math
import shutil
import sys
from collections.abc import Callable, Iterator
from typing import IO, Any, TypeVar

import click

from tunnelscope.lab.control import parse_address

F = TypeVar("F", bound=Callable[..., Any])


def capture_at_option(name: str) -> Callable[[F], F]:
    """`--capture-at pre|post|both`, the same on every command that captures a link."""
    from tunnelscope.datapath.engine import CAPTURE_POINTS  # the engine is heavy: only when used

    return click.option(
        "--capture-at",
        name,
        type=click.Choice(CAPTURE_POINTS),
        default="pre",
        show_default=True,
        help="Before the impairments, after them, or both (pcapng).",
    )


def dissect_option(what: str) -> Callable[[F], F]:
    """`--dissect auto|wireshark|builtin`, the same on every command that shows frames."""
    from tunnelscope.decoders.wireshark import DISSECTORS

    return click.option(
        "--dissect",
        type=click.Choice(DISSECTORS),
        default="auto",
        show_default=True,
        help=f"Whose dissectors {what}: Wireshark's (tshark), the built-in decoders, or "
        "auto: Wireshark's when tshark is installed.",
    )


def dissector_for(choice: str) -> str:
    """ "wireshark" or "builtin" for a --dissect choice; Failure when tshark is missing."""
    from tunnelscope.decoders.wireshark import DissectError, choose

    try:
        return choose(choice)
    except DissectError as exc:
        raise Failure(str(exc)) from None


def error_line(message: str) -> str:
    """`tunnelscope: error: MESSAGE`, on one line whatever MESSAGE holds."""
    return "tunnelscope: error: " + " ".join(message.splitlines())


class Failure(click.ClickException):
    """Bad input or an unusable resource: one line on stderr, exit status 2, no traceback."""

    exit_code = 2

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(error_line(self.format_message()), err=True)


class UsageFailure(click.UsageError):
    """A usage error (bad value, unknown option or command, missing argument) as one line
    that names the command's --help, in place of click's usage block and `Try` line."""

    def show(self, file: IO[Any] | None = None) -> None:
        message = self.format_message().rstrip(".")
        if message[:1].isupper() and message[1:2].islower():  # click's sentences, our style
            message = message[0].lower() + message[1:]
        hint = f" (try '{self.ctx.command_path} --help')" if self.ctx else ""
        click.echo(error_line(message + hint), err=True)


# Shown as they are: ours, and the help click >= 8.2 prints (exit 2) for a bare `tunnelscope`.
_SHOWN_AS_IS = (UsageFailure, getattr(click.exceptions, "NoArgsIsHelpError", UsageFailure))


@contextlib.contextmanager
def _one_line_usage_errors() -> Iterator[None]:
    try:
        yield
    except click.UsageError as exc:
        if isinstance(exc, _SHOWN_AS_IS):
            raise
        raise UsageFailure(exc.format_message(), exc.ctx) from None


class OneLineErrors(click.Group):
    """The root group: a usage error anywhere below it, from click's parser or from a
    command, is shown as one line (`tunnelscope: error: ... (try '... --help')`), exit 2."""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        with _one_line_usage_errors():
            return super().make_context(info_name, args, parent, **extra)

    def invoke(self, ctx: click.Context) -> Any:
        with _one_line_usage_errors():
            return super().invoke(ctx)


# --- option types: values are checked while the command line is parsed, before any file or
# socket is opened, so a bad value is a usage error and leaves nothing behind. ---------------


class FiniteFloat(click.FloatRange):
    """A FloatRange that also refuses nan and infinity (nan passes every comparison)."""

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        number = super().convert(value, param, ctx)
        if not math.isfinite(number):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        return number


POSITIVE = FiniteFloat(min=0, min_open=True)  # durations, rates, intervals
NON_NEGATIVE = FiniteFloat(min=0)
COUNT = click.IntRange(min=1)


class Address(click.ParamType):
    """`HOST:PORT`, `[V6]:PORT` or `PORT` (loopback), as `parse_address` reads it. A listening
    address may use port 0 (any free port); `off` where the service can be turned off; `named`
    takes a `NAME=` prefix (a host of a lab spanning hosts). The value stays the text given: the
    control and stream clients take it so."""

    name = "address"

    def __init__(self, listen: bool = False, off: bool = False, named: bool = False) -> None:
        self.listen, self.off, self.named = listen, off, named

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if self.off and value == "off":
            return value
        try:
            _, port = parse_address(value.rpartition("=")[2] if self.named else value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)
        if port == 0 and not self.listen:
            self.fail(f"{value!r}: ports run from 1 to 65535", param, ctx)
        return value


class PortSet(click.ParamType):
    """`10001,10002` or `10000-10010` (mixed freely) -> the set of UDP ports."""

    name = "ports"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if isinstance(value, frozenset):
            return value
        ports: set[int] = set()
        for item in value.replace(" ", "").split(","):
            first, _, last = item.partition("-")
            try:
                low, high = int(first), int(last or first)
            except ValueError:
                self.fail(f"{item!r} is not a port or a range such as 10000-10010", param, ctx)
            if not 1 <= low <= high <= 65535:
                self.fail(f"{item!r}: ports run from 1 to 65535, low to high", param, ctx)
            ports.update(range(low, high + 1))
        return frozenset(ports)


def direction_text(stats: dict[str, Any]) -> str:
    """One direction's counters as a line: `received 30 forwarded 20 dropped 10 (freq_drop 10)`."""
    text = f"received {stats['received']} forwarded {stats['forwarded']}"
    dropped = stats["dropped"]
    if dropped:
        causes = ", ".join(f"{cause} {n}" for cause, n in sorted(dropped.items()))
        text += f" dropped {sum(dropped.values())} ({causes})"
    for key in ("corrupted", "duplicated", "reordered", "queued", "send_errors"):
        if stats.get(key):
            text += f" {key} {stats[key]}"
    return text


def fit_to_terminal(line: str) -> str:
    """`line` cut to the terminal's width at a word boundary, with an ellipsis; uncut when
    standard output is not a terminal (a pipe or a file gets every character)."""
    if not sys.stdout.isatty():
        return line
    width = shutil.get_terminal_size().columns
    if len(line) <= width:
        return line
    cut = line.rfind(" ", 0, width)
    return line[: cut if cut > width // 2 else width - 1].rstrip() + "\u2026"


def echo_json(data: object, file: IO[str] | None = None) -> None:
    json.dump(data, file or sys.stdout, indent=None, sort_keys=False)
    (file or sys.stdout).write("\n")
