"""What every command shares: the one-line error and the JSON output."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import IO, Any, TypeVar

import click

F = TypeVar("F", bound=Callable[..., Any])


def capture_at_option(name: str) -> Callable[[F], F]:
    """`--capture-at pre|post|both`, the same on every command that captures a link."""
    from tunnelscope.engine import CAPTURE_POINTS  # the engine is heavy: only when used

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


def echo_json(data: object, file: IO[str] | None = None) -> None:
    json.dump(data, file or sys.stdout, indent=None, sort_keys=False)
    (file or sys.stdout).write("\n")
