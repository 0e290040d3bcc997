"""The one registry of pcap LINKTYPE numbers tunnelscope reads and writes.

Lab tunnels carry four link layers (Ethernet, Cisco HDLC, PPP in HDLC-like framing, Frame
Relay); host captures that contain tunnels come as Ethernet, Linux cooked (SLL, SLL2) or raw IP.
"""

from __future__ import annotations

from enum import IntEnum


class LinkType(IntEnum):
    ETHERNET = 1  # LINKTYPE_ETHERNET / DLT_EN10MB
    PPP = 9  # PPP without HDLC framing (read only)
    PPP_SERIAL = 50  # PPP in HDLC-like framing, starts FF 03 (libpcap PPP_HDLC/PPP_SERIAL)
    RAW = 101  # raw IPv4/IPv6
    C_HDLC = 104  # Cisco HDLC, starts 0F 00 / 8F 00
    FRELAY = 107  # Frame Relay, starts with the Q.922 address
    LINUX_SLL = 113  # tcpdump -i any (cooked v1)
    PPP_WITH_DIR = 204  # one direction byte, then PPP
    C_HDLC_WITH_DIR = 205  # one direction byte, then Cisco HDLC
    FRELAY_WITH_DIR = 206  # one direction byte, then Frame Relay
    IPV4 = 228
    IPV6 = 229
    LINUX_SLL2 = 276  # tcpdump -i any on newer libpcap (cooked v2)

    @property
    def short_name(self) -> str:
        """The name users type and see (Dynagen's ETH/HDLC/PPP/FR in lower case)."""
        return _SHORT_NAMES.get(self, self.name.lower())

    @property
    def without_direction(self) -> LinkType:
        """The link type of the frame after the 204-206 direction byte is removed."""
        return _DIRECTION_STRIPPED.get(self, self)

    @property
    def has_direction_byte(self) -> bool:
        return self in _DIRECTION_STRIPPED

    @property
    def is_tunnel_payload(self) -> bool:
        """True for the link layers a lab UDP tunnel can carry."""
        return self in TUNNEL_LINKTYPES

    @classmethod
    def parse(cls, text: str | int) -> LinkType:
        """Accept a number, an enum name, or a user name (eth, hdlc, ppp, fr, Dynagen's FR...).

        Raises ValueError with the accepted names: an unknown name must never silently become
        Ethernet (dynamips does that and writes unreadable files).
        """
        if isinstance(text, int):
            return cls(text)
        key = text.strip().lower().replace("-", "_")
        if key.isdigit():
            try:
                return cls(int(key))
            except ValueError:
                raise ValueError(f"unknown link type number {key}") from None
        if key in _ALIASES:
            return _ALIASES[key]
        names = ", ".join(sorted({"ethernet", "hdlc", "ppp", "fr"}))
        raise ValueError(f"unknown link type {text!r} (use one of {names}, or a LINKTYPE number)")


TUNNEL_LINKTYPES = (LinkType.ETHERNET, LinkType.C_HDLC, LinkType.PPP_SERIAL, LinkType.FRELAY)

_SHORT_NAMES = {
    LinkType.PPP: "ppp_raw",  # PPP without HDLC framing; "ppp" is the serial link (50)
    LinkType.ETHERNET: "ethernet",
    LinkType.C_HDLC: "hdlc",
    LinkType.PPP_SERIAL: "ppp",
    LinkType.FRELAY: "fr",
}

_DIRECTION_STRIPPED = {
    LinkType.PPP_WITH_DIR: LinkType.PPP_SERIAL,
    LinkType.C_HDLC_WITH_DIR: LinkType.C_HDLC,
    LinkType.FRELAY_WITH_DIR: LinkType.FRELAY,
}

_ALIASES: dict[str, LinkType] = {
    "ethernet": LinkType.ETHERNET,
    "eth": LinkType.ETHERNET,
    "en10mb": LinkType.ETHERNET,
    "hdlc": LinkType.C_HDLC,
    "chdlc": LinkType.C_HDLC,
    "c_hdlc": LinkType.C_HDLC,
    "cisco_hdlc": LinkType.C_HDLC,
    "ppp": LinkType.PPP_SERIAL,
    "ppp_serial": LinkType.PPP_SERIAL,
    "ppp_hdlc": LinkType.PPP_SERIAL,
    "fr": LinkType.FRELAY,
    "frelay": LinkType.FRELAY,
    "frame_relay": LinkType.FRELAY,
}
_ALIASES.update({lt.name.lower(): lt for lt in LinkType})
