"""IOU's NETIO: how an IOU instance exchanges frames with its neighbours (and with ubridge).

Every participant, an IOU instance or a bridge, has an ID and a Unix datagram socket at
/tmp/netio<UID>/<ID> (with a lock file <ID>.lck holding the owner's PID). A datagram is an
8-byte header, then one whole frame (Ethernet, or HDLC/PPP/Frame Relay on a serial port):

    offset 0  destination ID (2 bytes, big-endian)   4  destination port   6  message type
           2  source ID      (2 bytes, big-endian)   5  source port        7  channel (0)

A port is `bay + 16 * unit`; message type 1 is data. (ubridge's hypervisor_iol_bridge.h.)

`NetioHub` is one iol_bridge's socket: frames IOU sends to it are routed, by destination
port, into that port's side of a socket pair, whose other side is an ordinary endpoint a
link relays to the port's UDP tunnel; frames the link writes there go back to the port's IOU
instance with the header in front. Routing runs in the hub's own thread.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import selectors
import socket
import struct
import threading

from tunnelscope.nio.spec import EndpointError, SocketEndpoint, tune_buffers

HEADER = struct.Struct("!HHBBBB")  # dst ID, src ID, dst port, src port, message type, channel
MSG_DATA = 1
MAX_FRAME = 0x1000  # ubridge's MAX_MTU: IOU frames are at most 4096 bytes
MAX_ID = 0xFFFF
BAYS = UNITS = 16
_MAX_PATH = 107


def default_directory() -> str:
    return f"/tmp/netio{os.getuid()}"


def port_key(bay: int, unit: int) -> int:
    """The header's port byte for interface bay/unit (e1/2 is bay 1, unit 2)."""
    if not (0 <= bay < BAYS and 0 <= unit < UNITS):
        raise ValueError(f"port {bay}/{unit} is out of range (bay and unit 0-15)")
    return bay + 16 * unit


def header(destination: int, source: int, port: int) -> bytes:
    return HEADER.pack(destination, source, port, port, MSG_DATA, 0)


def socket_path(directory: str, netio_id: int) -> str:
    return os.path.join(directory, str(netio_id))


class NetioHub:
    """The socket of iol_bridge ID `netio_id` in `directory`, and the routes to its ports.

    EndpointError (one line) when the ID is taken (its lock is held) or the socket cannot
    be made. `ports` is read by the hub thread; changes are made under `_lock`.
    """

    def __init__(self, directory: str, netio_id: int) -> None:
        self.directory = directory
        self.netio_id = netio_id
        self.path = socket_path(directory, netio_id)
        if len(os.fsencode(self.path)) > _MAX_PATH:
            raise EndpointError(f"{self.path}: longer than a Unix socket path may be")
        self.counters = {"unrouted": 0, "unreachable": 0}
        self._ports: dict[int, tuple[int, socket.socket]] = {}  # key -> (IOU ID, hub side)
        self._lock = threading.Lock()
        self._lock_fd = self._take_lock()
        try:
            self.sock = self._bind()
        except BaseException:
            self._release_lock()
            raise
        self._stop = threading.Event()
        self._changed = True
        self._thread = threading.Thread(target=self._route, name=f"netio{netio_id}", daemon=True)
        self._thread.start()

    def _take_lock(self) -> int:
        try:
            if not os.path.isdir(self.directory):
                os.mkdir(self.directory, 0o700)
            fd = os.open(f"{self.path}.lck", os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise EndpointError(f"{self.path}: {exc.strerror}") from None
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            os.close(fd)
            raise EndpointError(f"ID {self.netio_id} is in use (locked: {self.path}.lck)") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"{os.getpid()}\n".encode())
        return fd

    def _release_lock(self) -> None:
        with contextlib.suppress(OSError):
            os.unlink(f"{self.path}.lck")  # before closing: never someone else's lock
        os.close(self._lock_fd)

    def _bind(self) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)  # we hold the lock: what is there is stale
            tune_buffers(sock)
            sock.setblocking(False)
            sock.bind(self.path)
        except OSError as exc:
            sock.close()
            raise EndpointError(f"cannot bind {self.path}: {exc.strerror}") from None
        return sock

    def add_port(self, key: int, iou_id: int, spec: str) -> SocketEndpoint:
        """Route port `key` to IOU instance `iou_id`; the endpoint a link relays from."""
        ours, link_side = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        for side in (ours, link_side):
            tune_buffers(side)
            side.setblocking(False)
        with self._lock:
            old = self._ports.pop(key, None)
            self._ports[key] = (iou_id, ours)
            self._changed = True
        if old:
            old[1].close()
        return SocketEndpoint(spec, link_side)

    def remove_port(self, key: int) -> None:
        with self._lock:
            old = self._ports.pop(key, None)
            self._changed = True
        if old:
            old[1].close()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        with self._lock:
            for _, side in self._ports.values():
                side.close()
            self._ports.clear()
        self.sock.close()
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        self._release_lock()

    # -- the hub thread -------------------------------------------------------------------

    def _route(self) -> None:
        selector = selectors.DefaultSelector()
        routes: dict[int, tuple[int, int, socket.socket]] = {}  # fd -> key, IOU ID, side
        try:
            while not self._stop.is_set():
                if self._changed:
                    routes = self._rebuild(selector)
                for key, _ in selector.select(0.1):
                    if key.fileobj is self.sock:
                        self._from_iou()
                    elif key.fd in routes:
                        self._to_iou(*routes[key.fd])
        finally:
            selector.close()

    def _rebuild(
        self, selector: selectors.BaseSelector
    ) -> dict[int, tuple[int, int, socket.socket]]:
        with self._lock:
            self._changed = False
            for key in list(selector.get_map().values()):
                selector.unregister(key.fileobj)
            selector.register(self.sock, selectors.EVENT_READ)
            routes = {}
            for port, (iou_id, side) in self._ports.items():
                selector.register(side, selectors.EVENT_READ)
                routes[side.fileno()] = (port, iou_id, side)
            return routes

    def _from_iou(self) -> None:
        for _ in range(64):
            try:
                data = self.sock.recv(HEADER.size + MAX_FRAME)
            except BlockingIOError:
                return
            except OSError:
                continue
            if len(data) <= HEADER.size:
                continue
            with self._lock:
                route = self._ports.get(data[4])
            if route is None:
                self.counters["unrouted"] += 1
                continue
            with contextlib.suppress(OSError):  # a full link side: the frame is lost, as on a wire
                route[1].send(data[HEADER.size :])

    def _to_iou(self, port: int, iou_id: int, side: socket.socket) -> None:
        target = socket_path(self.directory, iou_id)
        prefix = header(iou_id, self.netio_id, port)
        for _ in range(64):
            try:
                frame = side.recv(MAX_FRAME + 1)
            except BlockingIOError:
                return
            except OSError:
                return
            try:
                self.sock.sendto(prefix + frame, target)
            except OSError:  # IOU not started yet, or gone: ubridge drops it too
                self.counters["unreachable"] += 1
