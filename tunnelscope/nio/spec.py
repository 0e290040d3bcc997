"""What every endpoint shares: the parsed spec, the Endpoint interface, the error type.

An endpoint (a dynamips/ubridge "NIO") is one end of a lab link. The relay loops (pure
Python in tunnelscope/datapath/pipeline.py, C in tunnelscope/nio/fastpath/loop.c) only need
`fileno()` and `kind`; the batch methods here are the pure-Python data path and the reference
the C loop mirrors (tunnelscope/nio/fastpath/endpoint.c).
"""

from __future__ import annotations

import errno
import socket
import sys
from collections.abc import Callable
from dataclasses import dataclass

KIND_DGRAM = 0  # a datagram socket (UDP, Unix, AF_PACKET): one frame per datagram, recvmmsg-able
KIND_FD = 1  # a TAP file descriptor: read()/write() one frame per call

RECV_BUFFER = 65536  # bigger than any UDP payload (65507 IPv4, 65527 IPv6); larger is oversize
SOCKET_BUFFER = 4 * 1024 * 1024  # absorbs bursts while the relay is busy elsewhere

# SO_{RCV,SND}BUFFORCE (Linux, root) exceed net.core.[rw]mem_max; Python does not name them.
_FORCE = {socket.SO_RCVBUF: 33, socket.SO_SNDBUF: 32} if sys.platform == "linux" else {}


class EndpointError(Exception):
    """An endpoint could not be opened (or broke); one line that starts with the spec."""


@dataclass(frozen=True)
class EndpointSpec:
    """A parsed, validated endpoint spec; opening it touches the system, parsing never does."""

    text: str  # the spec as the user wrote it: the endpoint's name in every message

    def open(self) -> Endpoint:
        raise NotImplementedError

    def __str__(self) -> str:
        return self.text


class Endpoint:
    """One open link end.

    `recv_batch` and `send_batch` never block and never raise for the weather of a lab link
    (peer not listening, buffer full, frame too big for the interface): those are counted in
    `counters` and, for sends, in the returned error count.
    """

    kind: int

    def __init__(self, spec: str) -> None:
        self.spec = spec
        self.counters = {"refused": 0, "oversize": 0, "send_busy": 0, "send_failed": 0}

    def fileno(self) -> int:
        raise NotImplementedError

    def recv_batch(self, max_frames: int = 64) -> list[bytes]:
        raise NotImplementedError

    def send_batch(self, frames: list[bytes]) -> tuple[int, int]:
        raise NotImplementedError

    def close(self) -> None:
        raise NotImplementedError

    def __enter__(self) -> Endpoint:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.spec}>"

    def _send_each(self, frames: list[bytes], send: Callable[[bytes], object]) -> tuple[int, int]:
        """Send frame by frame with `send`, counting failures; (sent, errors)."""
        sent = 0
        for index, frame in enumerate(frames):
            try:
                send(frame)
            except OSError as exc:
                if self._send_error(exc, len(frames) - index):
                    break
            else:
                sent += 1
        return sent, len(frames) - sent

    def _send_error(self, exc: OSError, remaining: int) -> bool:
        """Count a failed send; True when the rest of the batch should be given up."""
        if exc.errno == errno.EBADF:  # closed endpoint: a bug in the caller, not link weather
            raise exc
        if exc.errno in (errno.EAGAIN, errno.ENOBUFS):  # full now, so the rest would fail too
            self.counters["send_busy"] += remaining
            return True
        self.counters["refused" if exc.errno == errno.ECONNREFUSED else "send_failed"] += 1
        return False


class SocketEndpoint(Endpoint):
    """A datagram socket endpoint: one frame per datagram, no truncation ever goes unnoticed."""

    kind = KIND_DGRAM

    def __init__(self, spec: str, sock: socket.socket) -> None:
        super().__init__(spec)
        self.sock = sock
        self._buffer = bytearray(RECV_BUFFER)
        self._view = memoryview(self._buffer)

    def fileno(self) -> int:
        return self.sock.fileno()

    def _recv_one(self) -> int:
        """Read one datagram into the buffer; its full length (MSG_TRUNC), or -1 to skip it."""
        return self.sock.recv_into(self._buffer, RECV_BUFFER, socket.MSG_TRUNC)

    def recv_batch(self, max_frames: int = 64) -> list[bytes]:
        frames = []
        for _ in range(max_frames):  # attempts, not frames: a persistent error cannot spin
            try:
                size = self._recv_one()
            except BlockingIOError:
                break
            except ConnectionRefusedError:  # an ICMP port unreachable for an earlier send
                self.counters["refused"] += 1
                continue
            except OSError:  # one-shot errors (ENETDOWN: the interface went) clear once read
                continue
            if size > RECV_BUFFER:
                self.counters["oversize"] += 1
            elif size >= 0:
                frames.append(self._view[:size].tobytes())
        return frames

    def send_batch(self, frames: list[bytes]) -> tuple[int, int]:
        return self._send_each(frames, self.sock.send)

    def close(self) -> None:
        self.sock.close()


def tune_buffers(sock: socket.socket) -> None:
    """Give the socket SOCKET_BUFFER bytes each way, beyond the sysctl cap when we may."""
    for option in (socket.SO_RCVBUF, socket.SO_SNDBUF):
        for name in (_FORCE.get(option), option):
            try:
                if name is not None:
                    sock.setsockopt(socket.SOL_SOCKET, name, SOCKET_BUFFER)
                    break
            except OSError:  # not root, or above the system's cap: try the next, else default
                pass
