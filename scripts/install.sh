#!/usr/bin/env bash
# Install everything tunnelscope's demo and tests need on a fresh Debian machine. Idempotent.
# Debian packages: tshark (the judge of every file), tcpdump (what decap and sniff are held
# to), vpcs (a real peer), iproute2 (network namespaces), gcc + Python headers (the C fast
# path). Python: a venv in .venv with the package (its C extensions compiled) and the dev
# tools; a GNS3 server in .venv-gns3.
#
# One progress line per step; what the installers print goes to .install.log, shown only when a
# step fails.
set -euo pipefail
cd "$(dirname "$0")/.."
SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"
LOG="$PWD/.install.log"
: >"$LOG"

step() {  # step DESCRIPTION COMMAND...: run COMMAND quietly, show its log if it fails
    local what=$1
    shift
    printf 'install: %s ... ' "$what"
    if "$@" >>"$LOG" 2>&1; then
        echo ok
    else
        echo FAILED
        echo "install: the log of that step ($LOG):" >&2
        tail -n 40 "$LOG" >&2
        exit 1
    fi
}

apt_install() {
    echo "wireshark-common wireshark-common/install-setuid boolean false" | $SUDO debconf-set-selections
    $SUDO apt-get update -qq
    $SUDO env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "$@"
}

packages=()
command -v tshark >/dev/null || packages+=(tshark)
command -v tcpdump >/dev/null || packages+=(tcpdump)
command -v vpcs >/dev/null || packages+=(vpcs)
command -v ip >/dev/null || packages+=(iproute2)
command -v ping >/dev/null || packages+=(iputils-ping)
command -v gcc >/dev/null || packages+=(gcc)
command -v python3 >/dev/null || packages+=(python3)
python3 -c 'import sysconfig, os, sys; sys.exit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))' 2>/dev/null \
    || packages+=(python3-dev)
python3 -c 'import ensurepip, venv' 2>/dev/null || packages+=(python3-venv)
if [ "${#packages[@]}" -gt 0 ]; then
    step "Debian packages (${packages[*]})" apt_install "${packages[@]}"
fi

[ -x .venv/bin/python ] || step "virtualenv .venv" python3 -m venv .venv
# setuptools >= 77 reads pyproject's SPDX license; `make ext`/`make asan` build with this one.
step "pip and setuptools in .venv" .venv/bin/python -m pip install -q --upgrade pip "setuptools>=77" wheel
step "tunnelscope with its C extensions, and the dev tools" .venv/bin/python -m pip install -q -e ".[dev]"
# A GNS3 server of its own (tests run it with tunnelscope as its ubridge); kept apart from
# .venv because it pins its own versions of common packages.
if [ "${TUNNELSCOPE_SKIP_GNS3:-0}" != 1 ] && [ ! -x .venv-gns3/bin/gns3server ]; then
    step "virtualenv .venv-gns3" python3 -m venv .venv-gns3
    step "gns3-server 2.2.61 in .venv-gns3" .venv-gns3/bin/python -m pip install -q gns3-server==2.2.61
fi
step "import check" .venv/bin/python -c "import tunnelscope.nio, tunnelscope.analysis.decap"
.venv/bin/tunnelscope info | sed -n 1,2p  # sed reads it all: no broken pipe
