"""`udp:[LADDR:]LPORT:RHOST:RPORT`: the UDP tunnel of dynamips, ubridge, VPCS and QEMU.

IPv6 addresses go in brackets: `udp:10001:[::1]:10002`, `udp:[::1]:10001:[::1]:10002`.

The socket is bound, then connect()ed to the peer, so the kernel drops datagrams from any
other source and the peer sees ours come from exactly LPORT. Without LADDR we bind the
loopback address when RHOST is a loopback address (a lab on one host is then unreachable
from the network), else the wildcard address of RHOST's family. RHOST may be a host name:
it resolves to its first IPv4 address, else its first IPv6 one (GNS3 and VPCS speak IPv4,
and "localhost" often lists ::1 first). We never set SO_REUSEADDR: a port already in use is
an error, not a silently shared port as in dynamips.
"""

from __future__ import annotations

import errno
import ipaddress
import re
import socket
from dataclasses import dataclass

from tunnelscope.nio.spec import EndpointError, EndpointSpec, SocketEndpoint, tune_buffers

_USAGE = "expected udp:LPORT:RHOST:RPORT or udp:LADDR:LPORT:RHOST:RPORT (IPv6 in brackets)"
_FIELD = re.compile(r"\[[^\]]*\]|[^:\[\]]*")
_HOSTNAME = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)(\.(?!-)[A-Za-z0-9-]{1,63}(?<!-))*\.?")


def _split(args: str) -> list[str] | None:
    """Split on ':' outside brackets; None when the brackets do not pair up."""
    fields, pos = [], 0
    while True:
        match = _FIELD.match(args, pos)
        assert match is not None  # the pattern matches the empty string
        fields.append(match.group())
        pos = match.end()
        if pos == len(args):
            return fields
        if args[pos] != ":":
            return None
        pos += 1


def _port(text: str, value: str, what: str) -> int:
    if not (value.isascii() and value.isdigit() and 1 <= int(value) <= 65535):
        raise ValueError(f"{text}: {what} port '{value}' is not a number 1-65535")
    return int(value)


def _address(text: str, value: str, what: str, names: bool) -> str:
    """Check an IPv4 address, a bracketed IPv6 address or (when `names`) a host name."""
    if value.startswith("["):
        try:
            return str(ipaddress.IPv6Address(value[1:-1]))
        except ValueError:
            raise ValueError(f"{text}: {what} '{value}' is not an IPv6 address") from None
    try:
        return str(ipaddress.IPv4Address(value))
    except ValueError:
        if names and _HOSTNAME.fullmatch(value) and not value.rstrip(".").split(".")[-1].isdigit():
            return value
    kind = "an IPv4 address or a host name" if names else "an IP address"
    raise ValueError(f"{text}: {what} '{value}' is not {kind}")


def parse(text: str, args: str) -> UdpSpec:
    fields = _split(args)
    if fields is None or len(fields) not in (3, 4):
        raise ValueError(f"{text}: {_USAGE}")
    local_host = _address(text, fields.pop(0), "local address", False) if len(fields) == 4 else None
    local_port = _port(text, fields[0], "local")
    remote_host = _address(text, fields[1], "remote host", True)
    remote_port = _port(text, fields[2], "remote")
    if local_host is not None and _is_ip(remote_host):
        local_v6, remote_v6 = ":" in local_host, ":" in remote_host
        if local_v6 != remote_v6:
            raise ValueError(
                f"{text}: local address {local_host} is IPv{6 if local_v6 else 4}"
                f" but remote host {remote_host} is IPv{6 if remote_v6 else 4}"
            )
    return UdpSpec(text, local_host, local_port, remote_host, remote_port)


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


@dataclass(frozen=True)
class UdpSpec(EndpointSpec):
    local_host: str | None  # None: decided at open (see the module docstring)
    local_port: int
    remote_host: str
    remote_port: int

    def _resolve(self) -> tuple[socket.AddressFamily, str]:
        """The remote address to connect to, preferring IPv4 for host names."""
        if _is_ip(self.remote_host):
            family = socket.AF_INET6 if ":" in self.remote_host else socket.AF_INET
            return family, self.remote_host
        family = 0  # any, unless LADDR fixes it
        if self.local_host is not None:
            family = socket.AF_INET6 if ":" in self.local_host else socket.AF_INET
        try:
            infos = socket.getaddrinfo(self.remote_host, None, family, socket.SOCK_DGRAM)
        except socket.gaierror as exc:
            raise EndpointError(
                f"{self.text}: cannot resolve remote host '{self.remote_host}' ({exc.strerror})"
            ) from None
        info = next((i for i in infos if i[0] == socket.AF_INET), infos[0])
        return info[0], str(info[4][0])

    def open(self) -> UdpEndpoint:
        family, remote = self._resolve()
        local = self.local_host
        if local is None:
            loopback = ipaddress.ip_address(remote).is_loopback
            v6 = family == socket.AF_INET6
            local = ("::1" if v6 else "127.0.0.1") if loopback else ("::" if v6 else "0.0.0.0")
        sock = socket.socket(family, socket.SOCK_DGRAM)
        try:
            if family == socket.AF_INET6:  # leave the IPv4 port of the same number alone
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            tune_buffers(sock)
            sock.setblocking(False)
            try:
                sock.bind((local, self.local_port))
            except OSError as exc:
                raise EndpointError(f"{self.text}: {self._bind_error(exc, local)}") from None
            try:
                sock.connect((remote, self.remote_port))
            except OSError as exc:
                raise EndpointError(
                    f"{self.text}: cannot reach {remote} port {self.remote_port}: {exc.strerror}"
                ) from None
        except BaseException:
            sock.close()
            raise
        return UdpEndpoint(self.text, sock)

    def _bind_error(self, exc: OSError, local: str) -> str:
        if exc.errno == errno.EADDRINUSE:
            return f"local port {self.local_port} is already in use"
        if exc.errno == errno.EADDRNOTAVAIL:
            return f"local address {local} is not an address of this host"
        if exc.errno == errno.EACCES:
            return f"binding local port {self.local_port} needs root"
        return f"cannot bind {local} port {self.local_port}: {exc.strerror}"


class UdpEndpoint(SocketEndpoint):
    """A connected UDP socket; ECONNREFUSED (peer not listening yet) counts as `refused`."""
