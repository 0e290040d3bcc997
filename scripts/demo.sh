#!/usr/bin/env bash
# The demo lab, on a fresh Debian machine: installs what it needs, then runs `tunnelscope demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
TUNNELSCOPE_SKIP_GNS3=1 bash scripts/install.sh  # the demo needs no GNS3 server
.venv/bin/tunnelscope demo --out demo-out "$@"
