# `make demo` and `make test` set everything up on first use (scripts/install.sh), then do their job.
VENV ?= .venv
PYTHON ?= python3
PY := $(VENV)/bin/python
STAMP := $(VENV)/.cskd-installed

.PHONY: demo test bench install

demo: $(STAMP)
	$(PY) launch/grid.py

test: $(STAMP)
	$(PY) -m pytest -q

bench: $(STAMP)
	$(PY) -m cskd.bench

install: $(STAMP)

$(STAMP): requirements.txt pyproject.toml scripts/install.sh
	PYTHON=$(PYTHON) scripts/install.sh $(VENV)
	touch $@
