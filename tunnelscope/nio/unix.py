"""`unix:LOCAL_PATH:REMOTE_PATH`: a Unix datagram tunnel, as in dynamips and ubridge.

The socket is bound at LOCAL_PATH and connected to REMOTE_PATH. A socket file left at
LOCAL_PATH by a dead process is removed; one still bound by a live process is an error. The
peer may appear later (or restart): until it is there, sends count as `refused` and every
`send_batch` tries to connect again. Paths cannot contain ':'.
"""

from __future__ import annotations

import errno
import os
import socket
import stat
from dataclasses import dataclass

from tunnelscope.nio.spec import EndpointError, EndpointSpec, SocketEndpoint, tune_buffers

_MAX_PATH = 107  # sun_path holds 108 bytes including the terminating NUL


def parse(text: str, args: str) -> UnixSpec:
    paths = args.split(":")
    if len(paths) != 2:
        raise ValueError(f"{text}: expected unix:LOCAL_PATH:REMOTE_PATH (paths without ':')")
    for what, path in zip(("local", "remote"), paths):
        if not path:
            raise ValueError(f"{text}: {what} path is empty")
        size = len(os.fsencode(path))
        if size > _MAX_PATH:
            raise ValueError(f"{text}: {what} path is {size} bytes long, the limit is {_MAX_PATH}")
    if paths[0] == paths[1]:
        raise ValueError(f"{text}: local and remote path are the same")
    return UnixSpec(text, paths[0], paths[1])


def _in_use(path: str) -> bool:
    """True when a live socket is bound at `path` (a stale socket file refuses connections)."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        probe.connect(path)
    except OSError:
        return False
    finally:
        probe.close()
    return True


@dataclass(frozen=True)
class UnixSpec(EndpointSpec):
    local_path: str
    remote_path: str

    def open(self) -> UnixEndpoint:
        try:
            mode = os.lstat(self.local_path).st_mode
        except FileNotFoundError:
            mode = None
        if mode is not None:
            if not stat.S_ISSOCK(mode):
                raise EndpointError(f"{self.text}: {self.local_path} exists and is not a socket")
            if _in_use(self.local_path):
                raise EndpointError(f"{self.text}: {self.local_path} is already in use")
            os.unlink(self.local_path)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            tune_buffers(sock)
            sock.setblocking(False)
            sock.bind(self.local_path)
        except OSError as exc:
            sock.close()
            reason = f"cannot bind {self.local_path}: {exc.strerror}"
            raise EndpointError(f"{self.text}: {reason}") from None
        return UnixEndpoint(self.text, sock, self.local_path, self.remote_path)


class UnixEndpoint(SocketEndpoint):
    """A bound Unix datagram socket that (re)connects to its peer whenever it can."""

    def __init__(self, spec: str, sock: socket.socket, local_path: str, remote_path: str) -> None:
        super().__init__(spec, sock)
        self.local_path = local_path
        self.remote_path = remote_path
        self._inode = os.stat(local_path).st_ino
        self.connected = False
        self._connect()

    def _connect(self) -> bool:
        try:
            self.sock.connect(self.remote_path)
        except OSError:  # no peer yet (ENOENT) or a dead one (ECONNREFUSED)
            return False
        self.connected = True
        return True

    def send_batch(self, frames: list[bytes]) -> tuple[int, int]:
        if not frames:
            return 0, 0
        if not self.connected and not self._connect():
            self.counters["refused"] += len(frames)
            return 0, len(frames)
        return super().send_batch(frames)

    def _send_error(self, exc: OSError, remaining: int) -> bool:
        if exc.errno == errno.ECONNREFUSED:  # the peer went away: reconnect on the next batch
            self.connected = False
            self.counters["refused"] += remaining
            return True
        return super()._send_error(exc, remaining)

    def close(self) -> None:
        """Close and remove our socket file, unless someone has replaced it meanwhile."""
        if self.sock.fileno() >= 0:
            try:
                if os.stat(self.local_path).st_ino == self._inode:
                    os.unlink(self.local_path)
            except FileNotFoundError:
                pass
        super().close()
