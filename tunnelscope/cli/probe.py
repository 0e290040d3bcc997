"""`tunnelscope probe --from NIO --to NIO`: measure a lab path with numbered, timed probes."""

from __future__ import annotations

import importlib.util
import math
from typing import Any

import click

from tunnelscope.analysis.traffic import attribute_losses, plot_report, probe_report, run_probe
from tunnelscope.cli.blast import framing_options, open_factory, open_nio, stop_on_signals
from tunnelscope.cli.common import (
    COUNT,
    NON_NEGATIVE,
    POSITIVE,
    Failure,
    FiniteFloat,
    dissect_option,
    dissector_for,
    echo_json,
)
from tunnelscope.decoders.wireshark import DissectError
from tunnelscope.formats.packet import CaptureFormatError


@click.command()
@click.option("--from", "source", required=True, metavar="NIO", help="Where probes go in.")
@click.option("--to", "target", required=True, metavar="NIO", help="Where they come out.")
@framing_options
@click.option("--rate", type=POSITIVE, default=1000.0, show_default=True, help="Probes per second.")
@click.option("--count", type=COUNT, help="Probes to send [default: 1000].")
@click.option("--duration", type=POSITIVE, help="Send for SECONDS instead.")
@click.option(
    "--wait", type=NON_NEGATIVE, default=0.5, show_default=True,
    help="Seconds to wait for stragglers after the last probe.",
)  # fmt: skip
@click.option(
    "--confidence", type=FiniteFloat(0.5, 1, max_open=True), default=0.95, show_default=True,
    help="Of the loss interval (Wilson).",
)  # fmt: skip
@click.option(
    "--interval", type=POSITIVE, help="Seconds per time-series point [default: at most 100 points]."
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--plot", metavar="FILE.png", help="Draw loss and delay over time (matplotlib).")
@click.option(
    "--bridge-capture",
    metavar="FILE.pcapng",
    help="The pre-point pcapng of the tunnelscope bridge on the path: name the impairment"
    " that dropped each lost probe, or say it was lost outside tunnelscope.",
)
@dissect_option("name the frames --bridge-capture shows dropped and count them per protocol")
def probe(
    source: str,
    target: str,
    rate: float,
    count: int | None,
    duration: float | None,
    wait: float,
    confidence: float,
    interval: float | None,
    as_json: bool,
    plot: str | None,
    bridge_capture: str | None,
    dissect: str,
    **framing: Any,
) -> None:
    """Send probes into one tunnel endpoint and receive them at another, through whatever lab
    path lies between (a tunnelscope bridge, an emulated switch, routers, several hops).

    Reports loss with its confidence interval, loss bursts, reordering (a probe arriving after
    a higher-numbered one), duplicates, corruption (CRC), one-way delay percentiles and jitter
    (mean change of delay between consecutive probes; both ends share this host's clock), and
    a time series. The two NIOs are the path's two far ends, as the lab's nodes would use them.
    With --bridge-capture, every frame the bridge dropped (probes and the lab's own traffic)
    is counted per protocol and the first lost probes are named, by Wireshark's dissectors
    when tshark is installed.

    \b
    Examples:
      # through a bridge udp:10001:127.0.0.1:20000 <-> udp:10002:127.0.0.1:20001
      tunnelscope probe --from udp:20000:127.0.0.1:10001 --to udp:20001:127.0.0.1:10002 \\
          --rate 20000 --count 20000
      # a routed serial path: IPv4/UDP over Frame Relay on DLCI 102, plotted
      tunnelscope probe --from udp:20000:127.0.0.1:10001 --to udp:20001:127.0.0.1:10002 \\
          --frame fr --dlci 102 --src-ip 10.1.1.1 --dst-ip 10.2.2.2 --plot path.png
      # why each probe died: the bridge captured its pre point with drop comments
      tunnelscope bridge udp:10001:127.0.0.1:20000 udp:10002:127.0.0.1:20001 \\
          -I "a2b packet_loss 5" -w path.pcapng --capture-at both &
      tunnelscope probe --from udp:20000:127.0.0.1:10001 --to udp:20001:127.0.0.1:10002 \\
          --bridge-capture path.pcapng
    """
    dissector = dissector_for(dissect) if bridge_capture else "builtin"
    factory = open_factory(framing)
    if plot and importlib.util.find_spec("matplotlib") is None:
        raise Failure("--plot needs matplotlib: pip install 'tunnelscope[plot]'")
    if duration is not None:
        count = min(count or math.inf, math.ceil(rate * duration))
    count = int(count or 1000)
    endpoints = [open_nio(source)]
    try:
        endpoints.append(open_nio(target))
        run = run_probe(*endpoints, factory, rate, count, wait, stop_on_signals())
    except OSError as exc:
        raise Failure(f"{source}: cannot send: {exc.strerror}") from None
    finally:
        for endpoint in endpoints:
            endpoint.close()
    report = {"from": source, "to": target, **probe_report(run, confidence, interval)}
    if bridge_capture:
        try:
            report["causes"] = attribute_losses(run, bridge_capture, dissector=dissector)
        except DissectError as exc:
            raise Failure(str(exc)) from None
        except (OSError, CaptureFormatError) as exc:
            raise Failure(f"{bridge_capture}: {getattr(exc, 'strerror', None) or exc}") from None
    if plot:
        try:
            plot_report(report, plot)
        except OSError as exc:
            raise Failure(f"cannot write {plot}: {exc.strerror}") from None
    if as_json:
        echo_json(report)
    else:
        click.echo(_text(report))


def _text(r: dict[str, Any]) -> str:
    low, high = r["loss_ci_percent"]
    confidence = f"{100 * r['confidence']:g} %"
    lines = [
        f"{r['from']} -> {r['to']}: {r['framing']} {r['size']} B at {r['rate']:g}/s, "
        f"stream {r['stream']}, {r['seconds']:.3f} s",
        f"sent {r['sent']}  received {r['received']}  lost {r['lost']} "
        f"({r['loss_percent']:.2f} %, {confidence} interval {low:.2f}..{high:.2f} %)",
        f"reordered {r['reordered']}  duplicated {r['duplicated']}  corrupted {r['corrupted']}  "
        f"foreign {r['foreign']}  send errors {r['send_errors']}",
    ]
    if r["loss_bursts"]:
        bursts = " ".join(f"{length}:{n}" for length, n in list(r["loss_bursts"].items())[:12])
        lines.append(f"loss bursts (length:count) {bursts}  mean {r['loss_burst_mean']:g}")
    delay = r["delay_ms"]
    if delay["p50"] is not None:
        quantiles = "  ".join(f"{k} {v:.3f}" for k, v in delay.items())
        lines.append(f"delay ms: {quantiles}  jitter {r['jitter_ms'] or 0:.3f}")
    if "causes" in r:
        causes = ", ".join(f"{cause} {n}" for cause, n in r["causes"]["by_cause"].items())
        lines.append(f"lost by cause: {causes or 'nothing lost'}")
        dropped = r["causes"]["dropped_by_protocol"]
        if dropped:
            table = ", ".join(f"{protocol} {n}" for protocol, n in dropped.items())
            lines.append(f"dropped at the bridge by protocol: {table}")
        for seq, summary in list(r["causes"]["frames"].items())[:5]:
            lines.append(f"  probe {seq}: {summary}")
    return "\n".join(lines)
