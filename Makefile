# Two entry points on a fresh machine with Python >= 3.11 and pip:
#   make demo   - runs the main job (reference + kernels in interpret mode, and a tiny model)
#   make test   - runs the test suite
# The demo needs only the package; the tests add their extras (torch, transformers, ...).
PYTHON ?= python3
VENV := .venv
BASE := $(VENV)/.installed-base
STAMP := $(VENV)/.installed

$(BASE): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e .
	touch $(BASE)

$(STAMP): $(BASE)
	$(VENV)/bin/python -m pip install -q -e ".[test,bench]"
	touch $(STAMP)

.PHONY: demo test install
install: $(STAMP)

demo: $(BASE)
	$(VENV)/bin/gqa-pallas demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile
