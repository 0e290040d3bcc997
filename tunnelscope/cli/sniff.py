"""`tunnelscope sniff -w OUT`: the live tap (the work is in tunnelscope/analysis/sniff.py)."""

from __future__ import annotations

import signal
import time

import click

from tunnelscope.analysis.sniff import DEFAULT_BUFFER_KIB, PacketRing, Sniffer, SniffError
from tunnelscope.cli.common import COUNT, POSITIVE, Failure, PortSet
from tunnelscope.cli.decap import _report, decap_options
from tunnelscope.formats.capture import CaptureError


@click.command()
@click.option("-i", "--interface", default="lo", show_default=True, help="Where to listen.")
@click.option("-w", "--write", "output", metavar="OUT", help="The pcapng to write (- = stdout).")
@click.option("--split", "split_dir", metavar="DIR", help="One classic pcap per link into DIR.")
@click.option(
    "--ports", type=PortSet(), metavar="LIST", help="Only links with one of these UDP ports."
)
@click.option("--linktype", metavar="TYPE", help="Write every link as TYPE (no detection).")
@click.option("--dedupe", is_flag=True, help="Drop second copies relayed by a ubridge.")
@click.option("--duration", type=POSITIVE, metavar="SECONDS", help="Stop after SECONDS.")
@click.option("-c", "--count", type=COUNT, help="Stop after N tunnel frames.")
@click.option(
    "-B",
    "--buffer-size",
    "buffer_kib",
    type=COUNT,
    default=DEFAULT_BUFFER_KIB,
    show_default=True,
    metavar="KIB",
    help="The kernel's packet ring, in KiB (whole 256 KiB blocks), as tcpdump's -B.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
def sniff(
    interface: str,
    output: str | None,
    split_dir: str | None,
    ports: frozenset[int] | None,
    linktype: str | None,
    dedupe: bool,
    duration: float | None,
    count: int | None,
    buffer_kib: int,
    as_json: bool,
) -> None:
    """Capture lab tunnels live from an interface, without touching the lab.

    What `tcpdump -i lo` followed by `tunnelscope decap` gives, live: each UDP tunnel becomes
    one pcapng interface with its detected link type (options as for `decap`). Packets come
    through a kernel ring (-B) and filter (the --ports, IP fragments), as tcpdump reads them.
    Needs CAP_NET_RAW. Ctrl-C, --duration or -c ends it with every file closed valid; a
    summary goes to stderr.

    \b
    Examples:
      tunnelscope sniff --ports 10000-10010 -w - | wireshark -k -i -
      tunnelscope sniff --dedupe --duration 60 -w gns3.pcapng
      tunnelscope sniff -i eth0 --split links/ -c 1000
    """
    if (output is None) == (split_dir is None):
        raise click.UsageError("give either -w OUT or --split DIR")
    if as_json and output == "-":
        raise click.UsageError("--json prints on stdout, which -w - already uses")
    options = decap_options(ports, linktype, dedupe)
    deadline = time.monotonic() + duration if duration is not None else None
    try:
        ring = PacketRing(interface, buffer_kib, ports, deadline)
    except SniffError as exc:
        raise Failure(str(exc)) from None
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: ring.stop())
    click.echo(f"sniffing on {interface}", err=True)
    try:
        summary = Sniffer(ring, output, split_dir, options, count).run()
    except CaptureError as exc:
        raise Failure(str(exc)) from None
    if ring.kernel_drops:
        click.echo(
            f"tunnelscope: warning: the kernel dropped {ring.kernel_drops} packets before sniff"
            f" read them (its {ring.size_kib} KiB ring was full {ring.ring_full} times;"
            " -B makes it bigger): the capture misses frames",
            err=True,
        )
    _report(summary, as_json)
