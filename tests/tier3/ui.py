"""Driving the real ComfyUI frontend in headless Chromium (Playwright) the way a person does.

Workflows are opened through the frontend's own file input (what *Workflow → Open* and drag-and-drop use),
nodes are added through the node search box, buttons are clicked with the mouse and prompts are queued with
the *Run* button. Graph read-outs come from ``page_helpers.js`` (``window.multiloraTest``).
"""
from __future__ import annotations

import json
import os
import time
from typing import Any

from playwright.sync_api import Locator, Page, Response
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

HERE = os.path.dirname(os.path.abspath(__file__))
CHROMIUM = os.environ.get("MULTILORA_CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = [
    # Playwright adds --headless, --no-sandbox (chromium_sandbox=False) and a fresh --user-data-dir itself.
    # The rest keeps Chromium from calling out of this closed network (refused connections otherwise pile up).
    "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--disable-default-apps", "--disable-extensions",
]
VIEWPORT = {"width": 1400, "height": 900}
APP_READY = ("() => window.app?.graph && window.app.canvas && document.querySelector('#comfy-file-input')"
             " && window.LiteGraph?.registered_node_types?.MultiLoRAStack")

SCALED_DOWN = {
    "EmptyLatentImage": {"width": 64, "height": 64, "batch_size": 1},
    "*": {"steps": 4, "refine_iters": 2, "switch_every": 1},
}
"""Widget values set before queueing a workflow on the CPU: 64x64 latent, 4 steps, CLoRA with 2 refinement
iterations, LoRA Switch every step (so 4 steps still cycle through the LoRAs), as the tier-2 workflow tests."""

with open(os.path.join(HERE, "page_helpers.js"), encoding="utf-8") as _f:
    PAGE_HELPERS = _f.read()


class ComfyPage:
    """One browser tab on the ComfyUI server."""

    def __init__(self, page: Page, url: str) -> None:
        self.page = page
        self.url = url

    def open(self) -> None:
        self.page.goto(self.url)
        self.wait_ready()

    def reload(self) -> None:
        self.page.reload()
        self.wait_ready()

    def wait_ready(self) -> None:
        self.page.wait_for_function(APP_READY, timeout=120_000)
        self.page.evaluate(PAGE_HELPERS)
        # The workflow restored or loaded at start-up is configured asynchronously.
        self.page.wait_for_timeout(500)

    def js(self, expression: str, arg: Any = None) -> Any:
        return self.page.evaluate(expression, arg)

    # -- reading the graph --------------------------------------------------------------------------------
    def node_types(self) -> list[str]:
        return self.js("multiloraTest.nodeTypes()")

    def nodes_of_type(self, node_type: str) -> list[int]:
        return self.js("t => multiloraTest.nodesOfType(t)", node_type)

    def missing_node_types(self) -> list[str]:
        return self.js("multiloraTest.missingNodeTypes()")

    def invalid_widgets(self) -> list[dict]:
        return self.js("multiloraTest.invalidWidgets()")

    def widgets(self, node_id: int) -> list[dict]:
        return self.js("id => multiloraTest.widgets(id)", node_id)

    def widget_value(self, node_id: int, name: str) -> Any:
        return next(w["value"] for w in self.widgets(node_id) if w["name"] == name)

    def missing_nodes_dialog(self) -> str | None:
        """Text of the frontend's 'missing node types' dialog, or None when it is not shown."""
        dialog = self.page.locator(".comfy-missing-nodes")
        return dialog.inner_text() if dialog.count() and dialog.first.is_visible() else None

    def problems(self) -> list[str]:
        """Everything that would make a loaded workflow unusable: node types the frontend does not know
        (also listed by its missing-nodes dialog) and widget values not among their options (the red
        'Value not in list' inputs)."""
        found = [f"missing node type {t}" for t in self.missing_node_types()]
        dialog = self.missing_nodes_dialog()
        if dialog is not None:
            found.append(f"missing-nodes dialog: {' '.join(dialog.split())}")
        found += [f"node {w['node']} {w['type']}: {w['widget']} = {w['value']!r} is not one of its options"
                  for w in self.invalid_widgets()]
        return found

    # -- acting -------------------------------------------------------------------------------------------
    def open_workflow(self, path: str) -> None:
        """Open a workflow file through the frontend's file input; wait until all its nodes are in the graph."""
        with open(path, encoding="utf-8") as f:
            expected = sorted(node["type"] for node in json.load(f)["nodes"])
        self.js("() => window.app.graph.clear()")
        self.page.set_input_files("#comfy-file-input", path)
        self.page.wait_for_function(
            "types => JSON.stringify(window.app.graph.nodes.map(n => n.type).sort()) === JSON.stringify(types)",
            arg=expected)
        self.page.wait_for_timeout(300)

    def set_widget(self, node_id: int, name: str, value: Any) -> None:
        self.js("([id, name, value]) => multiloraTest.setWidget(id, name, value)", [node_id, name, value])

    def scale_down(self) -> None:
        """Set the ``SCALED_DOWN`` widget values on every node that has them."""
        for node_id in self.js("() => window.app.graph.nodes.map(n => n.id)"):
            names = {w["name"] for w in self.widgets(node_id)}
            node_type = self.js("id => window.app.graph.getNodeById(id).type", node_id)
            for key in (node_type, "*"):
                for name, value in SCALED_DOWN.get(key, {}).items():
                    if name in names:
                        self.set_widget(node_id, name, value)

    def click_widget(self, node_id: int, name: str) -> None:
        """A real mouse click on a canvas widget (e.g. a button) of a node."""
        point = self.js("([id, name]) => multiloraTest.widgetCenter(id, name)", [node_id, name])
        self.page.wait_for_timeout(200)
        self.page.mouse.click(point["x"], point["y"])
        self.page.wait_for_timeout(150)

    def open_search_box(self, attempts: int = 3) -> Locator:
        """Double-click the empty canvas until the node search box shows. A double-click that lands while
        the previous dialog is still closing (or before the canvas has focus) is dropped by the frontend,
        so it is tried again, with Escape in between, before giving up."""
        box = self.page.locator(".comfy-vue-node-search-box input")
        for attempt in range(attempts):
            self.page.mouse.dblclick(VIEWPORT["width"] // 2, VIEWPORT["height"] // 2)
            try:
                box.wait_for(timeout=5_000)
                return box
            except PlaywrightTimeoutError:
                if attempt == attempts - 1:
                    raise
                self.page.keyboard.press("Escape")
                self.page.wait_for_timeout(500)
        raise AssertionError("unreachable")

    def search_and_add(self, query: str, display_name: str) -> list[str]:
        """Double-click the empty canvas, type ``query`` into the node search box and pick the suggestion
        titled ``display_name``. Returns the suggestions' titles; adds nothing if none matches."""
        self.js("() => window.app.graph.clear()")
        box = self.open_search_box()
        box.fill(query)
        options = self.page.locator(".comfy-vue-node-search-container li[role=option]")
        deadline = time.monotonic() + 10
        titles: list[str] = []
        while time.monotonic() < deadline:
            self.page.wait_for_timeout(300)
            titles = [t.split("\n")[0].strip() for t in options.all_inner_texts()]
            if any(titles):
                break
        titles = [t for t in titles if t]
        match = [i for i, t in enumerate(options.all_inner_texts()) if t.split("\n")[0].strip() == display_name]
        if match:
            options.nth(match[0]).click()
        else:
            self.page.keyboard.press("Escape")
        self.page.wait_for_timeout(200)
        return titles

    def queue(self) -> tuple[dict, dict]:
        """Click *Run*; return (the API prompt the frontend posted, the server's answer)."""
        with self.page.expect_response(lambda r: r.url.endswith("/api/prompt") and r.request.method == "POST") as info:
            self.page.locator('[data-testid="queue-button"] button').first.click()
        response: Response = info.value
        return response.request.post_data_json, {"status": response.status, **response.json()}

    def wait_for_image(self, node_id: int, timeout_ms: int = 30_000) -> list[dict]:
        """The images an output node shows on the canvas, once at least one has loaded. The frontend loads
        them when it draws the node, so the view is moved onto it first."""
        self.js("id => multiloraTest.centerOn(id)", node_id)
        self.page.wait_for_function(
            "id => (window.app.graph.getNodeById(id).imgs ?? []).some(i => i.complete && i.naturalWidth > 0)",
            arg=node_id, timeout=timeout_ms)
        return self.js("id => multiloraTest.shownImages(id)", node_id)

    def screenshot(self, path: str) -> None:
        self.page.screenshot(path=path)
