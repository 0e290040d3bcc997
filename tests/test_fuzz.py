"""A short run of the fuzz harness (tests/fuzz.py) per target; `make fuzz` runs the long one."""

from __future__ import annotations

import pytest
from fuzz import TARGETS, run

from tunnelscope.analysis.decap import c_scanner_available

COUNTS = {"decoders": 5000, "readers": 5000, "decap": 1500, "tpacket": 1500, "control": 5000}


@pytest.mark.parametrize("target", TARGETS)
def test_the_fuzz_target_finds_nothing(target: str) -> None:
    if target in ("decap", "tpacket") and not c_scanner_available():
        pytest.skip("the differential test needs the C scanner")
    found = run(target, COUNTS[target], seed=20261203)
    assert found is None, found.args[0]
