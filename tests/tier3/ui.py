"""Driving the real ComfyUI frontend in headless Chromium (Playwright) the way a person does.

Workflows are opened through the frontend's own file input (what *Workflow → Open* and drag-and-drop use),
nodes are added through the node search box, buttons are clicked with the mouse and prompts are queued with
the *Run* button. Graph read-outs come from ``page_helpers.js`` (``window.multiloraTest``).

Two frontends are driven: 1.32 (ComfyUI 0.3.75) and 1.49 (ComfyUI 0.33.0). Where their pages differ, the
part is found by what the page shows, never by a version number: ``PARTS`` names each part by one CSS
selector that matches it on either frontend, and ``page_helpers.js`` reads a node's widgets from whichever
renderer draws it (the classic canvas or the Vue node renderer, "Nodes 2.0"). The tests use only the
methods of ``ComfyPage``.
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
    "EmptySD3LatentImage": {"width": 64, "height": 64, "batch_size": 1},
    "*": {"steps": 4, "refine_iters": 2, "switch_every": 1},
}
"""Widget values set before queueing a workflow on the CPU: 64x64 latent, 4 steps, CLoRA with 2 refinement
iterations, LoRA Switch every step (so 4 steps still cycle through the LoRAs), as the tier-2 workflow tests."""

PARTS = {
    # The node search box's text input: 1.32's PrimeVue AutoComplete, 1.49's "Add a node..." dialog.
    "search_input": ".comfy-vue-node-search-box input, input[role=combobox][aria-controls=results-list]",
    # Its suggestions (the title is the first line of each).
    "search_option": ".comfy-vue-node-search-container li[role=option], [data-testid=result-item]",
    # Run: a button inside the queue split button (1.32), the button itself (1.49).
    "run_button": '[data-testid="queue-button"] button, button[data-testid="queue-button"]',
    # The file name box of the prompt dialog Save opens (both: role=dialog labelled by "global-prompt").
    "prompt_input": "[role=dialog][aria-labelledby=global-prompt] input",
    # Missing node types on loading a workflow: 1.32's dialog, 1.49's error toast ("Missing node: X").
    "missing_nodes": ".comfy-missing-nodes, [data-testid=error-overlay]:has-text('Missing node')",
}
"""The frontend's parts the tests touch, each as one selector for both frontends."""

RENDERERS = ("classic", "vue")
"""The node renderers: the classic LiteGraph canvas and the Vue nodes of setting ``VUE_NODES_SETTING``."""
VUE_NODES_SETTING = "Comfy.VueNodes.Enabled"
"""'Modern Node Design (Nodes 2.0)' in the frontend's settings (frontends 1.32 and 1.49, off by default)."""

with open(os.path.join(HERE, "page_helpers.js"), encoding="utf-8") as _f:
    PAGE_HELPERS = _f.read()


class ComfyPage:
    """One browser tab on the ComfyUI server."""

    def __init__(self, page: Page, url: str) -> None:
        self.page = page
        self.url = url
        self.changed_settings: set[str] = set()
        """Settings this page changed; they are stored on the server, the ``ui`` fixture resets them."""

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
        """Text of the frontend's 'missing node types' dialog (or toast), or None when it is not shown."""
        dialog = self.page.locator(PARTS["missing_nodes"])
        return dialog.first.inner_text() if dialog.count() and dialog.first.is_visible() else None

    def wait_for_missing_nodes_dialog(self, timeout_ms: int = 10_000) -> None:
        self.page.locator(PARTS["missing_nodes"]).first.wait_for(timeout=timeout_ms)

    def renderer(self, node_id: int) -> str:
        """``"vue"`` or ``"classic"``: what draws the node now."""
        return self.js("id => multiloraTest.renderer(id)", node_id)

    def shown_widgets(self, node_id: int) -> list[dict]:
        """The widgets the node shows, top to bottom: name, y and height (canvas units), either renderer."""
        return self.js("id => multiloraTest.shownWidgets(id)", node_id)

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
    def renderer_unsupported(self, renderer: str) -> str | None:
        """Why the LoRA Stack's rows cannot follow + / − under that node renderer here, or None.

        Both frontends have the Vue renderer (it knows the setting), but only one whose widgets keep their
        state in the frontend's widget store (a widget has a ``widgetId``: frontend 1.49) re-reads a
        widget's options after the node changed. Frontend 1.32's experimental one copies them when it
        first draws the node and again only on the first value change, so rows shown or hidden later stay
        as they were until the workflow is loaded again."""
        if renderer == "classic":
            return None
        if self.js("id => window.app.extensionManager.setting.get(id) === undefined", VUE_NODES_SETTING):
            return "this frontend has no Vue node renderer"
        if not self.js("() => 'widgetId' in window.LiteGraph.createNode('MultiLoRAStack').widgets[0]"):
            return ("this frontend's experimental Vue node renderer copies widget options once (no widget "
                    "store), so rows shown or hidden after the first change are not redrawn")
        return None

    def use_renderer(self, renderer: str) -> None:
        """Switch the node renderer as the settings dialog does (the setting is stored for the user on the
        server, so the ``ui`` fixture switches back to classic afterwards); the open graph is redrawn."""
        assert renderer in RENDERERS, renderer
        self.changed_settings.add(VUE_NODES_SETTING)
        self.js("([id, on]) => window.app.extensionManager.setting.set(id, on)",
                [VUE_NODES_SETTING, renderer == "vue"])
        self.page.wait_for_timeout(500)

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
        """A real mouse click on a widget (e.g. a button) of a node, drawn on the canvas or as a Vue node:
        the view is moved onto the widget first, once it is not moving any more (a view still panning
        would carry the widget away from the point clicked)."""
        self.wait_view_settled()
        self.js("([id, name]) => multiloraTest.revealWidget(id, name)", [node_id, name])
        self.page.wait_for_timeout(200)
        point = self.js("([id, name]) => multiloraTest.widgetCenter(id, name)", [node_id, name])
        self.page.mouse.click(point["x"], point["y"])
        self.page.wait_for_timeout(150)

    def wait_view_settled(self, timeout_s: float = 5.0) -> None:
        """Until the canvas view (offset, zoom) stays the same for 200 ms."""
        view = "() => [...window.app.canvas.ds.offset, window.app.canvas.ds.scale]"
        deadline = time.monotonic() + timeout_s
        last = self.js(view)
        while time.monotonic() < deadline:
            self.page.wait_for_timeout(200)
            now = self.js(view)
            if now == last:
                return
            last = now

    def save_workflow(self, name: str) -> None:
        """The frontend's own Save (Ctrl+S) under ``name``, into the user's workflows folder."""
        self.page.keyboard.press("Control+s")
        name_box = self.page.locator(PARTS["prompt_input"])
        name_box.wait_for(timeout=10_000)
        name_box.fill(name)
        self.page.keyboard.press("Enter")
        self.page.wait_for_function("sel => !document.querySelector(sel)", arg=PARTS["prompt_input"],
                                    timeout=10_000)
        self.page.wait_for_timeout(500)

    def open_search_box(self, attempts: int = 3) -> Locator:
        """Double-click the empty canvas until the node search box shows. A double-click that lands while
        the previous dialog is still closing (or before the canvas has focus) is dropped by the frontend,
        so it is tried again, with Escape in between, before giving up."""
        box = self.page.locator(PARTS["search_input"])
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
        options = self.page.locator(PARTS["search_option"])
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
            self.place_ghost_node()
        else:
            self.page.keyboard.press("Escape")
        self.page.wait_for_timeout(200)
        return titles

    def place_ghost_node(self) -> None:
        """A node picked in frontend 1.49's search box follows the pointer, drawn faded (a "ghost", setting
        Comfy.NodeSearchBoxImpl.FollowCursor), until a click puts it down: click where the search began.
        Frontend 1.32 puts the node down at once (no ghost: nothing to do)."""
        ghost = "window.app.graph.nodes.some(n => n.flags?.ghost) || window.app.canvas.state?.ghostNodeId != null"
        if not self.js(f"() => {ghost}"):
            return
        self.page.locator(PARTS["search_input"]).wait_for(state="hidden", timeout=5_000)  # the dialog has closed
        self.page.wait_for_timeout(200)
        self.page.mouse.move(VIEWPORT["width"] // 2, VIEWPORT["height"] // 2)
        self.page.mouse.click(VIEWPORT["width"] // 2, VIEWPORT["height"] // 2)
        self.page.wait_for_function(f"() => !({ghost})", timeout=5_000)

    def queue(self) -> tuple[dict, dict]:
        """Click *Run*; return (the API prompt the frontend posted, the server's answer)."""
        with self.page.expect_response(lambda r: r.url.endswith("/api/prompt") and r.request.method == "POST") as info:
            self.page.locator(PARTS["run_button"]).first.click()
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

    def wait_for_widget_showing(self, node_id: int, value: Any, timeout_ms: int = 30_000) -> None:
        """Until one of the node's widgets holds ``value`` (an output shown on the node: Preview as Text's
        widget is called 'preview' in frontend 1.32 and 'preview_text' in 1.49)."""
        self.page.wait_for_function("([id, value]) => (window.app.graph.getNodeById(id).widgets ?? [])"
                                    ".some(w => w.value === value)", arg=[node_id, value], timeout=timeout_ms)

    def screenshot(self, path: str) -> None:
        self.page.screenshot(path=path)
