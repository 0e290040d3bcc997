"""`tap:IFNAME[@NETNS]`: a Linux TAP device, the kernel's own end of a lab link.

The device is created (or, if it exists as a persistent TAP, attached to) with IFF_NO_PI, so
each read() or write() is one whole Ethernet frame, and it is brought up. With `@NETNS` it
is created inside that named network namespace (see netns.py); the fd keeps working from
the host's namespace. A device we created disappears when the endpoint closes.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import struct
from dataclasses import dataclass

from tunnelscope.nio.netns import parse_ifname_netns, run_in_netns
from tunnelscope.nio.spec import (
    KIND_FD,
    RECV_BUFFER,
    Endpoint,
    EndpointError,
    EndpointSpec,
)

TUNSETIFF = 0x400454CA
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
IFF_UP = 0x0001
_IFREQ = "16sH22x"  # struct ifreq: the name, then the flags member of its 24-byte union


def parse(text: str, args: str) -> TapSpec:
    return TapSpec(text, *parse_ifname_netns(text, args))


def _link_up(ifname: bytes) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        reply = fcntl.ioctl(sock, SIOCGIFFLAGS, struct.pack(_IFREQ, ifname, 0))
        flags = struct.unpack(_IFREQ, reply)[1]
        fcntl.ioctl(sock, SIOCSIFFLAGS, struct.pack(_IFREQ, ifname, flags | IFF_UP))


def _open_tap(ifname: str) -> int:
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, TUNSETIFF, struct.pack(_IFREQ, ifname.encode(), IFF_TAP | IFF_NO_PI))
        _link_up(ifname.encode())
    except BaseException:
        os.close(fd)
        raise
    return fd


@dataclass(frozen=True)
class TapSpec(EndpointSpec):
    ifname: str
    netns: str | None

    def open(self) -> TapEndpoint:
        try:
            fd = run_in_netns(self.text, self.netns, lambda: _open_tap(self.ifname))
        except OSError as exc:
            raise EndpointError(f"{self.text}: {self._explain(exc)}") from None
        return TapEndpoint(self.text, fd)

    def _explain(self, exc: OSError) -> str:
        if exc.errno == errno.ENOENT:
            return "/dev/net/tun is missing (is the tun module loaded?)"
        if exc.errno in (errno.EPERM, errno.EACCES):
            return "creating a TAP device needs root or CAP_NET_ADMIN"
        if exc.errno == errno.EBUSY:
            return f"interface {self.ifname} is already in use"
        if exc.errno == errno.EINVAL:
            return f"interface {self.ifname} exists and is not a TAP device"
        return f"cannot open TAP device {self.ifname}: {exc.strerror}"


class TapEndpoint(Endpoint):
    """A non-blocking TAP fd: one read() or write() per frame."""

    kind = KIND_FD

    def __init__(self, spec: str, fd: int) -> None:
        super().__init__(spec)
        self.fd = fd
        self._buffer = bytearray(RECV_BUFFER)
        self._view = memoryview(self._buffer)

    def fileno(self) -> int:
        return self.fd

    def recv_batch(self, max_frames: int = 64) -> list[bytes]:
        frames = []
        for _ in range(max_frames):
            try:
                size = os.readv(self.fd, [self._buffer])
            except BlockingIOError:
                break
            if size == 0:  # the device went away: nothing more to read
                break
            if size == len(self._buffer):  # a full buffer may hide a longer frame
                self.counters["oversize"] += 1
                continue
            frames.append(self._view[:size].tobytes())
        return frames

    def send_batch(self, frames: list[bytes]) -> tuple[int, int]:
        return self._send_each(frames, lambda frame: os.write(self.fd, frame))

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
