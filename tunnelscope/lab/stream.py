"""Remote live captures: a running tunnelscope serves its links' frames over TCP.

Why TCP and one capture per client: a pipe reader needs its own file header from its first
byte (a reader joining a running stream cannot decode it), and a reader that stalls must cost
the link nothing. Each accepted socket is handed to the engine with `Link.attach_fd`, which
writes a fresh header, never blocks (a stalled reader is stopped with "reader stalled") and
closes the socket when the capture stops.

The request, one line, sent by the client right after connecting:

    CAPTURE LINK [points=pre|post|both] [format=pcap|pcapng] [linktype=auto|eth|hdlc|ppp|fr]
            ["filter=EXPR"] [token=TOKEN]
    LIST [token=TOKEN]                         -> one JSON object per link, then close
    GET /LINK?points=..&format=..&token=.. HTTP/1.1   (curl; the reply is HTTP/1.0)

A client that sends nothing within REQUEST_WAIT seconds (`nc 127.0.0.1 PORT | wireshark -k
-i -`) gets the first link, as pcap. Errors are one line `tunnelscope: error: TEXT` and the
connection closes; a capture always starts with a pcap or pcapng magic, so clients tell the two
apart from the first four bytes. Off loopback every request needs the token (the nc default
then does not apply).

Running instances register in a per-user directory (one JSON file per process, removed at
exit) so that the Wireshark extcap can list their links.
"""

from __future__ import annotations

import contextlib
import errno
import hmac
import json
import os
import secrets
import select
import socket
import tempfile
import threading
import urllib.parse
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from typing import Any

from tunnelscope.datapath.engine import CAPTURE_POINTS, Engine, Link
from tunnelscope.formats.capture import CaptureError, Format
from tunnelscope.formats.linktype import TUNNEL_LINKTYPES, LinkType
from tunnelscope.lab.control import ControlError, listen_tcp, parse_address, tokenize
from tunnelscope.lab.labfile import is_loopback

REQUEST_WAIT = 1.0  # seconds before a silent client gets the default capture
REQUEST_TIMEOUT = 5.0  # seconds to finish a request (an HTTP request's headers included)
MAX_REQUEST = 2048
MAX_CLIENTS = 64
WATCH_PERIOD = 0.2
CAPTURE_MAGICS = (b"\xd4\xc3\xb2\xa1", b"\x4d\x3c\xb2\xa1", b"\x0a\x0d\x0d\x0a")
ERROR_PREFIX = b"tunnelscope: error: "


class StreamError(Exception):
    """A bad request or an unusable stream: one line of text."""


@dataclass
class Request:
    """What one client asked for."""

    kind: str = "capture"  # or "list"
    link: str | None = None  # None: the first link
    points: str = "pre"
    pcapng: bool = False
    linktype: LinkType | None = None
    filter: str | None = None
    token: str | None = None
    http: bool = False

    def line(self) -> str:
        """The request as a client sends it (the inverse of parse_request)."""
        if self.kind == "list":
            words = ["LIST"]
        else:
            words = ["CAPTURE", *([_word(self.link)] if self.link else [])]
            words += [f"points={self.points}", f"format={'pcapng' if self.pcapng else 'pcap'}"]
            if self.linktype is not None:
                words.append(f"linktype={self.linktype.short_name}")
            if self.filter:
                words.append(_word(f"filter={self.filter}"))
        if self.token:
            words.append(_word(f"token={self.token}"))
        return " ".join(words)


def _word(text: str) -> str:
    if not text or any(c in text for c in '"\r\n\0'):
        raise StreamError(f"{text!r} cannot be sent in a stream request")
    return f'"{text}"' if any(c in text for c in " \t#!") else text


def parse_request(line: str) -> Request:
    """A request line (see the module doc) to a Request; StreamError when it is bad."""
    if line.startswith("GET "):
        parts = line.split(" ")
        if len(parts) != 3 or not parts[2].startswith("HTTP/"):
            raise StreamError("expected GET /LINK?OPTIONS HTTP/1.1")
        url = urllib.parse.urlsplit(parts[1])
        name = urllib.parse.unquote(url.path.lstrip("/")) or None
        options = urllib.parse.parse_qsl(url.query, keep_blank_values=True)
        return _options(Request(link=name, http=True), options)
    try:
        words = tokenize(line)
    except ControlError as exc:
        raise StreamError(exc.text) from None
    if not words:
        return Request()
    verb, rest = words[0].upper(), words[1:]
    if verb == "LIST":
        request = Request(kind="list")
    elif verb == "CAPTURE" and rest and "=" not in rest[0]:
        request, rest = Request(link=rest[0]), rest[1:]
    elif verb == "CAPTURE":
        request = Request()
    else:
        raise StreamError(f"unknown request {words[0]!r} (use CAPTURE LINK ... or LIST)")
    pairs = []
    for word in rest:
        key, equal, value = word.partition("=")
        if not equal:
            raise StreamError(f"expected KEY=VALUE, not {word!r}")
        pairs.append((key, value))
    return _options(request, pairs)


def _options(request: Request, pairs: list[tuple[str, str]]) -> Request:
    for key, value in pairs:
        if key == "points":
            if value not in CAPTURE_POINTS:
                raise StreamError(f"points must be one of {', '.join(CAPTURE_POINTS)}")
            request.points = value
        elif key == "format":
            if value not in ("pcap", "pcapng"):
                raise StreamError(f"format must be pcap or pcapng, not {value!r}")
            request.pcapng = value == "pcapng"
        elif key == "linktype":
            request.linktype = None if value == "auto" else tunnel_linktype(value)
        elif key == "filter":
            request.filter = value or None
        elif key == "token":
            request.token = value
        else:
            raise StreamError(f"unknown option {key!r}")
    if request.points == "both":
        request.pcapng = True
    return request


def tunnel_linktype(text: str) -> LinkType:
    """A link type a lab tunnel carries (ethernet, hdlc, ppp, fr or its number)."""
    try:
        linktype = LinkType.parse(text)
    except ValueError as exc:
        raise StreamError(str(exc)) from None
    if linktype not in TUNNEL_LINKTYPES:
        raise StreamError(f"link type {text} is not one a lab tunnel carries")
    return linktype


def required_token(host: str, token: str | None, no_token: bool = False) -> str | None:
    """The token a stream server on `host` asks of its clients; None: no token.

    On loopback only a token given is asked. Off loopback a token is generated when none is
    given, and an empty one is refused (ValueError): it would serve every link's live capture
    to anyone who can reach the port. `no_token` asks for exactly that, explicitly.
    """
    if is_loopback(host) or no_token:
        return token or None
    if token is None:
        return secrets.token_urlsafe(16)
    if not token:
        raise ValueError(
            f"an empty stream token on {host} would serve every link to anyone who can reach"
            " it; give a token, or --no-token to serve without one"
        )
    return token


# --- the server ------------------------------------------------------------------------------


@dataclass
class _Client:
    """A streaming client: `watch` is our duplicate of the engine's socket, to see it leave."""

    watch: socket.socket
    link: Link
    state: Any  # engine CaptureState


class StreamServer:
    """Serves the links of `engine` to TCP clients at `address`, each with its own capture.

    Off loopback a token is required: `token` or, when None, a generated one (read it from
    `.token` to print it); see `required_token`. `encapsulation(name)` gives a link's
    configured link type, used when the request names none.
    """

    def __init__(
        self,
        engine: Engine,
        address: tuple[str, int],
        token: str | None = None,
        encapsulation: Callable[[str], LinkType | None] | None = None,
        no_token: bool = False,
    ) -> None:
        self.engine = engine
        self.encapsulation = encapsulation or (lambda name: None)
        self.token = required_token(address[0], token, no_token)
        self.sock = listen_tcp(address, "stream", MAX_CLIENTS)
        self.sock.settimeout(WATCH_PERIOD)
        self.address: tuple[str, int] = self.sock.getsockname()[:2]
        self._clients: list[_Client] = []
        self._lock = threading.Lock()
        self._closing = False
        self._threads = [
            threading.Thread(target=self._accept, name="stream-accept", daemon=True),
            threading.Thread(target=self._watch, name="stream-watch", daemon=True),
        ]

    @property
    def exposure_warning(self) -> str | None:
        """Said every time streams off loopback ask no token (`no_token`)."""
        if self.token is None and not is_loopback(self.address[0]):
            return (
                f"streams on {self.where} need no token: anyone who can reach the port may"
                " watch every link"
            )
        return None

    @property
    def where(self) -> str:
        host, port = self.address
        return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"

    def start(self) -> StreamServer:
        for thread in self._threads:
            thread.start()
        return self

    def close(self) -> None:
        """Stop accepting and end every client's capture (call before the engine closes)."""
        self._closing = True
        for thread in self._threads:
            thread.join(2)
        self.sock.close()
        with self._lock:
            clients, self._clients = self._clients, []
        for client in clients:
            self._drop(client)

    # -- accepting ---------------------------------------------------------------------------

    def _accept(self) -> None:
        while not self._closing:
            try:
                sock, _ = self.sock.accept()
            except (TimeoutError, socket.timeout):
                continue
            except OSError:
                return
            threading.Thread(target=self._serve, args=(sock,), daemon=True).start()

    def _serve(self, sock: socket.socket) -> None:
        request: Request | None = None
        try:
            line = _read_request(sock)
            request = parse_request(line)
            self._check_token(request)
            if request.kind == "list":
                _reply(sock, request, "".join(json.dumps(r) + "\n" for r in self.listing()))
                sock.close()
            else:
                self._start(sock, request)
        except StreamError as exc:
            with contextlib.suppress(OSError):
                _reply(sock, request, f"{ERROR_PREFIX.decode()}{exc}\n", error=True)
            sock.close()
        except OSError:
            sock.close()

    def _check_token(self, request: Request) -> None:
        if self.token is None:
            return
        given = (request.token or "").encode()
        if not hmac.compare_digest(given, self.token.encode()):
            raise StreamError("a valid token=TOKEN is required")

    def listing(self) -> list[dict[str, Any]]:
        """Every link: name, link type number (None while unknown), endpoints."""

        def collect() -> list[dict[str, Any]]:
            return [
                {
                    "name": link.name,
                    "linktype": int(lt) if (lt := self._linktype(link)) else None,
                    "endpoints": [end.spec for end in link.ends],
                }
                for link in self.engine.links.values()
            ]

        return self.engine.call(collect)

    def _linktype(self, link: Link) -> LinkType | None:
        return link.linktype or self.encapsulation(link.name)

    def _start(self, sock: socket.socket, request: Request) -> None:
        def find() -> Link:
            links = self.engine.links
            if request.link is None and links:
                return next(iter(links.values()))
            if request.link in links:
                return links[request.link]
            names = ", ".join(links) or "none"
            raise StreamError(f"no link named {request.link!r} (links: {names})")

        link = self.engine.call(find)
        with self._lock:
            if len(self._clients) >= MAX_CLIENTS:
                raise StreamError("too many stream clients")
        _reply(sock, request, "")
        fmt = Format(pcapng=request.pcapng, flush_ms=10)
        linktype = request.linktype or self._linktype(link)
        watch = sock.dup()
        sock.setblocking(False)
        fd = sock.detach()
        try:
            state = link.attach_fd(fd, fmt, request.points, request.filter, linktype)
        except (CaptureError, ValueError) as exc:  # attach_fd closed fd
            watch.close()
            raise StreamError(str(exc)) from None
        with self._lock:
            self._clients.append(_Client(watch, link, state))

    # -- watching: a client that leaves or stalls ends its capture -----------------------------

    def _watch(self) -> None:
        while not self._closing:
            with self._lock:
                clients = list(self._clients)
            if not clients:
                threading.Event().wait(WATCH_PERIOD)
                continue
            readable, _, _ = select.select([c.watch for c in clients], [], [], WATCH_PERIOD)
            for client in clients:
                gone = client.watch in readable and not _drain(client.watch)
                if gone or client.state.error or client.state not in client.link.captures:
                    with self._lock:
                        self._clients.remove(client)
                    self._drop(client)

    def _drop(self, client: _Client) -> None:
        with contextlib.suppress(Exception):  # the link or the engine may be gone already
            client.link.stop_capture(client.state)
        client.watch.close()


def _read_request(sock: socket.socket) -> str:
    """The first line, or "" when the client says nothing within REQUEST_WAIT seconds.

    An HTTP request is read up to its blank line: unread input would reset the connection
    when it closes."""
    sock.settimeout(REQUEST_WAIT)
    data = b""
    while not _complete(data):
        try:
            chunk = sock.recv(MAX_REQUEST)
        except (TimeoutError, socket.timeout):
            if data:
                raise StreamError("incomplete request") from None
            return ""
        if not chunk:
            break
        data += chunk
        sock.settimeout(REQUEST_TIMEOUT)
        if len(data) > 8 * MAX_REQUEST:
            raise StreamError("request too long")
    line = data.split(b"\n", 1)[0].rstrip(b"\r")
    if len(line) > MAX_REQUEST:
        raise StreamError(f"request longer than {MAX_REQUEST} bytes")
    try:
        return line.decode("utf-8")
    except UnicodeDecodeError:
        raise StreamError("the request is not UTF-8 text") from None


def _complete(data: bytes) -> bool:
    if data.startswith(b"GET "):
        return b"\r\n\r\n" in data or b"\n\n" in data
    return b"\n" in data


def _reply(sock: socket.socket, request: Request | None, text: str, error: bool = False) -> None:
    if request is not None and request.http:
        status = "400 Bad Request" if error else "200 OK"
        kind = "text/plain" if error or request.kind == "list" else "application/octet-stream"
        head = f"HTTP/1.0 {status}\r\nContent-Type: {kind}\r\nCache-Control: no-cache\r\n\r\n"
        text = head + text
    sock.sendall(text.encode())


def _drain(sock: socket.socket) -> bool:
    """Read what a client sent after its request; False once it has gone."""
    try:
        return bool(sock.recv(4096, socket.MSG_DONTWAIT))
    except BlockingIOError:
        return True
    except OSError:
        return False


# --- the client ------------------------------------------------------------------------------


def connect(address: str, request: Request, timeout: float = 5.0) -> socket.socket:
    """Send `request` to the stream at HOST:PORT; the socket is positioned at the first byte
    of the capture. StreamError (one line) for an unreachable stream or a refused request."""
    try:
        host, port = parse_address(address)
    except ValueError as exc:
        raise StreamError(str(exc)) from None
    try:
        sock = socket.create_connection((host, port), timeout)
    except OSError as exc:
        raise StreamError(f"no tunnelscope stream at {address} ({exc.strerror or exc})") from None
    try:
        sock.sendall(request.line().encode() + b"\n")
        sock.settimeout(None)  # a link whose type is still unknown sends its header later
        head = read_exactly(sock.recv, 4)
        if head not in CAPTURE_MAGICS:
            rest = head + sock.recv(MAX_REQUEST)
            text = rest.decode("utf-8", "replace").strip().splitlines() or ["closed"]
            message = text[0].removeprefix(ERROR_PREFIX.decode())
            raise StreamError(f"{address}: {message}")
    except OSError as exc:
        sock.close()
        raise StreamError(f"{address}: {exc.strerror or exc}") from None
    except StreamError:
        sock.close()
        raise
    return _Prefixed(sock, head)


def list_links(address: str, token: str | None = None, timeout: float = 5.0) -> list[dict]:
    """The links a running stream serves (see StreamServer.listing)."""
    try:
        sock = socket.create_connection(parse_address(address), timeout)
    except (OSError, ValueError) as exc:
        raise StreamError(f"no tunnelscope stream at {address} ({exc})") from None
    with sock:
        try:
            sock.sendall(Request(kind="list", token=token).line().encode() + b"\n")
            data = b""
            while chunk := sock.recv(65536):
                data += chunk
        except OSError as exc:
            raise StreamError(f"{address}: {exc.strerror or exc}") from None
    if data.startswith(ERROR_PREFIX):
        raise StreamError(f"{address}: {data[len(ERROR_PREFIX) :].decode(errors='replace')}")
    try:
        return [json.loads(line) for line in data.decode().splitlines() if line]
    except ValueError:
        raise StreamError(f"{address}: not a tunnelscope stream") from None


def read_exactly(read: Callable[[int], bytes], size: int) -> bytes:
    """`size` bytes from a socket's recv or a pipe's read; fewer only at the end."""
    data = b""
    while len(data) < size:
        chunk = read(size - len(data))
        if not chunk:
            break
        data += chunk
    return data


class _Prefixed(socket.socket):
    """The connected socket, with the capture bytes `connect` already read put back."""

    def __init__(self, sock: socket.socket, head: bytes) -> None:
        super().__init__(sock.family, sock.type, sock.proto, fileno=sock.detach())
        self._head = head

    def recv(self, size: int, flags: int = 0) -> bytes:  # type: ignore[override]
        if self._head:
            return self._take_head(size)
        return super().recv(size, flags)

    def recv_into(self, buffer: Any, nbytes: int = 0, flags: int = 0) -> int:
        """As `recv`, for `makefile()` readers (a capture Reader over the stream)."""
        if self._head:
            head = self._take_head(nbytes or len(buffer))
            buffer[: len(head)] = head
            return len(head)
        return super().recv_into(buffer, nbytes, flags)

    def _take_head(self, size: int) -> bytes:
        head, self._head = self._head[:size], self._head[size:]
        return head


def copy_stream(sock: socket.socket, fd: int) -> int:
    """Copy the capture to `fd` until the stream ends; bytes copied (BrokenPipe: reader left).

    A reader that leaves a pipe (Wireshark closed, `head` done) ends the copy at once, not at
    the next frame: an idle link would otherwise keep the command waiting.
    """
    total = 0
    watch = select.poll()
    watch.register(sock, select.POLLIN)
    watch.register(fd, 0)  # a pipe whose reader left reports POLLERR; files report nothing
    while True:
        events = dict(watch.poll())
        if events.get(fd, 0) & (select.POLLERR | select.POLLHUP):
            raise BrokenPipeError(errno.EPIPE, "the reader left")
        if sock.fileno() not in events:
            continue
        data = sock.recv(1 << 16)
        if not data:
            return total
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view) :]
        total += len(data)


class StreamedCapture:
    """A live stream written to a local file by a thread, until `stop` or the stream ends:
    how a console captures a link another host relays into a file where the user is."""

    def __init__(self, address: str, request: Request, path: str) -> None:
        self.path = path
        self.error: str | None = None
        self.sock = connect(address, request)  # StreamError, before any file exists
        try:
            self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            self.sock.close()
            raise StreamError(f"cannot write {path}: {exc.strerror}") from None
        self.bytes = 0
        self._thread = threading.Thread(target=self._copy, name=f"capture {path}", daemon=True)
        self._thread.start()

    def _copy(self) -> None:
        try:
            self.bytes = copy_stream(self.sock, self._fd)
        except OSError as exc:
            self.error = exc.strerror or str(exc)
        finally:
            os.close(self._fd)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)

    def stop(self) -> None:
        """End the stream; what arrived is in the file."""
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self._thread.join(5)
        self.sock.close()


# --- the registry of running instances -------------------------------------------------------


@dataclass
class Instance:
    """One running `serve` or `bridge`, as it registered itself."""

    pid: int
    kind: str
    stream: str | None
    control: str | None = None
    token: str | None = None
    name: str = ""  # what stays the same across restarts: the lab's name, a bridge's endpoints


def registry_dir() -> str:
    """$XDG_RUNTIME_DIR/tunnelscope, else /tmp/tunnelscope-UID: private to the user."""
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "tunnelscope")
    return os.path.join(tempfile.gettempdir(), f"tunnelscope-{os.getuid()}")


@contextlib.contextmanager
def registered(instance: Instance) -> Iterator[str]:
    """Announce a running instance for the extcap while the block runs (the file holds the
    token, so the directory is the user's alone)."""
    folder = registry_dir()
    os.makedirs(folder, mode=0o700, exist_ok=True)
    info = os.lstat(folder)
    if info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise OSError(f"{folder} is not a private directory of this user")
    path = os.path.join(folder, f"{instance.pid}.json")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    with os.fdopen(fd, "w") as file:
        json.dump(asdict(instance), file)
    try:
        yield path
    finally:
        with contextlib.suppress(OSError):
            os.unlink(path)


def running_instances() -> list[Instance]:
    """Registered instances whose process still runs (stale files are ignored)."""
    folder = registry_dir()
    found = []
    with contextlib.suppress(OSError):
        for name in sorted(os.listdir(folder)):
            if not name.endswith(".json"):
                continue
            try:
                with open(os.path.join(folder, name)) as file:
                    instance = Instance(**json.load(file))
                os.kill(instance.pid, 0)
            except (OSError, ValueError, TypeError):
                continue
            found.append(instance)
    return found
