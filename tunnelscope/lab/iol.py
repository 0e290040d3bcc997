"""ubridge's `iol_bridge` module: IOU nodes' ports bridged to UDP tunnels.

GNS3 gives every IOU node an iol_bridge with ID application_id + 512: IOU sends each
port's frames to that bridge's NETIO socket (tunnelscope/nio/netio.py), and the bridge
relays each port to the UDP tunnel of the link on it. Here every port is an ordinary bridge
(tunnelscope/lab/control.py's `Bridge`: a link in the engine) between the hub's side of that
port and its UDP tunnel, so IOU ports get what every link has: per-direction impairments,
bpf filters for the port's own encapsulation, captures with the right link type or a
detected one, pcapng, counters.

Direction a2b is what IOU sends on the port, b2a what it receives.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from tunnelscope.lab.control import Bridge, Code, ControlError, Reply, Switchboard
from tunnelscope.nio import EndpointError, parse_endpoint
from tunnelscope.nio.netio import MAX_ID, NetioHub, port_key


@dataclass
class IolBridge:
    name: str
    netio_id: int
    hub: NetioHub
    ports: dict[int, Bridge] = field(default_factory=dict)  # by port key
    running: bool = False


class IolBridges:
    """The iol_bridge commands, over a Switchboard's bridge machinery."""

    def __init__(self, switchboard: Switchboard, directory: str) -> None:
        self.board = switchboard
        self.directory = directory
        self.bridges: dict[str, IolBridge] = {}

    def commands(self) -> dict[str, tuple[int, int, Callable[..., Reply | str]]]:
        return {
            "create": (2, 2, self.create),
            "delete": (1, 1, self.delete),
            "start": (1, 1, self.start),
            "stop": (1, 1, self.stop),
            "get_stats": (1, 1, self.get_stats),
            "reset_stats": (1, 1, self.reset_stats),
            "rename": (2, 2, self.rename),
            "add_nio_udp": (7, 7, self.add_nio_udp),
            "delete_nio_udp": (3, 3, self.delete_nio_udp),
            "start_capture": (4, 5, self.start_capture),
            "stop_capture": (3, 3, self.stop_capture),
            "add_packet_filter": (4, 15, self.add_packet_filter),
            "delete_packet_filter": (4, 4, self.delete_packet_filter),
            "reset_packet_filters": (3, 3, self.reset_packet_filters),
            "list": (0, 0, self.list),
        }

    # -- lookups --------------------------------------------------------------------------

    def _bridge(self, name: str, label: str = "bridge") -> IolBridge:
        bridge = self.bridges.get(name)
        if bridge is None:
            raise _error("NOT_FOUND", f"{label} '{name}' doesn't exist")
        return bridge

    def _port(self, bridge: IolBridge, bay: str, unit: str) -> tuple[int, Bridge]:
        key = _port_key(bridge, bay, unit)
        port = bridge.ports.get(key)
        if port is None:
            raise _error("NOT_FOUND", f"port {bay}/{unit} doesn't exist")
        return key, port

    # -- the bridge -----------------------------------------------------------------------

    def create(self, name: str, netio_id: str) -> str:
        if name in self.bridges:
            raise _error("CREATE", f"IOL bridge '{name}' already exist")
        number = _id(netio_id, "CREATE", f"could not create IOL bridge '{name}'")
        if any(b.netio_id == number for b in self.bridges.values()):  # our own lock
            raise _error("CREATE", f"could not create IOL bridge '{name}': ID {number} is in use")
        try:
            hub = NetioHub(self.directory, number)
        except EndpointError as exc:
            raise _error("CREATE", f"could not create IOL bridge '{name}': {exc}") from None
        self.bridges[name] = IolBridge(name, number, hub)
        return f"IOL bridge '{name}' created"

    def delete(self, name: str) -> str:
        bridge = self._bridge(name, "IOL bridge")
        self._forget(bridge)
        return f"IOL bridge '{name}' deleted"

    def _forget(self, bridge: IolBridge) -> None:
        for port in bridge.ports.values():
            self.board.release(port)
        bridge.hub.close()
        del self.bridges[bridge.name]

    def close(self) -> list[str]:
        notes: list[str] = []
        for bridge in list(self.bridges.values()):
            for port in bridge.ports.values():
                notes += self.board.halt(port)
            self._forget(bridge)
        return notes

    def start(self, name: str) -> str:
        bridge = self._bridge(name, "IOL bridge")
        if bridge.running:
            raise _error("START", f"IOL bridge '{name}' is already running")
        started = []
        try:
            for port in bridge.ports.values():
                self.board.start_bridge(port)
                started.append(port)
        except Exception:
            for port in started:
                self.board.halt(port)
            raise
        bridge.running = True
        return f"IOL bridge '{name}' started"

    def stop(self, name: str) -> str:
        bridge = self._bridge(name, "IOL bridge")
        if not bridge.running:
            raise _error("STOP", f"IOL bridge '{name}' is not running")
        for port in bridge.ports.values():
            self.board.halt(port)
        bridge.running = False
        return f"IOL bridge '{name}' stopped"

    def rename(self, name: str, new: str) -> str:
        bridge = self._bridge(name, "IOL bridge")
        if new in self.bridges:
            raise _error("RENAME", f"IOL bridge '{name}' already exist")
        self.bridges[new] = self.bridges.pop(name)
        bridge.name = new
        for port in bridge.ports.values():
            old, port.name = port.name, _port_name(new, port.name.rpartition(" ")[2])
            if port.link is not None:
                self.board.engine.rename_link(old, port.name)
        return f"IOL bridge '{name}' renamed to '{new}'"

    def port_bridges(self) -> list[Bridge]:
        """The bridge of every port of every IOL bridge, as `lab links` lists them."""
        return [port for bridge in self.bridges.values() for port in bridge.ports.values()]

    def list(self) -> Reply:
        return Reply(info=[f"{b.name} (ports = {len(b.ports)})" for b in self.bridges.values()])

    def get_stats(self, name: str) -> Reply:
        """Per port, as ubridge: IN is what the UDP tunnel brought, OUT what was sent on it."""
        bridge = self._bridge(name)
        info = []
        for port in bridge.ports.values():
            stats = port.stats()
            received = stats["b2a"]["received"] if stats else 0
            sent = stats["a2b"]["forwarded"] if stats else 0
            location = port.name.rpartition(" ")[2]
            info.append(f"port {location}:      IN: {received} packets OUT: {sent} packets")
        return Reply(info=info)

    def reset_stats(self, name: str) -> str:
        bridge = self._bridge(name)
        for port in bridge.ports.values():
            self.board.reset_stats(port)
        return "OK"

    # -- ports ----------------------------------------------------------------------------

    def add_nio_udp(
        self, name: str, iou_id: str, bay: str, unit: str, lport: str, rhost: str, rport: str
    ) -> str:
        """Port bay/unit of IOU instance IOU_ID to a UDP tunnel; replaces what was there,
        and runs at once when the bridge does."""
        bridge = self._bridge(name)
        number = _id(iou_id, "CREATE", f"unable to create NIO UDP for IOL bridge '{name}'")
        if number == bridge.netio_id:
            raise _error("CREATE", f"IOU ID {number} cannot be the same as bridge '{name}' ID")
        key = _port_key(bridge, bay, unit)
        host = f"[{rhost}]" if ":" in rhost else rhost
        udp = f"udp:{lport}:{host}:{rport}"
        location = f"{int(bay)}/{int(unit)}"
        netio = f"netio:{bridge.hub.path}:{number}:{location}"
        try:
            parse_endpoint(udp)
        except ValueError as exc:
            raise _error(
                "CREATE", f"unable to create NIO UDP for IOL bridge '{name}': {exc}"
            ) from None
        port = Bridge(_port_name(name, location), [netio, udp], ["NETIO", "UDP"])
        port.seed = self.board.seed
        if key in bridge.ports:
            self.board.release(bridge.ports.pop(key))
        port.held[netio] = bridge.hub.add_port(key, number, netio)
        if bridge.running:
            try:
                self.board.start_bridge(port)
            except Exception:
                self.board.release(port)
                bridge.hub.remove_port(key)
                raise
        bridge.ports[key] = port
        return f"NIO UDP added to IOL bridge '{name}'"

    def delete_nio_udp(self, name: str, bay: str, unit: str) -> str:
        bridge = self._bridge(name)
        key, port = self._port(bridge, bay, unit)
        self.board.release(bridge.ports.pop(key))
        bridge.hub.remove_port(key)
        return f"NIO UDP deleted from IOL bridge '{name}'"

    def start_capture(
        self, name: str, bay: str, unit: str, path: str, linktype: str | None = None
    ) -> str:
        """GNS3 names the port's link type (EN10MB, C_HDLC, PPP_SERIAL, FRELAY, with or
        without DLT_); without one the link type is detected from the first frames."""
        bridge = self._bridge(name)
        _, port = self._port(bridge, bay, unit)
        self.board.start_capture(port, path, linktype, None)
        return f"packet capture started on port {bay}/{unit}"

    def stop_capture(self, name: str, bay: str, unit: str) -> str:
        bridge = self._bridge(name)
        _, port = self._port(bridge, bay, unit)
        if not self.board.capturing(port):
            raise _error("NOT_FOUND", f"no packet capture active on port {bay}/{unit}")
        self.board.end_capture(port)
        return f"packet capture stopped on port {bay}/{unit}"

    def add_packet_filter(
        self, name: str, bay: str, unit: str, filter_name: str, kind: str, *args: str
    ) -> str:
        """Filters act on both directions of the port, as ubridge's; delay works too."""
        bridge = self._bridge(name)
        _, port = self._port(bridge, bay, unit)
        self.board.add_filter(port, filter_name, kind, args)
        return f"Filter '{filter_name}' type '{kind}' added to bridge '{name}'"

    def delete_packet_filter(self, name: str, bay: str, unit: str, filter_name: str) -> str:
        bridge = self._bridge(name)
        _, port = self._port(bridge, bay, unit)
        self.board.delete_filter(port, filter_name)
        return f"Filter '{filter_name}' deleted from bridge '{name}'"

    def reset_packet_filters(self, name: str, bay: str, unit: str) -> str:
        bridge = self._bridge(name)
        _, port = self._port(bridge, bay, unit)
        self.board.reset_filters(port)
        return "OK"


def _port_name(bridge: str, location: str) -> str:
    """The engine's name of a port's link (shown by `lab links`)."""
    return f"{bridge} {location}"


def _port_key(bridge: IolBridge, bay: str, unit: str) -> int:
    if not (bay.isdigit() and unit.isdigit()):
        raise _error("INV_PARAM", f"invalid port {bay}/{unit} on bridge '{bridge.name}'")
    try:
        return port_key(int(bay), int(unit))
    except ValueError as exc:
        raise _error("INV_PARAM", f"{exc} on bridge '{bridge.name}'") from None


def _id(text: str, code: str, failed: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= MAX_ID:
        raise _error(code, f"{failed}: ID '{text}' is not 1-{MAX_ID}")
    return int(text)


def _error(code: str, text: str) -> ControlError:
    return ControlError(Code[code], text)
