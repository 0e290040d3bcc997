"""An IOU stand-in: the IOU side of the NETIO protocol, since IOU images cannot be shipped.

It is written from ubridge's definition of the protocol (src/hypervisor_iol_bridge.h), with
its own header code rather than tunnelscope's: an instance with ID `iou_id` binds
/tmp/netio<UID>/<iou_id> (here: any directory), sends each frame to its bridge's socket
with the 8-byte header (destination ID, source ID, destination port, source port, message
type 1, channel 0; a port is bay + 16 * unit) and takes the frames addressed to it.

    with iou.Instance(directory, iou_id=7, bridge_id=519) as r1:
        r1.send(1, 0, frame)                 # on serial 1/0
        r1.keepalives(1, 0, count=3)         # Cisco HDLC SLARP keepalives, as IOS sends
        r1.receive(count=2)                  # [(bay, unit, frame), ...]
"""

from __future__ import annotations

import os
import socket
import struct
import time

DATA = 1


def slarp_keepalive(sequence: int, seen: int = 0) -> bytes:
    """A Cisco HDLC SLARP keepalive (RFC 1144's cousin): 8F 00 80 35, code 2, sequences."""
    body = struct.pack("!IIIH", 2, sequence, seen, 0xFFFF)
    return b"\x8f\x00\x80\x35" + body


class Instance:
    """One IOU instance's NETIO socket."""

    def __init__(self, directory: str, iou_id: int, bridge_id: int) -> None:
        self.directory = directory
        self.iou_id = iou_id
        self.bridge_id = bridge_id
        self.path = os.path.join(directory, str(iou_id))
        os.makedirs(directory, mode=0o700, exist_ok=True)  # as IOU does, if it is first
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(self.path)
        self.sock.settimeout(0.05)
        self.sent = 0
        self.foreign: list[bytes] = []  # datagrams not addressed to us, or not data

    def header(self, bay: int, unit: int) -> bytes:
        port = bay + 16 * unit
        return bytes(
            [self.bridge_id >> 8, self.bridge_id & 0xFF, self.iou_id >> 8, self.iou_id & 0xFF]
            + [port, port, DATA, 0]
        )

    def send(self, bay: int, unit: int, frame: bytes) -> None:
        self.sock.sendto(
            self.header(bay, unit) + frame, os.path.join(self.directory, str(self.bridge_id))
        )
        self.sent += 1

    def keepalives(self, bay: int, unit: int, count: int, interval: float = 0.002) -> list[bytes]:
        frames = [slarp_keepalive(sequence) for sequence in range(1, count + 1)]
        for frame in frames:
            self.send(bay, unit, frame)
            time.sleep(interval)
        return frames

    def receive(self, count: int, timeout: float = 1.0) -> list[tuple[int, int, bytes]]:
        """Up to `count` frames addressed to us, as (bay, unit, frame)."""
        got: list[tuple[int, int, bytes]] = []
        deadline = time.monotonic() + timeout
        while len(got) < count and time.monotonic() < deadline:
            try:
                data = self.sock.recv(65536)
            except (TimeoutError, socket.timeout):
                continue
            destination, source = (data[0] << 8) | data[1], (data[2] << 8) | data[3]
            if (
                len(data) < 8
                or destination != self.iou_id
                or source != self.bridge_id
                or data[6] != DATA
            ):
                self.foreign.append(data)
                continue
            got.append((data[4] & 0x0F, data[4] >> 4, data[8:]))
        return got

    def close(self) -> None:
        self.sock.close()
        os.unlink(self.path)

    def __enter__(self) -> Instance:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
