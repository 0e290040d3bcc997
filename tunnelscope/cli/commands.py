"""The list of subcommands; each module defines one click command."""

from __future__ import annotations

import click

from tunnelscope.cli import console, hypervisor, labverbs, serve
from tunnelscope.cli.blast import blast
from tunnelscope.cli.bridge import bridge
from tunnelscope.cli.compare import compare_command
from tunnelscope.cli.decap import decap
from tunnelscope.cli.decode import decode
from tunnelscope.cli.demo import demo
from tunnelscope.cli.extcap import extcap
from tunnelscope.cli.info import info
from tunnelscope.cli.probe import probe
from tunnelscope.cli.sink import sink
from tunnelscope.cli.sniff import sniff
from tunnelscope.cli.stream import stream

ALL: list[click.Command] = [bridge, demo, info, decode, decap, blast, sink, probe]
ALL += [serve.serve, hypervisor.hypervisor, labverbs.capture, labverbs.filter_, labverbs.links]
ALL += [labverbs.stats, console.console]
ALL += [compare_command]
ALL += [stream, sniff, extcap]
