#!/usr/bin/env bash
# The demo lab, on a fresh Debian machine: installs what it needs, then runs `tunnelscope demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
.venv/bin/tunnelscope demo --out demo-out "$@"
