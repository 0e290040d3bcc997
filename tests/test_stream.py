"""Remote live streams: every client decodes from its first byte; a stalled one costs nothing."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import peers
import pytest
import tshark
from command import TUNNELSCOPE

from tunnelscope.datapath.engine import Engine, Link
from tunnelscope.formats.linktype import LinkType
from tunnelscope.lab.stream import (
    Request,
    StreamError,
    StreamServer,
    connect,
    parse_request,
    required_token,
)

pytestmark = pytest.mark.timeout(90)

OFFERED = 50_000  # frames per second
ETHERNET_FRAME = bytes.fromhex("ffffffffffff020000000001") + b"\x88\xb5" + bytes(50)


@contextmanager
def served(
    host: str = "127.0.0.1", token: str | None = None
) -> Iterator[tuple[Link, StreamServer, socket.socket, socket.socket]]:
    """A running link between two UDP peers (a, b), and its stream server."""
    pa, la, lb, pb = peers.free_udp_ports(4)
    engine = Engine()
    link = engine.add_link("lan", f"udp:{la}:127.0.0.1:{pa}", f"udp:{lb}:127.0.0.1:{pb}")
    link.linktype = LinkType.ETHERNET  # as if detected: headers go out at once
    thread = threading.Thread(target=engine.run, daemon=True)
    thread.start()
    a = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    a.bind(("127.0.0.1", pa))
    a.connect(("127.0.0.1", la))
    b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    b.bind(("127.0.0.1", pb))
    server = StreamServer(engine, (host, 0), token).start()
    try:
        yield link, server, a, b
    finally:
        server.close()
        engine.stop()
        thread.join(5)
        engine.close()
        a.close()
        b.close()


def send(a: socket.socket, frames: list[bytes], pause: float = 0.002) -> None:
    for frame in frames:
        a.send(frame)
        time.sleep(pause)


def collect(sock: socket.socket, into: bytearray) -> threading.Thread:
    def run() -> None:
        while data := sock.recv(65536):
            into.extend(data)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def frame(n: int) -> bytes:
    return ETHERNET_FRAME[:-2] + n.to_bytes(2, "big")


@tshark.required
def test_two_clients_joining_at_different_times_both_decode_from_their_first_byte(
    tmp_path: Path,
) -> None:
    with served() as (link, server, a, _):
        first_bytes, second_bytes = bytearray(), bytearray()
        first = connect(server.where, Request(link="lan"))
        readers = [collect(first, first_bytes)]
        assert peers.wait_until(lambda: len(link.captures) == 1, 5)
        send(a, [frame(n) for n in range(10)])
        second = connect(server.where, Request(link="lan", pcapng=True))
        readers.append(collect(second, second_bytes))
        assert peers.wait_until(lambda: len(link.captures) == 2, 5)
        send(a, [frame(n) for n in range(10, 25)])
        assert peers.wait_until(lambda: all(c.frames >= 25 - 15 * i for i, c in
                                            enumerate(link.captures)), 5)  # fmt: skip
        first.shutdown(socket.SHUT_RDWR)
        second.shutdown(socket.SHUT_RDWR)
        for reader in readers:
            reader.join(5)
        first.close()
        second.close()
        assert peers.wait_until(lambda: not link.captures, 5)  # leaving ends the capture
    for name, data, numbers in (
        ("first.pcap", first_bytes, range(25)),
        ("second.pcapng", second_bytes, range(10, 25)),
    ):
        path = tmp_path / name
        path.write_bytes(bytes(data))
        rows = tshark.fields(str(path), ["eth.type", "frame.len"])
        assert len(rows) == len(numbers), name
        assert {row["eth.type"][0] for row in rows} == {"0x88b5"}


def forwarded_per_second(link: Link, a: socket.socket, seconds: float) -> float:
    """Offer OFFERED frames/s A -> B for `seconds` (paced: a sender flat out would measure
    its own speed on a busy host); the frames the link forwarded per second meanwhile."""
    before = link.stats()["a2b"]["forwarded"]
    start = time.monotonic()
    payload, sent = frame(1), 0
    while (elapsed := time.monotonic() - start) < seconds:
        while sent < elapsed * OFFERED:
            a.send(payload)
            sent += 1
        time.sleep(0.001)
    time.sleep(0.05)
    return (link.stats()["a2b"]["forwarded"] - before) / (time.monotonic() - start - 0.05)


def test_a_stalled_client_does_not_lower_the_links_throughput() -> None:
    """Runs alternate (without, with a new stalled client) so that load on the host from
    anything else hits both sides alike; the best run of each side is compared."""
    baseline, with_stalled, stalled_clients = [], [], []
    with served() as (link, server, a, b):
        b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 16)
        try:
            for _ in range(3):
                baseline.append(forwarded_per_second(link, a, 0.7))
                stalled = socket.create_connection(server.address)
                stalled_clients.append(stalled)
                stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
                stalled.sendall(b"CAPTURE lan\n")  # and never reads
                assert peers.wait_until(lambda: len(link.captures) == 1, 5)
                state = link.captures[0]
                with_stalled.append(forwarded_per_second(link, a, 0.7))
                # once 4 MiB wait for it, the reader is dropped: keep frames coming until then
                assert peers.wait_until(
                    lambda: send(a, [frame(2) + bytes(1400)] * 500, 0) or not link.captures, 10
                )
                assert state.error == "reader stalled"
            for stalled in stalled_clients:
                stalled.settimeout(5)
                assert stalled.recv(4) == b"\xd4\xc3\xb2\xa1"  # what it got is a capture
        finally:
            for stalled in stalled_clients:
                stalled.close()
    assert max(baseline) > 0.8 * OFFERED
    assert max(with_stalled) >= 0.9 * max(baseline), (baseline, with_stalled)


def test_requests_errors_and_the_token() -> None:
    assert parse_request("") == Request()
    assert parse_request('CAPTURE "a b" points=both "filter=icmp or arp"') == Request(
        link="a b", points="both", pcapng=True, filter="icmp or arp"
    )
    assert parse_request("GET /l%201?format=pcapng&token=t HTTP/1.1").link == "l 1"
    for bad in ("CAPTURE x points=mid", "CAPTURE x colour=red", "DELETE x", 'CAPTURE "x'):
        with pytest.raises(StreamError):
            parse_request(bad)
    with served(host="0.0.0.0") as (link, server, a, _):
        assert server.token  # generated: off loopback a token is required
        address = f"127.0.0.1:{server.address[1]}"
        with pytest.raises(StreamError, match="token"):
            connect(address, Request(link="lan"))
        with pytest.raises(StreamError, match="no link named 'nope'"):
            connect(address, Request(link="nope", token=server.token))
        with connect(address, Request(link="lan", token=server.token)):
            pass
        with socket.create_connection(server.address) as raw:  # nc: no request, no token
            assert raw.recv(100).startswith(b"tunnelscope: error: a valid token")
    with served() as (link, server, a, _):
        with socket.create_connection(server.address) as raw:  # curl
            raw.sendall(b"GET /lan HTTP/1.1\r\nHost: x\r\n\r\n")
            head = raw.recv(4096)
            while b"\r\n\r\n" not in head:
                head += raw.recv(4096)
            assert head.startswith(b"HTTP/1.0 200 OK")
            if head.endswith(b"\r\n\r\n"):
                head += raw.recv(4)
            assert head.split(b"\r\n\r\n", 1)[1][:4] == b"\xd4\xc3\xb2\xa1"
        with socket.create_connection(server.address) as raw:  # nc: the default link
            assert raw.recv(4) == b"\xd4\xc3\xb2\xa1"
        for args in ([server.where, "nope", "-w", "-"], ["127.0.0.1:1", "lan", "-w", "-"]):
            done = subprocess.run(
                [*TUNNELSCOPE, "stream", *args],
                capture_output=True,
                text=True,
                timeout=30,
            )
            assert done.returncode == 2
            assert done.stderr.startswith("tunnelscope: error: ")
            assert len(done.stderr.splitlines()) == 1


def test_off_loopback_an_empty_token_is_refused_and_no_token_is_explicit() -> None:
    assert required_token("127.0.0.1", "") is None
    assert required_token("::1", "s3cret") == "s3cret"
    assert len(required_token("0.0.0.0", None) or "") >= 16  # generated
    with pytest.raises(ValueError, match="--no-token"):
        required_token("0.0.0.0", "")
    assert required_token("0.0.0.0", "", no_token=True) is None
    with served(host="0.0.0.0", token=None) as (_, server, _, _):
        assert server.token and server.exposure_warning is None


@pytest.mark.parametrize("command", ["bridge", "serve"])
def test_the_cli_refuses_an_empty_token_off_loopback_before_anything_runs(
    command: str, tmp_path: Path
) -> None:
    pa, la, lb, pb = peers.free_udp_ports(4)
    a, b = f"udp:{la}:127.0.0.1:{pa}", f"udp:{lb}:127.0.0.1:{pb}"
    lab = tmp_path / "lab.toml"
    ends = f'a_endpoint = "{a}"\nb_endpoint = "{b}"\n'
    lab.write_text('[[link]]\na = "R1 f0/0"\nb = "R2 f0/0"\n' + ends)
    words = {
        "bridge": ["bridge", a, b, "-w", str(tmp_path / "x.pcap"), "--duration", "1"],
        "serve": ["serve", str(lab), "--control", "127.0.0.1:0"],
    }[command]
    refused = subprocess.run(
        [*TUNNELSCOPE, *words, "--stream", "0.0.0.0:0", "--stream-token", ""],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=tmp_path,
    )
    assert refused.returncode == 2
    assert refused.stderr.startswith("tunnelscope: error: an empty stream token on 0.0.0.0")
    assert len(refused.stderr.splitlines()) == 1
    assert not (tmp_path / "x.pcap").exists()
    if command == "bridge":
        open_stream = subprocess.run(
            [*TUNNELSCOPE, *words, "--stream", "0.0.0.0:0", "--no-token"],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert open_stream.returncode == 0, open_stream.stderr
        assert "need no token: anyone who can reach the port may watch" in open_stream.stderr
