"""The LoRA Stack's row buttons (js/stack_rows.js) in the real frontend: clicking them changes `rows`, shows
and hides rows without overlapping widgets, and the rows survive saving, reloading and queueing."""
from __future__ import annotations

import json
import os
import time

from support.pack_loader import REPO_ROOT

MERGE = os.path.join(REPO_ROOT, "example_workflows", "multilora_merge.json")
ROW_FIELDS = ("lora", "on", "strength_model", "strength_clip", "category", "concept", "trigger")
ADD, REMOVE = "+ add LoRA row", "− remove last row"


def layout(ui, node_id: int) -> dict:
    """rows, the shown row numbers, and any widgets drawn on top of each other."""
    widgets = ui.widgets(node_id)
    shown = [w for w in widgets if not w["hidden"]]
    rows = sorted({int(w["name"].rsplit("_", 1)[1]) for w in shown if w["name"].startswith("lora_")})
    overlaps = [(a["name"], b["name"]) for a, b in zip(shown, shown[1:]) if b["y"] < a["y"] + a["height"] - 4]
    zero = [w["name"] for w in shown if not w["height"]]
    return {"rows": next(w["value"] for w in widgets if w["name"] == "rows"), "shown": rows,
            "overlaps": overlaps, "zero_height": zero}


def expect_rows(ui, node_id: int, n: int, timeout: float = 5.0) -> None:
    """The node shows rows 1..n, laid out without overlaps (polled: the canvas lays out on its next frame)."""
    expected = {"rows": n, "shown": list(range(1, n + 1)), "overlaps": [], "zero_height": []}
    deadline = time.monotonic() + timeout
    while (found := layout(ui, node_id)) != expected and time.monotonic() < deadline:
        ui.page.wait_for_timeout(100)
    assert found == expected


def test_row_buttons_show_hide_save_reload_and_queue(ui, comfy):
    ui.open_workflow(MERGE)
    stack = ui.nodes_of_type("MultiLoRAStack")[0]
    expect_rows(ui, stack, 3)  # a loaded workflow shows exactly its rows

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
    ui.page.keyboard.press("Control+s")
    name_box = ui.page.locator(".p-dialog input")
    name_box.wait_for(timeout=10_000)
    name_box.fill("rows_test")
    ui.page.keyboard.press("Enter")
    saved_path = os.path.join(comfy.base, "user", "default", "workflows", "rows_test.json")
    ui.page.wait_for_function("() => !document.querySelector('.p-dialog input')", timeout=10_000)
    ui.page.wait_for_timeout(500)
    with open(saved_path, encoding="utf-8") as f:
        saved = json.load(f)
    values = next(n for n in saved["nodes"] if n["type"] == "MultiLoRAStack")["widgets_values"]
    assert values[0] == 4 and len(values) == 1 + 10 * len(ROW_FIELDS)  # buttons are not saved
    assert values[1 + 1 * len(ROW_FIELDS)] == "demo_style.safetensors"

    # Reload the page: the frontend restores the open workflow, rows and visibility included.
    ui.reload()
    stack = ui.nodes_of_type("MultiLoRAStack")[0]
    expect_rows(ui, stack, 4)
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


def test_a_new_stack_starts_with_one_row_and_grows(ui):
    ui.search_and_add("LoRA Stack", "LoRA Stack")
    stack = ui.nodes_of_type("MultiLoRAStack")[0]
    expect_rows(ui, stack, 1)
    for n in range(2, 11):
        ui.click_widget(stack, ADD)
        expect_rows(ui, stack, n)
    ui.click_widget(stack, ADD)
    expect_rows(ui, stack, 10)  # at most the node's ten rows
    size = ui.js("id => window.app.graph.getNodeById(id).size[1]", stack)
    for _ in range(9):
        ui.click_widget(stack, REMOVE)
    expect_rows(ui, stack, 1)
    assert ui.js("id => window.app.graph.getNodeById(id).size[1]", stack) < size / 3  # the node shrinks back
