#!/usr/bin/env bash
# Install everything tunnelscope's demo and tests need on a fresh Debian machine. Idempotent.
# Debian packages: tshark (the judge of every file), vpcs (a real peer), iproute2 (network
# namespaces), gcc + Python headers (the C fast path). Python: a venv in .venv with the
# package (its C extension compiled) and the dev tools.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

packages=()
command -v tshark >/dev/null || packages+=(tshark)
command -v vpcs >/dev/null || packages+=(vpcs)
command -v ip >/dev/null || packages+=(iproute2)
command -v ping >/dev/null || packages+=(iputils-ping)
command -v gcc >/dev/null || packages+=(gcc)
command -v python3 >/dev/null || packages+=(python3)
python3 -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))' 2>/dev/null \
    || packages+=(python3-dev)
python3 -c 'import ensurepip, venv' 2>/dev/null || packages+=(python3-venv)
if [ "${#packages[@]}" -gt 0 ]; then
    echo "installing Debian packages: ${packages[*]}"
    echo "wireshark-common wireshark-common/install-setuid boolean false" | $SUDO debconf-set-selections
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
        "${packages[@]}" >/dev/null
fi

[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
.venv/bin/python -m pip install -q -e ".[dev]" 2>&1 | grep -v -i "warning" || true
# A GNS3 server of its own (tests run it with tunnelscope as its ubridge); kept apart from
# .venv because it pins its own versions of common packages.
if [ "${TUNNELSCOPE_SKIP_GNS3:-0}" != 1 ] && [ ! -x .venv-gns3/bin/gns3server ]; then
    python3 -m venv .venv-gns3
    .venv-gns3/bin/python -m pip install -q gns3-server==2.2.61 2>&1 | grep -v -i "warning" || true
fi
.venv/bin/python -c "import tunnelscope"
.venv/bin/tunnelscope info | sed -n 1,2p  # sed reads it all: no broken pipe
