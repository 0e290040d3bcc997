#!/usr/bin/env bash
# The whole test suite, on a fresh Debian machine: installs what it needs, then runs
# ruff and pytest (tshark, VPCS and kernel TAP peers included; root tests need root).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/ruff check tunnelscope tests benchmarks captures
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
