"""Endpoint spec parsing: what users type, as dynamips/ubridge taught them, and every error."""

from __future__ import annotations

import pytest

from tunnelscope.nio import parse_endpoint
from tunnelscope.nio.eth import EthSpec
from tunnelscope.nio.tap import TapSpec
from tunnelscope.nio.udp import UdpSpec
from tunnelscope.nio.unix import UnixSpec

GOOD = [
    ("udp:10001:127.0.0.1:10002", UdpSpec, (None, 10001, "127.0.0.1", 10002)),
    ("udp:1:127.0.0.1:65535", UdpSpec, (None, 1, "127.0.0.1", 65535)),
    ("udp:10001:[::1]:10002", UdpSpec, (None, 10001, "::1", 10002)),
    ("udp:10001:[0:0:0:0:0:0:0:1]:10002", UdpSpec, (None, 10001, "::1", 10002)),
    ("udp:127.0.0.1:10001:127.0.0.1:10002", UdpSpec, ("127.0.0.1", 10001, "127.0.0.1", 10002)),
    ("udp:[::1]:10001:[::1]:10002", UdpSpec, ("::1", 10001, "::1", 10002)),
    ("udp:0.0.0.0:10001:192.0.2.7:10002", UdpSpec, ("0.0.0.0", 10001, "192.0.2.7", 10002)),
    ("udp:10001:localhost:10002", UdpSpec, (None, 10001, "localhost", 10002)),
    ("udp:10001:r1.lab-2.example:10002", UdpSpec, (None, 10001, "r1.lab-2.example", 10002)),
    ("udp:[::]:10001:localhost:10002", UdpSpec, ("::", 10001, "localhost", 10002)),
    ("unix:/tmp/a.sock:/tmp/b.sock", UnixSpec, ("/tmp/a.sock", "/tmp/b.sock")),
    ("unix:rel/a:b", UnixSpec, ("rel/a", "b")),
    ("tap:tap0", TapSpec, ("tap0", None)),
    ("tap:tap-lab.1@lab1", TapSpec, ("tap-lab.1", "lab1")),
    ("tap:abcdefghijklmno@x", TapSpec, ("abcdefghijklmno", "x")),
    ("eth:eth0", EthSpec, ("eth0", None)),
    ("eth:veth0@tstest-1", EthSpec, ("veth0", "tstest-1")),
]


@pytest.mark.parametrize(("text", "cls", "fields"), GOOD, ids=[g[0] for g in GOOD])
def test_good_specs(text: str, cls: type, fields: tuple) -> None:
    spec = parse_endpoint(text)
    assert type(spec) is cls
    assert spec.text == text
    assert str(spec) == text
    assert tuple(vars(spec).values())[1:] == fields


USAGE = "expected udp:LPORT:RHOST:RPORT or udp:LADDR:LPORT:RHOST:RPORT (IPv6 in brackets)"
IFNAME = "is invalid (1-15 bytes, no '/', ':' or spaces)"
LONG = "/tmp/" + "x" * 103  # 108 bytes: one more than sun_path can hold

BAD = [
    ("", "endpoint spec is empty (e.g. udp:10001:127.0.0.1:10002)"),
    ("udp", "udp: expected TYPE:ARGUMENTS with TYPE udp, unix, tap or eth"),
    ("gre:1:2", "gre:1:2: unknown endpoint type 'gre' (expected udp, unix, tap or eth)"),
    (
        "UDP:1:127.0.0.1:2",
        "UDP:1:127.0.0.1:2: unknown endpoint type 'UDP' (expected udp, unix, tap or eth)",
    ),
    ("udp:abc:127.0.0.1:2", "udp:abc:127.0.0.1:2: local port 'abc' is not a number 1-65535"),
    ("udp:0:127.0.0.1:2", "udp:0:127.0.0.1:2: local port '0' is not a number 1-65535"),
    ("udp:-1:127.0.0.1:2", "udp:-1:127.0.0.1:2: local port '-1' is not a number 1-65535"),
    ("udp:1:127.0.0.1:65536", "udp:1:127.0.0.1:65536: remote port '65536' is not a number 1-65535"),
    ("udp:1:127.0.0.1:", "udp:1:127.0.0.1:: remote port '' is not a number 1-65535"),
    ("udp:1:127.0.0.1:+5", "udp:1:127.0.0.1:+5: remote port '+5' is not a number 1-65535"),
    (
        "udp:1:127.0.0.1:\u0665",
        "udp:1:127.0.0.1:\u0665: remote port '\u0665' is not a number 1-65535",
    ),
    ("udp:1:127.0.0.1", f"udp:1:127.0.0.1: {USAGE}"),
    ("udp:1:::1:2", f"udp:1:::1:2: {USAGE}"),
    ("udp:1:[::1:2", f"udp:1:[::1:2: {USAGE}"),
    ("udp:1:[::1]x:2", f"udp:1:[::1]x:2: {USAGE}"),
    ("udp:1:2:3:4:5", f"udp:1:2:3:4:5: {USAGE}"),
    ("udp:", f"udp:: {USAGE}"),
    (
        "udp:1:[127.0.0.1]:2",
        "udp:1:[127.0.0.1]:2: remote host '[127.0.0.1]' is not an IPv6 address",
    ),
    (
        "udp:1:300.1.1.1:2",
        "udp:1:300.1.1.1:2: remote host '300.1.1.1' is not an IPv4 address or a host name",
    ),
    ("udp:1::2", "udp:1::2: remote host '' is not an IPv4 address or a host name"),
    (
        "udp:1:bad_host:2",
        "udp:1:bad_host:2: remote host 'bad_host' is not an IPv4 address or a host name",
    ),
    ("udp:1:-r1:2", "udp:1:-r1:2: remote host '-r1' is not an IPv4 address or a host name"),
    (
        "udp:localhost:1:127.0.0.1:2",
        "udp:localhost:1:127.0.0.1:2: local address 'localhost' is not an IP address",
    ),
    ("udp:[x]:1:[::1]:2", "udp:[x]:1:[::1]:2: local address '[x]' is not an IPv6 address"),
    (
        "udp:[::1]:1:127.0.0.1:2",
        "udp:[::1]:1:127.0.0.1:2: local address ::1 is IPv6 but remote host 127.0.0.1 is IPv4",
    ),
    (
        "udp:127.0.0.1:1:[::1]:2",
        "udp:127.0.0.1:1:[::1]:2: local address 127.0.0.1 is IPv4 but remote host ::1 is IPv6",
    ),
    ("unix:/a", "unix:/a: expected unix:LOCAL_PATH:REMOTE_PATH (paths without ':')"),
    ("unix:/a:/b:/c", "unix:/a:/b:/c: expected unix:LOCAL_PATH:REMOTE_PATH (paths without ':')"),
    ("unix::/b", "unix::/b: local path is empty"),
    ("unix:/a:", "unix:/a:: remote path is empty"),
    ("unix:/a:/a", "unix:/a:/a: local and remote path are the same"),
    (f"unix:{LONG}:/b", f"unix:{LONG}:/b: local path is 108 bytes long, the limit is 107"),
    (f"unix:/a:{LONG}", f"unix:/a:{LONG}: remote path is 108 bytes long, the limit is 107"),
    ("tap:", f"tap:: interface name '' {IFNAME}"),
    ("tap:abcdefghijklmnop", f"tap:abcdefghijklmnop: interface name 'abcdefghijklmnop' {IFNAME}"),
    ("tap:a b", f"tap:a b: interface name 'a b' {IFNAME}"),
    ("tap:a/b", f"tap:a/b: interface name 'a/b' {IFNAME}"),
    ("tap:..", f"tap:..: interface name '..' {IFNAME}"),
    ("eth:eth0:1", f"eth:eth0:1: interface name 'eth0:1' {IFNAME}"),
    ("eth:@ns", f"eth:@ns: interface name '' {IFNAME}"),
    ("tap:tap0@", "tap:tap0@: network namespace name '' is invalid"),
    ("tap:tap0@a/b", "tap:tap0@a/b: network namespace name 'a/b' is invalid"),
    ("eth:eth0@..", "eth:eth0@..: network namespace name '..' is invalid"),
]


@pytest.mark.parametrize(("text", "message"), BAD, ids=[b[0] or "empty" for b in BAD])
def test_bad_specs(text: str, message: str) -> None:
    with pytest.raises(ValueError) as error:
        parse_endpoint(text)
    assert str(error.value) == message
    assert "\n" not in message
