# Two entry points on a fresh machine with Python >= 3.11 and pip:
#   make demo   - runs the main job (reference + kernels in interpret mode, and a tiny model)
#   make test   - runs the test suite
# The demo needs only the package; the tests add their extras (pytest, hypothesis, safetensors,
# tokenizers, ...) and, for the Hugging Face parity tests, torch and transformers.
#
# TORCH is the torch requirement `make test` installs next to the [parity] extra. The default is
# the CPU build our CI machines take from local disk. Set it empty to skip the parity tests
# (`make test TORCH=`: no torch, no transformers; tests/test_hf_parity.py then skips), or point it
# at a wheel (`make test TORCH=/path/to/torch-2.13.0+cpu-...whl`). Plain `pip install torch` on
# Linux pulls a multi-GB CUDA build. The choice is made once per .venv: after changing it, remove
# .venv/.installed (or .venv) so that the next `make test` reinstalls.
PYTHON ?= python3
TORCH ?= torch==2.13.0
VENV := .venv
BASE := $(VENV)/.installed-base
STAMP := $(VENV)/.installed
comma := ,
EXTRAS := test,bench,hf$(if $(strip $(TORCH)),$(comma)parity)

$(BASE): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(VENV)/bin/python -m pip install -q --upgrade pip
	$(VENV)/bin/python -m pip install -q -e .
	touch $(BASE)

$(STAMP): $(BASE)
	$(VENV)/bin/python -m pip install -q -e ".[$(EXTRAS)]" $(TORCH)
	touch $(STAMP)

.PHONY: demo test install
install: $(STAMP)

demo: $(BASE)
	$(VENV)/bin/gqa-pallas demo

test: $(STAMP)
	$(VENV)/bin/python -m pytest -q -n 2 --dist loadfile
