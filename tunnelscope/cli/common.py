"""What every command shares: the one-line error and the JSON output."""

from __future__ import annotations

import json
import sys
from typing import IO, Any

import click


class Failure(click.ClickException):
    """Bad input or an unusable resource: one line on stderr, exit status 2, no traceback."""

    exit_code = 2

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"tunnelscope: error: {self.format_message()}", err=True)


def echo_json(data: object, file: IO[str] | None = None) -> None:
    json.dump(data, file or sys.stdout, indent=None, sort_keys=False)
    (file or sys.stdout).write("\n")
