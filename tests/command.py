"""The command under test: this interpreter's tunnelscope, never whatever PATH holds.

A `tunnelscope` found on PATH may be another installation (an old one, or none at all on a
fresh machine), so tests run `python -m tunnelscope` with the interpreter running pytest.
"""

from __future__ import annotations

import sys

TUNNELSCOPE = [sys.executable, "-m", "tunnelscope"]
