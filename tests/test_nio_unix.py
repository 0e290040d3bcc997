"""Unix datagram endpoints: a late or restarting peer, stale socket files, oversize frames."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import peers
import pytest

from tunnelscope.nio import EndpointError, open_endpoint


def test_pair_with_late_peer(tmp_path: Path) -> None:
    a_path, b_path = tmp_path / "a.sock", tmp_path / "b.sock"
    with open_endpoint(f"unix:{a_path}:{b_path}") as a:
        assert not a.connected  # type: ignore[attr-defined]
        assert a.send_batch([b"early", b"too"]) == (0, 2)  # nobody there yet: counted
        assert a.counters["refused"] == 2
        with open_endpoint(f"unix:{b_path}:{a_path}") as b:
            frames = [b"", b"\x02", bytes(range(14)), os.urandom(65507)]
            assert b.send_batch(frames) == (4, 0)
            assert peers.receive(a, 4) == frames
            assert a.send_batch(frames) == (4, 0)  # reconnects by itself
            assert peers.receive(b, 4) == frames
        assert not b_path.exists()  # close removes its socket file
        assert a.send_batch([b"gone"]) == (0, 1)  # the peer left: refused, not raised
        assert a.counters["refused"] == 3
        with open_endpoint(f"unix:{b_path}:{a_path}") as b:  # the peer restarts
            assert a.send_batch([b"back"]) == (1, 0)
            assert peers.receive(b, 1) == [b"back"]
    assert not a_path.exists()


def test_oversize_datagram_is_counted_not_truncated(tmp_path: Path) -> None:
    a_path, b_path = tmp_path / "a", tmp_path / "b"
    with (
        open_endpoint(f"unix:{a_path}:{b_path}") as a,
        open_endpoint(f"unix:{b_path}:{a_path}") as b,
    ):
        assert a.send_batch([b"x" * 70000, b"small"]) == (2, 0)
        assert peers.receive(b, 1) == [b"small"]
        assert b.counters["oversize"] == 1


def test_full_peer_counts_busy(tmp_path: Path) -> None:
    a_path, b_path = tmp_path / "a", tmp_path / "b"
    with open_endpoint(f"unix:{a_path}:{b_path}") as a, open_endpoint(f"unix:{b_path}:{a_path}"):
        frames = [b"x" * 1500] * 20000  # more than a's 4 MiB send buffer: b never reads
        sent, errors = a.send_batch(frames)
        assert sent > 0
        assert errors == len(frames) - sent > 0
        assert a.counters["send_busy"] == errors


def test_stale_socket_file_is_replaced(tmp_path: Path) -> None:
    path = tmp_path / "a"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as dead:
        dead.bind(str(path))
    assert path.exists()  # left behind by a process that died
    with open_endpoint(f"unix:{path}:{tmp_path / 'b'}"):
        pass


def test_live_socket_is_in_use(tmp_path: Path) -> None:
    path = tmp_path / "a"
    spec = f"unix:{path}:{tmp_path / 'b'}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as live:
        live.bind(str(path))
        with pytest.raises(EndpointError) as error:
            open_endpoint(spec)
        assert path.exists()
    assert str(error.value) == f"{spec}: {path} is already in use"


def test_existing_file_is_not_a_socket(tmp_path: Path) -> None:
    path = tmp_path / "a"
    path.write_text("precious")
    spec = f"unix:{path}:{tmp_path / 'b'}"
    with pytest.raises(EndpointError) as error:
        open_endpoint(spec)
    assert str(error.value) == f"{spec}: {path} exists and is not a socket"
    assert path.read_text() == "precious"


def test_unbindable_directory(tmp_path: Path) -> None:
    spec = f"unix:{tmp_path / 'missing' / 'a'}:{tmp_path / 'b'}"
    with pytest.raises(EndpointError) as error:
        open_endpoint(spec)
    assert str(error.value) == (
        f"{spec}: cannot bind {tmp_path / 'missing' / 'a'}: No such file or directory"
    )
