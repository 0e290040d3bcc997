"""One console over several tunnelscope hosts: a lab spanning hosts, each serving its part.

Dynagen drove several dynamips servers from one console. `LabHosts` does the same over the
control protocol: it holds a client per host (`tunnelscope serve LAB --host NAME` on each),
sends a request about a device to the host that relays that device's link, and merges what
the hosts list, each link marked with its host. A host that cannot be reached, or goes away,
is reported as such; the others keep working. With one host it is just that host's client.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tunnelscope.lab.control import (
    Code,
    ControlClient,
    ControlError,
    ControlUnavailable,
    parse_address,
)
from tunnelscope.lab.labfile import is_loopback

_BY_DEVICE = ("capture", "stop_capture", "filter", "find")  # `lab VERB DEVICE ...`


@dataclass
class Host:
    name: str
    address: str
    client: ControlClient | None = None
    down: str | None = None  # why it cannot be reached


class LabHosts:
    """Clients of the hosts at `controls` (each `[NAME=]HOST:PORT`; NAME defaults to HOST).

    With one control address, ControlUnavailable is raised as ControlClient raises it; with
    several, only when none answers.
    """

    def __init__(self, controls: list[str]) -> None:
        self.hosts = [_host(text) for text in controls]
        for host in self.hosts:
            try:
                host.client = ControlClient(host.address)
            except ControlUnavailable as exc:
                if len(self.hosts) == 1:
                    raise
                host.down = exc.reason
        if all(host.client is None for host in self.hosts):
            down = "; ".join(f"{host.name}: {host.down}" for host in self.hosts)
            raise ControlUnavailable(f"no host answers ({down})")

    @property
    def address(self) -> str:
        return ", ".join(host.address for host in self.hosts)

    @property
    def several(self) -> bool:
        return len(self.hosts) > 1

    def request(self, *words: str) -> list[str]:
        """One request, sent where it belongs: to the host of the device it names, else to
        every host (`lab show`: each host's lines under its name), else to the first."""
        if words[:1] == ("lab",) and len(words) > 2 and words[1] in _BY_DEVICE:
            return self._ask(self._host_of(words[2]), words)
        if not self.several:
            return self._ask(self.hosts[0], words)
        if words[:2] == ("lab", "show"):
            lines = []
            for host in self.hosts:
                body = self._each(host, words)
                lines += (
                    [f"host {host.name}: {host.down}"]
                    if body is None
                    else [
                        f"host {host.name} ({host.address})",
                        *(f"  {line}" for line in body[:-1]),
                    ]
                )
            return [*lines, "OK"]
        return self._ask(self._up()[0], words)

    def links(self) -> list[dict[str, Any]]:
        """Every host's links, each with its `host`; a host down is one entry saying why."""
        merged: list[dict[str, Any]] = []
        for host in self.hosts:
            body = self._each(host, ("lab", "links"))
            if body is None:
                merged.append({"host": host.name, "unreachable": host.down})
                continue
            links = [json.loads(line) for line in body[:-1]]
            if self.several:
                for link in links:
                    link["host"] = host.name
            merged += links
        return merged

    def devices(self) -> dict[str, list[str]]:
        return {device: names for _, device, names in self._devices()}

    def remote_stream(
        self, device: str, interface: str
    ) -> tuple[Host, str, str, str | None] | None:
        """`stream_source` for a link another machine relays; None when it is relayed here
        (a host reached over loopback), where the control plane captures it itself."""
        if not self.several:
            return None
        host = self._host_of(device)
        if is_loopback(parse_address(host.address)[0]):
            return None
        return self._stream_of(host, device, interface)

    def stream_source(self, device: str, interface: str) -> tuple[Host, str, str, str | None]:
        """Where the link on DEVICE INTERFACE is served live, as reached from here: (the host
        relaying it, the stream address, the link's name, the token).

        ControlError when that host serves no streams a console here can reach.
        """
        return self._stream_of(self._host_of(device), device, interface)

    def _stream_of(
        self, host: Host, device: str, interface: str
    ) -> tuple[Host, str, str, str | None]:
        control_host = parse_address(host.address)[0]
        found = self._ask(host, ("lab", "find", device, interface))[-1]
        lines = self._ask(host, ("lab", "stream"))[:-1]
        stream_host, port = parse_address(lines[0])
        if stream_host in ("0.0.0.0", "::"):  # every address: the one its control answers on
            stream_host = control_host
        elif is_loopback(stream_host) and not is_loopback(control_host):
            raise ControlError(
                Code.UNSPECIFIED,
                f"host {host.name} serves its live streams on loopback only; give its serve"
                " --stream ADDRESS:PORT (or capture with --remote-file)",
            )
        token = lines[1].removeprefix("token ") if len(lines) > 1 else None
        where = f"[{stream_host}]:{port}" if ":" in stream_host else f"{stream_host}:{port}"
        return host, where, found.rsplit(" ", 1)[0], token

    def close(self) -> None:
        for host in self.hosts:
            if host.client is not None:
                host.client.close()

    def __enter__(self) -> LabHosts:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- routing ------------------------------------------------------------------------------

    def _devices(self) -> list[tuple[Host, str, list[str]]]:
        found = []
        for host in self.hosts:
            body = self._each(host, ("lab", "devices"))
            for line in (body or [""])[:-1]:
                device, *names = line.split()
                found.append((host, device, names))
        return found

    def _host_of(self, device: str) -> Host:
        if not self.several:
            return self.hosts[0]
        for host, name, _ in self._devices():
            if name == device:
                return host
        down = [host.name for host in self.hosts if host.down]
        unknown = f"unknown device {device!r}"
        if down:
            unknown += f" (unreachable: {', '.join(down)})"
        raise ControlError(Code.UNK_OBJ, unknown)

    def _up(self) -> list[Host]:
        up = [host for host in self.hosts if host.client is not None]
        if not up:
            raise ControlUnavailable("no host answers any more")
        return up

    def _each(self, host: Host, words: tuple[str, ...]) -> list[str] | None:
        """A request to one host; of several, None (and the host marked down) if it is gone."""
        if host.client is None:
            return None
        try:
            return host.client.request(*words)
        except ControlUnavailable as exc:
            if not self.several:
                raise
            host.client.close()
            host.client, host.down = None, exc.reason
            return None

    def _ask(self, host: Host, words: tuple[str, ...]) -> list[str]:
        """A request to one host; ControlError (not the end of the session) if it is gone."""
        body = self._each(host, words)
        if body is None:
            raise ControlError(Code.UNSPECIFIED, f"host {host.name} is unreachable: {host.down}")
        return body


def _host(text: str) -> Host:
    """`[NAME=]HOST:PORT`; ValueError for a bad address."""
    name, _, address = text.rpartition("=")
    host, _ = parse_address(address)
    return Host(name or host, address)
