"""`tunnelscope extcap`: the program Wireshark runs (and `extcap install` to set it up)."""

from __future__ import annotations

import click

from tunnelscope.analysis.sniff import SniffError
from tunnelscope.cli.common import Failure, PortSet
from tunnelscope.datapath.engine import CAPTURE_POINTS
from tunnelscope.formats.capture import CaptureError
from tunnelscope.lab import extcap as ext


@click.group(invoke_without_command=True)
@click.option("--extcap-interfaces", is_flag=True, help="List the interfaces (Wireshark).")
@click.option("--extcap-version", metavar="VERSION", help="Wireshark's version (ignored).")
@click.option("--extcap-interface", "interface", metavar="IFACE", help="The interface.")
@click.option("--extcap-dlts", is_flag=True, help="The interface's link type.")
@click.option("--extcap-config", is_flag=True, help="The interface's options.")
@click.option("--extcap-reload-option", metavar="OPTION", help="(not used)")
@click.option("--capture", is_flag=True, help="Capture into --fifo.")
@click.option("--fifo", metavar="PATH", help="Where the capture goes.")
@click.option("--extcap-capture-filter", "capture_filter", metavar="EXPR")
@click.option("--extcap-control-in", "control_in", metavar="PATH")
@click.option("--extcap-control-out", "control_out", metavar="PATH")
@click.option("--linktype", default="auto", help="Link type of the capture (link interfaces).")
@click.option("--capture-at", "points", type=click.Choice(CAPTURE_POINTS[:2]), default="pre")
@click.option("--ports", type=PortSet(), metavar="LIST", help="Tunnel ports (tunnelscope-sniff).")
@click.option("--dedupe", is_flag=True, help="Drop ubridge copies (tunnelscope-sniff).")
@click.option("--debug", is_flag=True, hidden=True)
@click.option("--debug-file", hidden=True)
@click.pass_context
def extcap(
    ctx: click.Context,
    extcap_interfaces: bool,
    extcap_version: str | None,
    interface: str | None,
    extcap_dlts: bool,
    extcap_config: bool,
    extcap_reload_option: str | None,
    capture: bool,
    fifo: str | None,
    capture_filter: str | None,
    control_in: str | None,
    control_out: str | None,
    linktype: str,
    points: str,
    ports: frozenset[int] | None,
    dedupe: bool,
    debug: bool,
    debug_file: str | None,
) -> None:
    """Wireshark's extcap program: running tunnelscope links as capture interfaces.

    Install it once with `tunnelscope extcap install`; Wireshark (and `tshark -D`) then list
    one interface per link of every running `serve` (and `bridge` with a stream), plus
    `tunnelscope-sniff`, the passive tap on lo. The toolbar (View > Interface Toolbars)
    changes a served link's loss, freq_drop and delay live.
    """
    if ctx.invoked_subcommand is not None:
        return
    try:
        if extcap_interfaces:
            click.echo(ext.interfaces_text(), nl=False)
        elif interface and extcap_dlts:
            click.echo(ext.dlts_text(interface), nl=False)
        elif interface and extcap_config:
            click.echo(ext.config_text(interface), nl=False)
        elif interface and capture:
            if not fifo:
                raise Failure("--capture needs --fifo PATH")
            args = ext.CaptureArgs(
                interface, fifo, capture_filter, linktype, points, ports, dedupe, control_in,
                control_out,
            )  # fmt: skip
            ext.capture(args)
        else:
            raise Failure(
                "use --extcap-interfaces, or --extcap-interface I with --extcap-dlts,"
                " --extcap-config or --capture (Wireshark does), or `extcap install`"
            )
    except (ext.ExtcapError, SniffError, CaptureError) as exc:
        raise Failure(str(exc)) from None


@extcap.command()
@click.option("--uninstall", is_flag=True, help="Remove the launcher instead.")
@click.option("--folder", metavar="DIR", help="Another extcap folder (default: the personal one).")
def install(uninstall: bool, folder: str | None) -> None:
    """Put the launcher in Wireshark's personal extcap folder (restart Wireshark after)."""
    try:
        if uninstall:
            path = ext.uninstall(folder)
            click.echo(f"removed {path}" if path else "the extcap launcher was not installed")
        else:
            click.echo(f"installed {ext.install(folder)}")
    except ext.ExtcapError as exc:
        raise Failure(str(exc)) from None
