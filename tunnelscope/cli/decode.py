"""`tunnelscope decode FILE|-`: print a capture's frames, one line (or JSON object) each.

Reads what tunnelscope and Wireshark write, files and pipes alike, and decodes the link
layers of lab tunnels that tcpdump and scapy cannot (Cisco HDLC, PPP, Frame Relay) with the
built-in decoders, or everything above them with Wireshark's dissectors when tshark is
installed (`tunnelscope.decoders.wireshark`).
"""

from __future__ import annotations

import contextlib
import functools
import itertools
import json
import os
import queue
import stat
import sys
import time
from collections.abc import Iterator

import click

from tunnelscope.cli.common import Failure, dissect_option, dissector_for
from tunnelscope.decoders import decode as decode_frame
from tunnelscope.decoders.base import Decoded, printable
from tunnelscope.decoders.wireshark import (
    DissectError,
    Dissector,
    FileDissection,
    headline,
)
from tunnelscope.formats.capture import Reader, open_capture, read_capture
from tunnelscope.formats.linktype import LinkType
from tunnelscope.formats.packet import CaptureFormatError, Direction, Packet

_WORDS = {Direction.OUTBOUND: "out", Direction.INBOUND: "in"}
_ARROWS = {Direction.OUTBOUND: ">", Direction.INBOUND: "<"}
_P2P_DIR = {0: Direction.OUTBOUND, 1: Direction.INBOUND}  # tshark's frame.p2p_dir values
_BATCH = 256  # lines a write


@click.command()
@click.argument("path", metavar="FILE|-")
@click.option("-c", "--count", type=click.IntRange(min=1), metavar="N", help="Stop after N frames.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object per frame.")
@click.option(
    "--linktype",
    metavar="TYPE",
    help="Decode every frame as TYPE (ethernet, hdlc, ppp, fr or a LINKTYPE number), "
    "whatever link type the file declares.",
)
@dissect_option("decode the frames")
@click.option(
    "-Y",
    "--display-filter",
    metavar="FILTER",
    help="Print only the frames matching a Wireshark display filter (needs tshark).",
)
def decode(
    path: str,
    count: int | None,
    as_json: bool,
    linktype: str | None,
    dissect: str,
    display_filter: str | None,
) -> None:
    """Print the frames of a pcap or pcapng capture (FILE, or - for standard input).

    One line per frame, as tcpdump prints them: local time, link (the interface name, or the link
    type when the file names none), direction where the capture records it (> sent, <
    received: pcapng flags, link types 204-206), then what the frame carries.

    --json prints one object per line instead: number, time (seconds since the epoch),
    interface, linktype, direction ("out", "in" or null), summary, fields (keyed by Wireshark
    display-filter names, e.g. fr.dlci, slarp.mysequence), protocols, malformed, comment.

    --dissect wireshark (the default when tshark is installed) hands the capture to
    Wireshark's dissectors: the summary is Wireshark's Info column ("Hello Packet",
    "KEEPALIVE Message"), fields hold every field Wireshark shows plus its Info, Protocol,
    Source and Destination columns (_ws.col.Info, ...), protocols is tshark's
    frame.protocols, and -Y keeps only the frames a display filter matches. --dissect
    builtin uses tunnelscope's own decoders (link layers, IP, ICMP, UDP, TCP, and OSPF,
    EIGRP, BGP, RIP, LDP and IS-IS by message type), which need no tshark and are several
    times faster.

    Exit status: 0 when the whole capture was read; 1 when it ends in a damaged record (the
    frames before it are printed, a warning goes to stderr); 2 when it cannot be read at
    all (missing file, not a capture) or the output fails, with one line
    `tunnelscope: error: REASON` on stderr.

    \b
    Examples:
      tunnelscope decode r1-r2.pcap
      tunnelscope decode -c 5 --json lab.pcapng | jq -r '.fields["fr.dlci"]'
      tunnelscope bridge udp:10001:127.0.0.1:10000 udp:10002:127.0.0.1:10003 -w - \\
          | tunnelscope decode -
      # a Cisco HDLC capture that another tool labelled Ethernet (no editcap -T needed)
      tunnelscope decode --linktype hdlc serial.pcap
      tunnelscope decode -Y 'ospf || bgp' r1-r2.pcap
      tunnelscope decode --dissect builtin -c 100 big.pcap
    """
    dissector = dissector_for(dissect)
    if display_filter and dissector != "wireshark":
        raise Failure("-Y needs Wireshark's dissectors: install tshark, or drop --dissect builtin")
    if display_filter and linktype is not None:
        raise Failure("-Y and --linktype do not go together (tshark filters the file as it is)")
    forced = None
    if linktype is not None:
        try:
            forced = LinkType.parse(linktype)
        except ValueError as exc:
            raise Failure(f"--linktype: {exc}") from None
    name = "standard input" if path == "-" else path
    try:
        if dissector == "wireshark" and forced is None:
            problem = _print_dissected(path, count, as_json, display_filter)
        else:
            with open_capture(path) as reader:
                printer = _print_fed if dissector == "wireshark" else _print_frames
                problem = printer(reader, count, as_json, forced, _is_live(path))
    except DissectError as exc:
        raise Failure(str(exc)) from None
    except CaptureFormatError as exc:  # the file header: nothing could be read
        raise Failure(f"{name}: {exc}") from None
    except OSError as exc:
        raise Failure(f"{name}: {exc.strerror or exc}") from None
    if problem:
        click.echo(f"tunnelscope: warning: {name}: {problem}; reading stopped", err=True)
        sys.exit(1)


def _print_frames(
    reader: Reader, count: int | None, as_json: bool, forced: LinkType | None, live: bool
) -> str | None:
    """Print frames until the end or `count`; return why reading stopped early, if it did."""
    stopped: list[str] = []
    with _Printer(reader, as_json, live) as printer:
        for number, packet in _numbered(reader, count, stopped):
            linktype = int(forced or packet.linktype)
            if not printer.frame(number, packet, linktype, decode_frame(linktype, packet.data)):
                return None
    return stopped[0] if stopped else None


def _numbered(
    reader: Reader, count: int | None, stopped: list[str]
) -> Iterator[tuple[int, Packet]]:
    """(number, packet) until the end or `count`; why reading stopped early goes to `stopped`."""
    numbers = itertools.count(1) if count is None else range(1, count + 1)
    try:
        yield from zip(numbers, reader)  # the numbers first: no frame read past `count`
    except CaptureFormatError as exc:
        stopped.append(str(exc))
    except OSError as exc:  # e.g. EIO on a damaged disk, after some frames
        stopped.append(exc.strerror or str(exc))


def _print_fed(
    reader: Reader, count: int | None, as_json: bool, forced: LinkType | None, live: bool
) -> str | None:
    """--linktype with Wireshark's dissectors: the frames go to tshark in memory, as that
    link type (a file tshark would read as the type it declares)."""
    assert forced is not None
    answers: queue.SimpleQueue[tuple[object, Decoded]] = queue.SimpleQueue()
    stopped: list[str] = []
    with _Printer(reader, as_json, live) as printer:
        with Dissector(
            int(forced), lambda tag, decoded: answers.put((tag, decoded)), live=live
        ) as dissector:
            for number, packet in _numbered(reader, count, stopped):
                dissector.submit(packet.data, (number, packet), packet.ts_ns, block=True)
                if not _print_answers(answers, printer, int(forced)):
                    return None
        if not _print_answers(answers, printer, int(forced)):  # close() waited
            return None
    if dissector.failure:
        raise DissectError(dissector.failure)
    return stopped[0] if stopped else None


def _print_answers(
    answers: queue.SimpleQueue[tuple[object, Decoded]], printer: _Printer, linktype: int
) -> bool:
    """Print the frames tshark has answered so far; False when the reader went away."""
    while not answers.empty():
        (number, packet), decoded = answers.get()  # type: ignore[misc]
        if not printer.frame(number, packet, linktype, decoded):
            return False
    return True


def _print_dissected(
    path: str, count: int | None, as_json: bool, display_filter: str | None
) -> str | None:
    """As `_print_frames`, with Wireshark's dissection of each frame the filter keeps.

    tshark reads the same capture (the file, or a copy of standard input); this process
    reads it too for what the line shows around the dissection (time, interface, direction,
    comment), stepping to each frame number tshark reports.
    """
    live = _is_live(path)
    printed = 0
    stopped: list[str] = []
    with contextlib.ExitStack() as stack:
        dissection = stack.enter_context(FileDissection(path, display_filter))
        if dissection.input is None:
            reader = stack.enter_context(open_capture(path))
        else:
            reader = read_capture(dissection.input)
        frames = _numbered(reader, None, stopped)
        printer = stack.enter_context(_Printer(reader, as_json, live))
        for number, decoded in dissection:
            if printed == count:
                return None
            packet = next((p for n, p in frames if n == number), None)
            if packet is None:
                break
            printed += 1
            if not printer.frame(number, packet, int(packet.linktype), decoded):
                return None
        printer.flush()
        for _ in frames:  # a damaged record after tshark's last frame: said, as builtin says it
            pass
        if stopped:
            return stopped[0]
        failure = dissection.failure()
    if failure:
        raise DissectError(failure)
    return None


class _Printer:
    """Prints each frame as its text line or JSON object.

    Lines go out in batches of `_BATCH` (one write each), or each at once, flushed, when the
    capture is live. What repeats from frame to frame is made once: the clock of each second
    and the label of each interface and link type. Leaving its `with` block writes what is
    left, whatever ends the printing (the end, a count, tshark failing, Ctrl-C).
    """

    def __init__(self, reader: Reader, as_json: bool, live: bool) -> None:
        self._reader = reader
        self._as_json = as_json
        self._live = live
        self._pending: list[str] = []
        self._second: int | None = None
        self._clock = ""
        self._labels: dict[tuple[str, int], str] = {}

    def __enter__(self) -> _Printer:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.flush()

    def frame(self, number: int, packet: Packet, linktype: int, decoded: Decoded) -> bool:
        """Print one frame; False when the reader went away (`| head`): stop quietly."""
        if self._as_json:
            self._pending.append(
                json.dumps(_frame(self._reader, packet, number, linktype, decoded))
            )
        else:
            self._pending.append(self._line(packet, linktype, decoded))
        if self._live or len(self._pending) >= _BATCH:
            return self.flush()
        return True

    def flush(self) -> bool:
        """Write the lines not written yet; False when the reader went away.

        Any other output error (disk full) is fatal; stdout then points at /dev/null so the
        interpreter's last flush cannot print a second error.
        """
        try:
            if self._pending:
                sys.stdout.write("\n".join(self._pending) + "\n")
                self._pending.clear()
            sys.stdout.flush()
        except OSError as exc:
            self._pending.clear()
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            if isinstance(exc, BrokenPipeError):
                return False
            raise Failure(f"standard output: {exc.strerror or exc}") from None
        return True

    def _line(self, packet: Packet, linktype: int, decoded: Decoded) -> str:
        """tcpdump's layout: local time, link, direction, summary (and a pcapng comment)."""
        interface = self._reader.interfaces[packet.interface]
        seconds, fraction = divmod(packet.ts_ns, 1_000_000_000)
        if seconds != self._second:
            self._second = seconds
            self._clock = time.strftime("%H:%M:%S", time.localtime(seconds))
        if interface.ticks_per_second > 1_000_000:
            stamp = f"{self._clock}.{fraction:09d}"
        else:
            stamp = f"{self._clock}.{fraction // 1000:06d}"
        label = self._labels.get((interface.name, linktype))
        if label is None:  # names from the file
            label = printable(interface.name or _linktype_name(linktype))
            self._labels[interface.name, linktype] = label
        parts = [stamp, label]
        arrow = _ARROWS.get(_direction(packet, decoded))
        if arrow:
            parts.append(arrow)
        parts.append(headline(decoded.fields, decoded.summary))
        if packet.comment:
            parts.append(f"# {printable(packet.comment)}")
        return " ".join(parts)


def _frame(reader: Reader, packet: Packet, number: int, linktype: int, decoded: Decoded) -> dict:
    """The JSON object of one frame."""
    seconds, fraction = divmod(packet.ts_ns, 1_000_000_000)
    return {
        "number": number,
        "time": seconds + fraction / 1e9,  # exact to the microsecond as a float
        "interface": reader.interfaces[packet.interface].name or None,
        "linktype": _linktype_name(linktype),
        "direction": _WORDS.get(_direction(packet, decoded)),
        "summary": decoded.summary,
        "fields": decoded.fields,
        "protocols": decoded.protocols,
        "malformed": decoded.malformed,
        "comment": packet.comment,
    }


def _direction(packet: Packet, decoded: Decoded) -> Direction:
    """pcapng flags, else the 204-206 direction byte."""
    if not packet.direction and "frame.p2p_dir" in decoded.fields:
        return _P2P_DIR[decoded.fields["frame.p2p_dir"]]  # type: ignore[index]
    return packet.direction


@functools.cache
def _linktype_name(linktype: int) -> str:
    try:
        return LinkType(linktype).short_name
    except ValueError:
        return f"linktype {linktype}"


def _is_live(path: str) -> bool:
    """Pipes and FIFOs are read while they are written: print each frame at once."""
    try:
        mode = os.fstat(sys.stdin.fileno()).st_mode if path == "-" else os.stat(path).st_mode
    except (OSError, ValueError):
        return False
    return not stat.S_ISREG(mode)
