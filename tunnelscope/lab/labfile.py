"""Labs: devices, their interfaces, and the links tunnelscope relays between them.

A lab comes from a TOML lab file (tunnelscope's own format) or a Dynagen `.net` network file.
Either way every link end gets the endpoint tunnelscope opens for it, facing the emulator, and
for UDP the tunnel the emulator must be given instead of its peer's: the port plan. Lab files
are edited by hand, so every error names the file, the line and the reason.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import os
import re
import socket
from dataclasses import dataclass, field
from typing import Any

from configobj import ConfigObj, ConfigObjError

from tunnelscope.datapath.impairments import Impairment, ImpairmentError, parse_impairment
from tunnelscope.formats.linktype import TUNNEL_LINKTYPES, LinkType
from tunnelscope.nio import parse_endpoint
from tunnelscope.nio.udp import UdpSpec

try:
    import tomllib
except ImportError:  # Python < 3.11
    tomllib = None  # type: ignore[assignment]

CAPTURE_POINTS = ("pre", "post", "both")
DEFAULT_UDP_BASE = 10000  # Dynagen's default
LOCALHOST = "localhost"  # the host key of this machine in a lab spanning hosts
DEFAULT_CAPTURES = "captures"  # next to the lab file
_NAME = re.compile(r"[A-Za-z0-9_.-]+")
_INTERFACE = re.compile(r"[A-Za-z0-9_./:-]+")
_CISCO = re.compile(r"([a-z]+)\s*(\d+(?:/\d+)*)")
_SHORT = {
    **dict.fromkeys(("e", "et", "ethernet"), "e"),
    **dict.fromkeys(("f", "fa", "fastethernet"), "f"),
    **dict.fromkeys(("g", "gi", "gigabitethernet"), "g"),
    **dict.fromkeys(("s", "se", "serial"), "s"),
    **dict.fromkeys(("a", "at", "atm"), "a"),
    **dict.fromkeys(("p", "pos"), "p"),
}


class LabError(ValueError):
    """A lab that cannot run: one line, `FILE:LINE: reason` when a line is to blame."""


@dataclass(frozen=True)
class End:
    """One side of a link as users name it: a device and one of its interfaces."""

    device: str
    interface: str

    def __str__(self) -> str:
        return f"{self.device} {self.interface}"


@dataclass
class LinkEnd:
    end: End
    endpoint: str  # the spec tunnelscope opens for this end; it faces the emulator
    kind: str = ""  # the device's type (ROUTER, VPCS, FRSW...) when the lab file says it
    host: str = ""  # where the emulator runs, in a lab of several hosts ("": one host)


@dataclass
class LabLink:
    """A lab link: end a, end b; directions (a2b, b2a) and impairments are relative to them."""

    name: str
    ends: tuple[LinkEnd, LinkEnd]
    encapsulation: LinkType | None = None  # None: detected when a capture needs it
    impairments: list[Impairment] = field(default_factory=list)
    capture: str | None = None  # a file in the captures directory, captured from the start
    capture_at: str = "post"
    line: int = 0
    relay: str = ""  # the host tunnelscope relays this link on, in a lab of several hosts


@dataclass
class PlanRow:
    """What one device interface must be configured with to reach tunnelscope."""

    device: str
    interface: str
    link: str
    endpoint: str  # tunnelscope's side
    emulator_port: int | None = None  # the UDP port the emulator binds
    emulator_remote: str | None = None  # where the emulator sends: tunnelscope's HOST:PORT
    hint: str = ""  # the same, in the emulator's own syntax
    host: str = ""  # where the emulator runs (several hosts only)
    relay: str = ""  # where tunnelscope relays the link (several hosts only)


@dataclass
class Lab:
    name: str
    path: str
    captures: str  # absolute directory every capture file lands in
    links: list[LabLink]
    hosts: list[str] = field(default_factory=list)  # several: a lab spanning hosts, in order

    def part(self, host: str | None) -> Lab:
        """The links one host relays (`serve --host`); a lab of one host runs whole here.

        Without a host, a lab spanning hosts runs this machine's part (`localhost` or its own
        names); LabError when it has none or `host` is not one of the lab's.
        """
        if not self.hosts:
            return self
        if host is None:
            if LOCALHOST not in self.hosts:
                raise LabError(
                    f"{self.name} spans hosts {', '.join(self.hosts)}; say which one this is"
                    " with --host"
                )
            host = LOCALHOST
        wanted = host_key(host)
        if wanted not in self.hosts:
            raise LabError(f"{host!r} is not a host of {self.name} ({', '.join(self.hosts)})")
        links = [link for link in self.links if link.relay == wanted]
        return dataclasses.replace(self, links=links)

    def devices(self) -> dict[str, list[str]]:
        """Every device and its linked interfaces, in lab order."""
        result: dict[str, list[str]] = {}
        for link in self.links:
            for link_end in link.ends:
                result.setdefault(link_end.end.device, []).append(link_end.end.interface)
        return result

    def find(self, device: str, interface: str) -> tuple[LabLink, int]:
        """The link on `device interface` and the side (0 = a, 1 = b); LabError names both."""
        devices = self.devices()
        if device not in devices:
            raise LabError(f"unknown device {device!r} (devices: {', '.join(devices) or 'none'})")
        wanted = canonical_interface(interface)
        for link in self.links:
            for side, link_end in enumerate(link.ends):
                if link_end.end == End(device, wanted):
                    return link, side
        known = ", ".join(devices[device])
        raise LabError(f"{device} has no linked interface {interface!r} (linked: {known})")

    def plan(self) -> list[PlanRow]:
        return [_plan_row(link, link_end) for link in self.links for link_end in link.ends]


def host_key(host: str) -> str:
    """Which machine a host name or address means: LOCALHOST for this one (loopback,
    `localhost`, its own host names), else the address or the lower-cased name. No DNS: a
    plan is made for hosts this machine may not resolve."""
    try:
        address = ipaddress.ip_address(host.strip("[]"))
    except ValueError:
        name = host.lower().rstrip(".")
        own = {socket.gethostname().lower(), socket.getfqdn().lower(), LOCALHOST}
        return LOCALHOST if name in own else name
    return LOCALHOST if address.is_loopback else str(address)


def canonical_interface(name: str) -> str:
    """Cisco spellings to Dynagen's short form: FastEthernet0/0, fa0/0 and f0/0 are f0/0."""
    match = _CISCO.fullmatch(name.lower())
    if match and match.group(1) in _SHORT:
        return _SHORT[match.group(1)] + match.group(2)
    return name


def default_link_name(a: End, b: End) -> str:
    return f"{a.device}:{a.interface}--{b.device}:{b.interface}"


def resolve_capture_path(captures: str, name: str) -> str:
    """The absolute path of capture `name` inside `captures`; refuses to leave the directory.

    Relative names land in the directory; absolute ones must point inside it (GNS3 sends
    absolute paths). Directories on the way are resolved (the captures directory may be
    reached through a symbolic link); the file itself is not: it is opened later with
    `open_beneath`, which follows no symbolic link, so a name swapped for one after this
    check still cannot lead outside.
    """
    joined = os.path.join(os.path.realpath(captures), name)
    base = os.path.basename(joined)
    if not name or "\0" in name or base in ("", ".", ".."):
        raise LabError(f"invalid capture file name {name!r}")
    root = os.path.realpath(captures)
    path = os.path.join(os.path.realpath(os.path.dirname(joined)), base)
    if os.path.commonpath([root, path]) != root:
        raise LabError(f"capture file {name!r} is outside the captures directory {root}")
    if os.path.isdir(path):
        raise LabError(f"capture file {name!r} is a directory")
    return path


def load_lab(path: str, captures: str | None = None) -> Lab:
    """Read a `.toml` lab file or a Dynagen `.net` file; `captures` overrides its directory."""
    try:
        with open(path, encoding="utf-8") as stream:
            text = stream.read()
    except OSError as exc:
        raise LabError(f"cannot read {path}: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise LabError(f"{path}: not UTF-8 text ({exc.reason})") from None
    if path.endswith(".toml"):
        lab = _TomlLab(path, text).load()
    elif path.endswith(".net"):
        lab = _NetLab(path, text).load()
    else:
        raise LabError(f"{path}: unknown lab file type (expected a .toml lab or a .net file)")
    if captures is not None:
        lab.captures = os.path.abspath(captures)
    _check_ports(lab)
    for link in lab.links:
        if link.capture:
            try:
                resolve_capture_path(lab.captures, link.capture)
            except LabError as exc:
                raise LabError(f"{path}:{link.line}: {exc}") from None
    return lab


# --- the port plan -------------------------------------------------------------------------


def _plan_row(link: LabLink, link_end: LinkEnd) -> PlanRow:
    end = link_end.end
    row = PlanRow(end.device, end.interface, link.name, link_end.endpoint)
    spec = parse_endpoint(link_end.endpoint)
    if not isinstance(spec, UdpSpec):
        row.hint = f"{link_end.endpoint} (not a UDP tunnel)"
        return row
    row.host, row.relay = link_end.host, link.relay
    ours = spec.local_host or _our_address(spec.remote_host)
    if link.relay and link_end.host != link.relay:  # the emulator reaches the relay host
        ours = link.relay
    row.emulator_port = spec.remote_port
    row.emulator_remote = f"{_bracket(ours)}:{spec.local_port}"
    row.hint = _hint(link_end.kind, spec.remote_host, spec.remote_port, ours, spec.local_port)
    return row


def _our_address(remote_host: str) -> str:
    """Where an emulator reaches tunnelscope's socket (see tunnelscope/nio/udp.py)."""
    try:
        address = ipaddress.ip_address(remote_host)
    except ValueError:
        return "127.0.0.1" if remote_host == "localhost" else "THIS_HOST"
    return str(address) if address.is_loopback else "THIS_HOST"


def is_loopback(host: str) -> bool:
    """A loopback address or `localhost`: this machine, and only from itself."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host.lower() == LOCALHOST


def _hosts(link: LabLink) -> list[str]:
    return [link_end.host for link_end in link.ends]


def _bracket(host: str) -> str:
    return f"[{host}]" if ":" in host else host


def _hint(kind: str, host: str, port: int, ours: str, our_port: int) -> str:
    if kind == "ROUTER":
        return f"NIO_udp:{port}:{ours}:{our_port}"
    if kind == "VPCS":
        return f"vpcs -s {port} -c {our_port} -t {ours}"
    if kind == "QEMU":
        remote, local = f"{_bracket(ours)}:{our_port}", f"{_bracket(host)}:{port}"
        return f"-netdev socket,id=n0,udp={remote},localaddr={local}"
    if kind in ("FRSW", "ETHSW", "ATMSW", "ATMBR"):
        return f"nio create_udp NIO {port} {ours} {our_port}"
    return f"udp {port} -> {_bracket(ours)}:{our_port}"


def _check_ports(lab: Lab) -> None:
    """No UDP port may be bound twice on one host: by two of our ends, two emulators, or one
    of each. The same number on two hosts of a lab is fine."""
    seen: dict[tuple[str, int], str] = {}
    for link in lab.links:
        for link_end in link.ends:
            spec = parse_endpoint(link_end.endpoint)
            if not isinstance(spec, UdpSpec):
                continue
            uses = [(link.relay, spec.local_port, f"tunnelscope's end for {link_end.end}")]
            if lab.hosts or _our_address(spec.remote_host) != "THIS_HOST":  # a known host
                uses.append(
                    (link_end.host, spec.remote_port, f"the emulator's tunnel of {link_end.end}")
                )
            for host, port, user in uses:
                if (host, port) in seen:
                    where = f"{lab.path}:{link.line}: " if link.line else ""
                    on = f" on {host}" if host else ""
                    raise LabError(
                        f"{where}UDP port {port} is used twice{on}: by {seen[host, port]} and"
                        f" by {user}"
                    )
                seen[host, port] = f"{user} (line {link.line})" if link.line else user


# --- TOML lab files ------------------------------------------------------------------------

_TOP_KEYS = ("name", "captures", "udp", "host", "link")
_LINK_KEYS = (
    "name",
    "a",
    "b",
    "a_endpoint",
    "b_endpoint",
    "encapsulation",
    "impairments",
    "capture",
    "capture_at",
)
_TOML_KEY = re.compile(r"""\s*(?:"([^"]+)"|'([^']+)'|([A-Za-z0-9_-]+))\s*=""")
_TOML_ERROR_AT = re.compile(r"\s*\(at line (\d+), column \d+\)")


class _Problem(Exception):
    """A mistake at a line of the file being read (0: not tied to a line)."""

    def __init__(self, line: int, message: str) -> None:
        super().__init__(message)
        self.line = line


class _TomlLines:
    """Where keys and tables sit in a TOML text: tomllib keeps no positions."""

    def __init__(self, text: str) -> None:
        self.top: dict[str, int] = {}
        self.links: list[tuple[int, dict[str, int]]] = []
        section = self.top
        for number, line in enumerate(text.splitlines(), 1):
            stripped = line.strip()
            if re.fullmatch(r"\[\[\s*link\s*\]\](\s*#.*)?", stripped):
                self.links.append((number, {}))
                section = self.links[-1][1]
            elif stripped.startswith("["):
                name = stripped.strip("[] ").split("]")[0].strip()
                self.top.setdefault(name.split(".")[0], number)
                section = {}
            else:
                match = _TOML_KEY.match(line)
                if match:
                    section.setdefault(next(g for g in match.groups() if g), number)

    def link(self, index: int, key: str | None = None) -> int:
        if index >= len(self.links):
            return 0
        header, keys = self.links[index]
        return keys.get(key, header) if key else header


class _TomlLab:
    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self.text = text
        self.lines = _TomlLines(text)

    def load(self) -> Lab:
        if tomllib is None:
            raise LabError(f"{self.path}: TOML lab files need Python 3.11 or newer (tomllib)")
        try:
            data = tomllib.loads(self.text)
        except tomllib.TOMLDecodeError as exc:
            message = str(exc)
            at = _TOML_ERROR_AT.search(message)
            line = at.group(1) if at else "?"
            raise LabError(f"{self.path}:{line}: {_TOML_ERROR_AT.sub('', message)}") from None
        try:
            return self._lab(data)
        except _Problem as problem:
            where = f"{self.path}:{problem.line}" if problem.line else self.path
            raise LabError(f"{where}: {problem}") from None

    def _lab(self, data: dict[str, Any]) -> Lab:
        for key in data:
            if key not in _TOP_KEYS:
                raise _Problem(self.lines.top.get(key, 0), _unknown_key(key, _TOP_KEYS))
        base_dir = os.path.dirname(os.path.abspath(self.path))
        name = self._top(data, "name", str, os.path.splitext(os.path.basename(self.path))[0])
        captures = self._top(data, "captures", str, DEFAULT_CAPTURES)
        ports = _PortCounter(
            self._top(data, "udp", int, DEFAULT_UDP_BASE), self.lines.top.get("udp", 0)
        )
        host = self._top(data, "host", str, "127.0.0.1")
        tables = data.get("link", [])
        if not isinstance(tables, list) or not all(isinstance(t, dict) for t in tables):
            raise _Problem(self.lines.top.get("link", 0), "'link' must be [[link]] tables")
        links = [self._link(index, table, ports, host) for index, table in enumerate(tables)]
        if not links:
            raise _Problem(0, "the lab has no [[link]]")
        _check_ends(links)
        return Lab(name, os.path.abspath(self.path), os.path.join(base_dir, captures), links)

    def _top(self, data: dict[str, Any], key: str, kind: type, default: Any) -> Any:
        value = data.get(key, default)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise _Problem(self.lines.top.get(key, 0), f"'{key}' must be {_KIND_NAMES[kind]}")
        return value

    def _link(self, index: int, table: dict[str, Any], ports: _PortCounter, host: str) -> LabLink:
        def line(key: str | None = None) -> int:
            return self.lines.link(index, key)

        def value(key: str, kind: type, default: Any = None) -> Any:
            got = table.get(key, default)
            if got is not None and (not isinstance(got, kind) or isinstance(got, bool)):
                raise _Problem(line(key), f"'{key}' must be {_KIND_NAMES[kind]}")
            return got

        for key in table:
            if key not in _LINK_KEYS:
                raise _Problem(line(key), _unknown_key(key, _LINK_KEYS))
        ends = []
        for side in ("a", "b"):
            text = value(side, str)
            if text is None:
                raise _Problem(line(), f"the link needs '{side}' (e.g. {side} = \"R1 f0/0\")")
            end = _parse_end(text, line(side))
            spec = value(f"{side}_endpoint", str)
            if spec is None:
                spec = ports.allocate(host)
            try:
                parse_endpoint(spec)
            except ValueError as exc:
                raise _Problem(line(f"{side}_endpoint"), str(exc)) from None
            ends.append(LinkEnd(end, spec))
        encapsulation = _encapsulation(value("encapsulation", str, "auto"), line("encapsulation"))
        impairments = []
        for text in value("impairments", list, []):
            if not isinstance(text, str):
                raise _Problem(line("impairments"), "'impairments' must be a list of strings")
            try:
                impairments.append(parse_impairment(text))
            except ImpairmentError as exc:
                raise _Problem(line("impairments"), str(exc)) from None
        capture_at = value("capture_at", str, "post")
        if capture_at not in CAPTURE_POINTS:
            raise _Problem(
                line("capture_at"), f"'capture_at' must be one of {', '.join(CAPTURE_POINTS)}"
            )
        name = value("name", str) or default_link_name(ends[0].end, ends[1].end)
        if not name.strip() or '"' in name:
            raise _Problem(line("name"), f"invalid link name {name!r}")
        return LabLink(
            name,
            (ends[0], ends[1]),
            encapsulation,
            impairments,
            value("capture", str),
            capture_at,
            line(),
        )


_KIND_NAMES = {str: "a string", int: "an integer", list: "a list"}


def _unknown_key(key: str, known: tuple[str, ...]) -> str:
    return f"unknown key {key!r} (known: {', '.join(known)})"


def _parse_end(text: str, line: int) -> End:
    words = text.split()
    if len(words) != 2 or not _NAME.fullmatch(words[0]) or not _INTERFACE.fullmatch(words[1]):
        raise _Problem(
            line, f'{text!r} is not a link end (expected "DEVICE INTERFACE", e.g. "R1 f0/0")'
        )
    return End(words[0], canonical_interface(words[1]))


def _encapsulation(text: str, line: int) -> LinkType | None:
    if text == "auto":
        return None
    try:
        linktype = LinkType.parse(text)
    except ValueError as exc:
        raise _Problem(line, str(exc)) from None
    if linktype not in TUNNEL_LINKTYPES:
        raise _Problem(
            line, f"{text!r} is not a link a lab tunnel carries (ethernet, hdlc, ppp, fr)"
        )
    return linktype


def _check_ends(links: list[LabLink]) -> None:
    used: dict[End, LabLink] = {}
    names: dict[str, LabLink] = {}
    for link in links:
        if link.name in names:
            raise _Problem(
                link.line, f"link name {link.name!r} is used twice (line {names[link.name].line})"
            )
        names[link.name] = link
        for link_end in link.ends:
            other = used.get(link_end.end)
            if other is not None:
                raise _Problem(
                    link.line, f"{link_end.end} is linked twice (here and at line {other.line})"
                )
            used[link_end.end] = link


class _PortCounter:
    """Dynagen's allocation: a base port, counted up per link end (two ports per end here:
    the emulator's, then tunnelscope's)."""

    def __init__(self, base: int, line: int) -> None:
        if not 1 <= base <= 65534:
            raise _Problem(line, f"udp base port {base} is not in 1..65534")
        self.next = base
        self.line = line

    def allocate(self, host: str) -> str:
        emulator, ours = self.take()
        return f"udp:{ours}:{_bracket(host)}:{emulator}"

    def take(self) -> tuple[int, int]:
        """The next end's two ports: the emulator's, then tunnelscope's."""
        emulator, ours = self.next, self.next + 1
        if ours > 65535:
            raise _Problem(self.line, "the udp base port leaves too few ports for every link end")
        self.next += 2
        return emulator, ours


# --- Dynagen .net files --------------------------------------------------------------------

_SWITCHES = ("FRSW", "ETHSW", "ATMSW", "ATMBR")
_HOSTS = ("VPCS", "QEMU")
_DEVICE_TYPES = ("ROUTER", *_SWITCHES, *_HOSTS)
_ROUTER_INTERFACE = re.compile(
    r"(e|et|eth|ethernet|f|fa|fastethernet|g|gi|gigabitethernet|s|se|serial|a|at|atm|p|pos)"
    r"\s*\d+(/\d+)*",
    re.IGNORECASE,
)
_HOST_INTERFACE = re.compile(r"[a-z]+\d+(/\d+)*", re.IGNORECASE)


@dataclass
class _Device:
    kind: str
    name: str
    host: str  # as the section names it (localhost: 127.0.0.1)
    counter: _PortCounter
    line: int
    ports: set[str] = field(default_factory=set)  # a switch's configured ports
    site: str = ""  # host_key(host): which machine
    section: str = ""  # the hypervisor section, for messages
    relay: str | None = None  # the section's `relay = HOST`, as a host key


@dataclass
class _Wire:
    """A link being read: its ends (the second may come later, for a LAN) and its line."""

    line: int
    ends: list[tuple[End, _Device]]


class _NetLines:
    """Line numbers of sections and keys in a .net file: configobj keeps none."""

    def __init__(self, text: str) -> None:
        self.sections: dict[tuple[str, ...], int] = {}
        self.keys: dict[tuple[tuple[str, ...], str], int] = {}
        path: list[str] = []
        for number, line in enumerate(text.splitlines(), 1):
            stripped = line.split("#", 1)[0].strip()
            header = re.fullmatch(r"(\[+)\s*(.*?)\s*(\]+)", stripped)
            if header:
                depth = len(header.group(1))
                path = path[: depth - 1] + [" ".join(header.group(2).split())]
                self.sections.setdefault(tuple(path), number)
            elif "=" in stripped:
                key = stripped.split("=", 1)[0].strip().strip("\"'")
                self.keys.setdefault((tuple(path), key), number)

    def section(self, *path: str) -> int:
        return self.sections.get(tuple(" ".join(p.split()) for p in path), 0)

    def key(self, path: tuple[str, ...], key: str) -> int:
        normal = tuple(" ".join(p.split()) for p in path)
        return self.keys.get((normal, key), self.sections.get(normal, 0))


class _NetLab:
    def __init__(self, path: str, text: str) -> None:
        self.path = path
        self.text = text
        self.lines = _NetLines(text)
        self.devices: dict[str, _Device] = {}
        self.link_relays: dict[End, tuple[str, int]] = {}  # `s1/0 relay = HOST` keys
        self.bases: dict[str, int] = {}  # per host: the lowest udp base of its sections

    def load(self) -> Lab:
        try:
            config = ConfigObj(self.text.splitlines(), interpolation=False, raise_errors=False)
        except ConfigObjError as exc:
            errors = getattr(exc, "errors", [])
            line = errors[0].line_number if errors else "?"
            message = re.sub(r" at line \d+\.?$", "", str(errors[0].msg if errors else exc))
            raise LabError(f"{self.path}:{line}: {message}") from None
        try:
            links = self._links(config)
        except _Problem as problem:
            where = f"{self.path}:{problem.line}" if problem.line else self.path
            raise LabError(f"{where}: {problem}") from None
        base_dir = os.path.dirname(os.path.abspath(self.path))
        name = os.path.splitext(os.path.basename(self.path))[0]
        captures = os.path.join(base_dir, DEFAULT_CAPTURES)
        hosts = list(dict.fromkeys(h for link in links for h in (link.relay, *_hosts(link)) if h))
        return Lab(name, os.path.abspath(self.path), captures, links, hosts)

    def _links(self, config: Any) -> list[LabLink]:
        hypervisors = [name for name in config.sections if name != "GNS3-DATA"]
        for hypervisor in hypervisors:
            self._read_devices(hypervisor, config[hypervisor])
        wires: list[_Wire] = []
        by_end: dict[End, _Wire] = {}
        lans: dict[str, _Wire] = {}
        for hypervisor in hypervisors:
            for section in config[hypervisor].sections:
                device = self._device_of(section)
                if device is None or device.kind in _SWITCHES:
                    continue
                for key, value in config[hypervisor][section].items():
                    line = self.lines.key((hypervisor, section), key)
                    words = key.split()
                    if len(words) == 2 and words[1] == "relay" and isinstance(value, str):
                        end = End(device.name, canonical_interface(words[0]))
                        self.link_relays[end] = (host_key(value), line)
                        continue
                    if not isinstance(value, (str, list)) or not self._is_interface(device, key):
                        continue
                    end = End(device.name, canonical_interface(key))
                    self._wire(end, device, value, line, wires, by_end, lans)
        for lan, wire in lans.items():
            if len(wire.ends) != 2:
                raise _Problem(
                    wire.line,
                    f"LAN {lan} has {len(wire.ends)} member(s); a tunnelscope link joins exactly"
                    " two interfaces (use an ETHSW for more)",
                )
        if not wires:
            raise _Problem(0, "no links: no device interface is connected to anything")
        wires.sort(key=lambda w: w.line)
        if len({device.site for wire in wires for _, device in wire.ends}) == 1:
            return [self._lab_link(wire) for wire in wires]
        return self._lab_links_across_hosts(wires)

    def _read_devices(self, hypervisor: str, section: Any) -> None:
        host = hypervisor.rsplit(":", 1)[0] if re.search(r":\d+$", hypervisor) else hypervisor
        host = "127.0.0.1" if host == "localhost" else host.strip("[]")
        udp = section.get("udp", str(DEFAULT_UDP_BASE))
        line = self.lines.key((hypervisor,), "udp")
        if not (isinstance(udp, str) and udp.isdigit()):
            raise _Problem(line, f"udp = {udp!r} is not a port number")
        counter = _PortCounter(int(udp), line)
        site = host_key(host)
        self.bases[site] = min(int(udp), self.bases.get(site, int(udp)))
        relay = section.get("relay")
        relay = host_key(relay) if isinstance(relay, str) else None
        for name in section.sections:
            words = name.split()
            if len(words) == 1:
                continue  # [[7200]] and friends: model defaults for the emulator
            line = self.lines.section(hypervisor, name)
            kind = words[0].upper()
            if len(words) != 2 or kind not in _DEVICE_TYPES:
                known = ", ".join(_DEVICE_TYPES)
                raise _Problem(line, f"[[{name}]]: unknown device type (known: {known})")
            if not _NAME.fullmatch(words[1]):
                raise _Problem(line, f"[[{name}]]: invalid device name {words[1]!r}")
            if words[1] in self.devices:
                earlier = self.devices[words[1]].line
                raise _Problem(
                    line, f"device {words[1]} is defined twice (first at line {earlier})"
                )
            device = _Device(kind, words[1], host, counter, line, set(), site, hypervisor, relay)
            if kind in _SWITCHES:
                device.ports = self._switch_ports(device, hypervisor, name, section[name])
            self.devices[device.name] = device

    def _switch_ports(self, device: _Device, hypervisor: str, name: str, section: Any) -> set[str]:
        """Ports a switch configures: ETHSW `1 = access 1`, FRSW `1:102 = 2:201`, ATM alike."""
        ports = set()
        for key, value in section.items():
            line = self.lines.key((hypervisor, name), key)
            if device.kind == "ETHSW":
                if not key.isdigit():
                    raise _Problem(line, f"{device.name}: {key!r} is not an Ethernet switch port")
                ports.add(key)
                continue
            for text in (key, value if isinstance(value, str) else ""):
                fields = text.split(":")
                if not all(f.strip().isdigit() for f in fields):
                    raise _Problem(
                        line, f"{device.name}: {text!r} is not PORT:DLCI (or PORT:VPI[:VCI])"
                    )
                ports.add(fields[0].strip())
        return ports

    def _device_of(self, section: str) -> _Device | None:
        words = section.split()
        return self.devices.get(words[1]) if len(words) == 2 else None

    @staticmethod
    def _is_interface(device: _Device, key: str) -> bool:
        pattern = _ROUTER_INTERFACE if device.kind == "ROUTER" else _HOST_INTERFACE
        return bool(pattern.fullmatch(key))

    def _wire(
        self,
        end: End,
        device: _Device,
        value: str | list,
        line: int,
        wires: list[_Wire],
        by_end: dict[End, _Wire],
        lans: dict[str, _Wire],
    ) -> None:
        """Record `end = value`; the same link written on both sides is one link."""
        words = value.split() if isinstance(value, str) else []
        if words and words[0].lower().startswith("nio_"):
            raise _Problem(
                line, f"{end} = {value}: NIO connections are not relayed; link it to a device"
            )
        if len(words) != 2:
            raise _Problem(line, f"{end} = {value!r}: expected DEVICE INTERFACE, e.g. R2 s1/0")
        if words[0].upper() == "LAN":
            wire = lans.setdefault(words[1], _Wire(line, []))
            if not wire.ends:
                wires.append(wire)
            self._claim(end, device, wire, line, by_end)
            return
        peer = self.devices.get(words[0])
        if peer is None:
            raise _Problem(line, f"{end} = {value}: unknown device {words[0]!r}")
        if peer.kind in _SWITCHES:
            if words[1] not in peer.ports:
                ports = ", ".join(sorted(peer.ports, key=int)) or "none"
                raise _Problem(
                    line, f"{end} = {value}: {peer.name} has no port {words[1]} (ports: {ports})"
                )
            peer_end = End(peer.name, words[1])
        elif self._is_interface(peer, words[1]):
            peer_end = End(peer.name, canonical_interface(words[1]))
        else:
            raise _Problem(
                line, f"{end} = {value}: {words[1]!r} is not an interface of a {peer.kind}"
            )
        if peer_end == end:
            raise _Problem(line, f"{end} is connected to itself")
        wire = by_end.get(end)
        if wire is not None and wire is by_end.get(peer_end) and len(wire.ends) == 2:
            return  # the other side already declared this link
        wire = _Wire(line, [])
        self._claim(end, device, wire, line, by_end)
        self._claim(peer_end, peer, wire, line, by_end)
        wires.append(wire)

    @staticmethod
    def _claim(end: End, device: _Device, wire: _Wire, line: int, by_end: dict[End, _Wire]) -> None:
        if end in by_end:
            raise _Problem(line, f"{end} is connected twice (first at line {by_end[end].line})")
        by_end[end] = wire
        wire.ends.append((end, device))

    def _lab_link(self, wire: _Wire, endpoints: list[str] | None = None) -> LabLink:
        """The link of `wire`; its endpoints allocated as on one host unless given."""
        if endpoints is None:
            endpoints = [device.counter.allocate(device.host) for _, device in wire.ends]
        ends = [
            LinkEnd(end, endpoint, device.kind)
            for (end, device), endpoint in zip(wire.ends, endpoints)
        ]
        kinds = {device.kind for _, device in wire.ends}
        letters = {end.interface[0] for end, device in wire.ends if device.kind == "ROUTER"}
        encapsulation = None
        if "FRSW" in kinds:
            encapsulation = LinkType.FRELAY
        elif "ETHSW" in kinds or kinds & set(_HOSTS) or letters & {"e", "f", "g"}:
            encapsulation = LinkType.ETHERNET
        name = default_link_name(ends[0].end, ends[1].end)
        return LabLink(name, (ends[0], ends[1]), encapsulation, line=wire.line)

    def _lab_links_across_hosts(self, wires: list[_Wire]) -> list[LabLink]:
        """Port plans per host (Dynagen's: each section counts from its own udp base).

        Pass 1 gives every end its emulator's port and, as on one host, the next one for
        tunnelscope; that one is used when the link is relayed on the emulator's own host
        (over loopback). Pass 2 gives the ends relayed on another host a port there: the
        lowest free one from that host's base, so nothing on any host collides.
        """
        used: dict[str, set[int]] = {}
        links, remote = [], []
        for wire in wires:
            pairs = [device.counter.take() for _, device in wire.ends]
            link = self._lab_link(wire, [f"udp:{ours}:127.0.0.1:{emu}" for emu, ours in pairs])
            link.relay = self._relay(wire)
            for link_end, (_, device), (emulator, ours) in zip(link.ends, wire.ends, pairs):
                used.setdefault(device.site, set()).update((emulator, ours))
                link_end.host = device.site
                if device.site != link.relay:
                    if is_loopback(device.host):
                        raise _Problem(
                            wire.line,
                            f"{link_end.end} is on [{device.section}], which {link.relay} cannot"
                            " reach by that name: in a lab spanning hosts, name this host by an"
                            " address or a name the other hosts reach",
                        )
                    remote.append((link, link_end, device, emulator))
            links.append(link)
        for link, link_end, device, emulator in remote:
            taken = used.setdefault(link.relay, set())
            port = next(p for p in range(self.bases.get(link.relay, DEFAULT_UDP_BASE), 65536)
                        if p not in taken)  # fmt: skip
            taken.add(port)
            link_end.endpoint = f"udp:{port}:{_bracket(device.host)}:{emulator}"
        return links

    def _relay(self, wire: _Wire) -> str:
        """Where a link is relayed: its `INTERFACE relay = HOST` key, its sections' `relay`,
        else the ends' one host, else this machine if an end is here, else end a's host."""
        per_link = {self.link_relays[end][0] for end, _ in wire.ends if end in self.link_relays}
        per_section = {device.relay for _, device in wire.ends if device.relay}
        for choices in (per_link, per_section):
            if len(choices) > 1:
                raise _Problem(
                    wire.line,
                    f"{wire.ends[0][0]} = {wire.ends[1][0]}: its ends disagree on where to relay"
                    f" it ({', '.join(sorted(choices))})",
                )
            if choices:
                return choices.pop()
        sites = [device.site for _, device in wire.ends]
        if sites[0] == sites[1]:
            return sites[0]
        return LOCALHOST if LOCALHOST in sites else sites[0]
