"""What a decoded frame is, and the collector the layer decoders fill in.

Field conventions (shared by every decoder):
- keys are Wireshark display-filter names wherever Wireshark has one, so a user can move
  between tunnelscope and Wireshark without translating;
- integers are ints, flags (Wireshark FT_BOOLEAN) are bools, addresses are strings in
  tshark's format (`10.0.0.1`, `fe80::1`, `00:11:22:33:44:55`);
- a field that can occur several times in one frame (VLAN tags, Q.922 EA bits, LMI PVC
  status elements) is always a list in frame order, outer first, even when it occurs once:
  the type of a key never depends on the frame. tshark -T fields prints the same values
  comma-separated.
"""

from __future__ import annotations

import socket
import struct
from collections.abc import Iterator
from dataclasses import dataclass

Value = object  # int, bool, str, or a list of them
_WIDE_TLV = struct.Struct(">HH")


@dataclass
class Decoded:
    """One frame, decoded as far as its bytes are valid."""

    linktype: int
    summary: str  # tcpdump-like one line
    fields: dict[str, Value]
    protocols: list[str]  # tshark's frame.protocols without its "ethertype" and "data" entries
    malformed: bool = False


class Builder:
    """Collects what each layer of one frame found; `decode()` turns it into a `Decoded`.

    Layer decoders never raise: when bytes run out or a value is impossible they call `bad`
    and return, so everything decoded up to that point is kept.
    """

    __slots__ = ("fields", "protocols", "_parts", "_problem")

    def __init__(self) -> None:
        self.fields: dict[str, Value] = {}
        self.protocols: list[str] = []
        self._parts: list[str] = []
        self._problem: str | None = None

    def layer(self, protocol: str, text: str = "") -> None:
        """Enter a protocol (as tshark names it) and add its words to the summary."""
        self.protocols.append(protocol)
        if text:
            self._parts.append(text)

    def text(self, text: str) -> None:
        if text:
            self._parts.append(text)

    def append(self, name: str, value: Value) -> None:
        """Add one occurrence of a repeatable field (always a list, see the module doc)."""
        self.fields.setdefault(name, []).append(value)  # type: ignore[union-attr]

    def need(self, data: bytes, size: int, what: str) -> bool:
        """True when `data` holds `size` bytes; otherwise marks the frame truncated."""
        if len(data) >= size:
            return True
        self.bad(f"truncated {what}")
        return False

    def bad(self, problem: str) -> None:
        """Mark the frame malformed; the first problem found is the one reported."""
        if self._problem is None:
            self._problem = problem

    def build(self, linktype: int) -> Decoded:
        summary = " ".join(self._parts)
        if self._problem is not None:
            summary = f"{summary} [malformed: {self._problem}]".lstrip()
        return Decoded(linktype, summary, self.fields, self.protocols, self._problem is not None)


def top_protocol(decoded: Decoded) -> str:
    """The innermost protocol of a frame as tshark names it ("ospf"), for grouping frames."""
    return decoded.protocols[-1] if decoded.protocols else "unknown"


_C_ESCAPES = {7: "\\a", 8: "\\b", 9: "\\t", 10: "\\n", 11: "\\v", 12: "\\f", 13: "\\r"}


def frame_text(raw: bytes) -> str:
    """Text a frame carries (a CHAP name, a CDP device ID) made safe for one summary line.

    As tshark's Info column shows it: UTF-8 with bad bytes as U+FFFD, C escapes for control
    characters (`\\n`, `\\033`, `\\177`, `\\u0085`), so a name can neither split a line
    nor send escape sequences to a terminal.
    """
    return printable(raw.decode("utf-8", "replace"))


def printable(text: str) -> str:
    """`frame_text` for text already decoded (a pcapng comment, an interface name)."""
    if text.isprintable():
        return text
    return "".join(_escaped(char) for char in text)


def _escaped(char: str) -> str:
    code = ord(char)
    if code in _C_ESCAPES:
        return _C_ESCAPES[code]
    if code < 0x20 or code == 0x7F:
        return f"\\{code:03o}"
    if not char.isprintable():
        return f"\\u{code:04x}" if code <= 0xFFFF else f"\\U{code:08x}"
    return char


def name_of(table: dict[int, str], number: int, kind: str) -> str:
    """A name for the summary, also for numbers the table does not know."""
    return table.get(number) or f"{kind} {number:#x}"


def tlvs(
    b: Builder, data: bytes, what: str, wide: bool = True, length_counts_header: bool = True
) -> Iterator[tuple[int, bytes]]:
    """(type, value) of each type-length-value item in `data`, in order.

    Type and length are 2 bytes each (`wide`: CDP, EIGRP, LDP) or 1 each (IS-IS, PPP options);
    the length counts the type and length bytes or only the value. An item that does not fit
    ends the walk and marks the frame malformed.
    """
    size = 4 if wide else 2
    offset = 0
    while offset < len(data):
        if not b.need(data, offset + size, what):
            return
        if wide:
            kind, length = _WIDE_TLV.unpack_from(data, offset)
        else:
            kind, length = data[offset], data[offset + 1]
        end = offset + length if length_counts_header else offset + size + length
        if end < offset + size or end > len(data):
            b.bad(f"{what} length {length}")
            return
        yield kind, data[offset + size : end]
        offset = end


def ipv4_prefixes(b: Builder, data: bytes, length_name: str, prefix_name: str) -> list[str]:
    """Packed IPv4 prefixes (BGP NLRI, EIGRP destinations): each a prefix length (1), then only
    its significant bytes. Appends both to the fields; returns them as `prefix/length`."""
    shown, offset = [], 0
    while offset < len(data):
        length = data[offset]
        size = (length + 7) // 8
        if length > 32 or offset + 1 + size > len(data):
            b.bad(f"IPv4 prefix /{length} past the end of its field")
            break
        prefix = socket.inet_ntoa(data[offset + 1 : offset + 1 + size].ljust(4, b"\0"))
        b.append(length_name, length)
        b.append(prefix_name, prefix)
        shown.append(f"{prefix}/{length}")
        offset += 1 + size
    return shown
