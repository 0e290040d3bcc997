"""Host network devices, as ubridge's `docker` and `brctl` modules handle them for GNS3.

GNS3 asks its ubridge to create veth pairs, to move an interface into a container's network
namespace (named by a PID of a process inside it), to set a MAC address, and to attach an
interface to a Linux bridge. These run iproute2's `ip` with an argument list (never a
shell), after checking every name the way the kernel would, so a request cannot smuggle in
options or reach anything but network devices. Each function raises NetdevError (one line).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess

IFNAMSIZ = 16
_MAC = re.compile(r"[0-9A-Fa-f]{2}(:[0-9A-Fa-f]{2}){5}")
IP_TIMEOUT = 10.0


class NetdevError(Exception):
    """A device operation failed; the text says why, on one line."""


def check_name(name: str) -> str:
    """An interface name as the kernel accepts it (1-15 bytes, no '/', ':' or blanks), not
    starting with '-' (it would read as an option)."""
    if (
        not 0 < len(name.encode()) < IFNAMSIZ
        or name in (".", "..")
        or name.startswith("-")
        or any(c in name for c in "/:@ \t\n\0")
    ):
        raise NetdevError(f"invalid interface name '{name}'")
    return name


def exists(name: str) -> bool:
    try:
        return socket.if_nametoindex(name) > 0
    except OSError:
        return False


def _ip(*args: str) -> None:
    ip = shutil.which("ip") or "/sbin/ip"
    try:
        done = subprocess.run(
            [ip, *args], capture_output=True, text=True, timeout=IP_TIMEOUT, check=False
        )
    except (OSError, subprocess.SubprocessError) as exc:
        raise NetdevError(f"cannot run ip: {exc}") from None
    if done.returncode != 0:
        message = " ".join(done.stderr.split()) or f"ip exited with status {done.returncode}"
        raise NetdevError(message)


def create_veth(name: str, peer: str) -> bool:
    """A veth pair, `name` up; False when the peer's TX checksum offload could not be turned
    off (ubridge turns it off so the host does not rely on checksums a container left out)."""
    _ip("link", "add", check_name(name), "type", "veth", "peer", "name", check_name(peer))
    try:
        _ip("link", "set", name, "up")
    except NetdevError:
        _ip("link", "delete", name)
        raise
    ethtool = shutil.which("ethtool")
    if ethtool is None:
        return False
    done = subprocess.run(
        [ethtool, "-K", peer, "tx", "off"], capture_output=True, timeout=IP_TIMEOUT, check=False
    )
    return done.returncode == 0


def delete_link(name: str) -> None:
    """Delete an interface (a veth takes its peer with it)."""
    if not exists(check_name(name)):
        raise NetdevError(f"could not find interface index for {name}")
    _ip("link", "delete", name)


def move_to_netns(name: str, pid: str, new_name: str) -> None:
    """Move an interface into the network namespace of process `pid`, renamed `new_name`."""
    if not exists(check_name(name)):
        raise NetdevError(f"could not find interface index for {name}")
    check_name(new_name)
    if not pid.isdigit() or int(pid) < 1:
        raise NetdevError(f"invalid process id '{pid}'")
    if not os.path.exists(f"/proc/{int(pid)}/ns/net"):
        raise NetdevError(f"no process {int(pid)} (its network namespace is not there)")
    _ip("link", "set", name, "netns", str(int(pid)), "name", new_name)


def set_mac(name: str, mac: str) -> None:
    if not _MAC.fullmatch(mac):
        raise NetdevError("invalid MAC address format")
    if not exists(check_name(name)):
        raise NetdevError(f"could not set a MAC address on interface {name}")
    _ip("link", "set", name, "address", mac.lower())


def add_to_bridge(bridge: str, name: str) -> None:
    """Attach an interface to a Linux bridge and bring it up (already attached is fine)."""
    if not exists(check_name(name)):
        raise NetdevError(f"Could not find interface {name}")
    if not exists(check_name(bridge)) or not os.path.isdir(f"/sys/class/net/{bridge}/bridge"):
        raise NetdevError(f"Could not add interface {name} to {bridge}: no such bridge")
    try:
        _ip("link", "set", name, "master", bridge)
        _ip("link", "set", name, "up")
    except NetdevError as exc:
        raise NetdevError(f"Could not add interface {name} to {bridge}: {exc}") from None
