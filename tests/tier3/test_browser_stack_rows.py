"""The LoRA Stack's row buttons (js/stack_rows.js) in the real frontend, under both node renderers (the
classic canvas and the Vue nodes of "Nodes 2.0", fixture ``renderer``): clicking them changes `rows`, shows
and hides rows without overlapping widgets, and the rows survive saving, reloading and queueing. A workflow
saved before the Vue renderer was supported (fixtures/stack_rows_saved_before_nodes2.json, saved by frontend
1.32's Save with the stack script of that time) still loads, runs and saves the same."""
from __future__ import annotations

import json
import os
import time

from support.pack_loader import REPO_ROOT

HERE = os.path.dirname(os.path.abspath(__file__))
MERGE = os.path.join(REPO_ROOT, "example_workflows", "multilora_merge.json")
SAVED_BEFORE = os.path.join(HERE, "fixtures", "stack_rows_saved_before_nodes2.json")
ROW_FIELDS = ("lora", "on", "strength_model", "strength_clip", "category", "concept", "trigger")
ADD, REMOVE = "+ add LoRA row", "− remove last row"


def layout(ui, node_id: int) -> dict:
    """rows, the shown row numbers, and any widgets drawn on top of each other (as drawn: canvas or DOM)."""
    shown = ui.shown_widgets(node_id)
    rows = sorted({int(w["name"].rsplit("_", 1)[1]) for w in shown if w["name"].startswith("lora_")})
    overlaps = [(a["name"], b["name"]) for a, b in zip(shown, shown[1:]) if b["y"] < a["y"] + a["height"] - 4]
    zero = [w["name"] for w in shown if not w["height"]]
    buttons = [w["name"] for w in shown if w["name"] in (ADD, REMOVE)]
    return {"rows": ui.widget_value(node_id, "rows"), "shown": rows, "overlaps": overlaps, "zero_height": zero,
            "buttons": buttons}


def expect_rows(ui, node_id: int, n: int, timeout: float = 5.0) -> None:
    """The node shows rows 1..n and both buttons, laid out without overlaps (polled: the canvas lays out
    on its next frame, a Vue node on its next render)."""
    expected = {"rows": n, "shown": list(range(1, n + 1)), "overlaps": [], "zero_height": [],
                "buttons": [ADD, REMOVE]}
    deadline = time.monotonic() + timeout
    while (found := layout(ui, node_id)) != expected and time.monotonic() < deadline:
        ui.page.wait_for_timeout(100)
    assert found == expected


def stack_values(path: str) -> list:
    with open(path, encoding="utf-8") as f:
        return next(n for n in json.load(f)["nodes"] if n["type"] == "MultiLoRAStack")["widgets_values"]


def test_row_buttons_show_hide_save_reload_and_queue(ui, comfy, renderer):
    ui.open_workflow(MERGE)
    stack = ui.nodes_of_type("MultiLoRAStack")[0]
    expect_rows(ui, stack, 3)  # a loaded workflow shows exactly its rows
    assert ui.renderer(stack) == renderer

    ui.click_widget(stack, REMOVE)
    ui.click_widget(stack, REMOVE)
    expect_rows(ui, stack, 1)
    assert ui.widget_value(stack, "lora_2") == "None" and ui.widget_value(stack, "lora_3") == "None"  # reset
    ui.click_widget(stack, REMOVE)
    expect_rows(ui, stack, 1)  # never fewer than one row

    for _ in range(3):
        ui.click_widget(stack, ADD)
    expect_rows(ui, stack, 4)
    ui.set_widget(stack, "lora_2", "demo_style.safetensors")
    ui.set_widget(stack, "lora_3", "demo_background.safetensors")
    ui.set_widget(stack, "on_4", False)  # row 4 stays without a file, switched off
    assert ui.problems() == []

    # Saved with the frontend's own Save (Ctrl+S, a name), as a file in the user's workflows folder.
    name = f"rows_test_{renderer}"
    ui.save_workflow(name)
    saved_path = os.path.join(comfy.base, "user", "default", "workflows", f"{name}.json")
    values = stack_values(saved_path)
    assert values[0] == 4 and len(values) == 1 + 10 * len(ROW_FIELDS)  # buttons are not saved
    assert values[1 + 1 * len(ROW_FIELDS)] == "demo_style.safetensors"

    # Reload the page: the frontend restores the open workflow, rows and visibility included.
    ui.reload()
    stack = ui.nodes_of_type("MultiLoRAStack")[0]
    expect_rows(ui, stack, 4)
    assert ui.renderer(stack) == renderer
    assert ui.widget_value(stack, "lora_3") == "demo_background.safetensors"
    assert ui.widget_value(stack, "on_4") is False

    # Open the saved file again from disk: the same.
    ui.open_workflow(saved_path)
    stack = ui.nodes_of_type("MultiLoRAStack")[0]
    expect_rows(ui, stack, 4)
    ui.scale_down()

    # Queue it (scaled down for the CPU): the API prompt carries rows and every row's values; the server runs it.
    prompt, answer = ui.queue()
    assert answer["status"] == 200 and answer.get("node_errors") == {}, answer
    inputs = prompt["prompt"][str(stack)]["inputs"]
    assert inputs["rows"] == 4
    assert [inputs[f"lora_{n}"] for n in range(1, 5)] == [
        "demo_character.safetensors", "demo_style.safetensors", "demo_background.safetensors", "None"]
    assert inputs["on_4"] is False and inputs["lora_10"] == "None"
    assert not [key for key in inputs if key.startswith(("+", "−"))], inputs
    history = comfy.wait_for_history(answer["prompt_id"])
    assert history["status"]["status_str"] == "success", json.dumps(history["status"]["messages"])[-3000:]


def test_a_new_stack_starts_with_one_row_and_grows(ui, renderer):
    ui.search_and_add("LoRA Stack", "LoRA Stack")
    stack = ui.nodes_of_type("MultiLoRAStack")[0]
    expect_rows(ui, stack, 1)
    assert ui.renderer(stack) == renderer
    for n in range(2, 11):
        ui.click_widget(stack, ADD)
        expect_rows(ui, stack, n)
    ui.click_widget(stack, ADD)
    expect_rows(ui, stack, 10)  # at most the node's ten rows
    size = ui.js("id => window.app.graph.getNodeById(id).size[1]", stack)
    for _ in range(9):
        ui.click_widget(stack, REMOVE)
    expect_rows(ui, stack, 1)
    ui.page.wait_for_timeout(300)  # a Vue node hands its new size to the graph after its render
    assert ui.js("id => window.app.graph.getNodeById(id).size[1]", stack) < size / 3  # the node shrinks back


def test_a_stack_saved_before_nodes2_loads_runs_and_saves_the_same(ui, comfy, renderer):
    """Migration: the file saved before the Vue renderer was supported opens with its 4 rows and values,
    queues them, and the frontend's Save writes the stack back unchanged (same widgets_values, no new
    entries); its rows still grow and shrink."""
    before = stack_values(SAVED_BEFORE)
    ui.open_workflow(SAVED_BEFORE)
    assert ui.problems() == []
    stack = ui.nodes_of_type("MultiLoRAStack")[0]
    expect_rows(ui, stack, 4)
    assert ui.renderer(stack) == renderer

    name = f"saved_again_{renderer}"
    ui.save_workflow(name)
    assert stack_values(os.path.join(comfy.base, "user", "default", "workflows", f"{name}.json")) == before

    ui.scale_down()
    prompt, answer = ui.queue()
    assert answer["status"] == 200 and answer.get("node_errors") == {}, answer
    inputs = prompt["prompt"][str(stack)]["inputs"]
    assert inputs["rows"] == 4
    assert [inputs[f"lora_{n}"] for n in range(1, 5)] == [
        "demo_character.safetensors", "demo_background.safetensors", "demo_style.safetensors",
        "demo_style.safetensors"]
    assert inputs["strength_model_3"] == 0.55 and inputs["concept_3"] == "watercolor"
    assert inputs["on_4"] is False and inputs["on_3"] is True
    history = comfy.wait_for_history(answer["prompt_id"])
    assert history["status"]["status_str"] == "success", json.dumps(history["status"]["messages"])[-3000:]

    ui.click_widget(stack, REMOVE)
    expect_rows(ui, stack, 3)
    ui.click_widget(stack, ADD)
    expect_rows(ui, stack, 4)
    assert ui.widget_value(stack, "lora_4") == "None"  # a removed row comes back empty
