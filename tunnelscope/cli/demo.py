"""`tunnelscope demo`: a two-link lab on loopback, bridged, impaired, captured and decoded."""

from __future__ import annotations

import shutil
import subprocess
import threading
from pathlib import Path

import click

from tunnelscope.cli.common import Failure, direction_text, fit_to_terminal
from tunnelscope.datapath.engine import Engine
from tunnelscope.datapath.impairments import parse_impairment
from tunnelscope.decoders import decode
from tunnelscope.formats.capture import open_capture
from tunnelscope.formats.linktype import LinkType


@click.command()
@click.option(
    "--out",
    "out_dir",
    default="demo-out",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Where the captures go.",
)
@click.option("--backend", type=click.Choice(["auto", "c", "python"]), default="auto")
@click.option(
    "--pings",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="Echo requests per link.",
)
def demo(out_dir: str, backend: str, pings: int) -> None:
    """Run a built-in lab through tunnelscope and show what it captured.

    PC1 and PC2 (Ethernet, like VPCS) and R1 and R2 (Cisco HDLC serial, like dynamips) each
    sit on a UDP tunnel; tunnelscope bridges both links. PC1's side drops every 3rd frame
    (dynamips freq_drop 3): the ping results, the pcapng drop comments and the counters must
    all agree. The serial link's encapsulation is detected, not given.

    \b
    Examples:
      tunnelscope demo
      tunnelscope demo --out /tmp/lab --backend python
    """
    from tunnelscope.demo import EmulatedHost, free_udp_ports  # scapy: only when asked for

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    try:
        engine = Engine(backend)
    except ValueError as exc:
        raise Failure(str(exc)) from None
    ports = free_udp_ports(8)
    lan = engine.add_link(
        "PC1-PC2", f"udp:{ports[1]}:127.0.0.1:{ports[0]}", f"udp:{ports[2]}:127.0.0.1:{ports[3]}"
    )
    serial = engine.add_link(
        "R1-R2", f"udp:{ports[5]}:127.0.0.1:{ports[4]}", f"udp:{ports[6]}:127.0.0.1:{ports[7]}"
    )
    lan.set_impairments([parse_impairment("a2b freq_drop 3")])
    lan.start_capture(str(out / "lan.pcapng"), LinkType.ETHERNET, "both")
    serial.start_capture(str(out / "serial.pcapng"))  # link type detected from the frames
    thread = threading.Thread(target=engine.run, daemon=True)
    thread.start()
    pc1 = EmulatedHost("PC1", "10.0.0.1", ports[0], ports[1], mac="00:50:79:66:68:01")
    pc2 = EmulatedHost("PC2", "10.0.0.2", ports[3], ports[2], mac="00:50:79:66:68:02")
    r1 = EmulatedHost("R1", "10.1.1.1", ports[4], ports[5], encapsulation="hdlc")
    r2 = EmulatedHost("R2", "10.1.1.2", ports[7], ports[6], encapsulation="hdlc")
    try:
        with pc1, pc2, r1, r2:
            click.echo(f"tunnelscope demo ({engine.backend} backend), captures in {out}/")
            lan_result = pc1.ping("10.0.0.2", pings, interval=0.05)
            serial_result = r1.ping("10.1.1.2", pings, interval=0.05)
    finally:
        engine.stop()
        thread.join(5)
        lan_stats = lan.stats()
        engine.close()
    _report("PC1 -> PC2 with a2b freq_drop 3", lan_result, lan_stats)
    _report("R1 -> R2 over Cisco HDLC", serial_result, None)
    for name in ("lan.pcapng", "serial.pcapng"):
        _show_capture(out / name, per_interface=8)
    _decap_demo(
        out, {(ports[0], ports[1]): out / "lan.pcapng", (ports[4], ports[5]): out / "serial.pcapng"}
    )


def _decap_demo(out: Path, lab_captures: dict[tuple[int, int], Path]) -> None:
    """The offline tap: a loopback capture of four tunnels (one per link type), decapsulated."""
    from tunnelscope.analysis.decap import decap as decapsulate
    from tunnelscope.demo import serial_samples, write_host_capture

    links: dict[tuple[int, int], list[tuple[bool, bytes]]] = {}
    for ports, path in lab_captures.items():
        with open_capture(str(path)) as reader:  # what each device sent, at the pre point
            links[ports] = [(int(p.direction) == 2, p.data) for p in reader if p.interface == 0]
    samples = serial_samples()
    links[(30001, 30002)] = samples["ppp"]
    links[(30003, 30004)] = samples["fr"]
    host = out / "host-loopback.pcap"
    write_host_capture(str(host), links)
    summary = decapsulate(str(host), str(out / "links.pcapng"))
    click.echo(f"\ndecap {host} -w {out / 'links.pcapng'}: {summary.line()}")
    for link in summary.links:
        click.echo(
            f"  {link.name:28} {link.linktype:8} confidence {link.confidence:.2f}"
            f"  {link.outbound} out / {link.inbound} in"
        )
    _show_capture(out / "links.pcapng", per_interface=2)


def _report(title: str, result: list[bool], stats: dict | None) -> None:
    marks = " ".join(f"{seq}:{'ok' if ok else 'lost'}" for seq, ok in enumerate(result, 1))
    click.echo(f"\n{title}: {sum(result)}/{len(result)} replies  [{marks}]")
    if stats:
        click.echo(f"  a2b {direction_text(stats['a2b'])}")


def _show_capture(path: Path, per_interface: int = 14) -> None:
    """Decode the first frames of each interface, and let tshark confirm the file."""
    with open_capture(str(path)) as reader:
        packets = list(reader)
        interfaces = reader.interfaces
    linktypes = sorted({LinkType(i.linktype).short_name for i in interfaces})
    click.echo(f"\n{path} ({', '.join(linktypes)}, {len(packets)} frames):")
    shown: dict[int, int] = {}
    for packet in packets:
        if shown.get(packet.interface, 0) >= per_interface:
            continue
        shown[packet.interface] = shown.get(packet.interface, 0) + 1
        name = interfaces[packet.interface].name or path.stem
        arrow = {1: "<", 2: ">"}.get(int(packet.direction), " ")
        note = f"  [{packet.comment}]" if packet.comment else ""
        summary = decode(packet.linktype, packet.data).summary
        click.echo(fit_to_terminal(f"  {name:12} {arrow} {summary}{note}"))
    if len(packets) > sum(shown.values()):
        click.echo(f"  ... {len(packets) - sum(shown.values())} more")
    if shutil.which("tshark"):
        done = subprocess.run(
            ["tshark", "-r", str(path), "-T", "fields", "-e", "frame.protocols"],
            capture_output=True,
            text=True,
            check=False,
        )
        protocols = sorted(set(done.stdout.split()))
        click.echo(f"  tshark reads it: {done.returncode == 0}; protocols: {', '.join(protocols)}")
