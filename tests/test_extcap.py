"""The Wireshark extcap: tshark lists running links and captures them with the right link type."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import peers
import pytest
import tshark
from command import TUNNELSCOPE

from tunnelscope.lab import extcap
from tunnelscope.lab.control import ControlClient
from tunnelscope.lab.stream import running_instances

pytestmark = pytest.mark.timeout(120)

HDLC_IP = bytes.fromhex("0f0008004500002000000000401100000a0000010a000002") + bytes(12)


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """A private HOME (the extcap folder) and runtime directory (the instance registry)."""
    home, runtime = tmp_path / "home", tmp_path / "run"
    home.mkdir()
    runtime.mkdir(mode=0o700)
    monkeypatch.setenv("HOME", str(home))
    monkeypatch.setenv("XDG_RUNTIME_DIR", str(runtime))
    monkeypatch.delenv("XDG_CONFIG_HOME", raising=False)
    return dict(os.environ)


@pytest.fixture
def served(env: dict[str, str], tmp_path: Path) -> Iterator[tuple[int, int]]:
    """`tunnelscope serve` of one C-HDLC link (R1's port, tunnelscope's port facing it)."""
    r1, ours_a, ours_b, r2 = peers.free_udp_ports(4)
    lab = tmp_path / "lab.toml"
    lab.write_text(
        'name = "serial"\n[[link]]\na = "R1 s1/0"\nb = "R2 s1/0"\n'
        f'a_endpoint = "udp:{ours_a}:127.0.0.1:{r1}"\nb_endpoint = "udp:{ours_b}:127.0.0.1:{r2}"\n'
        'encapsulation = "hdlc"\n'
    )
    command = [*TUNNELSCOPE, "serve", str(lab), "--control", "127.0.0.1:0"]
    process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True, env=env)
    try:
        assert process.stdout is not None
        for line in process.stdout:
            if line.startswith("stream on"):
                break
        assert peers.wait_until(lambda: running_instances(), 5)
        yield r1, ours_a
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def run(*args: str, env: dict[str, str], timeout: float = 30) -> subprocess.CompletedProcess:
    return subprocess.run(args, capture_output=True, text=True, env=env, timeout=timeout)


@tshark.required
def test_tshark_lists_and_captures_a_running_hdlc_link(
    served: tuple[int, int], env: dict[str, str]
) -> None:
    done = run(*TUNNELSCOPE, "extcap", "install", env=env)
    assert done.returncode == 0, done.stderr
    launcher = Path(env["HOME"], ".config/wireshark/extcap/tunnelscope")
    assert os.access(launcher, os.X_OK)

    listing = run("tshark", "-D", env=env).stdout
    names = [line.split(". ", 1)[1].split(" ", 1)[0] for line in listing.splitlines()]
    links = [name for name in names if name.startswith("tunnelscope-serial-")]
    # named after the lab and the link, never the process: the same after a restart
    assert links == ["tunnelscope-serial-R1%3As1%2F0--R2%3As1%2F0"], listing
    assert "tunnelscope-sniff" in names, listing
    dlts = run("tshark", "-i", links[0], "-L", env=env).stdout
    assert "C_HDLC" in dlts

    r1, ours = served
    stop = threading.Event()

    def traffic() -> None:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
            sock.bind(("127.0.0.1", r1))
            while not stop.is_set():
                sock.sendto(HDLC_IP, ("127.0.0.1", ours))
                time.sleep(0.02)

    sender = threading.Thread(target=traffic, daemon=True)
    sender.start()
    try:
        fields = ["chdlc.address", "chdlc.protocol", "ip.dst"]
        command = ["tshark", "-n", "-i", links[0], "-a", "duration:3", "-T", "fields"]
        captured = run(*command, *(f"-e{f}" for f in fields), env=env, timeout=30)
    finally:
        stop.set()
        sender.join(5)
    rows = [line.split("\t") for line in captured.stdout.splitlines() if line]
    assert len(rows) >= 10, captured.stderr
    assert {tuple(row) for row in rows} == {("0x0f", "0x0800", "10.0.0.2")}

    done = run(*TUNNELSCOPE, "extcap", "install", "--uninstall", env=env)
    assert done.returncode == 0 and not launcher.exists()


def test_the_toolbar_changes_the_links_impairments(served: tuple[int, int], tmp_path: Path) -> None:
    (interface,) = extcap.link_interfaces()
    control = interface.instance.control
    assert control
    requests = tmp_path / "control-in"
    message = b"12.5"
    requests.write_bytes(b"T" + (len(message) + 2).to_bytes(3, "big") + b"\x00\x01" + message)
    replies = io.BytesIO()
    extcap.Toolbar(interface, replies).serve(str(requests))
    assert b"packet_loss 12.5 set" in replies.getvalue()
    with ControlClient(control) as client:
        (link,) = client.links()
    assert [f["impairment"] for f in link["filters"]] == ["packet_loss 12.5"]
    assert "removed" in extcap.Toolbar(interface, io.BytesIO()).apply(0, "0")
    assert "not a number" in extcap.Toolbar(interface, io.BytesIO()).apply(2, "soon")
    with ControlClient(control) as client:
        assert client.links()[0]["filters"] == []


def test_bad_extcap_calls_are_one_line(env: dict[str, str]) -> None:
    for args in ([], ["--extcap-interface", "tunnelscope-1-nope", "--extcap-dlts"]):
        done = run(*TUNNELSCOPE, "extcap", *args, env=env)
        assert done.returncode == 2
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
