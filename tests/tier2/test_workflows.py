"""Every workflow in example_workflows/ runs through ComfyUI's real validator and executor.

Each UI-format workflow is converted to an API prompt the way the frontend does
(``support.workflow_api.ui_to_api``), scaled down (64x64 latent, 4 steps) and pointed at the tiny
real-format SD1.5 checkpoint; the demo LoRAs it references are written into the loras folder under
their own names. The Flux workflow keeps its loaders (UNETLoader, DualCLIPLoader, VAELoader) and runs on tiny
Flux.1-dev files under its own file names (``support.tiny_flux_files``: a real-format DiT, CLIP-L, VAE and a
T5 in T5-XXL's layout at tiny sizes, the one size ComfyUI takes from the test instead of the file).
The run must end with a real, non-constant PNG from SaveImage (and, in the CLoRA
workflows, a preview PNG from CLoRA Mask Preview; in the Compare workflow, its grid and its table).
"""
from __future__ import annotations

import copy
import glob
import json
import os
import re
import uuid

import numpy as np
import pytest
from PIL import Image

import folder_paths
import nodes

from support.executor import PromptFailed, run_prompt
from support.pack_loader import REPO_ROOT
from support.saved_images import compare_methods, saved_image_size
from support.tiny_checkpoint import DEMO_LORAS, ensure_demo_loras, ensure_tiny_checkpoint
from support.workflow_api import (
    CONTROL_AFTER_GENERATE,
    CONTROL_VALUES,
    WorkflowError,
    ui_to_api,
    unknown_node_types,
    widget_names,
)

WORKFLOWS_DIR = os.path.join(REPO_ROOT, "example_workflows")
WORKFLOW_FILES = sorted(glob.glob(os.path.join(WORKFLOWS_DIR, "*.json")))
METHOD_WORKFLOWS = ("multilora_merge.json", "multilora_switch.json", "multilora_composite.json", "multilora_cmlora.json")
"""Same stack and prompts, one per method; their images compare side by side."""
CLORA_WORKFLOWS = ("multilora_clora_two_subjects.json", "multilora_clora_subject_style.json")
"""KSampler (CLoRA) with its prompts in its own widgets and a stack of subject rows (+ a style row)."""
COMPARE_WORKFLOW = "multilora_compare.json"
"""The Compare node on the method workflows' stack, prompts and settings."""
COMPARE_TABLE_ROWS = {"merge": "Merge", "lora_switch": "LoRA Switch", "lora_composite": "LoRA Composite",
                      "clora": "CLoRA", "cmlora": "CMLoRA"}
"""The Compare node's run_* toggles and the method names its table and grid labels use."""
REGIONAL_WORKFLOWS = ("multilora_regional_sdxl.json", "multilora_regional_flux.json")
"""KSampler (Regional LoRA): two subject rows with left/right masks made by core SolidMask + MaskComposite, a style
row without a mask; the same on SDXL and on Flux.1-dev."""
FLUX_WORKFLOWS = ("multilora_regional_flux.json",)
"""Loaded as Flux.1-dev is (UNETLoader, DualCLIPLoader type flux, VAELoader): run on the tiny Flux files."""
EXPECTED = set(METHOD_WORKFLOWS) | set(CLORA_WORKFLOWS) | {COMPARE_WORKFLOW} | set(REGIONAL_WORKFLOWS)
TEST_SIZE = 64
TEST_STEPS = 4
TEST_REFINE_ITERS = 2
SAMPLING_KEYS = ("seed", "steps", "cfg", "sampler_name", "scheduler", "denoise")


def load(path: str) -> dict:
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def sampler_id(prompt: dict) -> str:
    """The one node of the prompt that samples (has a seed and a latent_image input)."""
    found = [k for k, v in prompt.items() if "seed" in v["inputs"] and "latent_image" in v["inputs"]]
    assert len(found) == 1, f"expected one sampler node, found {found}"
    return found[0]


def linked_id(prompt: dict, node_id: str, name: str) -> str:
    """Id of the node feeding input ``name`` of node ``node_id``."""
    source = prompt[node_id]["inputs"][name]
    assert isinstance(source, list), f"{prompt[node_id]['class_type']}.{name} is not linked"
    return source[0]


def linked(prompt: dict, node_id: str, name: str) -> dict:
    return prompt[linked_id(prompt, node_id, name)]


def png_pixels(file: str, size: tuple[int, int] = (TEST_SIZE, TEST_SIZE)) -> np.ndarray:
    """RGB pixels of a valid PNG of ``size`` (width, height), as float32."""
    with Image.open(file) as image:
        image.verify()
    with Image.open(file) as image:
        assert image.format == "PNG" and image.size == size, (image.format, image.size)
        pixels = np.asarray(image.convert("RGB"), dtype=np.float32)
    assert np.isfinite(pixels).all()
    return pixels


def stack_rows(stack: dict) -> list[dict]:
    """The used rows (1..rows) of a LoRA Stack node's inputs, as {field: value}."""
    fields = ("lora", "on", "strength_model", "strength_clip", "category", "concept", "trigger")
    return [{f: stack[f"{f}_{n}"] for f in fields} for n in range(1, stack["rows"] + 1)]


def in_prompt(words: str, prompt: str) -> bool:
    """Whether ``words`` occur in ``prompt`` as whole words (case-insensitive), as CLoRA looks for them."""
    pattern = r"(?<![^\W_])" + r"\s+".join(map(re.escape, words.split())) + r"(?![^\W_])"
    return re.search(pattern, prompt, re.IGNORECASE) is not None


def scaled_for_test(prompt: dict, ckpt_name: str | None, prefix: str) -> dict:
    """Small sizes and the tiny checkpoint; LoRA switching every step so 4 steps still cycle; CLoRA with
    2 refinement iterations (instead of 20) at its refinement steps."""
    prompt = copy.deepcopy(prompt)
    for node in prompt.values():
        inputs = node["inputs"]
        if node["class_type"] in ("EmptyLatentImage", "EmptySD3LatentImage"):
            inputs.update(width=TEST_SIZE, height=TEST_SIZE, batch_size=1)
        if "ckpt_name" in inputs and ckpt_name is not None:
            inputs["ckpt_name"] = ckpt_name
        if "steps" in inputs and not isinstance(inputs["steps"], list):
            inputs["steps"] = TEST_STEPS
        if "switch_every" in inputs and not isinstance(inputs["switch_every"], list):
            inputs["switch_every"] = 1
        if "refine_iters" in inputs and not isinstance(inputs["refine_iters"], list):
            inputs["refine_iters"] = TEST_REFINE_ITERS
        if node["class_type"] == "SaveImage":
            inputs["filename_prefix"] = prefix
    return prompt


@pytest.fixture(scope="module")
def demo_files(comfy_state) -> str:
    """The tiny checkpoint (its file name is returned) and the demo LoRAs, in ComfyUI's folders."""
    ckpt = ensure_tiny_checkpoint(comfy_state["checkpoints_dir"])
    ensure_demo_loras(comfy_state["loras_dir"], os.path.join(comfy_state["checkpoints_dir"], ckpt))
    return ckpt


def test_the_method_workflows_exist():
    assert EXPECTED <= {os.path.basename(p) for p in WORKFLOW_FILES}


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=os.path.basename)
def test_workflow_matches_the_node_definitions(path):
    workflow = load(path)
    assert unknown_node_types(workflow) == []
    for node in workflow["nodes"]:
        names = widget_names(nodes.NODE_CLASS_MAPPINGS[node["type"]])
        values = node.get("widgets_values") or []
        assert len(values) == len(names), f"node {node['id']} {node['type']}: {values} vs widgets {names}"
        for name, value in zip(names, values):
            if name == CONTROL_AFTER_GENERATE:
                assert value in CONTROL_VALUES
    link_ids = {link[0] for link in workflow["links"]}
    for link in workflow["links"]:
        _, origin, slot, target, target_slot, kind = link
        source = next(n for n in workflow["nodes"] if n["id"] == origin)
        dest = next(n for n in workflow["nodes"] if n["id"] == target)
        assert link[0] in source["outputs"][slot]["links"]
        assert dest["inputs"][target_slot]["link"] == link[0]
        assert source["outputs"][slot]["type"] == kind
        assert dest["inputs"][target_slot]["type"] in (kind, "*")  # "*": an any-type input (Preview as Text)
    assert workflow["last_link_id"] == max(link_ids)
    assert workflow["last_node_id"] == max(n["id"] for n in workflow["nodes"])


@pytest.fixture(scope="module")
def flux_files(comfy_state) -> dict:
    """The tiny Flux.1-dev files under the Flux workflow's names, and its LoRAs (support.tiny_flux_files)."""
    from support import tiny_flux_files
    return tiny_flux_files.write_flux_files(os.path.join(os.path.dirname(comfy_state["loras_dir"]), "flux_models"))


@pytest.mark.parametrize("path", WORKFLOW_FILES, ids=os.path.basename)
def test_workflow_runs_in_comfyui(path, request, monkeypatch):
    stem = os.path.splitext(os.path.basename(path))[0]
    prefix = f"test_workflows/{stem}-{uuid.uuid4().hex[:8]}"
    flux = os.path.basename(path) in FLUX_WORKFLOWS
    files = request.getfixturevalue("flux_files" if flux else "demo_files")
    prompt = scaled_for_test(ui_to_api(load(path)), None if flux else files, prefix)
    lora_names = set(folder_paths.get_filename_list("loras"))
    for node in prompt.values():
        for key, value in node["inputs"].items():
            if key.startswith("lora_") and isinstance(value, str) and value != "None":
                assert value in lora_names, f"{stem} references {value}, which the test does not provide"

    if flux:
        from support.tiny_flux_files import tiny_t5_sizes
        with tiny_t5_sizes(monkeypatch):
            server = run_prompt(prompt)
    else:
        server = run_prompt(prompt)

    # The stub server has no client id, so ComfyUI sends no 'executed' messages: find the file instead.
    files = glob.glob(os.path.join(folder_paths.get_output_directory(), prefix + "_*.png"))
    assert len(files) == 1, f"SaveImage wrote {files}"
    save = next(k for k, v in prompt.items() if v["class_type"] == "SaveImage")
    pixels = png_pixels(files[0], saved_image_size(prompt, save, TEST_SIZE))
    assert pixels.std() > 1.0, "the decoded image is (nearly) constant"

    # The Compare node's table goes to Preview as Text, which shows it on the node (the UI outputs).
    for node_id, node in prompt.items():
        if node["class_type"] != "PreviewAny":
            continue
        compare = linked(prompt, node_id, "source")
        assert compare["class_type"] == "MultiLoRACompare"
        shown = server.history_result["outputs"].get(node_id, {}).get("text")
        assert shown and len(shown) == 1, f"Preview as Text {node_id} showed {shown}"
        chosen = compare_methods(compare["inputs"])
        for toggle, method in COMPARE_TABLE_ROWS.items():
            assert (f"| {method} | " in shown[0]) == (toggle in chosen), shown[0]
        assert "skipped" not in shown[0], shown[0]

    # CLoRA Mask Preview is an output node: its preview is in the executor's UI outputs (what the frontend
    # shows) and, as a file, in ComfyUI's temp folder.
    previews = [k for k, v in prompt.items() if v["class_type"] == "MultiLoRAMaskPreview"]
    if os.path.basename(path) in CLORA_WORKFLOWS:
        assert previews, f"{stem} has no CLoRA Mask Preview"
    for node_id in previews:
        shown = server.history_result["outputs"].get(node_id, {}).get("images")
        assert shown and len(shown) == 1, f"Mask Preview {node_id} showed {shown}"
        assert shown[0]["type"] == "temp"
        file = os.path.join(folder_paths.get_temp_directory(), shown[0]["subfolder"], shown[0]["filename"])
        assert os.path.isfile(file), f"the Mask Preview image {file} is missing"
        overlay = png_pixels(file)  # the masks drawn over the decoded image (wired from VAE Decode)
        assert overlay.std() > 1.0, "the mask preview is (nearly) constant"


def workflow_summary(prompt: dict) -> dict:
    """What must match across workflows: sampling settings, prompts, latent, stack, checkpoint."""
    sampler = sampler_id(prompt)
    inputs = prompt[sampler]["inputs"]
    latent = linked(prompt, sampler, "latent_image")
    checkpoints = [n["inputs"]["ckpt_name"] for n in prompt.values() if n["class_type"] == "CheckpointLoaderSimple"]
    if prompt[sampler]["class_type"] == "MultiLoRACompare":
        # Compare encodes the prompts itself (with the stack's CLIP parts, as each method's own workflow does)
        # and always denoises fully; model, CLIP and VAE come from the checkpoint untouched.
        positive, negative = inputs["prompt"], inputs["negative_prompt"]
        for name in ("model", "clip", "vae"):
            assert linked(prompt, sampler, name)["class_type"] == "CheckpointLoaderSimple"
        inputs = {**inputs, "denoise": 1.0}
        stack = linked(prompt, sampler, "lora_stack")
    elif prompt[sampler]["class_type"] == "MultiLoRACLoRASampler":
        # CLoRA encodes its prompt variants itself (each with only its LoRA's CLIP part): the prompts are its
        # own widgets, and model and CLIP come from the checkpoint untouched (no Apply LoRA Stack, which
        # would apply every LoRA's text-encoder part to every variant).
        positive, negative = inputs["prompt"], inputs["negative_prompt"]
        assert linked(prompt, sampler, "model")["class_type"] == "CheckpointLoaderSimple"
        assert linked(prompt, sampler, "clip")["class_type"] == "CheckpointLoaderSimple"
        assert "MultiLoRAApplyStack" not in {n["class_type"] for n in prompt.values()}
        stack = linked(prompt, sampler, "lora_stack")
    else:
        positive = linked(prompt, sampler, "positive")["inputs"]["text"]
        negative = linked(prompt, sampler, "negative")["inputs"]["text"]
        for side in ("positive", "negative"):  # the LoRAs' text-encoder parts reach both prompts
            encoder = linked_id(prompt, sampler, side)
            assert linked(prompt, encoder, "clip")["class_type"] == "MultiLoRAApplyStack"
        stack = linked(prompt, sampler, "lora_stack") if "lora_stack" in inputs else None
        if stack is None:  # Merge: the stack feeds Apply LoRA Stack, which feeds the sampler's model
            stack = linked(prompt, sampler, "model")
            assert stack["class_type"] == "MultiLoRAApplyStack"
            stack = prompt[stack["inputs"]["lora_stack"][0]]
    assert stack["class_type"] == "MultiLoRAStack"
    return {
        "settings": {k: inputs[k] for k in SAMPLING_KEYS},
        "positive": positive,
        "negative": negative,
        "latent": {k: latent["inputs"][k] for k in ("width", "height", "batch_size")},
        "stack": stack["inputs"],
        "checkpoints": checkpoints,
    }


def test_method_workflows_are_comparable():
    """Same checkpoint, seed, sampling settings, prompts, latent size and LoRA rows in every method."""
    summaries = {name: workflow_summary(ui_to_api(load(os.path.join(WORKFLOWS_DIR, name)))) for name in METHOD_WORKFLOWS}
    reference = summaries["multilora_merge.json"]
    for name, summary in summaries.items():
        assert summary == reference, f"{name} differs from the Merge workflow"
    assert reference["settings"]["seed"] == 42 and reference["settings"]["steps"] == 20
    used = [reference["stack"][f"lora_{n}"] for n in range(1, reference["stack"]["rows"] + 1)]
    assert used == [d.filename for d in DEMO_LORAS]


def test_compare_workflow_runs_the_method_workflows_side_by_side():
    """The Compare workflow is the method workflows in one node: the same checkpoint, seed, sampling settings,
    prompts, latent and LoRA rows, Switch's switch_every, and one tile for each of their methods (CLoRA,
    which needs a two-subject prompt, has workflows of its own)."""
    path = os.path.join(WORKFLOWS_DIR, COMPARE_WORKFLOW)
    prompt = ui_to_api(load(path))
    reference = workflow_summary(ui_to_api(load(os.path.join(WORKFLOWS_DIR, "multilora_merge.json"))))
    assert workflow_summary(prompt) == reference
    compare = prompt[sampler_id(prompt)]
    switch = ui_to_api(load(os.path.join(WORKFLOWS_DIR, "multilora_switch.json")))
    assert compare["inputs"]["switch_every"] == switch[sampler_id(switch)]["inputs"]["switch_every"]
    assert compare_methods(compare["inputs"]) == ["merge", "lora_switch", "lora_composite", "cmlora"]
    outputs = {n["class_type"]: n for n in prompt.values() if n["class_type"] in ("SaveImage", "PreviewAny")}
    assert outputs["SaveImage"]["inputs"]["images"] == [sampler_id(prompt), 0]  # the grid
    assert outputs["PreviewAny"]["inputs"]["source"] == [sampler_id(prompt), 1]  # the table


def test_clora_workflows_are_comparable_with_the_methods():
    """CLoRA needs two subjects, so its prompt and stack differ from the method workflows'; everything
    else (checkpoint, seed, steps, CFG, sampler, scheduler, denoise, negative prompt, latent, the strengths
    of each LoRA file) is the Merge workflow's. Every concept row's word is in the prompt."""
    reference = workflow_summary(ui_to_api(load(os.path.join(WORKFLOWS_DIR, "multilora_merge.json"))))
    reference_rows = {row["lora"]: row for row in stack_rows(reference["stack"])}
    demo_files = {d.filename for d in DEMO_LORAS}
    summaries = {name: workflow_summary(ui_to_api(load(os.path.join(WORKFLOWS_DIR, name)))) for name in CLORA_WORKFLOWS}
    for name, summary in summaries.items():
        for key in ("settings", "negative", "latent", "checkpoints"):
            assert summary[key] == reference[key], f"{name}: {key} differs from the Merge workflow"
        rows = stack_rows(summary["stack"])
        assert all(row["on"] for row in rows) and {row["lora"] for row in rows} <= demo_files
        for row in rows:
            same_file = reference_rows[row["lora"]]
            assert (row["strength_model"], row["strength_clip"]) == (same_file["strength_model"], same_file["strength_clip"])
        subjects = [row for row in rows if row["category"] != "style"]
        assert len(subjects) >= 2, f"{name}: CLoRA needs at least 2 concept rows"
        for row in subjects:
            assert row["concept"].strip() and in_prompt(row["concept"], summary["positive"]), \
                f"{name}: concept '{row['concept']}' is not a word of the prompt '{summary['positive']}'"
        assert len({row["lora"] for row in rows}) == len(rows)  # each LoRA file once
    two, styled = (summaries[name] for name in CLORA_WORKFLOWS)
    two_rows, styled_rows = stack_rows(two["stack"]), stack_rows(styled["stack"])
    # subject + style = the two subjects plus a style row and its words at the end of the prompt
    assert styled_rows[:len(two_rows)] == two_rows and len(styled_rows) == len(two_rows) + 1
    assert styled_rows[-1]["category"] == "style"
    assert styled["positive"].startswith(two["positive"]) and styled["positive"] != two["positive"]
    assert in_prompt(reference_rows[styled_rows[-1]["lora"]]["concept"], styled["positive"])


def test_unknown_node_type_is_detected():
    workflow = load(os.path.join(WORKFLOWS_DIR, "multilora_merge.json"))
    broken = copy.deepcopy(workflow)
    victim = next(n for n in broken["nodes"] if n["type"] == "MultiLoRAStack")
    victim["type"] = "MultiLoRANoSuchNode"
    assert unknown_node_types(broken) == ["MultiLoRANoSuchNode"]
    with pytest.raises(WorkflowError, match="MultiLoRANoSuchNode"):
        ui_to_api(broken)
    assert unknown_node_types(workflow) == []  # the copy was broken, not the file

    # ComfyUI's own validator refuses it as well (nothing executes).
    prompt = ui_to_api(workflow)
    prompt[str(victim["id"])]["class_type"] = "MultiLoRANoSuchNode"
    with pytest.raises(PromptFailed, match="MultiLoRANoSuchNode"):
        run_prompt(prompt)


def test_ui_to_api_maps_widgets_in_frontend_order():
    workflow = load(os.path.join(WORKFLOWS_DIR, "multilora_switch.json"))
    by_type = {n["type"]: str(n["id"]) for n in workflow["nodes"]}
    prompt = ui_to_api(workflow)
    sampler = prompt[by_type["MultiLoRASwitchSampler"]]["inputs"]
    assert sampler == {  # the saved "fixed" after the seed is the frontend's control widget, not sent
        "seed": 42, "steps": 20, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
        "switch_every": 5, "schedule": "⌊i/τ⌋ mod k", "model": [by_type["CheckpointLoaderSimple"], 0],
        "lora_stack": [by_type["MultiLoRAStack"], 0],
        "positive": [sampler["positive"][0], 0], "negative": [sampler["negative"][0], 0],
        "latent_image": [by_type["EmptyLatentImage"], 0],
    }
    stack = prompt[by_type["MultiLoRAStack"]]["inputs"]
    assert len(stack) == 1 + 10 * 7 and stack["rows"] == 3
    assert {k: stack[f"{k}_2"] for k in ("lora", "on", "strength_model", "strength_clip", "category", "concept")} == {
        "lora": "demo_style.safetensors", "on": True, "strength_model": 0.8, "strength_clip": 0.8,
        "category": "style", "concept": "oil painting"}
    assert stack["lora_10"] == "None"
    assert prompt[by_type["MultiLoRAApplyStack"]]["inputs"] == {
        "lora_stack": [by_type["MultiLoRAStack"], 0], "clip": [by_type["CheckpointLoaderSimple"], 1],
        "unfit_lora": "error"}


def test_ui_to_api_maps_clora_widgets_in_frontend_order():
    workflow = load(os.path.join(WORKFLOWS_DIR, "multilora_clora_subject_style.json"))
    by_type = {n["type"]: str(n["id"]) for n in workflow["nodes"]}
    prompt = ui_to_api(workflow)
    assert prompt[by_type["MultiLoRACLoRASampler"]]["inputs"] == {
        "prompt": "a knight and a dragon in a misty forest, oil painting",
        "negative_prompt": "blurry, low quality, deformed, watermark, text",
        "seed": 42, "steps": 20, "cfg": 7.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0,
        "mask_threshold": 0.4, "temperature": 0.5, "step_size": 20.0, "opt_until": 0.5, "refine_iters": 20,
        "gradient_checkpointing": False, "variant": "pack", "mask_source": "union of variants",
        "recompute_after_update": True, "attention_halves": "cond",
        "model": [by_type["CheckpointLoaderSimple"], 0], "clip": [by_type["CheckpointLoaderSimple"], 1],
        "lora_stack": [by_type["MultiLoRAStack"], 0], "latent_image": [by_type["EmptyLatentImage"], 0],
    }
    assert prompt[by_type["MultiLoRAMaskPreview"]]["inputs"] == {
        "mask_threshold": 0.4, "step": -1, "average_steps": False,
        "attention_maps": [by_type["MultiLoRACLoRASampler"], 1], "image": [by_type["VAEDecode"], 0]}
    assert stack_rows(prompt[by_type["MultiLoRAStack"]]["inputs"]) == [
        {"lora": "demo_character.safetensors", "on": True, "strength_model": 0.8, "strength_clip": 0.8,
         "category": "character", "concept": "knight", "trigger": "sks"},
        {"lora": "demo_background.safetensors", "on": True, "strength_model": 0.8, "strength_clip": 0.8,
         "category": "object", "concept": "dragon", "trigger": ""},
        {"lora": "demo_style.safetensors", "on": True, "strength_model": 0.8, "strength_clip": 0.8,
         "category": "style", "concept": "", "trigger": ""},
    ]


def test_ui_to_api_skips_bypassed_and_muted_nodes():
    workflow = load(os.path.join(WORKFLOWS_DIR, "multilora_merge.json"))
    by_type = {n["type"]: n for n in workflow["nodes"]}
    sampler = sampler_id(ui_to_api(workflow))

    bypassed = copy.deepcopy(workflow)
    next(n for n in bypassed["nodes"] if n["type"] == "MultiLoRAApplyStack")["mode"] = 4
    prompt = ui_to_api(bypassed)
    apply_id, ckpt_id = str(by_type["MultiLoRAApplyStack"]["id"]), str(by_type["CheckpointLoaderSimple"]["id"])
    assert apply_id not in prompt
    assert prompt[sampler]["inputs"]["model"] == [ckpt_id, 0]  # MODEL passes through the bypassed node
    positive = prompt[sampler]["inputs"]["positive"][0]
    assert prompt[positive]["inputs"]["clip"] == [ckpt_id, 1]  # and so does CLIP

    muted = copy.deepcopy(workflow)
    next(n for n in muted["nodes"] if n["type"] == "SaveImage")["mode"] = 2
    assert "SaveImage" not in {n["class_type"] for n in ui_to_api(muted).values()}


def test_ui_to_api_fills_defaults_for_widgets_missing_from_an_older_save():
    workflow = load(os.path.join(WORKFLOWS_DIR, "multilora_composite.json"))
    sampler = next(n for n in workflow["nodes"] if n["type"] == "MultiLoRACompositeSampler")
    sampler["widgets_values"] = sampler["widgets_values"][:-1]  # saved before 'weighting' existed
    inputs = ui_to_api(workflow)[str(sampler["id"])]["inputs"]
    assert inputs["weighting"] == "uniform" and inputs["denoise"] == 1.0
    sampler["widgets_values"] = sampler["widgets_values"] + ["uniform", "extra"]
    with pytest.raises(WorkflowError, match="widget values"):
        ui_to_api(workflow)


@pytest.mark.parametrize("name", REGIONAL_WORKFLOWS)
def test_regional_workflow_gives_each_subject_its_half(name):
    prompt = ui_to_api(load(os.path.join(WORKFLOWS_DIR, name)))
    sampler = prompt[sampler_id(prompt)]
    assert sampler["class_type"] == "MultiLoRARegionalSampler"
    regions = {}
    for slot in ("mask_1", "mask_2"):
        composite = prompt[sampler["inputs"][slot][0]]
        assert composite["class_type"] == "MaskComposite" and composite["inputs"]["operation"] == "add"
        source = prompt[composite["inputs"]["source"][0]]["inputs"]
        regions[slot] = (composite["inputs"]["x"], source["width"], source["value"])
    assert regions == {"mask_1": (0, 512, 1.0), "mask_2": (512, 512, 1.0)}
    stack = next(n for n in prompt.values() if n["class_type"] == "MultiLoRAStack")["inputs"]
    assert stack["category_3"] == "style" and "mask_3" not in sampler["inputs"]


def test_flux_regional_workflow_is_the_sdxl_one_loaded_as_flux_dev():
    """Flux.1-dev as its users load it (the diffusion model, CLIP-L + T5-XXL as DualCLIPLoader type flux, the Flux
    VAE), with its sampling (FluxGuidance 3.5 on the positive, CFG 1 so the zeroed negative is never computed,
    euler / simple, a 16-channel SD3 latent); prompt, seed, steps, masks, feather and the stack's rows (categories,
    concepts, on, strengths) are the SDXL workflow's, only the LoRA files are Flux ones."""
    flux = ui_to_api(load(os.path.join(WORKFLOWS_DIR, FLUX_WORKFLOWS[0])))
    sdxl = ui_to_api(load(os.path.join(WORKFLOWS_DIR, REGIONAL_WORKFLOWS[0])))
    sampler = flux[sampler_id(flux)]["inputs"]
    assert linked(flux, sampler_id(flux), "model")["inputs"] == {"unet_name": "flux1-dev.safetensors",
                                                                 "weight_dtype": "default"}
    guidance = linked(flux, sampler_id(flux), "positive")
    assert guidance["class_type"] == "FluxGuidance" and guidance["inputs"]["guidance"] == 3.5
    prompt_node = flux[guidance["inputs"]["conditioning"][0]]
    assert prompt_node["class_type"] == "CLIPTextEncode"
    zero = linked(flux, sampler_id(flux), "negative")
    assert zero["class_type"] == "ConditioningZeroOut" and zero["inputs"]["conditioning"] == guidance["inputs"]["conditioning"]
    loader = flux[prompt_node["inputs"]["clip"][0]]
    assert loader["class_type"] == "DualCLIPLoader" and {k: v for k, v in loader["inputs"].items() if k != "device"} == {
        "clip_name1": "clip_l.safetensors", "clip_name2": "t5xxl_fp16.safetensors", "type": "flux"}
    decode = next(n for n in flux.values() if n["class_type"] == "VAEDecode")
    assert flux[decode["inputs"]["vae"][0]]["inputs"] == {"vae_name": "ae.safetensors"}
    assert linked(flux, sampler_id(flux), "latent_image")["class_type"] == "EmptySD3LatentImage"
    assert (sampler["cfg"], sampler["sampler_name"], sampler["scheduler"]) == (1.0, "euler", "simple")

    sdxl_sampler = sdxl[sampler_id(sdxl)]["inputs"]
    same = ("seed", "steps", "denoise", "feather", "text_tokens", "mask_from")
    assert {k: sampler[k] for k in same} == {k: sdxl_sampler[k] for k in same}
    sdxl_text = linked(sdxl, sampler_id(sdxl), "positive")["inputs"]["text"]
    assert prompt_node["inputs"]["text"] == sdxl_text
    rows = stack_rows(next(n for n in flux.values() if n["class_type"] == "MultiLoRAStack")["inputs"])
    sdxl_rows = stack_rows(next(n for n in sdxl.values() if n["class_type"] == "MultiLoRAStack")["inputs"])
    keep = ("on", "strength_model", "concept", "trigger")
    assert [{k: r[k] for k in keep} for r in rows] == [{k: r[k] for k in keep} for r in sdxl_rows]
    assert [r["category"] for r in rows] == ["character", "character", "style"]
    assert [r["lora"] for r in rows] == ["demo_flux_knight.safetensors", "demo_flux_dragon.safetensors",
                                         "demo_flux_style.safetensors"]
