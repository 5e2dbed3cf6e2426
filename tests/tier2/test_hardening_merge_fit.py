"""Hardening, Apply LoRA Stack (the Merge baseline): a LoRA that does not fit the model is refused before sampling,
with the message the on-the-fly methods give, unless 'unfit_lora' asks for core's behaviour (ComfyUI's loader only
logs "lora key not loaded" and skips layers whose shapes do not match).
"""
import copy
import json
import os

import pytest
import torch

import nodes

from support import hardening, lora_files, tiny_models
from support.executor import CAPTURED, PromptFailed, run_prompt
from support.hardening import (  # noqa: F401
    base_sample,
    counted,
    errors,
    fails_before_sampling,
    forget_dead_loaded_models,
    refresh,
    w,
)
from support.pack_loader import REPO_ROOT
from support.workflow_api import ui_to_api

APPLY = "Apply LoRA Stack"
IGNORE = "ignore like ComfyUI"


class CaptureLatent:
    """Test-only output node: keeps the LATENT it gets (TestCaptureAny's '*' input does not take core's LATENT)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"latent": ("LATENT",)}}

    RETURN_TYPES = ()
    FUNCTION = "keep"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def keep(self, latent):
        CAPTURED["fit"] = latent
        return ()


def apply(**kw):
    return nodes.NODE_CLASS_MAPPINGS["MultiLoRAApplyStack"].execute(**kw).result


def core_merge(w, name, strength):
    """Core's own LoraLoader on the world's model and CLIP."""
    return nodes.LoraLoader().load_lora(w.model, w.clip, name, strength, strength)


@pytest.fixture(scope="module")
def flux_lora(w):
    name = w.scratch("fit_flux.safetensors")
    lora_files.write_lora(tiny_models.build_tiny("flux"), w.path(name), "kohya", seed=7)
    refresh()
    return name


@pytest.fixture(scope="module")
def misfit_lora(w):
    """The UNet-only test LoRA with attn1.to_q's down factor one input too wide (33 for a 32-wide layer)."""
    sd = dict(w.spec.state_dict)
    down = next(k for k in sorted(sd) if k.endswith("attn1_to_q.lora_down.weight"))
    sd[down] = torch.randn(4, 33)
    return w.put("fit_down_width.safetensors", sd)


@pytest.mark.parametrize("which", ["flux_lora", "misfit_lora"])
def test_unfit_lora_is_refused_with_the_message_of_the_other_methods(w, ml, errors, request, which):
    name = request.getfixturevalue(which)
    other = fails_before_sampling(w, "composite", errors.LoraFileError, r"^KSampler \(LoRA Composite\): LoRA ",
                                  stack=w.stack([name]))
    expected = str(other).replace("KSampler (LoRA Composite): ", f"{APPLY}: ", 1)
    if which == "flux_lora":
        count = len(ml("host.lora_files").read_lora_file(w.path(name)))
        assert expected == (f"{APPLY}: LoRA '{name}' matched 0 of its {count} tensors in this SD1.5 model. It was "
                            "probably trained for another model family. Use a LoRA made for this checkpoint's family.")
    else:
        assert expected == (f"{APPLY}: LoRA '{name}' does not fit layer 'diffusion_model.input_blocks.1.1.transformer_"
                            "blocks.0.attn1.to_q.weight' (weight shape [32, 32]): the down factor of shape [4, 33] "
                            "takes 33 inputs, the layer has 32. The file is damaged or made for another model; use "
                            "a LoRA made for this checkpoint.")
    for kw in ({}, {"unfit_lora": "error"}, {"clip": w.clip}):
        with pytest.raises(errors.LoraFileError) as info:
            apply(lora_stack=w.stack([name, w.good[0]]), model=w.model, **kw)
        assert str(info.value) == expected
    w.assert_clean()


@pytest.mark.parametrize("which", ["flux_lora", "misfit_lora"])
def test_ignore_like_comfyui_merges_exactly_what_core_merges(w, request, which):
    name = request.getfixturevalue(which)
    model, clip = apply(lora_stack=w.stack([name], strengths=(0.7,)), model=w.model, clip=w.clip, unfit_lora=IGNORE)
    core_model, core_clip = core_merge(w, name, 0.7)
    assert sorted(model.patches) == sorted(core_model.patches)
    assert sorted(clip.patcher.patches) == sorted(core_clip.patcher.patches)
    if which == "flux_lora":
        assert model.patches == {}  # nothing of it fits: core logs every key and merges nothing
    w.assert_clean()


def test_text_encoder_only_lora_is_not_an_unfit_lora(w):
    """Only CLIP tensors: the model part is empty, not foreign, and the CLIP part merges as core does."""
    name = w.scratch("fit_te_only.safetensors")
    lora_files.write_te_lora(w.clip, w.path(name), seed=8)
    refresh()
    model, clip = apply(lora_stack=w.stack([name]), model=w.model, clip=w.clip)
    _, core_clip = core_merge(w, name, 0.8)
    assert model.patches == {} and sorted(clip.patcher.patches) == sorted(core_clip.patcher.patches) != []
    w.assert_clean()


def test_through_the_executor_before_sampling_and_saved_prompts_without_the_input(w, misfit_lora):
    """An API prompt without 'unfit_lora' (saved before it existed) gets 'error': Apply LoRA Stack stops the run
    before the KSampler's first UNet call; with 'ignore like ComfyUI' the same prompt samples. On a model of its
    own: core's KSampler leaves the merged weights in place until ComfyUI unloads the model."""
    nodes.NODE_CLASS_MAPPINGS.setdefault("TestHardeningInputs", hardening.HardeningInputs)
    nodes.NODE_CLASS_MAPPINGS.setdefault("TestFitCaptureLatent", CaptureLatent)
    model, counter = counted(tiny_models.build_tiny("sd15", seed=0))
    hardening.INPUTS["fit"] = (model, w.clip, tiny_models.make_conditioning("sd15", seed=1),
                               tiny_models.make_conditioning("sd15", seed=2), {"samples": torch.zeros(1, 4, 8, 8)})
    stack = {"rows": 1, "lora_1": misfit_lora, "strength_model_1": 0.5, "strength_clip_1": 0.5}
    prompt = {"in": {"class_type": "TestHardeningInputs", "inputs": {"key": "fit"}},
              "s": {"class_type": "MultiLoRAStack", "inputs": stack},
              "a": {"class_type": "MultiLoRAApplyStack", "inputs": {"lora_stack": ["s", 0], "model": ["in", 0]}},
              "k": {"class_type": "KSampler", "inputs": {"model": ["a", 0], "seed": 3, "steps": 2, "cfg": 5.0,
                                                         "sampler_name": "euler", "scheduler": "normal",
                                                         "positive": ["in", 2], "negative": ["in", 3],
                                                         "latent_image": ["in", 4], "denoise": 1.0}},
              "c": {"class_type": "TestFitCaptureLatent", "inputs": {"latent": ["k", 0]}}}
    try:
        with pytest.raises(PromptFailed) as info:
            run_prompt(prompt)
        assert info.value.details["node_id"] == "a"
        assert info.value.details["exception_message"].strip().startswith(
            f"{APPLY}: LoRA '{misfit_lora}' does not fit layer ")
        assert counter.calls == 0
        prompt["a"]["inputs"]["unfit_lora"] = IGNORE
        run_prompt(prompt)
        assert counter.calls > 0 and torch.isfinite(CAPTURED["fit"]["samples"]).all()
    finally:
        hardening.INPUTS.pop("fit", None)


def test_workflow_saved_before_unfit_lora_existed_loads_with_error():
    """As the frontend loads it: the missing widget value gets the input's default."""
    with open(os.path.join(REPO_ROOT, "example_workflows", "multilora_merge.json"), encoding="utf-8") as f:
        workflow = json.load(f)
    old = copy.deepcopy(workflow)
    node = next(n for n in old["nodes"] if n["type"] == "MultiLoRAApplyStack")
    assert node["widgets_values"] == ["error"]
    node["widgets_values"] = []
    for saved in (workflow, old):
        prompt = ui_to_api(saved)
        assert prompt[str(node["id"])]["inputs"]["unfit_lora"] == "error"
