"""Wireshark's extcap interface: every link of every running tunnelscope in its interface list.

Why: users should pick a lab link in Wireshark's capture dialog as they pick a NIC, with the
right link type, instead of piping. Wireshark runs the program in its personal extcap folder
with `--extcap-interfaces`, then per interface `--extcap-dlts` and `--extcap-config`, then
`--capture --fifo PATH`; toolbar controls arrive on `--extcap-control-in` (messages: 'T',
3-byte length, control number, command, payload). Interfaces:

- `tunnelscope-PID-LINK`: one per link of each registered instance (see stream.registered),
  captured through that instance's stream server; its toolbar changes the link's impairments
  through the control protocol (a `serve`; a bare `bridge` has no control port).
- `tunnelscope-sniff`: the passive tap on lo (sniff.py), for labs tunnelscope does not run.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import struct
import sys
import threading
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import BinaryIO

from tunnelscope import __version__
from tunnelscope.analysis.decap import Options
from tunnelscope.analysis.sniff import PacketRing, Sniffer
from tunnelscope.formats.linktype import LinkType
from tunnelscope.lab.control import ControlClient, ControlError, ControlUnavailable
from tunnelscope.lab.stream import (
    Instance,
    Request,
    StreamError,
    connect,
    copy_stream,
    list_links,
    read_exactly,
    running_instances,
    tunnel_linktype,
)

PREFIX = "tunnelscope-"
SNIFF = "tunnelscope-sniff"
LAUNCHER = "tunnelscope"
LIST_TIMEOUT = 2.0  # seconds per instance while listing: a hung one must not hang Wireshark
DLT_NAMES = {
    LinkType.ETHERNET: ("EN10MB", "Ethernet"),
    LinkType.C_HDLC: ("C_HDLC", "Cisco HDLC"),
    LinkType.PPP_SERIAL: ("PPP_SERIAL", "PPP in HDLC-like framing"),
    LinkType.FRELAY: ("FRELAY", "Frame Relay"),
}
# toolbar controls: number -> (label, impairment, filter name)
CONTROLS = {
    0: ("Loss %", "packet_loss", "extcap_loss"),
    1: ("freq_drop N", "freq_drop", "extcap_freq_drop"),
    2: ("Delay ms", "delay", "extcap_delay"),
}
CMD_INITIALIZED, CMD_SET, CMD_ENABLE, CMD_DISABLE, CMD_STATUSBAR = 0, 1, 4, 5, 6


class ExtcapError(Exception):
    """Bad arguments or an interface that is gone: one line for Wireshark to show."""


# --- the launcher ----------------------------------------------------------------------------


def extcap_folder() -> str:
    """Wireshark's personal extcap folder on Linux (`tshark -G folders`: personal config)."""
    config = os.environ.get("XDG_CONFIG_HOME") or os.path.join(os.path.expanduser("~"), ".config")
    return os.path.join(config, "wireshark", "extcap")


def install(folder: str | None = None) -> str:
    """Write the launcher: a script running this Python with `-m tunnelscope extcap`, so a
    virtualenv's tunnelscope is the one Wireshark runs. Returns its path."""
    folder = folder or extcap_folder()
    try:
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, LAUNCHER)
        with open(path, "w") as file:
            file.write(
                "#!/bin/sh\n# tunnelscope's Wireshark extcap (tunnelscope extcap install)\n"
                f'exec {shlex.quote(sys.executable)} -m tunnelscope extcap "$@"\n'
            )
        os.chmod(path, 0o755)
    except OSError as exc:
        raise ExtcapError(f"cannot install into {folder}: {exc.strerror or exc}") from None
    return path


def uninstall(folder: str | None = None) -> str | None:
    """Remove the launcher; its path, or None when it was not installed."""
    path = os.path.join(folder or extcap_folder(), LAUNCHER)
    try:
        os.unlink(path)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise ExtcapError(f"cannot remove {path}: {exc.strerror or exc}") from None
    return path


# --- interfaces ------------------------------------------------------------------------------


@dataclass
class LinkInterface:
    """One link of one running instance, as Wireshark lists it."""

    instance: Instance
    link: str
    linktype: LinkType

    @property
    def value(self) -> str:
        """The same for the same lab (or bridge) and link after a restart, so Wireshark's
        remembered interfaces and per-interface preferences keep working."""
        owner = self.instance.name or str(self.instance.pid)
        quote = urllib.parse.quote
        return f"{PREFIX}{quote(owner, safe='')}-{quote(self.link, safe='')}"

    @property
    def display(self) -> str:
        owner = self.instance.name or self.instance.pid
        return f"tunnelscope {self.link} ({self.instance.kind} {owner})"


def link_interfaces() -> list[LinkInterface]:
    """Every link of every running instance with a stream (unreachable ones are skipped)."""
    found = []
    for instance in running_instances():
        if not instance.stream:
            continue
        try:
            links = list_links(instance.stream, instance.token, LIST_TIMEOUT)
        except StreamError:
            continue
        for link in links:
            number = link.get("linktype")
            linktype = LinkType(number) if number in DLT_NAMES else LinkType.ETHERNET
            found.append(LinkInterface(instance, link["name"], linktype))
    return found


def find_interface(value: str) -> LinkInterface:
    for interface in link_interfaces():
        if interface.value == value:
            return interface
    raise ExtcapError(f"no running tunnelscope link behind interface {value!r}")


def interfaces_text() -> str:
    lines = [f"extcap {{version={__version__}}}{{help=https://github.com/tunnelscope}}"]
    for interface in link_interfaces():
        lines.append(f"interface {{value={interface.value}}}{{display={interface.display}}}")
    lines.append(f"interface {{value={SNIFF}}}{{display=tunnelscope sniff: lab tunnels on lo}}")
    for number, (label, kind, _) in CONTROLS.items():
        lines.append(
            f"control {{number={number}}}{{type=string}}{{display={label}}}"
            f"{{tooltip=Set the link's {kind} (both directions); 0 or empty removes it}}"
        )
    return "\n".join(lines) + "\n"


def dlts_text(value: str) -> str:
    linktype = LinkType.ETHERNET if value == SNIFF else find_interface(value).linktype
    name, display = DLT_NAMES[linktype]
    if value == SNIFF:
        display = "one pcapng interface per tunnel, each with its own link type"
    return f"dlt {{number={int(linktype)}}}{{name={name}}}{{display={display}}}\n"


def config_text(value: str) -> str:
    if value == SNIFF:
        return (
            "arg {number=0}{call=--ports}{display=Tunnel UDP ports}{type=string}"
            "{tooltip=e.g. 10000-10010 or 10001,10005; empty: every tunnel found}\n"
            "arg {number=1}{call=--dedupe}{display=Drop ubridge copies}{type=boolflag}"
            "{tooltip=GNS3 2.x relays each frame twice on loopback}\n"
        )
    find_interface(value)
    lines = [
        "arg {number=0}{call=--linktype}{display=Link type}{type=selector}"
        "{tooltip=The link's encapsulation; auto: the configured or detected one}",
        "value {arg=0}{value=auto}{display=auto}{default=true}",
    ]
    lines += [
        f"value {{arg=0}}{{value={lt.short_name}}}{{display={display}}}{{default=false}}"
        for lt, (_, display) in DLT_NAMES.items()
    ]
    lines += [
        "arg {number=1}{call=--capture-at}{display=Capture point}{type=selector}"
        "{tooltip=Before the link's impairments or after them}",
        "value {arg=1}{value=pre}{display=before impairments}{default=true}",
        "value {arg=1}{value=post}{display=after impairments}{default=false}",
    ]
    return "\n".join(lines) + "\n"


# --- capturing -------------------------------------------------------------------------------


@dataclass
class CaptureArgs:
    interface: str
    fifo: str
    capture_filter: str | None = None
    linktype: str = "auto"
    points: str = "pre"
    ports: frozenset[int] | None = None
    dedupe: bool = False
    control_in: str | None = None
    control_out: str | None = None


def capture(args: CaptureArgs) -> None:
    """Write the interface's frames into the FIFO until Wireshark stops us (SIGTERM)."""
    if args.interface == SNIFF:
        if args.capture_filter:
            raise ExtcapError("tunnelscope-sniff takes no capture filter (use its ports option)")
        ring = PacketRing("lo", ports=args.ports)
        signal.signal(signal.SIGTERM, lambda *_: ring.stop())  # Wireshark's stop: end valid
        Sniffer(ring, args.fifo, None, Options(ports=args.ports, dedupe=args.dedupe)).run()
        return
    interface = find_interface(args.interface)
    try:
        linktype = None if args.linktype == "auto" else tunnel_linktype(args.linktype)
    except StreamError as exc:
        raise ExtcapError(str(exc)) from None
    request = Request(
        link=interface.link,
        points=args.points,
        linktype=linktype,
        filter=args.capture_filter or None,
        token=interface.instance.token,
    )
    with open(args.fifo, "wb", buffering=0) as fifo, _toolbar(args, interface):
        try:
            sock = connect(interface.instance.stream or "", request)
        except StreamError as exc:
            raise ExtcapError(str(exc)) from None
        with sock, contextlib.suppress(BrokenPipeError):
            copy_stream(sock, fifo.fileno())


@contextlib.contextmanager
def _toolbar(args: CaptureArgs, interface: LinkInterface) -> Iterator[None]:
    """Serve the toolbar controls in a thread while the capture runs."""
    if not args.control_in or not args.control_out:
        yield
        return
    with open(args.control_out, "wb", buffering=0) as out:
        toolbar = Toolbar(interface, out)
        thread = threading.Thread(target=toolbar.serve, args=(args.control_in,), daemon=True)
        thread.start()
        yield


class Toolbar:
    """Applies toolbar values to the link through its instance's control port."""

    def __init__(self, interface: LinkInterface, out: BinaryIO) -> None:
        self.interface = interface
        self.out = out
        self.lock = threading.Lock()

    def send(self, number: int, command: int, payload: bytes = b"") -> None:
        with self.lock:
            self.out.write(b"T" + struct.pack(">I", len(payload) + 2)[1:])
            self.out.write(bytes((number, command)) + payload)

    def serve(self, path: str) -> None:
        with contextlib.suppress(OSError), open(path, "rb", buffering=0) as pipe:
            if not self.interface.instance.control:
                for number in CONTROLS:
                    self.send(number, CMD_DISABLE)
            while header := read_exactly(pipe.read, 6):
                if len(header) < 6 or header[:1] != b"T":
                    return
                length = int.from_bytes(header[1:4], "big")
                payload = read_exactly(pipe.read, length - 2)
                if header[5] == CMD_SET and header[4] in CONTROLS:
                    message = self.apply(header[4], payload.decode("utf-8", "replace").strip())
                    self.send(0, CMD_STATUSBAR, message.encode())

    def apply(self, number: int, value: str) -> str:
        """Set (or, with 0 or nothing, remove) one impairment; a status line either way."""
        label, kind, name = CONTROLS[number]
        control = self.interface.instance.control
        link = self.interface.link
        if not control:
            return "this tunnelscope has no control port: impairments cannot be changed"
        try:
            number_value = float(value or "0")
        except ValueError:
            return f"{label}: {value!r} is not a number"
        try:
            with ControlClient(control, timeout=5) as client:
                if number_value == 0:
                    with contextlib.suppress(ControlError):
                        client.request("bridge", "delete_packet_filter", link, name)
                    return f"{link}: {kind} removed"
                client.request("bridge", "set_packet_filter", link, name, "both", kind, value)
        except (ControlError, ControlUnavailable, ValueError) as exc:
            return f"{link}: {exc}"
        return f"{link}: {kind} {value} set"
