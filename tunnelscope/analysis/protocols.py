"""Which protocols a link carries: a bounded live sample of its frames, tallied.

The console's `stats protocols` reads a link's live stream (`tunnelscope.lab.stream`) for a
few seconds or a number of frames, whichever ends first, and counts the frames per protocol
with Wireshark's dissectors (`tunnelscope.decoders.wireshark`) or the built-in decoders. The
link never waits: the stream server drops a reader that falls behind, and frames tshark
cannot take in time are counted as not dissected rather than queued without bound.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections import Counter
from dataclasses import dataclass, field

from tunnelscope.decoders import decode
from tunnelscope.decoders.base import Decoded
from tunnelscope.decoders.wireshark import DissectError, Dissector, protocol_column
from tunnelscope.formats.capture import read_capture
from tunnelscope.formats.packet import CaptureFormatError

SAMPLE_SECONDS = 2.0
SAMPLE_FRAMES = 1000


@dataclass
class Tally:
    """Frames of one link's sample per protocol."""

    link: str
    protocols: Counter[str] = field(default_factory=Counter)
    frames: int = 0  # sampled
    undissected: int = 0  # sampled while tshark was behind: not counted per protocol
    error: str | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "link": self.link,
            "frames": self.frames,
            "protocols": dict(self.protocols.most_common()),
            "undissected": self.undissected,
            "error": self.error,
        }


def sample_protocols(
    sock: socket.socket,
    link: str,
    dissector: str = "builtin",
    seconds: float = SAMPLE_SECONDS,
    frames: int = SAMPLE_FRAMES,
) -> Tally:
    """Read a live capture stream from `sock` (closed here) and tally its frames."""
    tally = Tally(link)
    lock = threading.Lock()

    def counted(_tag: object, decoded: Decoded) -> None:
        with lock:
            tally.protocols[protocol_column(decoded)] += 1

    timer = threading.Timer(seconds, _hang_up, (sock,))
    timer.start()
    wireshark: Dissector | None = None
    try:
        with sock, sock.makefile("rb") as stream:
            reader = read_capture(stream)
            for packet in reader:
                tally.frames += 1
                if dissector != "wireshark":
                    counted(None, decode(packet.linktype, packet.data))
                else:
                    if wireshark is None:
                        wireshark = Dissector(packet.linktype, counted)
                    wireshark.submit(packet.data)
                if tally.frames >= frames:
                    break
    except DissectError as exc:  # tshark could not start
        tally.error = str(exc)
    except (CaptureFormatError, OSError) as exc:
        if tally.frames == 0 and not timer.finished.is_set():
            tally.error = str(exc)
    finally:
        timer.cancel()
        if wireshark is not None:
            wireshark.close()
            tally.undissected = wireshark.dropped
            tally.error = tally.error or wireshark.failure
    return tally


def _hang_up(sock: socket.socket) -> None:
    """The sample's time is up: end the stream (the reader sees its end)."""
    with contextlib.suppress(OSError):
        sock.shutdown(socket.SHUT_RDWR)


def sample_links(
    sources: dict[str, socket.socket], dissector: str, seconds: float, frames: int
) -> list[Tally]:
    """Sample several links at once (one thread each), in the order given."""
    tallies: dict[str, Tally] = {}
    threads = [
        threading.Thread(
            target=lambda name=name, sock=sock: tallies.__setitem__(
                name, sample_protocols(sock, name, dissector, seconds, frames)
            ),
            daemon=True,
        )
        for name, sock in sources.items()
    ]
    for thread in threads:
        thread.start()
    deadline = time.monotonic() + seconds + 30  # tshark's start and its last answers
    for thread in threads:
        thread.join(max(0.0, deadline - time.monotonic()))
    return [tallies.get(name) or Tally(name, error="no answer in time") for name in sources]
