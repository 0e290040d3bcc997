"""The list of subcommands; each module defines one click command."""

from __future__ import annotations

import click

from tunnelscope.cli.bridge import bridge
from tunnelscope.cli.decap import decap
from tunnelscope.cli.decode import decode
from tunnelscope.cli.demo import demo
from tunnelscope.cli.info import info

ALL: list[click.Command] = [bridge, demo, info, decode, decap]
