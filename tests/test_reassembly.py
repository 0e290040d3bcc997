"""IP reassembly: the Reassembler's rules and bounds, and a real network: VPCS pings of 1472
and 3000 bytes through a tunnelscope bridge whose tunnel crosses a 1500-byte veth between two
namespaces; `decap` of a tcpdump of that veth, and `sniff` on it live, give what the bridge
itself captured (the fragmented tunnel datagrams included)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import peers
import pytest
from command import TUNNELSCOPE

from tunnelscope.analysis.reassembly import (
    REASSEMBLY_BYTES,
    REASSEMBLY_DATAGRAMS,
    Fragment,
    Reassembler,
)
from tunnelscope.formats.capture import open_capture

KEY = b"\x04" + bytes(39)


def piece(data: bytes, offset: int, more: bool, key: bytes = KEY) -> Fragment:
    return Fragment(key, offset, len(data), data, more, 20, 17)


def test_a_datagram_completes_in_any_order_and_only_once():
    whole = bytes(range(256)) * 10
    parts = [piece(whole[at : at + 512], at, at + 512 < len(whole)) for at in range(0, 2560, 512)]
    reassembler = Reassembler()
    results = [reassembler.add(part, n) for n, part in enumerate([parts[3], *parts[:3]])]
    assert results == [None] * 4
    assert reassembler.add(parts[4], 9) == (whole, 17)
    assert reassembler.add(parts[2], 10) is None  # a late copy: nothing twice
    assert (reassembler.reassembled, reassembler.duplicate_fragments) == (1, 1)
    assert reassembler.pending_bytes == 0


def test_bounds_hold_whatever_arrives():
    reassembler = Reassembler()
    for ident in range(3 * REASSEMBLY_DATAGRAMS):
        key = b"\x04" + ident.to_bytes(4, "big") + bytes(35)
        reassembler.add(piece(bytes(1024 if ident % 2 else 8), 0, True, key), ident)
        assert reassembler.pending_bytes <= REASSEMBLY_BYTES
        assert len(reassembler._table) <= REASSEMBLY_DATAGRAMS
    reassembler.finish()
    assert sum(reassembler.lost.values()) == 3 * REASSEMBLY_DATAGRAMS
    assert reassembler.lost["evicted"] > 0 and reassembler.pending_bytes == 0


def test_a_tail_past_the_known_end_is_malformed():
    reassembler = Reassembler()
    assert reassembler.add(piece(bytes(16), 16, False), 0) is None
    assert reassembler.add(piece(bytes(16), 32, True), 1) is None
    assert reassembler.lost["malformed"] == 1
    assert reassembler.add(piece(bytes(16), 0, True), 2) is None  # the tombstone takes it
    assert sum(reassembler.lost.values()) == 1


# A real network -------------------------------------------------------------------------------


def frames(path: Path) -> list[bytes]:
    with open_capture(str(path)) as reader:
        return [bytes(packet.data) for packet in reader]


@peers.needs_root
@peers.needs_vpcs
@pytest.mark.timeout(240)
def test_decap_and_sniff_of_a_1500_byte_link_recover_every_frame_the_bridge_forwarded(tmp_path):
    """PC1 and the bridge on host A, PC2 on host B, the tunnel between A and B crossing a veth
    (MTU 1500): frames of 1514 bytes travel in two IP fragments, which the kernels
    reassemble; decap and sniff must too."""
    with peers.netns() as host_a, peers.netns() as host_b:
        suffix = host_a.name[-4:]
        veth_a, veth_b = f"tra{suffix}", f"trb{suffix}"
        peers.run("ip", "link", "add", veth_a, "netns", host_a.name, "type", "veth",
                  "peer", "name", veth_b, "netns", host_b.name)  # fmt: skip
        for ns, ifname, address in ((host_a, veth_a, "10.78.0.1"), (host_b, veth_b, "10.78.0.2")):
            ns.ip("addr", "add", f"{address}/24", "dev", ifname)
            ns.ip("link", "set", ifname, "up")
        pc1_port, bridge_a, bridge_b, pc2_port = 20000, 20001, 20002, 20003
        in_a = ["ip", "netns", "exec", host_a.name]
        bridge = [*in_a, *TUNNELSCOPE, "bridge", f"udp:{bridge_a}:127.0.0.1:{pc1_port}"]
        bridge += [f"udp:{bridge_b}:10.78.0.2:{pc2_port}", "-w", str(tmp_path / "pre.pcapng")]
        tcpdump = [*in_a, "tcpdump", "-i", veth_a, "-U", "-w", str(tmp_path / "veth.pcap")]
        sniff = [*in_a, *TUNNELSCOPE, "sniff", "-i", veth_a, "--ports", str(bridge_b)]
        sniff += ["-w", str(tmp_path / "sniff.pcapng"), "--json", "--duration", "180"]
        logs = {name: tmp_path / f"{name}.err" for name in ("tcpdump", "sniff", "bridge")}

        def says(name: str, words: str) -> Callable[[], bool]:
            return lambda: words in logs[name].read_text()

        def bound() -> bool:
            return f":{bridge_b} " in host_a.exec("ss", "-uan").stdout

        with contextlib.ExitStack() as stack:
            listening = says("tcpdump", "listening on")
            stack.enter_context(peers.started(tcpdump, logs["tcpdump"], listening))
            sniffing = says("sniff", "sniffing on")
            sniffer = stack.enter_context(peers.started(sniff, logs["sniff"], sniffing))
            stack.enter_context(peers.started(bridge, logs["bridge"], bound))
            pc1 = stack.enter_context(peers.VPCS(pc1_port, bridge_a, 1, 0, "127.0.0.1",
                                                 host_a.name))  # fmt: skip
            pc2 = stack.enter_context(peers.VPCS(pc2_port, bridge_b, 2, 0, "10.78.0.1",
                                                 host_b.name))  # fmt: skip
            pc1.set_ip("10.0.0.1/24")
            pc2.set_ip("10.0.0.2/24")
            for size in (56, 1472, 3000):
                replies = pc1.ping("10.0.0.2", count=3, size=size)
                assert all(ok for _, ok in replies), (size, pc1.transcript[-800:])
            time.sleep(0.5)
            stack.close()
            sniffed = json.loads(sniffer.stdout.read())  # type: ignore[union-attr]
        bridged = frames(tmp_path / "pre.pcapng")
        assert len(bridged) >= 2 * 9 and sum(len(f) > 1480 for f in bridged) >= 8
        for backend in ("c", "python"):
            env = {"TUNNELSCOPE_NO_C": "1"} if backend == "python" else {}
            out = tmp_path / f"decap-{backend}.pcapng"
            done = subprocess.run(
                [*TUNNELSCOPE, "decap", str(tmp_path / "veth.pcap"), "-w", str(out), "--json"],
                capture_output=True, text=True, timeout=60,
                env={**os.environ, **env},
            )  # fmt: skip
            assert done.returncode == 0, done.stderr
            summary = json.loads(done.stdout)
            assert summary["backend"] == backend
            assert summary["reassembled"] >= 8 and sum(summary["lost"].values()) == 0
            assert sorted(frames(out)) == sorted(bridged)
        assert sniffed["reassembled"] >= 8 and sum(sniffed["lost"].values()) == 0
        assert sorted(frames(tmp_path / "sniff.pcapng")) == sorted(bridged)
