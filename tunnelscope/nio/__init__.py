"""Endpoints (dynamips/ubridge "NIOs"): the link ends a bridge relays frames between.

    udp:LPORT:RHOST:RPORT  udp:LADDR:LPORT:RHOST:RPORT  (IPv6 in brackets: [::1])
    unix:LOCAL_PATH:REMOTE_PATH
    tap:IFNAME[@NETNS]     eth:IFNAME[@NETNS]           (Linux)

`parse_endpoint` checks a spec without touching the system (ValueError, one line);
`EndpointSpec.open()` / `open_endpoint` open it (EndpointError, one line, nothing left open).
"""

from __future__ import annotations

from tunnelscope.nio import eth, tap, udp, unix
from tunnelscope.nio.spec import (
    KIND_DGRAM,
    KIND_FD,
    Endpoint,
    EndpointError,
    EndpointSpec,
)

__all__ = [
    "KIND_DGRAM",
    "KIND_FD",
    "Endpoint",
    "EndpointError",
    "EndpointSpec",
    "open_endpoint",
    "parse_endpoint",
]

_PARSERS = {"udp": udp.parse, "unix": unix.parse, "tap": tap.parse, "eth": eth.parse}
_TYPES = "udp, unix, tap or eth"


def parse_endpoint(spec: str) -> EndpointSpec:
    """Parse and check an endpoint spec; ValueError says what is wrong, on one line."""
    if not spec:
        raise ValueError("endpoint spec is empty (e.g. udp:10001:127.0.0.1:10002)")
    kind, colon, args = spec.partition(":")
    if not colon:
        raise ValueError(f"{spec}: expected TYPE:ARGUMENTS with TYPE {_TYPES}")
    if kind not in _PARSERS:
        raise ValueError(f"{spec}: unknown endpoint type '{kind}' (expected {_TYPES})")
    return _PARSERS[kind](spec, args)


def open_endpoint(spec: str) -> Endpoint:
    """Parse and open: ValueError for a bad spec, EndpointError when opening fails."""
    return parse_endpoint(spec).open()
