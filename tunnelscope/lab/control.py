"""The control protocol: ubridge's hypervisor line protocol, served on loopback TCP.

A GNS3 server drives tunnelscope exactly as it drives ubridge (`bridge create`, `add_nio_udp`,
`start_capture`, `add_packet_filter`...), same names, argument counts, reply codes and line
format. Commands ubridge lacks (per-direction filters, the new impairments, capture points,
pcapng, Dynagen's verbs on named lab ends) are new commands in the same protocol, listed in
docs/control.md.

Threads: the engine pumps frames in one thread (`Runner.run`). Each client connection has a
thread that reads lines and hands every command to the engine thread (`Runner.call`): the
loop must not be touched while it pumps, and one thread owning all state means commands run
one at a time, in arrival order, with no locks in the bridge model.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import ipaddress
import json
import os
import socket
import threading
import time
import unicodedata
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Any

from tunnelscope import __version__
from tunnelscope.datapath import bpf
from tunnelscope.datapath.engine import CAPTURE_POINTS, Engine, Link
from tunnelscope.datapath.impairments import Impairment, ImpairmentError, parse_impairment
from tunnelscope.formats.capture import CaptureError, Format
from tunnelscope.formats.linktype import TUNNEL_LINKTYPES, LinkType
from tunnelscope.lab.labfile import End, Lab, LabError, resolve_capture_path
from tunnelscope.nio import Endpoint, EndpointError, netdev, parse_endpoint
from tunnelscope.nio.netio import default_directory as default_netio_dir
from tunnelscope.nio.spec import SocketEndpoint
from tunnelscope.nio.tap import TapEndpoint

UBRIDGE_VERSION = "0.9.18"  # the ubridge whose protocol we speak; GNS3 wants >= 0.9.14
DEFAULT_PORT = 4242  # ubridge's
DEFAULT_CONTROL = f"127.0.0.1:{DEFAULT_PORT}"
CONTROL_ENV = "TUNNELSCOPE_CONTROL"
MAX_LINE = 512  # bytes per request, newline included (ubridge reads lines into 512 bytes)
MAX_CONNECTIONS = 16
LINE_TIMEOUT_S = 10.0  # a request line begun must end within this
EVICT_IDLE_S = 5.0  # when every slot is taken, a client idle this long gives its slot up
RATE_PERIOD = 1.0  # seconds between two rate samples


class Code(IntEnum):
    """ubridge's reply codes (hypervisor.h)."""

    OK = 100
    INFO = 101
    DEBUG = 102
    PARSING = 200
    UNK_MODULE = 201
    UNK_CMD = 202
    BAD_PARAM = 203
    INV_PARAM = 204
    BINDING = 205
    CREATE = 206
    DELETE = 207
    UNK_OBJ = 208
    START = 209
    STOP = 210
    FILE = 211
    BAD_OBJ = 212
    RENAME = 213
    NOT_FOUND = 214
    UNSPECIFIED = 215


class ControlError(Exception):
    """An error reply: a 2xx code and one line of text (raised by the client as well)."""

    def __init__(self, code: int, text: str) -> None:
        super().__init__(text)
        self.code = code
        self.text = text


@dataclass
class Reply:
    """A reply: `101 ` info lines, then the final `100-`/`2xx-` line."""

    text: str = "OK"
    info: list[str] = field(default_factory=list)
    code: int = Code.OK
    action: str | None = None  # "close" or "stop": what happens once the reply is sent

    def lines(self) -> list[str]:
        info = [f"{Code.INFO:d} {_one_line(line)}" for line in self.info]
        return [*info, f"{self.code:d}-{_one_line(self.text)}"]

    def encode(self) -> bytes:
        return "".join(f"{line}\r\n" for line in self.lines()).encode()


def _one_line(text: str) -> str:
    return text.replace("\r", " ").replace("\n", " ")


# --- the line format -------------------------------------------------------------------------


def tokenize(line: str) -> list[str]:
    """Split a request as ubridge's parser does: blanks separate, double quotes group,
    `#` and `!` start a comment, `""` is no token at all. ControlError(200) on bad quoting."""
    tokens: list[str] = []
    current: str | None = None
    quoted = False
    for char in line:
        if quoted:
            if char == '"':
                if current:
                    tokens.append(current)
                current, quoted = None, False
            else:
                current = (current or "") + char
        elif char in " \t":
            if current is not None:
                tokens.append(current)
                current = None
        elif char in "#!":
            break
        elif char == '"':
            if current is not None:
                raise ControlError(Code.PARSING, "Parse error: unexpected quote")
            quoted = True
        else:
            current = (current or "") + char
    if quoted:
        raise ControlError(Code.PARSING, "Parse error: unexpected end of line")
    if current:
        tokens.append(current)
    return tokens


def quote(word: str) -> str:
    """One argument as the parser reads it back; ValueError for what no request can carry."""
    if not word or any(c in word for c in '"\r\n\0'):
        raise ValueError(f"{word!r} cannot be sent as a control argument")
    return f'"{word}"' if any(c in word for c in " \t#!") else word


def parse_address(text: str) -> tuple[str, int]:
    """`PORT`, `HOST:PORT` or `[V6]:PORT`; a bare port means loopback."""
    host, colon, port = text.rpartition(":")
    if not colon:
        host, port = "127.0.0.1", text
    host = host.strip("[]") or "127.0.0.1"
    if not (port.isdigit() and 0 <= int(port) <= 65535):
        raise ValueError(f"{text!r} is not PORT or HOST:PORT")
    return host, int(port)


def exposure_warning(bound: tuple[str, int]) -> str | None:
    """A warning when the control port is reachable from beyond this host."""
    try:
        loopback = ipaddress.ip_address(bound[0]).is_loopback
    except ValueError:
        loopback = False
    if loopback:
        return None
    return f"control on {bound[0]} port {bound[1]} is reachable from the network, unauthenticated"


def gns3_captures_dir(cwd: str) -> str:
    """Where a hypervisor started in `cwd` keeps its captures when not told: the GNS3
    project the node lives in (GNS3 starts ubridge in PROJECT/project-files/TYPE/NODE and
    asks for PROJECT/project-files/captures/FILE), else `cwd` itself."""
    path = os.path.realpath(cwd)
    head, tail = path, ""
    while tail != "project-files" and head != os.path.dirname(head):
        head, tail = os.path.split(head)
    return head if tail == "project-files" else path


def control_address(text: str | None) -> str:
    """The control address to use: given, else $TUNNELSCOPE_CONTROL, else ubridge's default."""
    return text or os.environ.get(CONTROL_ENV) or DEFAULT_CONTROL


# --- bridges: ubridge's object model on the engine ---------------------------------------------


@dataclass
class Filter:
    name: str
    impairment: Impairment


@dataclass
class CaptureRequest:
    """A capture asked for while the bridge is stopped: it starts with the bridge."""

    path: str
    linktype: LinkType | None
    point: str
    pcapng: bool


@dataclass
class Bridge:
    """One ubridge bridge: up to two NIOs (endpoint specs), named filters, one capture.

    While running it is an engine `Link`; stopped, only its configuration exists, as in
    ubridge. A lab link's bridge knows its two device interfaces (`ends`).
    """

    name: str
    nios: list[str] = field(default_factory=list)
    nio_kinds: list[str] = field(default_factory=list)  # ubridge's: "UDP", "Ethernet"...
    filters: list[Filter] = field(default_factory=list)
    pcap_filter: tuple[int, str, bpf.Program] | None = None  # NIO, expression, program
    held: dict[str, Endpoint] = field(default_factory=dict)  # NIOs open since they were added
    link: Link | None = None
    ends: tuple[End, End] | None = None
    encapsulation: LinkType | None = None
    pending_capture: CaptureRequest | None = None
    seed: int | None = None
    baseline: dict[str, dict[str, Any]] = field(default_factory=dict)  # reset_stats
    rates: dict[str, dict[str, float]] = field(default_factory=dict)  # frames/s, last second
    sample: tuple[float, dict[str, dict[str, int]]] | None = None  # the counters rates start from

    def stats(self) -> dict[str, dict[str, Any]] | None:
        """Counters per direction since the last reset_stats; None while stopped."""
        if self.link is None:
            return None
        stats = self.link.stats()
        return {d: _minus(stats[d], self.baseline.get(d, {})) for d in ("a2b", "b2a")}


def _minus(stats: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    result = {}
    for key, value in stats.items():
        if isinstance(value, dict):
            result[key] = {k: v - base.get(key, {}).get(k, 0) for k, v in value.items()}
            result[key] = {k: v for k, v in result[key].items() if v}
        elif key == "queued":
            result[key] = value  # a level, not a count
        else:
            result[key] = value - base.get(key, 0)
    return result


def _totals(stats: dict[str, Any]) -> dict[str, int]:
    return {
        "received": stats["received"],
        "forwarded": stats["forwarded"],
        "dropped": sum(stats["dropped"].values()),
    }


Handler = Callable[..., "Reply | str"]


class Switchboard:
    """ubridge's commands over an Engine, plus tunnelscope's extensions. Engine thread only."""

    def __init__(
        self,
        engine: Engine,
        captures: str,
        lab: Lab | None = None,
        seed: int | None = None,
        netio_dir: str | None = None,
    ) -> None:
        """`netio_dir`: where IOU's NETIO sockets are (default /tmp/netio<UID>)."""
        from tunnelscope.lab.iol import IolBridges  # it builds on this module's bridges

        self.engine = engine
        self.captures = os.path.abspath(captures)
        self.lab = lab
        self.seed = seed
        self.bridges: dict[str, Bridge] = {}
        self.stream: tuple[str, str | None] | None = None  # where live streams are, token
        self._next_rates = time.monotonic() + RATE_PERIOD
        self.commands: dict[str, dict[str, tuple[int, int, Handler]]] = {
            "hypervisor": {
                "version": (0, 0, lambda: Reply(UBRIDGE_VERSION)),
                "module_list": (0, 0, self._module_list),
                "cmd_list": (1, 1, self._cmd_list),
                "reset": (0, 0, self._reset),
                "close": (0, 0, lambda: Reply(action="close")),
                "stop": (0, 0, lambda: Reply(action="stop")),
            },
            "bridge": {
                "create": (1, 1, self._create),
                "delete": (1, 1, self._delete),
                "start": (1, 1, self._start),
                "stop": (1, 1, self._stop),
                "rename": (2, 2, self._rename),
                "show": (1, 1, self._show),
                "list": (0, 0, self._list),
                "get_stats": (1, 1, self._get_stats),
                "reset_stats": (1, 1, self._reset_stats),
                "add_nio_udp": (4, 4, self._add_nio_udp),
                "delete_nio_udp": (4, 4, self._delete_nio_udp),
                "remove_nio_udp": (4, 4, self._delete_nio_udp),
                "add_nio_unix": (3, 3, self._add_nio_unix),
                "add_nio_tap": (2, 2, self._add_nio_tap),
                "add_nio_ethernet": (2, 2, self._add_nio_ethernet),
                "add_nio_linux_raw": (2, 2, self._add_nio_linux_raw),
                "start_capture": (2, 3, self._start_capture),
                "stop_capture": (1, 1, self._stop_capture),
                "add_packet_filter": (2, 10, self._add_packet_filter),
                "delete_packet_filter": (2, 2, self._delete_packet_filter),
                "reset_packet_filters": (1, 1, self._reset_packet_filters),
                "set_pcap_filter": (1, 2, self._set_pcap_filter),
                # extensions
                "set_packet_filter": (4, 12, self._set_packet_filter),
                "start_capture_ext": (3, 5, self._start_capture_ext),
            },
            "iol_bridge": {},
            "docker": {
                "create_veth": (2, 2, self._create_veth),
                "delete_veth": (1, 1, self._delete_veth),
                "move_to_ns": (3, 3, self._move_to_ns),
                "set_mac_addr": (2, 2, self._set_mac_addr),
            },
            "brctl": {"addif": (2, 2, self._addif)},
            "lab": {
                "show": (0, 0, self._lab_show),
                "devices": (0, 0, self._lab_devices),
                "find": (2, 2, self._lab_find),
                "links": (0, 0, self._lab_links),
                "capture": (3, 6, self._lab_capture),
                "stop_capture": (2, 2, self._lab_stop_capture),
                "filter": (3, 12, self._lab_filter),
                "stream": (0, 0, self._lab_stream),
            },
        }

        self.iol = IolBridges(self, netio_dir or default_netio_dir())
        self.commands["iol_bridge"] = self.iol.commands()

    # -- dispatch -------------------------------------------------------------------------

    def execute(self, tokens: list[str]) -> Reply:
        """Run one request (module, command, arguments); errors come back as error replies."""
        if len(tokens) < 2:
            return Reply("At least a module and a command must be specified", code=Code.PARSING)
        module, command, args = tokens[0], tokens[1], tokens[2:]
        if module not in self.commands:
            return Reply(f"Unknown module '{module}'", code=Code.UNK_MODULE)
        if command not in self.commands[module]:
            return Reply(f"Unknown command '{command}'", code=Code.UNK_CMD)
        low, high, handler = self.commands[module][command]
        if not low <= len(args) <= high:
            text = f"Bad number of parameters ({len(args)} with min/max={low}/{high})"
            return Reply(text, code=Code.BAD_PARAM)
        try:
            result = handler(*args)
        except ControlError as exc:
            return Reply(exc.text, code=exc.code)
        except Exception as exc:  # a bug must cost one error reply, not the lab
            return Reply(f"{type(exc).__name__}: {exc}", code=Code.UNSPECIFIED)
        return Reply(result) if isinstance(result, str) else result

    def _module_list(self) -> Reply:
        return Reply(info=list(self.commands))

    def _cmd_list(self, module: str) -> Reply:
        if module not in self.commands:
            raise ControlError(Code.UNK_MODULE, f"unknown module '{module}'")
        commands = self.commands[module].items()
        return Reply(info=[f"{name} (min/max args: {lo}/{hi})" for name, (lo, hi, _) in commands])

    # -- lifecycle ------------------------------------------------------------------------

    def start_lab(self) -> None:
        """A running bridge per lab link; EndpointError or ControlError (a capture) on failure."""
        assert self.lab is not None
        for index, lab_link in enumerate(self.lab.links):
            bridge = Bridge(lab_link.name, [end.endpoint for end in lab_link.ends])
            bridge.ends = (lab_link.ends[0].end, lab_link.ends[1].end)
            bridge.encapsulation = lab_link.encapsulation
            bridge.filters = [Filter(f"lab{i}", imp) for i, imp in enumerate(lab_link.impairments)]
            bridge.seed = None if self.seed is None else self.seed + index
            self.bridges[bridge.name] = bridge
            try:
                self._run_bridge(bridge)
            except EndpointError as exc:
                raise EndpointError(f"{lab_link.name}: {exc}") from None
            if lab_link.capture:
                path = resolve_capture_path(self.captures, lab_link.capture)
                fmt = Format.for_path(path, flush_ms=10)
                self._open_capture(
                    bridge, CaptureRequest(path, None, lab_link.capture_at, fmt.pcapng)
                )

    def tick(self) -> None:
        """Called between loop runs: refresh the per-second rates."""
        now = time.monotonic()
        if now < self._next_rates:
            return
        self._next_rates = now + RATE_PERIOD
        for bridge in self.bridges.values():
            stats = bridge.stats()
            if stats is None:
                bridge.rates, bridge.sample = {}, None
                continue
            totals = {d: _totals(stats[d]) for d in stats}
            if bridge.sample:
                then, before = bridge.sample
                elapsed = max(now - then, 1e-6)
                bridge.rates = {
                    d: {k: max(0, v - before[d][k]) / elapsed for k, v in totals[d].items()}
                    for d in totals
                }
            bridge.sample = (now, totals)

    def close(self) -> list[str]:
        """Stop every capture and link; what was captured, for the exit summary."""
        notes = []
        for bridge in list(self.bridges.values()):
            notes += self.halt(bridge)
            self._forget(bridge)
        return notes + self.iol.close()

    def _run_bridge(self, bridge: Bridge) -> None:
        a, b = (self._endpoint(bridge, spec) for spec in bridge.nios)
        try:
            link = self.engine.add_link(bridge.name, a, b, bridge.seed)
        except Exception:
            for end in (a, b):  # a copied TAP fd the link did not take
                if isinstance(end, Endpoint) and end.fileno() >= 0:
                    end.close()
            raise
        bridge.link = link
        bridge.baseline, bridge.sample, bridge.rates = {}, None, {}
        self._apply_filters(bridge)
        if bridge.pcap_filter:
            index, _, program = bridge.pcap_filter
            link.ends[index].set_filter(program)  # type: ignore[attr-defined]

    @staticmethod
    def _endpoint(bridge: Bridge, spec: str) -> str | Endpoint:
        """A held NIO goes to the link as a copy of its fd: stopping the link closes the
        copy, and the NIO (a TAP maybe moved into a container by then, an IOU port's side of
        the NETIO hub) lives on, as in ubridge."""
        held = bridge.held.get(spec)
        if isinstance(held, TapEndpoint):
            return TapEndpoint(spec, os.dup(held.fileno()))
        if isinstance(held, SocketEndpoint):
            return SocketEndpoint(spec, held.sock.dup())
        return spec

    def release(self, bridge: Bridge) -> list[str]:
        """Stop a bridge and close the NIOs it holds (it is going away)."""
        notes = self.halt(bridge)
        for endpoint in bridge.held.values():
            endpoint.close()
        bridge.held.clear()
        return notes

    def _forget(self, bridge: Bridge) -> None:
        self.release(bridge)
        del self.bridges[bridge.name]

    def halt(self, bridge: Bridge) -> list[str]:
        """Stop the link (and its capture); its configuration stays."""
        notes = []
        bridge.pending_capture = None
        if bridge.link is not None:
            state = bridge.link.stop_capture()
            if state is not None:
                notes.append(_capture_note(bridge.name, state.path, state.writer.sink.frames))
            self.engine.remove_link(bridge.name)
            bridge.link = None
        return notes

    # -- hypervisor -----------------------------------------------------------------------

    def _reset(self) -> str:
        """Delete every bridge (and IOL bridge) a client created; a served lab's links stay."""
        for bridge in list(self.bridges.values()):
            if bridge.ends is None:
                self._forget(bridge)
        self.iol.close()
        return "OK"

    # -- bridge ---------------------------------------------------------------------------

    def _bridge(self, name: str) -> Bridge:
        bridge = self.bridges.get(name)
        if bridge is None:
            raise ControlError(Code.NOT_FOUND, f"bridge '{name}' doesn't exist")
        return bridge

    def _client_bridge(self, name: str, code: int, verb: str) -> Bridge:
        bridge = self._bridge(name)
        if bridge.ends is not None:
            raise ControlError(code, f"bridge '{name}' is a lab link and cannot be {verb}")
        return bridge

    def _create(self, name: str) -> str:
        if name in self.bridges:
            raise ControlError(Code.CREATE, f"bridge '{name}' already exist")
        self.bridges[name] = Bridge(name, seed=self.seed)
        return f"bridge '{name}' created"

    def _delete(self, name: str) -> str:
        bridge = self._client_bridge(name, Code.DELETE, "deleted")
        self._forget(bridge)
        return f"bridge '{name}' deleted"

    def _start(self, name: str) -> Reply:
        bridge = self._bridge(name)
        if bridge.link is not None:
            raise ControlError(Code.START, f"bridge '{name}' is already running")
        if len(bridge.nios) != 2:
            raise ControlError(Code.START, f"bridge '{name}' must have 2 NIOs to be started")
        return Reply(f"bridge '{name}' started", self.start_bridge(bridge))

    def start_bridge(self, bridge: Bridge) -> list[str]:
        """Open its NIOs and run it (205 when they cannot be); notes for info lines."""
        try:
            self._run_bridge(bridge)
        except (EndpointError, ValueError) as exc:
            raise ControlError(
                Code.BINDING, f"bridge '{bridge.name}' could not start: {exc}"
            ) from None
        request, bridge.pending_capture = bridge.pending_capture, None
        if request is not None:
            try:
                self._open_capture(bridge, request)
            except ControlError as exc:
                return [f"packet capture could not be started: {exc.text}"]
        return []

    def _stop(self, name: str) -> str:
        bridge = self._bridge(name)
        if bridge.link is None:
            raise ControlError(Code.STOP, f"bridge '{name}' is not running")
        self.halt(bridge)
        return f"bridge '{name}' stopped"

    def _rename(self, name: str, new: str) -> str:
        bridge = self._client_bridge(name, Code.RENAME, "renamed")
        if new in self.bridges:
            raise ControlError(Code.RENAME, f"bridge '{new}' already exist")
        self.bridges[new] = self.bridges.pop(name)
        bridge.name = new
        if bridge.link is not None:
            self.engine.rename_link(name, new)
        return f"bridge '{name}' renamed to '{new}'"

    def _show(self, name: str) -> Reply:
        bridge = self._bridge(name)
        info = [f"bridge '{name}' is {'running' if bridge.link else 'not running'}"]
        info += [
            f"Filter '{f.name}' configured in position {i}" for i, f in enumerate(bridge.filters, 1)
        ]
        for label, spec in zip(("Source NIO", "Destination NIO"), bridge.nios):
            info.append(f"{label}: {spec}")
        return Reply(info=info)

    def _list(self) -> Reply:
        return Reply(info=[f"{b.name} (NIOs = {len(b.nios)})" for b in self.bridges.values()])

    def _get_stats(self, name: str) -> Reply:
        bridge = self._bridge(name)
        stats = bridge.stats()
        info = []
        if stats is not None:  # a NIO's IN is what it received, OUT what was sent through it
            for label, rx, tx in (
                ("Source NIO:     ", "a2b", "b2a"),
                ("Destination NIO:", "b2a", "a2b"),
            ):
                received, sent = stats[rx]["received"], stats[tx]["forwarded"]
                info.append(f"{label} IN: {received} packets OUT: {sent} packets")
        return Reply(info=info)

    def _reset_stats(self, name: str) -> str:
        self.reset_stats(self._bridge(name))
        return "OK"

    @staticmethod
    def reset_stats(bridge: Bridge) -> None:
        if bridge.link is not None:
            bridge.baseline = bridge.link.stats()
            bridge.sample, bridge.rates = None, {}

    def _add_nio(self, name: str, spec: str, kind: str) -> str:
        bridge = self._bridge(name)
        if bridge.ends is not None:
            raise ControlError(Code.CREATE, f"bridge '{name}' is a lab link; its NIOs are fixed")
        if len(bridge.nios) >= 2:
            raise ControlError(Code.CREATE, f"bridge '{name}' has already 2 allocated NIOs")
        try:
            parse_endpoint(spec)
        except ValueError as exc:
            raise ControlError(
                Code.CREATE, f"unable to create NIO {kind} for bridge '{name}': {exc}"
            ) from None
        bridge.nios.append(spec)
        bridge.nio_kinds.append(kind)
        return f"NIO {kind} added to bridge '{name}'"

    def _add_nio_udp(self, name: str, lport: str, rhost: str, rport: str) -> str:
        host = f"[{rhost}]" if ":" in rhost else rhost
        return self._add_nio(name, f"udp:{lport}:{host}:{rport}", "UDP")

    def _delete_nio_udp(self, name: str, lport: str, rhost: str, rport: str) -> str:
        bridge = self._client_bridge(name, Code.NOT_FOUND, "changed")
        if bridge.link is not None:
            raise ControlError(Code.NOT_FOUND, f"bridge '{name}' is running")
        host = f"[{rhost}]" if ":" in rhost else rhost
        spec = f"udp:{lport}:{host}:{rport}"
        if spec not in bridge.nios:
            raise ControlError(Code.NOT_FOUND, f"UDP nio missing in '{name}'")
        index = bridge.nios.index(spec)
        del bridge.nios[index], bridge.nio_kinds[index]
        if bridge.pcap_filter and bridge.pcap_filter[0] > index:  # the Ethernet NIO moved up
            bridge.pcap_filter = (index, *bridge.pcap_filter[1:])
        return f"NIO UDP removed from bridge '{name}'"

    def _add_nio_unix(self, name: str, local: str, remote: str) -> str:
        return self._add_nio(name, f"unix:{local}:{remote}", "UNIX")

    def _add_nio_tap(self, name: str, tap: str) -> str:
        """The TAP is created (or attached) now, as ubridge does: GNS3 moves it into a Docker
        container's namespace (`docker move_to_ns`) before it starts the bridge."""
        spec = f"tap:{_interface(name, 'TAP', tap)}"
        bridge = self._bridge(name)
        if spec in bridge.nios:
            raise ControlError(Code.CREATE, f"bridge '{name}' has this TAP already")
        reply = self._add_nio(name, spec, "TAP")
        try:
            endpoint = parse_endpoint(spec).open()
        except EndpointError as exc:
            bridge.nios.pop(), bridge.nio_kinds.pop()
            raise ControlError(
                Code.CREATE, f"unable to create NIO TAP for bridge '{name}': {exc}"
            ) from None
        assert isinstance(endpoint, TapEndpoint)
        bridge.held[spec] = endpoint
        return reply

    def _add_nio_ethernet(self, name: str, interface: str) -> str:
        """ubridge's pcap NIO; set_pcap_filter applies to it."""
        spec = f"eth:{_interface(name, 'Ethernet', interface)}"
        return self._add_nio(name, spec, "Ethernet")

    def _add_nio_linux_raw(self, name: str, interface: str) -> str:
        """ubridge's AF_PACKET NIO (what GNS3 uses on Linux): the same endpoint here."""
        spec = f"eth:{_interface(name, 'Linux raw', interface)}"
        return self._add_nio(name, spec, "Linux raw")

    def _start_capture(self, name: str, path: str, linktype: str | None = None) -> str:
        """ubridge's capture: after the filters (dropped frames never reach the file),
        classic pcap; no link type means the link's known encapsulation, else Ethernet."""
        bridge = self._bridge(name)
        self.start_capture(bridge, path, linktype, bridge.encapsulation or LinkType.ETHERNET)
        return f"packet capture started on bridge '{name}'"

    def start_capture(
        self, bridge: Bridge, path: str, linktype: str | None, default: LinkType | None
    ) -> None:
        """A capture after the filters, in classic pcap, of `linktype` (ubridge's names) or
        `default` (None: detected from the first frames)."""
        chosen = _linktype(linktype) if linktype else default
        self._capture(bridge, path, chosen, "post", False)
        if linktype and chosen and bridge.encapsulation is None:  # GNS3 names serial types
            self._learn_encapsulation(bridge, chosen)

    @staticmethod
    def capturing(bridge: Bridge) -> bool:
        return bool((bridge.link and bridge.link.capture) or bridge.pending_capture)

    def _start_capture_ext(
        self, name: str, path: str, linktype: str, point: str = "post", fmt: str = ""
    ) -> str:
        bridge = self._bridge(name)
        chosen = None if linktype == "auto" else _linktype(linktype)
        self._capture(bridge, path, chosen, point, _format(path, fmt))
        return f"packet capture started on bridge '{name}'"

    def _capture(
        self, bridge: Bridge, name: str, linktype: LinkType | None, point: str, pcapng: bool
    ) -> str:
        if point not in CAPTURE_POINTS:
            raise ControlError(
                Code.INV_PARAM, f"capture point must be one of {', '.join(CAPTURE_POINTS)}"
            )
        if point == "both" and not pcapng:
            raise ControlError(Code.INV_PARAM, "capturing at both points needs pcapng")
        try:
            path = resolve_capture_path(self.captures, name)
        except LabError as exc:
            raise ControlError(Code.FILE, str(exc)) from None
        if (bridge.link and bridge.link.capture) or bridge.pending_capture:
            raise ControlError(
                Code.START, f"packet capture is already active on bridge '{bridge.name}'"
            )
        request = CaptureRequest(path, linktype or bridge.encapsulation, point, pcapng)
        if bridge.link is None:
            bridge.pending_capture = request
        else:
            self._open_capture(bridge, request)
        return path

    def _open_capture(self, bridge: Bridge, request: CaptureRequest) -> None:
        assert bridge.link is not None
        fmt = Format(pcapng=request.pcapng, flush_ms=10)
        try:
            bridge.link.start_capture(
                request.path,
                request.linktype,
                request.point,
                fmt,
                beneath=os.path.realpath(self.captures),
            )
        except CaptureError as exc:
            raise ControlError(Code.FILE, str(exc)) from None

    def _stop_capture(self, name: str) -> str:
        bridge = self._bridge(name)
        return self.end_capture(bridge)

    def end_capture(self, bridge: Bridge) -> str:
        if bridge.pending_capture is not None:
            path, bridge.pending_capture = bridge.pending_capture.path, None
            return _capture_note(bridge.name, path, 0)
        state = bridge.link.stop_capture() if bridge.link else None
        if state is None:
            raise ControlError(Code.START, f"no packet capture active on bridge '{bridge.name}'")
        note = _capture_note(bridge.name, state.path, state.writer.sink.frames)
        return f"{note}; {state.error}" if state.error else note

    def _add_packet_filter(self, name: str, filter_name: str, kind: str = "", *args: str) -> str:
        self.add_filter(self._bridge(name), filter_name, kind, args)
        return f"Filter '{filter_name}' type '{kind}' added to bridge '{name}'"

    def add_filter(
        self, bridge: Bridge, filter_name: str, kind: str, args: tuple[str, ...]
    ) -> None:
        """ubridge's filters act on both directions; frequency_drop counts both together."""
        if not kind:
            raise ControlError(Code.CREATE, f"Failed to add filter '{filter_name}': no type given")
        if any(f.name == filter_name for f in bridge.filters):
            raise ControlError(Code.CREATE, f"Failed to add filter '{filter_name}': it exists")
        impairment = self._new_filter(bridge, filter_name, "both", kind, args)
        bridge.filters.append(Filter(filter_name, impairment))
        self._apply_filters(bridge)

    def _set_packet_filter(
        self, name: str, filter_name: str, direction: str, kind: str, *args: str
    ) -> str:
        """Add, or replace in place, a filter acting on one direction (a2b, b2a) or both."""
        bridge = self._bridge(name)
        impairment = self._new_filter(bridge, filter_name, direction, kind, args)
        self._put_filter(bridge, Filter(filter_name, impairment))
        return f"Filter '{filter_name}' set on bridge '{name}': {impairment}"

    def _put_filter(self, bridge: Bridge, new: Filter) -> None:
        for index, old in enumerate(bridge.filters):
            if old.name == new.name:
                bridge.filters[index] = new
                break
        else:
            bridge.filters.append(new)
        self._apply_filters(bridge)

    def _delete_packet_filter(self, name: str, filter_name: str) -> str:
        self.delete_filter(self._bridge(name), filter_name)
        return f"Filter '{filter_name}' delete from bridge '{name}'"

    def delete_filter(self, bridge: Bridge, filter_name: str) -> None:
        kept = [f for f in bridge.filters if f.name != filter_name]
        if len(kept) == len(bridge.filters):
            raise ControlError(Code.CREATE, f"Failed to delete filter '{filter_name}'")
        bridge.filters = kept
        self._apply_filters(bridge)

    def _reset_packet_filters(self, name: str) -> str:
        self.reset_filters(self._bridge(name))
        return "OK"

    def reset_filters(self, bridge: Bridge) -> None:
        bridge.filters = []
        self._apply_filters(bridge)

    def _set_pcap_filter(self, name: str, expression: str = "") -> str:
        """ubridge's capture filter on the bridge's (first) Ethernet NIO: what the interface
        hands over must match EXPR (the kernel filters it, as libpcap does); none: reset."""
        bridge = self._bridge(name)
        if "Ethernet" not in bridge.nio_kinds:
            raise ControlError(
                Code.CREATE,
                f"bridge {name} must have at least one Ethernet NIO in order to apply a filter",
            )
        index = bridge.nio_kinds.index("Ethernet")
        program = None
        if expression:
            try:
                program = bpf.compile_filter(expression, int(LinkType.ETHERNET))
            except bpf.FilterError as exc:
                nio = ("source", "destination")[index]
                raise ControlError(
                    Code.CREATE, f"unable to apply filter on bridge {name} ({nio} NIO): {exc}"
                ) from None
        bridge.pcap_filter = (index, expression, program) if program else None
        if bridge.link is not None:
            bridge.link.ends[index].set_filter(program)  # type: ignore[attr-defined]
        if expression:
            return f"filter '{expression}' applied on bridge '{name}'"
        return f"filter reset on bridge '{name}'"

    def _new_filter(
        self, bridge: Bridge, filter_name: str, direction: str, kind: str, args: tuple[str, ...]
    ) -> Impairment:
        """A filter's impairment, checked; `bpf "EXPR" [LINKTYPE]` is compiled for the link's
        encapsulation (LINKTYPE, as ubridge takes it, tells it when unknown)."""
        if kind != "bpf":
            return _impairment(filter_name, direction, kind, args)
        failed = f"Failed to add filter '{filter_name}'"
        if len(args) not in (1, 2):
            raise ControlError(Code.CREATE, f'{failed}: expected bpf "EXPRESSION" [LINKTYPE]')
        if len(args) == 2:
            told = _linktype(args[1])
            known = (bridge.link.linktype if bridge.link else None) or bridge.encapsulation
            if known not in (None, told):
                raise ControlError(Code.CREATE, f"{failed}: the link carries {known.short_name}")
            self._learn_encapsulation(bridge, told)
        impairment = _impairment(filter_name, direction, kind, args[:1])
        assert impairment.expression is not None
        try:
            bpf.compile_filter(impairment.expression, int(self._filter_linktype(bridge)))
        except bpf.FilterError as exc:  # GNS3 warns and goes on at "Cannot compile filter"
            text = f"Cannot compile filter '{impairment.expression}': {exc.reason}"
            raise ControlError(Code.CREATE, f"{failed}: {text}") from None
        return impairment

    def _learn_encapsulation(self, bridge: Bridge, linktype: LinkType) -> None:
        """What the link carries, once a client says it: its bpf filters are compiled for it."""
        if bridge.encapsulation is None:
            bridge.encapsulation = linktype
            self._apply_filters(bridge)

    @staticmethod
    def _filter_linktype(bridge: Bridge) -> LinkType:
        """What filter expressions are compiled for: the link's type when known or detected,
        else Ethernet, as ubridge always does (recompiled once a capture detects it)."""
        known = bridge.link.linktype if bridge.link else None
        return known or bridge.encapsulation or LinkType.ETHERNET

    def _apply_filters(self, bridge: Bridge) -> None:
        """The link's impairments are the filters in order; every counter restarts at 0."""
        if bridge.link is not None:
            assumed = bridge.encapsulation or LinkType.ETHERNET
            bridge.link.set_impairments([f.impairment for f in bridge.filters], assume=assumed)

    # -- docker, brctl: host devices (tunnelscope/nio/netdev.py) ------------------------

    def _create_veth(self, name: str, peer: str) -> Reply:
        try:
            checksum_off = netdev.create_veth(name, peer)
        except netdev.NetdevError as exc:
            raise ControlError(Code.CREATE, f"could not create veth pair: {exc}") from None
        info = [] if checksum_off else ["Warning: could not turn off checksum"]
        return Reply(f"veth pair created: {name} and {peer}", info)

    def _delete_veth(self, name: str) -> str:
        _host(Code.DELETE, netdev.delete_link, name)
        return f"veth interface {name} has been deleted"

    def _move_to_ns(self, name: str, pid: str, new_name: str) -> str:
        _host(Code.CREATE, netdev.move_to_netns, name, pid, new_name)
        return f"{name} moved to namespace {pid}"

    def _set_mac_addr(self, name: str, mac: str) -> str:
        _host(Code.CREATE, netdev.set_mac, name, mac)
        return f"MAC address {mac} has been successfully set on interface {name}"

    def _addif(self, bridge: str, name: str) -> str:
        _host(Code.CREATE, netdev.add_to_bridge, bridge, name)
        return f"{name} has been added to bridge {bridge}"

    # -- lab: named ends and Dynagen's verbs ----------------------------------------------

    def _lab_show(self) -> Reply:
        info = [f"tunnelscope {__version__}", f"captures {self.captures}"]
        if self.lab is not None:
            info[1:1] = [f"lab {self.lab.name}", f"file {self.lab.path}"]
        return Reply(info=info)

    def _lab_devices(self) -> Reply:
        devices: dict[str, list[str]] = {}
        for bridge in self.bridges.values():
            for end in bridge.ends or ():
                devices.setdefault(end.device, []).append(end.interface)
        return Reply(info=[" ".join([device, *names]) for device, names in devices.items()])

    def _lab_bridge(self, device: str, interface: str) -> tuple[Bridge, int]:
        if self.lab is None:
            raise ControlError(Code.UNK_OBJ, "no lab is served here (only bridges)")
        try:
            lab_link, side = self.lab.find(device, interface)
        except LabError as exc:
            raise ControlError(Code.UNK_OBJ, str(exc)) from None
        return self.bridges[lab_link.name], side

    def _lab_find(self, device: str, interface: str) -> str:
        bridge, side = self._lab_bridge(device, interface)
        return f"{bridge.name} {'ab'[side]}"

    def _lab_stream(self) -> Reply:
        """Where this process serves live streams (and their token): a console on another
        host captures a link relayed here through them."""
        if self.stream is None:
            raise ControlError(Code.NOT_FOUND, "no live streams are served here (--stream off)")
        where, token = self.stream
        return Reply(info=[where] + ([f"token {token}"] if token else []))

    def _lab_links(self) -> Reply:
        """Every bridge, IOU ports (one bridge each, `NAME BAY/UNIT`) included."""
        bridges = [*self.bridges.values(), *self.iol.port_bridges()]
        return Reply(info=[json.dumps(self.describe(b)) for b in bridges])

    def describe(self, bridge: Bridge) -> dict[str, Any]:
        """A bridge as `tunnelscope links` and `stats` show it."""
        link = bridge.link
        linktype = (link.linktype if link else None) or bridge.encapsulation
        capture = None
        if link and link.capture:
            state = link.capture
            capture = {
                "path": state.path,
                "frames": state.writer.sink.frames,
                "point": state.points,
                "format": "pcapng" if state.writer.format.pcapng else "pcap",
                "error": state.error,
            }
        elif bridge.pending_capture:
            capture = {"path": bridge.pending_capture.path, "frames": 0, "pending": True}
        return {
            "name": bridge.name,
            "ends": [str(end) for end in bridge.ends] if bridge.ends else None,
            "endpoints": bridge.nios,
            "running": link is not None,
            "encapsulation": linktype.short_name if linktype else None,
            "filters": [
                {"name": f.name, "direction": f.impairment.direction, "impairment": _what(f)}
                for f in bridge.filters
            ],
            "capture": capture,
            "stats": bridge.stats(),
            "rates": bridge.rates,
        }

    def _lab_capture(
        self,
        device: str,
        interface: str,
        path: str,
        linktype: str = "auto",
        point: str = "post",
        fmt: str = "",
    ) -> str:
        """Dynagen's `capture R1 s1/0 r1.cap HDLC`; the link type is detected when omitted."""
        bridge, _ = self._lab_bridge(device, interface)
        chosen = None if linktype.lower() == "auto" else _linktype(linktype)
        full = self._capture(bridge, path, chosen, point, _format(path, fmt))
        return f"capturing {device} {interface} to {full}"

    def _lab_stop_capture(self, device: str, interface: str) -> str:
        bridge, _ = self._lab_bridge(device, interface)
        return self.end_capture(bridge)

    def _lab_filter(self, device: str, interface: str, kind: str, *args: str) -> str:
        """Dynagen's `filter R1 s1/0 freq_drop in 50` (in/out/both as R1 sees them), `... none`.

        One filter per device interface, direction and kind, as in dynamips' slots: setting
        it again replaces it.
        """
        bridge, side = self._lab_bridge(device, interface)
        if kind == "none":
            if args:
                raise ControlError(
                    Code.BAD_PARAM, "filter DEVICE INTERFACE none takes no arguments"
                )
            bridge.filters = []
            self._apply_filters(bridge)
            return f"filters removed from {device} {interface}"
        if not args or args[0] not in ("in", "out", "both"):
            raise ControlError(
                Code.INV_PARAM, "expected filter DEVICE INTERFACE TYPE in|out|both ARGS"
            )
        word, rest = args[0], args[1:]
        sends, receives = ("a2b", "b2a") if side == 0 else ("b2a", "a2b")
        direction = {"out": sends, "in": receives, "both": "both"}[word]
        if kind == "bpf":  # the console splits the expression into words
            rest = (" ".join(rest),) if rest else ()
        impairment = self._new_filter(bridge, kind, direction, kind, rest)
        assert bridge.ends is not None
        end = bridge.ends[side]
        name = f"{end.device}:{end.interface}:{word}:{impairment.name}"
        self._put_filter(bridge, Filter(name, impairment))
        return f"filter {name} set: {impairment}"


def _host(code: int, action: Callable[..., object], *args: str) -> None:
    """A host device operation; its NetdevError becomes error `code`."""
    try:
        action(*args)
    except netdev.NetdevError as exc:
        raise ControlError(code, str(exc)) from None


def _interface(bridge: str, kind: str, name: str) -> str:
    """An interface name as the kernel takes it; never IFNAME@NETNS (the control port
    reaches no namespace by name)."""
    try:
        return netdev.check_name(name)
    except netdev.NetdevError as exc:
        raise ControlError(
            Code.CREATE, f"unable to create NIO {kind} for bridge '{bridge}': {exc}"
        ) from None


def _what(f: Filter) -> str:
    return " ".join((f.impairment.name, *f.impairment.args))


def _capture_note(bridge: str, path: str, frames: int) -> str:
    return f"packet capture stopped on bridge '{bridge}': {path} ({frames} frames)"


def _linktype(text: str) -> LinkType:
    """ubridge's names (EN10MB, C_HDLC, PPP_SERIAL, FRELAY, with or without DLT_) and ours."""
    name = text[4:] if text.upper().startswith("DLT_") else text
    try:
        linktype = LinkType.parse(name)
    except ValueError as exc:
        raise ControlError(Code.INV_PARAM, str(exc)) from None
    if linktype not in TUNNEL_LINKTYPES:
        raise ControlError(Code.INV_PARAM, f"link type {text} is not one a lab tunnel carries")
    return linktype


def _format(path: str, fmt: str) -> bool:
    """True for pcapng: asked for, or the file name says so."""
    if fmt not in ("", "pcap", "pcapng"):
        raise ControlError(Code.INV_PARAM, f"format must be pcap or pcapng, not {fmt!r}")
    return fmt == "pcapng" or (not fmt and Format.for_path(path).pcapng)


def _impairment(filter_name: str, direction: str, kind: str, args: tuple[str, ...]) -> Impairment:
    if direction not in ("a2b", "b2a", "both"):
        raise ControlError(Code.INV_PARAM, f"direction must be a2b, b2a or both, not {direction!r}")
    try:
        return parse_impairment(" ".join((direction, kind, *args)))
    except ImpairmentError as exc:
        raise ControlError(Code.CREATE, f"Failed to add filter '{filter_name}': {exc}") from None


# --- the engine thread -------------------------------------------------------------------------


class Runner:
    """Runs the engine in the calling thread; control threads reach it through `call`.

    The C loop runs without the GIL, so every switchboard call is handed to the engine thread
    (`Engine.call` wakes the loop and waits); rates are sampled once per RATE_PERIOD.
    """

    def __init__(self, engine: Engine, on_tick: Callable[[], None] | None = None) -> None:
        self.engine = engine
        self.on_tick = on_tick
        self._closed = False

    def call(self, function: Callable[[], Any]) -> Any:
        if self._closed:
            raise ControlError(Code.UNSPECIFIED, "tunnelscope is shutting down")
        try:
            return self.engine.call(function)
        except concurrent.futures.TimeoutError:
            raise ControlError(Code.UNSPECIFIED, "the engine did not answer in time") from None

    def run(self, on_news: Callable[[str], None] | None = None) -> None:
        """Pump until `stop()`; the calling thread becomes the engine thread."""
        try:
            self.engine.run(every=RATE_PERIOD / 4, on_tick=self.on_tick, on_news=on_news)
        finally:
            self._closed = True

    def stop(self) -> None:
        """Safe from any thread and from signal handlers."""
        self.engine.stop()


# --- the server --------------------------------------------------------------------------------


def handle_line(raw: bytes, execute: Callable[[list[str]], Reply]) -> Reply:
    """One request line (without its newline) to its reply; never raises for bad input."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return Reply("Parse error: not UTF-8 text", code=Code.PARSING)
    text = text.rstrip("\r")
    if any(unicodedata.category(c) == "Cc" and c != "\t" for c in text):  # C0, DEL, C1
        return Reply("Parse error: control character in request", code=Code.PARSING)
    try:
        return execute(tokenize(text))
    except ControlError as exc:
        return Reply(exc.text, code=exc.code)


@dataclass(eq=False)
class _Client:
    """One control connection and what eviction and the line timeout need to know of it."""

    sock: socket.socket
    last: float  # when its last request was answered (or it connected)
    requests: int = 0


class ControlServer:
    """Accepts clients on HOST:PORT; a thread per connection turns lines into replies.

    A line longer than MAX_LINE, bad quoting, bytes that are not text: an error reply, and
    the connection goes on. A client that leaves mid-line leaves nothing behind: a partial
    line is never executed, and one not finished within `line_timeout` closes the connection.
    An idle connection is never closed for idling (GNS3 keeps its one connection open all
    session long), but when every slot is taken a newcomer takes the slot of the client idle
    longest, those that never sent a request first, so idle clients cannot lock GNS3 out.
    """

    def __init__(
        self,
        address: tuple[str, int],
        execute: Callable[[list[str]], Reply],
        on_stop: Callable[[], None],
        log: Callable[[str], None] | None = None,
        line_timeout: float = LINE_TIMEOUT_S,
        evict_idle: float = EVICT_IDLE_S,
    ) -> None:
        self.execute = execute
        self.on_stop = on_stop
        self.log = log
        self.line_timeout = line_timeout
        self.evict_idle = evict_idle
        self._clients: set[_Client] = set()
        self._lock = threading.Lock()
        self._closing = False
        self.sock = listen_tcp(address, "control", MAX_CONNECTIONS)
        self.sock.settimeout(0.2)
        self.address: tuple[str, int] = self.sock.getsockname()[:2]
        self._thread = threading.Thread(target=self._accept, name="control", daemon=True)

    def start(self) -> ControlServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._closing = True
        with self._lock:
            for client in self._clients:
                with contextlib.suppress(OSError):
                    client.sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(2)
        self.sock.close()

    def _accept(self) -> None:
        while not self._closing:
            try:
                sock, _ = self.sock.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                break
            client = _Client(sock, time.monotonic())
            with self._lock:
                admitted = len(self._clients) < MAX_CONNECTIONS or self._evict_one()
                if admitted:
                    self._clients.add(client)
            if not admitted:
                with contextlib.suppress(OSError):
                    sock.sendall(Reply("too many connections", code=Code.UNSPECIFIED).encode())
                sock.close()
                continue
            threading.Thread(target=self._serve, args=(client,), daemon=True).start()

    def _evict_one(self) -> bool:
        """Free the slot of the client idle longest, if one has idled `evict_idle` (locked)."""
        now = time.monotonic()
        idle = [c for c in self._clients if now - c.last >= self.evict_idle]
        if not idle:
            return False
        victim = min(idle, key=lambda c: (c.requests > 0, c.last))
        self._clients.discard(victim)
        with contextlib.suppress(OSError):
            victim.sock.shutdown(socket.SHUT_RDWR)  # its thread sees the end and closes it
        if self.log:
            self.log("closed an idle connection: its slot was needed")
        return True

    def _serve(self, client: _Client) -> None:
        try:
            self._converse(client)
        except OSError:
            pass  # the client went away; nothing of its half-sent line was run
        finally:
            with self._lock:
                self._clients.discard(client)
            client.sock.close()

    def _converse(self, client: _Client) -> None:
        buffer = bytearray()
        overlong = False  # inside a line already refused as too long
        started = 0.0  # when the unfinished line in `buffer` began
        client.sock.settimeout(min(1.0, self.line_timeout))
        while not self._closing:
            try:
                data = client.sock.recv(4096)
            except (TimeoutError, socket.timeout):
                if (buffer or overlong) and time.monotonic() - started > self.line_timeout:
                    return  # a half-sent line that never ends: the slot goes back
                continue
            if not data:
                return
            if not buffer and not overlong:
                started = time.monotonic()
            buffer += data
            while True:
                end = buffer.find(b"\n")
                if end < 0:
                    if len(buffer) >= MAX_LINE:
                        if not overlong:
                            self._send(client, _too_long())
                        overlong = True
                        buffer.clear()
                    break
                line = bytes(buffer[:end])
                del buffer[: end + 1]
                started = time.monotonic()
                if overlong or end + 1 > MAX_LINE:
                    if not overlong:
                        self._send(client, _too_long())
                    overlong = False
                    continue
                if self.log:
                    self.log(f"<- {line.decode('utf-8', 'replace')}")
                reply = handle_line(line, self.execute)
                self._send(client, reply)
                client.requests += 1
                client.last = time.monotonic()
                if reply.action == "close":
                    return
                if reply.action == "stop":
                    self.on_stop()
                    return

    def _send(self, client: _Client, reply: Reply) -> None:
        if self.log:
            for line in reply.lines():
                self.log(f"-> {line}")
        client.sock.sendall(reply.encode())


def listen_tcp(address: tuple[str, int], what: str, backlog: int) -> socket.socket:
    """A listening TCP socket (IPv4 or IPv6 as HOST says); OSError naming `what` on failure."""
    host, port = address
    try:
        info = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(info[0], socket.SOCK_STREAM)
    except OSError as exc:
        raise OSError(f"{what} address {host}:{port}: {exc.strerror or exc}") from None
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(info[4])
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise OSError(f"{what} address {host}:{port}: {exc.strerror or exc}") from None
    return sock


def _too_long() -> Reply:
    return Reply(f"Parse error: request longer than {MAX_LINE} bytes", code=Code.PARSING)


def run_service(
    switchboard: Switchboard,
    address: tuple[str, int],
    on_ready: Callable[[tuple[str, int]], None] | None = None,
    log: Callable[[str], None] | None = None,
    on_news: Callable[[str], None] | None = None,
) -> list[str]:
    """Serve `switchboard` at `address` until `hypervisor stop` or `engine.stop()`.

    The calling thread runs the engine. Returns what the captures closed on the way out
    wrote; OSError (one line) when the address cannot be listened on.
    """
    runner = Runner(switchboard.engine, on_tick=switchboard.tick)

    def execute(tokens: list[str]) -> Reply:
        return runner.call(lambda: switchboard.execute(tokens))

    server = ControlServer(address, execute, runner.stop, log).start()
    try:
        if on_ready:
            on_ready(server.address)
        runner.run(on_news)
    finally:
        server.close()
    return switchboard.close()


# --- the client --------------------------------------------------------------------------------


class ControlUnavailable(Exception):
    """No tunnelscope answers at the control address; `reason` says so without advice."""

    def __init__(self, message: str, reason: str | None = None) -> None:
        super().__init__(message)
        self.reason = reason or message


class ControlClient:
    """Sends requests to a running `serve`/`hypervisor`; raises ControlError for error replies."""

    def __init__(self, address: str | None = None, timeout: float = 10.0) -> None:
        self.address = control_address(address)
        host, port = parse_address(self.address)
        try:
            self.sock = socket.create_connection((host, port), timeout)
        except OSError as exc:
            reason = f"no tunnelscope control at {self.address} ({exc.strerror or exc})"
            raise ControlUnavailable(
                f"{reason}; start `tunnelscope serve LAB`, or give --control HOST:PORT or"
                f" ${CONTROL_ENV}",
                reason,
            ) from None
        self._stream = self.sock.makefile("rb")

    def request(self, *words: str) -> list[str]:
        """The reply's text lines (info lines, then the final text) of one request."""
        line = " ".join(quote(word) for word in words)
        try:
            self.sock.sendall(line.encode() + b"\n")
            lines = []
            while True:
                raw = self._stream.readline()
                if not raw.endswith(b"\n"):
                    raise ControlUnavailable(f"{self.address} closed the connection")
                text = raw.decode("utf-8", "replace").rstrip("\r\n")
                code, last, body = text[:3], text[3:4] == "-", text[4:]
                if last and code.startswith("2"):
                    raise ControlError(int(code), body)
                lines.append(body)
                if last:
                    return lines
        except OSError as exc:
            raise ControlUnavailable(f"{self.address}: {exc.strerror or exc}") from None

    def links(self) -> list[dict[str, Any]]:
        return [json.loads(line) for line in self.request("lab", "links")[:-1]]

    def devices(self) -> dict[str, list[str]]:
        return {
            words[0]: words[1:]
            for words in (line.split() for line in self.request("lab", "devices")[:-1])
        }

    def close(self) -> None:
        self._stream.close()
        self.sock.close()

    def __enter__(self) -> ControlClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
