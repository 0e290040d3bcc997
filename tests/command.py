"""The command under test: this interpreter's tunnelscope, never whatever PATH holds.

A `tunnelscope` found on PATH may be another installation (an old one, or none at all on a
fresh machine), so tests run `python -m tunnelscope` with the interpreter running pytest.
"""

from __future__ import annotations

import os
import subprocess
import sys

TUNNELSCOPE = [sys.executable, "-m", "tunnelscope"]


def run_tunnelscope(
    *args: str, cwd: str | os.PathLike[str] | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """One run of the command as a user runs it, its output as text, bounded in time."""
    return subprocess.run(
        [*TUNNELSCOPE, *args], capture_output=True, text=True, timeout=60, cwd=cwd, env=env
    )
