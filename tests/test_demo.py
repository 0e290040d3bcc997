"""The README's first command: `tunnelscope demo` runs a lab and its results agree."""

from __future__ import annotations

import re
import subprocess

import pytest
from command import TUNNELSCOPE

from tunnelscope.datapath.engine import available_backends

pytestmark = pytest.mark.timeout(120)


@pytest.mark.parametrize("backend", available_backends())
def test_demo_lab_results_agree(backend: str, tmp_path) -> None:
    done = subprocess.run(
        [*TUNNELSCOPE, "demo", "--out", str(tmp_path), "--backend", backend],
        capture_output=True,
        text=True,
        timeout=100,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    # freq_drop 3 on PC1's side: ARP is frame 1, so echo requests 2, 5 and 8 are frames 3, 6, 9
    assert "7/10 replies  [1:ok 2:lost 3:ok 4:ok 5:lost 6:ok 7:ok 8:lost 9:ok 10:ok]" in out
    counters = re.search(r"a2b received (\d+) forwarded (\d+) dropped 3 \(freq_drop 3\)\n", out)
    assert counters and int(counters[1]) - int(counters[2]) == 3
    # a pipe gets whole summaries, never cut at a width
    dropped = "IPv4 10.0.0.1 > 10.0.0.2: ICMP echo request id 4660 seq 2  [dropped by freq_drop]"
    assert dropped in out
    assert out.count("[dropped by freq_drop]") == 1  # seq 2 is among the frames shown
    assert "R1 -> R2 over Cisco HDLC: 10/10 replies" in out
    assert re.search(r"serial\.pcapng \(hdlc, \d+ frames\)", out)  # detected, not given
    decapped = re.findall(r"^  udp \d+<->\d+ (\w+) +(\w+) +confidence", out, re.MULTILINE)
    assert sorted(decapped) == [("ethernet",) * 2, ("fr",) * 2, ("hdlc",) * 2, ("ppp",) * 2]
    assert "left out: 1 non-tunnel UDP" in out
    assert out.count("tshark reads it: True") == 3
