"""`tunnelscope sink NIO`: receive test frames and count loss, reordering and duplicates."""

from __future__ import annotations

from typing import Any

import click

from tunnelscope.analysis.traffic import sink as run_sink
from tunnelscope.cli.blast import STREAM_ID, open_nio, stop_on_signals
from tunnelscope.cli.common import COUNT, POSITIVE, echo_json


@click.command()
@click.argument("nio")
@click.option("--count", type=COUNT, help="Stop after N test frames.")
@click.option("--duration", type=POSITIVE, help="Stop after SECONDS.")
@click.option(
    "--idle",
    type=POSITIVE,
    help="Stop once no test frame came for SECONDS (counted from the first one).",
)
@click.option("--stream", type=STREAM_ID, help="Count this stream only [default: the first seen].")
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
def sink(
    nio: str,
    count: int | None,
    duration: float | None,
    idle: float | None,
    stream: int | None,
    as_json: bool,
) -> None:
    """Receive `tunnelscope blast` frames on NIO and report what the path did to them.

    The framing is found from the frames. Lost = sequence numbers that never came (from 0 up
    to the highest seen: start the sink first); reordered = frames that came after a
    higher-numbered one; duplicated = numbers that came twice; corrupted = frames whose CRC
    fails. Without --count, --duration or --idle it runs until Ctrl-C.

    \b
    Example:
      tunnelscope sink udp:10001:127.0.0.1:20000 --idle 2 --json
    """
    endpoint = open_nio(nio)
    try:
        result = run_sink(endpoint, count, duration, idle, stream, stop_on_signals())
    finally:
        endpoint.close()
    summary = result.as_dict()
    if as_json:
        echo_json(summary)
    else:
        click.echo(_text(summary))


def _text(s: dict[str, Any]) -> str:
    bursts = " ".join(f"{length}:{n}" for length, n in list(s["loss_bursts"].items())[:12])
    return "\n".join(
        [
            f"stream {s['stream']}: received {s['received']} of {s['expected']} expected in "
            f"{s['seconds']:.3f} s ({s['frames_per_second']:.0f} frames/s, "
            f"{s['mbit_per_second']:.1f} Mbit/s)",
            f"lost {s['lost']} ({s['loss_percent']:g} %)  reordered {s['reordered']}  "
            f"duplicated {s['duplicated']}  corrupted {s['corrupted']}  late {s['late']}  "
            f"foreign {s['foreign']}",
            *([f"loss bursts (length:count) {bursts}"] if bursts else []),
        ]
    )
