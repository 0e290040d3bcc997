"""`tunnelscope serve LAB`: every link of a lab in one process, controlled like ubridge."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import sys
from collections.abc import Callable

import click

from tunnelscope.cli.common import Address, Failure, echo_json
from tunnelscope.datapath.engine import Engine
from tunnelscope.formats.linktype import LinkType
from tunnelscope.lab.control import (
    CONTROL_ENV,
    DEFAULT_CONTROL,
    ControlError,
    Switchboard,
    exposure_warning,
    parse_address,
    run_service,
)
from tunnelscope.lab.labfile import Lab, LabError, load_lab
from tunnelscope.lab.stream import Instance, StreamServer, registered, required_token
from tunnelscope.nio import EndpointError


@click.command()
@click.argument("lab_file", metavar="LAB")
@click.option("--dry-run", is_flag=True, help="Print the port plan and exit.")
@click.option("--json", "as_json", is_flag=True, help="With --dry-run: the plan as JSON.")
@click.option(
    "--control",
    metavar="HOST:PORT",
    type=Address(listen=True),
    envvar=CONTROL_ENV,
    default=DEFAULT_CONTROL,
    show_default=True,
    help="Where the control protocol listens (loopback unless HOST says otherwise; port 0:"
    " any free port, printed).",
)
@click.option(
    "--stream",
    metavar="HOST:PORT",
    type=Address(listen=True, off=True),
    default="127.0.0.1:0",
    show_default=True,
    help="Where live captures are served over TCP (`tunnelscope stream`, the Wireshark extcap,"
    " nc, curl); any other address than loopback requires a token. 'off': none.",
)
@click.option(
    "--stream-token",
    metavar="TOKEN",
    envvar="TUNNELSCOPE_STREAM_TOKEN",
    help="The token stream clients must give (default off loopback: generated, printed).",
)
@click.option(
    "--no-token",
    is_flag=True,
    help="Serve streams off loopback without a token: anyone who reaches them may watch.",
)
@click.option("--captures", metavar="DIR", help="Capture directory (default: the lab's).")
@click.option(
    "--host",
    metavar="NAME",
    help="In a lab spanning hosts: which one this is (its section's name or address); the"
    " links relayed here are run (default: this machine's part).",
)
@click.option("--seed", type=int, help="Seed of the random impairments (link N gets SEED+N).")
@click.option(
    "--backend", type=click.Choice(["auto", "c", "python"]), default="auto", show_default=True
)
@click.option("-v", "--verbose", is_flag=True, help="Log every control request and reply.")
def serve(
    lab_file: str,
    dry_run: bool,
    as_json: bool,
    control: str,
    stream: str,
    stream_token: str | None,
    no_token: bool,
    captures: str | None,
    host: str | None,
    seed: int | None,
    backend: str,
    verbose: bool,
) -> None:
    """Run every link of LAB (a .toml lab file or a Dynagen .net file) in one process.

    tunnelscope opens an endpoint per link end and relays between them; each emulator is
    pointed at tunnelscope instead of at its peer, as the port plan says. A .net file's UDP
    ports are allocated like Dynagen's, from its `udp` base port: two per link end, the
    emulator's, then tunnelscope's.

    While it runs, `capture`, `filter`, `links`, `stats` and `console` talk to it through the
    control port, which speaks ubridge's protocol. Ctrl-C or SIGTERM stops cleanly: captures
    are closed valid.

    \b
    Examples:
      tunnelscope serve labs/two-vpcs.toml --dry-run       # the port plan only
      tunnelscope serve labs/two-vpcs.net --control 127.0.0.1:7300
      tunnelscope serve multiserver.net --host bender   # bender's part of a lab of hosts
      TUNNELSCOPE_CONTROL=127.0.0.1:7300 tunnelscope capture PC1 e0 pc1.pcap
    """
    try:
        whole = load_lab(lab_file, captures)
        lab = whole if dry_run else whole.part(host)
        address = parse_address(control)
        stream_address = None if stream == "off" else parse_address(stream)
        if stream_address:
            required_token(stream_address[0], stream_token, no_token)  # refused: nothing runs
    except (LabError, ValueError) as exc:
        raise Failure(str(exc)) from None
    if dry_run:
        _print_plan(lab, as_json)
        return
    try:
        os.makedirs(lab.captures, exist_ok=True)
    except OSError as exc:
        raise Failure(f"cannot create {lab.captures}: {exc.strerror}") from None
    try:
        engine = Engine(backend)
    except ValueError as exc:
        raise Failure(str(exc)) from None
    switchboard = Switchboard(engine, lab.captures, lab, seed)
    try:
        switchboard.start_lab()
    except (EndpointError, ControlError, LabError, ValueError) as exc:
        switchboard.close()
        engine.close()
        raise Failure(str(exc)) from None
    exits = contextlib.ExitStack()
    streams = None
    if stream_address is not None:
        try:
            streams = StreamServer(
                engine, stream_address, stream_token, _encapsulations(switchboard), no_token
            )
        except OSError as exc:
            switchboard.close()
            engine.close()
            raise Failure(str(exc)) from None
        exits.callback(streams.close)
        streams.start()
        switchboard.stream = (streams.where, streams.token)

    def ready(bound: tuple[str, int]) -> None:
        _print_plan(lab, False)
        where = f"[{bound[0]}]:{bound[1]}" if ":" in bound[0] else f"{bound[0]}:{bound[1]}"
        click.echo(f"captures in {lab.captures}")
        click.echo(f"control on {where}  (export {CONTROL_ENV}={where})")
        if streams is not None:
            token = f"  (token {streams.token})" if streams.token else ""
            click.echo(f"stream on {streams.where}{token}")
            if streams.exposure_warning:
                click.echo(f"tunnelscope: warning: {streams.exposure_warning}", err=True)
        warning = exposure_warning(bound)
        if warning:
            click.echo(f"tunnelscope: warning: {warning}", err=True)
        instance = Instance(
            os.getpid(),
            "serve",
            streams.where if streams else None,
            where,
            streams and streams.token,
            lab.name,
        )
        with contextlib.suppress(OSError):  # no registry: only the extcap misses this instance
            exits.enter_context(registered(instance))
        sys.stdout.flush()

    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: engine.stop())
    try:
        notes = run_service(
            switchboard,
            address,
            on_ready=ready,
            log=(lambda line: click.echo(line, err=True)) if verbose else None,
            on_news=lambda news: click.echo(f"tunnelscope: warning: {news}", err=True),
        )
    except OSError as exc:
        raise Failure(str(exc)) from None
    finally:
        exits.close()  # stream clients and the registration first, while the engine exists
        engine.close()  # closes every link still open, and its capture
    for note in notes:
        click.echo(note)


def _encapsulations(switchboard: Switchboard) -> Callable[[str], LinkType | None]:
    """A link's configured encapsulation (a stream client's default link type)."""

    def lookup(name: str) -> LinkType | None:
        bridge = switchboard.bridges.get(name)
        return bridge.encapsulation if bridge else None

    return lookup


def _print_plan(lab: Lab, as_json: bool) -> None:
    rows = lab.plan()
    if as_json:
        echo_json(
            {
                "lab": lab.name,
                "file": lab.path,
                "captures": lab.captures,
                "hosts": {host: [link.name for link in lab.part(host).links] for host in lab.hosts},
                "links": [
                    {
                        "name": link.name,
                        "ends": [str(end.end) for end in link.ends],
                        "endpoints": [end.endpoint for end in link.ends],
                        "encapsulation": link.encapsulation.short_name
                        if link.encapsulation
                        else None,
                        "impairments": [str(i) for i in link.impairments],
                        "relay": link.relay or None,
                    }
                    for link in lab.links
                ],
                "plan": [dataclasses.asdict(row) for row in rows],
            }
        )
        return
    count = len(lab.links)
    click.echo(f"lab {lab.name} ({lab.path}): {count} link{'s' * (count != 1)}")
    table = [("DEVICE", "INTERFACE", "EMULATOR PORT", "SENDS TO", "CONFIGURE", "LINK")]
    if lab.hosts:
        table = [("HOST", *table[0], "RELAYED ON")]
        rows.sort(key=lambda row: lab.hosts.index(row.host))
    for row in rows:
        port = str(row.emulator_port) if row.emulator_port else "-"
        remote = row.emulator_remote or "-"
        line = (row.device, row.interface, port, remote, row.hint, row.link)
        table.append((row.host, *line, row.relay) if lab.hosts else line)
    widths = [max(len(line[i]) for line in table) for i in range(len(table[0]))]
    for line in table:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(line, widths)).rstrip())
    for host in lab.hosts:
        part = lab.part(host).links
        if not part:
            click.echo(f"on {host}: nothing to relay")
            continue
        command = f"tunnelscope serve {os.path.basename(lab.path)} --host {host}"
        click.echo(f"on {host}: `{command}` relays {', '.join(link.name for link in part)}")
