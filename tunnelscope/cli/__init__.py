"""The `tunnelscope` command: thin click commands over the library API.

Each command lives in its own module and is registered here. Errors the user can fix are one
line on stderr, `tunnelscope: error: ...`, exit status 2, never a traceback: a command raises
`common.Failure`; click's usage errors (bad values, unknown options, missing arguments) are
turned into one line by the root group, `common.OneLineErrors`.
"""

from __future__ import annotations

import click

from tunnelscope import __version__
from tunnelscope.cli import commands
from tunnelscope.cli.common import OneLineErrors


@click.group(
    name="tunnelscope",
    cls=OneLineErrors,
    context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100},
)
@click.version_option(__version__, "-V", "--version", prog_name="tunnelscope")
def cli() -> None:
    """Capture, inspect and impair the UDP tunnels of Dynamips, GNS3, VPCS, QEMU and IOU labs.

    \b
    Shell completion (bash):  eval "$(_TUNNELSCOPE_COMPLETE=bash_source tunnelscope)"
    """


for command in commands.ALL:
    cli.add_command(command)


def main() -> None:
    cli(prog_name="tunnelscope")
