"""LoRA Stack node through ComfyUI's validator and executor: rows, chaining, immutability, row errors."""
import os

import pytest
import torch
from safetensors.torch import save_file

import folder_paths

from support.executor import CAPTURED, PromptFailed, capture, run_prompt


@pytest.fixture(scope="module")
def five_files(comfy_state):
    names = []
    for i in range(5):
        name = f"stack_row_{i}.safetensors"
        save_file({"lora_unet_x.lora_down.weight": torch.zeros(1, 1)}, os.path.join(comfy_state["loras_dir"], name))
        names.append(name)
    folder_paths.filename_list_cache.clear()
    return names


def stack_inputs(rows, names, **overrides):
    inputs = {"rows": rows}
    for n, name in enumerate(names, start=1):
        inputs.update({f"lora_{n}": name, f"on_{n}": True, f"strength_model_{n}": 0.1 * n,
                       f"strength_clip_{n}": 1.0, f"category_{n}": "character" if n == 1 else "style",
                       f"concept_{n}": f"word{n}", f"trigger_{n}": f"t{n}"})
    inputs.update(overrides)
    return inputs


def test_five_rows_round_trip_through_api_prompt(five_files):
    prompt = {"1": {"class_type": "MultiLoRAStack", "inputs": stack_inputs(5, five_files)},
              "2": capture(["1", 0], "stack")}
    run_prompt(prompt)
    stack = CAPTURED["stack"]
    assert [r.name for r in stack.rows] == five_files
    assert [r.strength_model for r in stack.rows] == pytest.approx([0.1, 0.2, 0.3, 0.4, 0.5])
    assert stack.rows[0].category == "character" and stack.rows[2].concept_words() == ("word3",)


def test_rows_beyond_count_are_ignored_and_widgets_may_be_missing(five_files):
    # An API prompt written by hand (or a node without its JS) may omit unused rows entirely.
    inputs = stack_inputs(2, five_files[:2])
    prompt = {"1": {"class_type": "MultiLoRAStack", "inputs": inputs}, "2": capture(["1", 0], "stack")}
    run_prompt(prompt)
    assert len(CAPTURED["stack"].rows) == 2


def test_chaining_keeps_the_input_stack(five_files):
    prompt = {"1": {"class_type": "MultiLoRAStack", "inputs": stack_inputs(2, five_files[:2])},
              "2": {"class_type": "MultiLoRAStack", "inputs": {**stack_inputs(1, five_files[4:]), "lora_stack": ["1", 0]}},
              "3": capture(["1", 0], "first"), "4": capture(["2", 0], "chained")}
    run_prompt(prompt)
    assert [r.name for r in CAPTURED["chained"].rows] == five_files[:2] + five_files[4:]
    assert [r.name for r in CAPTURED["first"].rows] == five_files[:2]


def test_off_rows_are_kept_but_inactive(five_files):
    prompt = {"1": {"class_type": "MultiLoRAStack", "inputs": stack_inputs(2, five_files[:2], on_2=False)},
              "2": capture(["1", 0], "stack")}
    run_prompt(prompt)
    assert [r.name for r in CAPTURED["stack"].active()] == five_files[:1]


def test_empty_row_is_an_error_naming_the_row(five_files):
    prompt = {"1": {"class_type": "MultiLoRAStack", "inputs": stack_inputs(3, five_files[:2], lora_3="None")},
              "2": capture(["1", 0], "stack")}
    with pytest.raises(PromptFailed) as info:
        run_prompt(prompt)
    assert "LoRA Stack: row 3 has no LoRA file selected" in str(info.value)


def test_missing_file_is_rejected_before_running(five_files):
    prompt = {"1": {"class_type": "MultiLoRAStack", "inputs": stack_inputs(1, ["gone.safetensors"])},
              "2": capture(["1", 0], "stack")}
    with pytest.raises(PromptFailed) as info:
        run_prompt(prompt)
    assert "gone.safetensors" in str(info.value) and "lora_1" in str(info.value)
