"""`tunnelscope decap IN -w OUT`: the offline tap (the work is in tunnelscope/analysis/decap.py)."""

from __future__ import annotations

import contextlib
import os
import stat
import sys
from collections.abc import Iterator
from dataclasses import asdict
from typing import TYPE_CHECKING, Callable

import click

from tunnelscope.cli.common import Failure, PortSet, echo_json
from tunnelscope.formats.capture import CaptureError
from tunnelscope.formats.linktype import LinkType
from tunnelscope.formats.packet import CaptureFormatError

if TYPE_CHECKING:
    from tunnelscope.analysis.decap import Options, Summary


def decap_options(ports: frozenset[int] | None, linktype: str | None, dedupe: bool) -> Options:
    """decap's --ports (already a set: PortSet), --linktype and --dedupe, shared with sniff."""
    from tunnelscope.analysis.decap import Options

    options = Options(ports=ports, dedupe=dedupe)
    try:
        options.linktype = LinkType.parse(linktype) if linktype is not None else None
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--linktype") from None
    if options.linktype is not None and not options.linktype.is_tunnel_payload:
        raise click.BadParameter("use ethernet, hdlc, ppp or fr", param_hint="--linktype")
    return options


@contextlib.contextmanager
def _progress(source: str) -> Iterator[Callable[[int], None] | None]:
    """A progress bar on stderr when stderr is a terminal (bytes read of the input file)."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        DownloadColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    total = None
    if source != "-":
        with contextlib.suppress(OSError):
            info = os.stat(source)
            total = info.st_size if stat.S_ISREG(info.st_mode) else None
    columns = (TextColumn("decap {task.description}"), BarColumn(), DownloadColumn())
    columns += (TimeRemainingColumn(),)
    with Progress(*columns, console=Console(stderr=True), transient=True) as bar:
        task = bar.add_task(os.path.basename(source) if source != "-" else "stdin", total=total)
        yield lambda done: bar.update(task, completed=done)


@click.command()
@click.argument("source", metavar="IN")
@click.option("-w", "--write", "output", metavar="OUT", help="The pcapng to write (- = stdout).")
@click.option(
    "--split",
    "split_dir",
    metavar="DIR",
    help="Write one classic pcap per link into DIR instead (udp-10001-10002-hdlc.pcap), with "
    "the link's own link type; classic pcap has no direction flags.",
)
@click.option(
    "--ports",
    type=PortSet(),
    metavar="LIST",
    help="Only the links with one of these UDP ports (10001,10002 or 10000-10010); every "
    "such link is taken as a tunnel, whatever it carries.",
)
@click.option(
    "--linktype",
    metavar="TYPE",
    help="Write every link as TYPE (ethernet, hdlc, ppp, fr or a LINKTYPE number) instead of "
    "detecting each link's encapsulation.",
)
@click.option(
    "--dedupe",
    is_flag=True,
    help="Drop the second copy of a frame relayed twice (GNS3 2.x ubridge on loopback): the "
    "same UDP payload on another flow within 50 ms. Broadcasts a switch floods to several "
    "links collapse to the first one too.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
def decap(
    source: str,
    output: str | None,
    split_dir: str | None,
    ports: frozenset[int] | None,
    linktype: str | None,
    dedupe: bool,
    as_json: bool,
) -> None:
    """Pull the lab links out of a host capture of UDP tunnels (IN, or - for stdin).

    IN is what tcpdump or Wireshark recorded on a host running a lab: pcap or pcapng, link
    type Ethernet, Linux cooked (tcpdump -i any, SLL or SLL2) or raw IP, IPv4 or IPv6. Each
    tunnel (a UDP flow and its reverse) whose payloads are L2 frames becomes one link; its
    encapsulation (ethernet, hdlc, ppp, fr) is detected from its first frames. The pcapng
    written has one interface per link, named `udp 10001<->10002 hdlc` (lower end's port
    first), its description holding the full addresses; frames sent from the lower
    address:port end are marked outbound, the others inbound.

    IP fragments (IPv4, IPv6) are reassembled in any order, within 30 s (IPv6: 60 s) of
    capture time, 4 MiB and 4096 pending datagrams; datagrams that cannot be completed
    (a fragment missing or cut by the snaplen, overlapping or malformed fragments, over the
    limits) are counted as lost frames, by reason.

    Left out and counted: other UDP (DNS, NTP and other well-known services, flows whose
    payloads are not L2 frames), what is not UDP.
    A summary goes to stderr (--json: to stdout). Memory stays bounded whatever the size of
    IN; a progress bar shows when stderr is a terminal.

    Exit status 2 with one line `tunnelscope: error: REASON` when IN or OUT cannot be used;
    when IN ends in a damaged record, OUT still holds every frame before it.

    \b
    Examples:
      tcpdump -i any -w host.pcap udp portrange 10000-20000
      tunnelscope decap host.pcap -w lab.pcapng
      tunnelscope decap host.pcap --split links/ --ports 10001,10005
      tunnelscope decap gns3-loopback.pcapng -w lab.pcapng --dedupe
    """
    from tunnelscope.analysis import decap as decapping  # imported here: only this command needs it

    if (output is None) == (split_dir is None):
        raise click.UsageError("give either -w OUT or --split DIR")
    if as_json and output == "-":
        raise click.UsageError("--json prints on stdout, which -w - already uses")
    options = decap_options(ports, linktype, dedupe)
    name = "standard input" if source == "-" else source
    try:
        with _progress(source) as progress:
            summary = decapping.decap(source, output, split_dir, options, progress)
    except CaptureFormatError as exc:
        raise Failure(f"{name}: {exc}") from None
    except CaptureError as exc:
        raise Failure(str(exc)) from None
    except OSError as exc:
        raise Failure(f"{name}: {exc.strerror or exc}") from None
    _report(summary, as_json)


def _report(summary: Summary, as_json: bool) -> None:
    if as_json:
        echo_json(asdict(summary))
        return
    for link in summary.links:
        where = f" -> {link.file}" if link.file else ""
        how = "--linktype" if link.how == "--linktype" else f"confidence {link.confidence:.2f}"
        click.echo(
            f"{link.name}: {link.low} <-> {link.high}, {link.outbound} out + {link.inbound} in "
            f"({how}){where}",
            err=True,
        )
    click.echo(f"decap: {summary.line()}", err=True)
