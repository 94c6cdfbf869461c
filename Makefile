# Two entry points on a fresh machine with Python >= 3.11 and pip:
#   make demo   - runs the main job (reference + kernels in interpret mode, and a tiny model)
#   make test   - runs the test suite
PYTHON ?= python3
VENV := .venv
STAMP := $(VENV)/.installed

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e ".[test,bench]"
	touch $(STAMP)

.PHONY: demo test install
install: $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/gqa-pallas demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile
