"""`tunnelscope stream HOST:PORT LINK -w -`: watch a link of a running tunnelscope remotely."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys

import click

from tunnelscope.cli.common import Address, Failure, capture_at_option
from tunnelscope.lab.stream import Request, StreamError, connect, copy_stream, tunnel_linktype


@click.command()
@click.argument("address", metavar="HOST:PORT", type=Address())
@click.argument("link", required=False)
@click.option(
    "-w", "--write", "path", metavar="FILE", help="Write the capture to FILE (- = stdout)."
)
@click.option("--wireshark", is_flag=True, help="Pipe the capture into `wireshark -k -i -`.")
@capture_at_option("points")
@click.option("--pcapng", is_flag=True, help="Ask for pcapng (one interface per point).")
@click.option("--linktype", default="auto", show_default=True, help="auto, eth, hdlc, ppp or fr.")
@click.option("--filter", "capture_filter", metavar="EXPR", help="Capture filter for this client.")
@click.option(
    "--token", envvar="TUNNELSCOPE_STREAM_TOKEN", help="The stream's token (off loopback)."
)
def stream(
    address: str,
    link: str | None,
    path: str | None,
    wireshark: bool,
    points: str,
    pcapng: bool,
    linktype: str,
    capture_filter: str | None,
    token: str | None,
) -> None:
    """Receive a live capture of LINK (default: the first link) from a running tunnelscope.

    A `serve` offers its links on its stream address (printed at start, loopback by default).
    Each client gets its own capture from its first byte, so any number of viewers can join
    and leave at any time; a viewer that stalls is dropped, never slowing the link.

    \b
    Examples:
      tunnelscope stream 127.0.0.1:7400 R1-R2 --wireshark
      tunnelscope stream 127.0.0.1:7400 R1-R2 -w - | tshark -r - -V
      nc 127.0.0.1 7400 | wireshark -k -i -                # the first link, no request
      curl -sN 'http://127.0.0.1:7400/R1-R2?format=pcapng' | tshark -r -
    """
    if (path is None) == (not wireshark):
        raise click.UsageError("give either -w FILE (- = stdout) or --wireshark")
    try:
        request = Request(
            link=link,
            points=points,
            pcapng=pcapng or points == "both",
            linktype=None if linktype == "auto" else tunnel_linktype(linktype),
            filter=capture_filter,
            token=token,
        )
        sock = connect(address, request)
    except StreamError as exc:
        raise Failure(str(exc)) from None
    with sock:
        if wireshark:
            to_wireshark(sock)
        else:
            to_file(sock, path or "-")


def to_file(sock: socket.socket, path: str) -> None:
    """Copy a live stream into `path` (- = stdout) until it ends, the reader leaves or Ctrl-C."""
    try:
        fd = (
            os.dup(sys.stdout.fileno())
            if path == "-"
            else os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        )
    except OSError as exc:
        raise Failure(f"cannot write {path}: {exc.strerror}") from None
    try:
        copy_stream(sock, fd)
    except (BrokenPipeError, KeyboardInterrupt):
        pass  # the reader left, or Ctrl-C: both end the stream
    except OSError as exc:
        raise Failure(f"{path}: {exc.strerror or exc}") from None
    finally:
        os.close(fd)


def to_wireshark(sock: socket.socket) -> None:
    """Show a live stream in `wireshark -k -i -` until either side ends."""
    program = shutil.which("wireshark")
    if program is None:
        raise Failure("wireshark is not installed (use -w - | tshark -r - instead)")
    viewer = subprocess.Popen([program, "-k", "-i", "-"], stdin=subprocess.PIPE)
    assert viewer.stdin is not None
    try:
        copy_stream(sock, viewer.stdin.fileno())
    except (BrokenPipeError, KeyboardInterrupt):
        pass
    finally:
        viewer.stdin.close()
        viewer.wait()
