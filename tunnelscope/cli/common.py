"""What every command shares: the one-line error and the JSON output."""

from __future__ import annotations

import json
import shutil
import sys
from collections.abc import Callable
from typing import IO, Any, TypeVar

import click

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


class Failure(click.ClickException):
    """Bad input or an unusable resource: one line on stderr, exit status 2, no traceback."""

    exit_code = 2

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"tunnelscope: error: {self.format_message()}", err=True)


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
