"""Every workflow in example_workflows/ opens in the real frontend without problems, runs from the Run button and
shows its images; a broken copy is flagged.

The server has the tiny real-format SD1.5 checkpoint and the demo LoRAs under the names the workflows use,
so nothing is missing. Before queueing, the sizes are scaled down in the widgets (``ComfyPage.scale_down``)
to keep the CPU run short.
"""
from __future__ import annotations

import copy
import glob
import json
import os

import pytest
from PIL import Image

from support.pack_loader import REPO_ROOT
from support.saved_images import saved_image_size

WORKFLOWS = sorted(glob.glob(os.path.join(REPO_ROOT, "example_workflows", "*.json")))


def load(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def check_png(path: str, size: tuple[int, int] = (64, 64)) -> None:
    with Image.open(path) as image:
        assert image.format == "PNG" and image.size == size, (image.format, image.size)


def test_there_are_workflows():
    assert len(WORKFLOWS) >= 7


@pytest.mark.parametrize("path", WORKFLOWS, ids=os.path.basename)
def test_workflow_opens_runs_and_shows_its_images(ui, comfy, path):
    workflow = load(path)
    ui.open_workflow(path)
    assert ui.problems() == []

    ui.scale_down()
    prompt, answer = ui.queue()
    assert answer["status"] == 200 and answer.get("node_errors") == {}, answer
    expected = {str(n["id"]) for n in workflow["nodes"] if n.get("mode", 0) == 0}
    assert set(prompt["prompt"]) == expected  # every node goes to the server, none lost on the way

    history = comfy.wait_for_history(answer["prompt_id"])
    status = history["status"]
    assert status["status_str"] == "success", json.dumps(status["messages"])[-3000:]
    assert ui.js("multiloraTest.nodeErrors()")["flagged"] == []

    saved = [n for n in workflow["nodes"] if n["type"] == "SaveImage"]
    assert saved
    for node in saved:
        images = history["outputs"][str(node["id"])]["images"]
        assert len(images) == 1 and images[0]["type"] == "output"
        size = saved_image_size(prompt["prompt"], str(node["id"]), 64)  # the Compare node's grid is wider
        check_png(comfy.output_file(images[0]), size)
        shown = ui.wait_for_image(node["id"])
        assert (shown[0]["width"], shown[0]["height"]) == size

    for node in workflow["nodes"]:  # the Compare node's table, shown in Preview as Text's own widget
        if node["type"] != "PreviewAny":
            continue
        text = history["outputs"][str(node["id"])]["text"]
        assert len(text) == 1 and text[0].startswith("| method | seconds |"), text
        ui.wait_for_widget_showing(node["id"], text[0])

    for node in workflow["nodes"]:
        if node["type"] != "MultiLoRAMaskPreview":
            continue
        images = history["outputs"][str(node["id"])]["images"]
        assert len(images) == 1 and images[0]["type"] == "temp"
        check_png(comfy.output_file(images[0]))
        shown = ui.wait_for_image(node["id"])  # the overlay is drawn on the node itself
        assert shown and shown[0]["complete"] and shown[0]["width"] == 64
        assert images[0]["filename"] in shown[0]["src"]


def test_a_workflow_with_an_unknown_node_is_flagged(ui, tmp_path):
    """A copy of a workflow whose LoRA Stack became an unknown node type: the same check that passes the
    real workflows above reports it (and the frontend shows its missing-nodes dialog or toast), so a workflow that
    references a node this pack no longer has fails the suite."""
    source = os.path.join(REPO_ROOT, "example_workflows", "multilora_merge.json")
    broken = copy.deepcopy(load(source))
    victim = next(n for n in broken["nodes"] if n["type"] == "MultiLoRAStack")
    victim["type"] = "MultiLoRANoSuchNode"
    path = tmp_path / "multilora_merge_broken.json"
    path.write_text(json.dumps(broken), encoding="utf-8")

    ui.open_workflow(str(path))
    ui.wait_for_missing_nodes_dialog()
    problems = ui.problems()
    assert "missing node type MultiLoRANoSuchNode" in problems
    assert any(p.startswith("missing-nodes dialog") and "MultiLoRANoSuchNode" in p for p in problems)
    assert ui.missing_node_types() == ["MultiLoRANoSuchNode"]

    # The untouched file still opens clean in the same page (the check flags the copy, not the pack).
    ui.page.keyboard.press("Escape")
    ui.open_workflow(source)
    ui.page.wait_for_timeout(500)
    assert ui.missing_node_types() == [] and ui.invalid_widgets() == []


def test_a_workflow_with_a_model_file_the_server_lacks_is_flagged(ui, tmp_path):
    """A LoRA file name the server does not have is an invalid (red) input for the same check."""
    broken = load(os.path.join(REPO_ROOT, "example_workflows", "multilora_switch.json"))
    stack = next(n for n in broken["nodes"] if n["type"] == "MultiLoRAStack")
    stack["widgets_values"][stack["widgets_values"].index("demo_style.safetensors")] = "no_such_lora.safetensors"
    path = tmp_path / "multilora_switch_missing_lora.json"
    path.write_text(json.dumps(broken), encoding="utf-8")
    ui.open_workflow(str(path))
    assert ui.problems() == [f"node {stack['id']} MultiLoRAStack: lora_2 = 'no_such_lora.safetensors' is not one of its options"]
