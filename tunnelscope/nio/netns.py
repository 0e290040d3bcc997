"""`IFNAME[@NETNS]` for tap: and eth:, and opening things inside a named network namespace.

A network namespace belongs to a thread, and a TAP fd or an AF_PACKET socket stays tied to
the namespace it was opened in. So the open runs in a short-lived helper thread that enters
/var/run/netns/NETNS (as `ip netns exec` does) and then ends: the process, its other threads
and its UDP sockets never leave the host's namespace, and nothing has to be restored.
"""

from __future__ import annotations

import ctypes
import os
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, TypeVar

from tunnelscope.nio.spec import EndpointError

NETNS_DIR = "/var/run/netns"
_CLONE_NEWNET = 0x40000000

T = TypeVar("T")


def parse_ifname_netns(text: str, args: str) -> tuple[str, str | None]:
    """Split and check `IFNAME[@NETNS]` the way the kernel and `ip netns` would."""
    ifname, at, netns = args.partition("@")
    if (
        not 0 < len(ifname.encode()) < 16
        or ifname in (".", "..")
        or any(c in ifname for c in "/: \t\n")
    ):
        raise ValueError(
            f"{text}: interface name '{ifname}' is invalid (1-15 bytes, no '/', ':' or spaces)"
        )
    if at and (not netns or netns in (".", "..") or "/" in netns or "\0" in netns):
        raise ValueError(f"{text}: network namespace name '{netns}' is invalid")
    return ifname, netns if at else None


def _setns(fd: int) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.setns(fd, _CLONE_NEWNET) != 0:
        code = ctypes.get_errno()
        raise OSError(code, os.strerror(code))


def run_in_netns(text: str, netns: str | None, opener: Callable[[], T]) -> T:
    """Run `opener` inside network namespace `netns` (None: right here) and return its result."""
    if netns is None:
        return opener()
    try:
        ns_fd = os.open(os.path.join(NETNS_DIR, netns), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        raise EndpointError(f"{text}: network namespace '{netns}' does not exist") from None
    except OSError as exc:
        raise EndpointError(f"{text}: network namespace '{netns}': {exc.strerror}") from None

    def enter_and_open() -> T:
        try:
            _setns(ns_fd)
        except OSError as exc:
            raise EndpointError(
                f"{text}: cannot enter network namespace '{netns}'"
                f" ({exc.strerror}; needs root or CAP_SYS_ADMIN)"
            ) from None
        return opener()

    try:  # a private one-thread pool: its thread ends at shutdown, namespace and all
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"netns-{netns}") as pool:
            return pool.submit(enter_and_open).result()
    finally:
        os.close(ns_fd)
