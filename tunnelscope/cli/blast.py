"""`tunnelscope blast NIO`: numbered test frames into a tunnel, paced or flat out.

Also home of the framing options `probe` shares (`framing_options`, `open_factory`).
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Callable
from typing import Any

import click

from tunnelscope.analysis.traffic import FRAMINGS, FrameFactory, Framing
from tunnelscope.analysis.traffic import blast as run_blast
from tunnelscope.cli.common import COUNT, POSITIVE, Failure, echo_json
from tunnelscope.nio import Endpoint, EndpointError, open_endpoint

_DEFAULTS = Framing()
STREAM_ID = click.IntRange(0, 2**32 - 1)  # the probe header's 32-bit field


def framing_options(command: Callable[..., Any]) -> Callable[..., Any]:
    """--frame, --size and the addresses that go into the frames."""
    options = [
        click.option(
            "--frame",
            type=click.Choice(FRAMINGS),
            default="ethernet",
            show_default=True,
            help="ethernet = raw, ethertype 0x88B5 (switched paths); ipv4 = IPv4/UDP over "
            "Ethernet (routed paths); hdlc, ppp, fr = IPv4/UDP over a serial link.",
        ),
        click.option(
            "--size",
            type=click.IntRange(min=1),
            help="Frame size in bytes, L2 header included [default: 64, or the smallest the "
            "framing allows].",
        ),
        click.option("--src-mac", default=_DEFAULTS.src_mac, show_default=True),
        click.option("--dst-mac", default=_DEFAULTS.dst_mac, show_default=True),
        click.option("--src-ip", default=_DEFAULTS.src_ip, show_default=True),
        click.option("--dst-ip", default=_DEFAULTS.dst_ip, show_default=True),
        click.option(
            "--sport", type=click.IntRange(0, 65535), default=_DEFAULTS.sport, show_default=True
        ),
        click.option(
            "--dport", type=click.IntRange(0, 65535), default=_DEFAULTS.dport, show_default=True
        ),
        click.option(
            "--ttl", type=click.IntRange(1, 255), default=_DEFAULTS.ttl, show_default=True
        ),
        click.option(
            "--dlci",
            type=click.IntRange(0, 1023),
            default=_DEFAULTS.dlci,
            show_default=True,
            help="Frame Relay DLCI.",
        ),
        click.option("--stream", type=STREAM_ID, help="Stream id [default: random]."),
    ]
    for option in reversed(options):
        command = option(command)
    return command


def open_factory(options: dict[str, Any]) -> FrameFactory:
    """The FrameFactory the framing options describe (they are popped from `options`)."""
    try:
        framing = Framing(
            options.pop("frame"),
            **{key: options.pop(key) for key in ("src_mac", "dst_mac", "src_ip", "dst_ip")},
            **{key: options.pop(key) for key in ("sport", "dport", "ttl", "dlci")},
        )
        return FrameFactory(framing, options.pop("size"), options.pop("stream"))
    except ValueError as exc:
        raise Failure(str(exc)) from None


def open_nio(spec: str) -> Endpoint:
    try:
        return open_endpoint(spec)
    except (ValueError, EndpointError) as exc:
        raise Failure(str(exc)) from None


def stop_on_signals() -> threading.Event:
    """Ctrl-C and SIGTERM end the run cleanly, with its report."""
    stop = threading.Event()
    for signum in (signal.SIGINT, signal.SIGTERM):
        signal.signal(signum, lambda *_: stop.set())
    return stop


@click.command()
@click.argument("nio")
@framing_options
@click.option("--rate", type=POSITIVE, help="Frames per second [default: flat out].")
@click.option("--count", type=COUNT, help="Stop after N frames.")
@click.option("--duration", type=POSITIVE, help="Stop after SECONDS.")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def blast(
    nio: str,
    rate: float | None,
    count: int | None,
    duration: float | None,
    as_json: bool,
    **framing: Any,
) -> None:
    """Send sequence-numbered test frames into NIO (e.g. udp:10000:127.0.0.1:10001).

    Each frame carries a stream id, a sequence number, its send time and a CRC, so
    `tunnelscope sink` at the far end of the path counts loss, reordering, duplicates and
    corruption. Without --count or --duration it runs until Ctrl-C.

    \b
    Examples:
      tunnelscope blast udp:20000:127.0.0.1:10001 --rate 10000 --duration 5
      tunnelscope blast udp:20000:127.0.0.1:10001 --frame ipv4 --size 1400 --count 100000
    """
    factory = open_factory(framing)
    endpoint = open_nio(nio)
    try:
        result = run_blast(endpoint, factory, rate, count, duration, stop_on_signals())
    except OSError as exc:
        raise Failure(f"{nio}: cannot send: {exc.strerror}") from None
    finally:
        endpoint.close()
    summary = result.as_dict()
    if as_json:
        echo_json(summary)
        return
    click.echo(
        f"sent {summary['sent']} frames of {summary['size']} B in {summary['seconds']:.3f} s"
        f" ({summary['frames_per_second']:.0f} frames/s, {summary['mbit_per_second']:.1f} Mbit/s)"
        f", stream {summary['stream']}, send errors {summary['send_errors']}"
    )
