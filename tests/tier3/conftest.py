"""Tier 3: the real ComfyUI server (main.py) with this pack, and its web frontend in headless Chromium.

Needs what `make test` installs (Makefile target ``browser-tools``): Debian's chromium, the Playwright wheel,
ComfyUI's pinned ``comfyui-frontend-package``. A missing tool fails the tier with the command to run; it is
never skipped silently. Screenshots (of every failure), console and server logs go to tests/tier3/artifacts/.
"""
from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from collections.abc import Iterator

import pytest

from tier3.make_models import ensure_models
from tier3.server import ComfyServer
from tier3.ui import CHROMIUM, CHROMIUM_ARGS, RENDERERS, VIEWPORT, ComfyPage

HERE = os.path.dirname(os.path.abspath(__file__))
ARTIFACTS = os.path.join(HERE, "artifacts")



def missing_tools() -> list[str]:
    missing = []
    if not os.access(CHROMIUM, os.X_OK):
        missing.append(f"Chromium at {CHROMIUM} (Debian packages chromium, chromium-driver)")
    for module, package in (("playwright", "playwright"), ("comfyui_frontend_package", "comfyui-frontend-package"),
                            ("requests", "requests")):
        if importlib.util.find_spec(module) is None:
            missing.append(f"Python package {package}")
    return missing


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture(scope="session")
def artifacts() -> str:
    shutil.rmtree(ARTIFACTS, ignore_errors=True)
    os.makedirs(ARTIFACTS)
    return ARTIFACTS


@pytest.fixture(scope="session")
def tools() -> None:
    missing = missing_tools()
    if missing:
        pytest.fail("browser tier needs " + ", ".join(missing) + ": run `make browser-tools` (part of `make test`)",
                    pytrace=False)


@pytest.fixture(scope="session")
def models_dir(tools) -> str:
    return ensure_models()


@pytest.fixture(scope="session")
def comfy(models_dir, artifacts) -> Iterator[ComfyServer]:
    work = tempfile.mkdtemp(prefix="multilora-tier3-")
    server = ComfyServer(work, models_dir, os.path.join(artifacts, "server.log"))
    try:
        server.start()
        yield server
    finally:
        server.stop()
        shutil.rmtree(work, ignore_errors=True)


@pytest.fixture(scope="session")
def browser(tools):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
                                              chromium_sandbox=False)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture
def ui(request, browser, comfy, artifacts) -> Iterator[ComfyPage]:
    """A fresh browser context (no stored workflows) with ComfyUI open. Requests to anything but the local
    server are refused before they leave the browser."""
    context = browser.new_context(viewport=VIEWPORT)
    blocked: list[str] = []
    console: list[str] = []

    def guard(route):
        if route.request.url.startswith(comfy.url) or route.request.url.startswith(("data:", "blob:")):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    context.route("**/*", guard)
    page = context.new_page()
    page.on("console", lambda m: console.append(f"[{m.type}] {m.text}"))
    page.on("pageerror", lambda e: console.append(f"[pageerror] {e}"))
    comfy_page = ComfyPage(page, comfy.url)
    try:
        comfy_page.open()
        yield comfy_page
    finally:
        name = request.node.name.replace("/", "_").replace("[", "-").replace("]", "")
        failed = any(getattr(request.node, f"rep_{when}", None) is not None
                     and getattr(request.node, f"rep_{when}").failed for when in ("setup", "call"))
        if failed:
            try:
                page.screenshot(path=os.path.join(artifacts, f"FAILED-{name}.png"))
            except Exception:  # the page may be gone; the logs still help
                pass
            with open(os.path.join(artifacts, f"FAILED-{name}.console.txt"), "w", encoding="utf-8") as f:
                f.write("\n".join(console + [f"[blocked] {u}" for u in blocked]) + "\n")
                f.write("\n--- server log (tail) ---\n" + comfy.log_tail())
        context.close()
        for setting in comfy_page.changed_settings:  # stored for the user: back to the default (off)
            comfy.request(f"/api/settings/{setting}", data=False)


@pytest.fixture(params=RENDERERS)
def renderer(request, ui) -> str:
    """Runs a test under each node renderer: the classic canvas and the Vue nodes ("Nodes 2.0"); skipped,
    with the reason, where the frontend's renderer cannot do what the test checks (see
    ``ComfyPage.renderer_unsupported``)."""
    reason = ui.renderer_unsupported(request.param)
    if reason:
        pytest.skip(reason)
    ui.use_renderer(request.param)
    return request.param

