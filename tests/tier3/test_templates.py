"""The pack's workflows in ComfyUI's template browser: listed by the server, each with its JPEG thumbnail
(example_workflows/<name>.jpg, what frontend 1.32 asks for), and opened from the browser's Templates dialog."""
from __future__ import annotations

import glob
import io
import json
import os

from PIL import Image

from support.pack_loader import REPO_ROOT
from tier3.server import PACK_DIR_NAME

WORKFLOWS = sorted(glob.glob(os.path.join(REPO_ROOT, "example_workflows", "*.json")))
NAMES = sorted(os.path.splitext(os.path.basename(p))[0] for p in WORKFLOWS)
MAX_THUMBNAIL_BYTES = 50_000


def test_the_server_lists_every_workflow_as_a_template(comfy):
    listed = comfy.get("/api/workflow_templates")
    assert sorted(listed.get(PACK_DIR_NAME, [])) == NAMES


def test_each_template_is_served_with_its_thumbnail(comfy):
    for name in NAMES:
        status, _, body = comfy.request(f"/api/workflow_templates/{PACK_DIR_NAME}/{name}.json")
        assert status == 200
        with open(os.path.join(REPO_ROOT, "example_workflows", f"{name}.json"), encoding="utf-8") as f:
            assert json.loads(body) == json.load(f)
        status, headers, body = comfy.request(f"/api/workflow_templates/{PACK_DIR_NAME}/{name}.jpg")
        assert status == 200, f"{name}.jpg is missing: run demo/make_thumbnails.py"
        assert headers.get("Content-Type") == "image/jpeg"
        assert len(body) < MAX_THUMBNAIL_BYTES
        with Image.open(io.BytesIO(body)) as image:
            assert image.format == "JPEG" and image.size[0] == image.size[1] >= 256  # the cards are square


def test_no_stray_thumbnails():
    thumbnails = sorted(os.path.splitext(os.path.basename(p))[0]
                        for p in glob.glob(os.path.join(REPO_ROOT, "example_workflows", "*.jpg")))
    assert thumbnails == NAMES


def test_the_templates_dialog_shows_and_opens_them(ui):
    ui.js("() => window.app.extensionManager.command.execute('Comfy.BrowseTemplates')")
    ui.page.get_by_text(PACK_DIR_NAME, exact=True).first.click()
    for name in NAMES:  # cards load their image when scrolled into view
        card = ui.page.locator(f"[data-testid='template-workflow-{name}']")
        card.scroll_into_view_if_needed(timeout=20_000)
        ui.page.wait_for_function(
            "name => [...document.querySelectorAll(`[data-testid='template-workflow-${name}'] img`)]"
            ".some(i => i.complete && i.naturalWidth > 0)", arg=name, timeout=20_000)
        size = ui.js("name => { const i = [...document.querySelectorAll(`[data-testid='template-workflow-${name}'] img`)]"
                     ".find(i => i.naturalWidth > 0); return [i.naturalWidth, i.naturalHeight]; }", name)
        with Image.open(os.path.join(REPO_ROOT, "example_workflows", f"{name}.jpg")) as image:
            assert tuple(size) == image.size, f"{name}: the card shows a {size} image, not its thumbnail"

    ui.page.locator("[data-testid='template-workflow-multilora_switch']").click()
    ui.page.wait_for_function("() => window.app.graph.nodes.some(n => n.type === 'MultiLoRASwitchSampler')",
                              timeout=20_000)
    with open(os.path.join(REPO_ROOT, "example_workflows", "multilora_switch.json"), encoding="utf-8") as f:
        expected = sorted(n["type"] for n in json.load(f)["nodes"])
    assert sorted(ui.node_types()) == expected
    assert ui.problems() == []
