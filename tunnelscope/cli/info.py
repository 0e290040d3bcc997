"""`tunnelscope info`: which backend runs the data path, and what this machine offers."""

from __future__ import annotations

import platform
import shutil

import click

from tunnelscope import __version__
from tunnelscope.cli.common import echo_json
from tunnelscope.datapath.engine import available_backends, choose_backend
from tunnelscope.datapath.impairments import NAMES
from tunnelscope.decoders.wireshark import choose, find_tshark
from tunnelscope.formats.linktype import TUNNEL_LINKTYPES


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print the facts as JSON.")
def info(as_json: bool) -> None:
    """Show the active backend (C fast path or Python), the dissector `decode`, `compare`
    and the console use by default (Wireshark's through tshark, or the built-in decoders),
    link types, impairments and tools.

    \b
    Examples:
      tunnelscope info
      tunnelscope info --json | jq .backend
      TUNNELSCOPE_BACKEND=python tunnelscope info
    """
    found = find_tshark()
    facts = {
        "version": __version__,
        "backend": choose_backend("auto"),
        "backends": available_backends(),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "dissector": choose("auto"),
        "tshark": {"path": found.path, "version": str(found.version)} if found else None,
        "linktypes": {lt.short_name: int(lt) for lt in TUNNEL_LINKTYPES},
        "impairments": list(NAMES),
        "tools": {tool: shutil.which(tool) for tool in ("tshark", "wireshark", "vpcs", "ubridge")},
    }
    if as_json:
        echo_json(facts)
        return
    click.echo(f"tunnelscope {facts['version']} on Python {facts['python']}")
    click.echo(f"backend: {facts['backend']} (available: {', '.join(facts['backends'])})")
    if found:
        click.echo(f"dissector: {facts['dissector']} (tshark {found.version}, {found.path})")
    else:
        click.echo(f"dissector: {facts['dissector']} (tshark not found)")
    click.echo("link types: " + ", ".join(f"{k} ({v})" for k, v in facts["linktypes"].items()))
    click.echo("impairments: " + ", ".join(facts["impairments"]))
    for tool, where in facts["tools"].items():
        click.echo(f"{tool}: {where or 'not found'}")
