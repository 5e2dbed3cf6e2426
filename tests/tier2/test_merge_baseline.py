"""Apply LoRA Stack (the Merge baseline) == a chain of core LoraLoader nodes, bit for bit."""
import os

import pytest
import torch

import folder_paths
import nodes

from support import lora_files, tiny_models


@pytest.fixture(scope="module")
def setup(comfy_state, ml):
    model = tiny_models.build_tiny("sd15", seed=0)
    clip = tiny_models.build_tiny_clip(seed=0)
    names = []
    for seed, fmt in ((21, "kohya"), (22, "locon"), (23, "loha")):
        name = f"merge_{fmt}.safetensors"
        lora_files.write_lora(model, os.path.join(comfy_state["loras_dir"], name), fmt, seed=seed,
                              clip=clip if fmt == "kohya" else None)
        names.append(name)
    folder_paths.filename_list_cache.clear()
    stack_mod = ml("core.stack")
    rows = (stack_mod.LoraRow(names[0], 0.8, 0.6), stack_mod.LoraRow(names[1], -0.5, 1.0),
            stack_mod.LoraRow(names[2], 1.2, 1.0), stack_mod.LoraRow(names[0], 1.0, 1.0, enabled=False))
    return model, clip, names, stack_mod.LoraStack(rows)


def image(model, clip):
    positive = nodes.CLIPTextEncode().encode(clip, "a cat wearing a hat")[0]
    negative = nodes.CLIPTextEncode().encode(clip, "blurry")[0]
    latent = tiny_models.make_latent("sd15")
    samples = nodes.common_ksampler(model, 7, 5, 6.0, "dpmpp_2m", "karras", positive, negative, latent)[0]["samples"]
    return samples, positive[0][0]


def test_apply_stack_equals_chained_core_lora_loaders_bit_for_bit(setup, comfy_state):
    model, clip, names, stack = setup
    apply_node = nodes.NODE_CLASS_MAPPINGS["MultiLoRAApplyStack"]
    out = apply_node.execute(lora_stack=stack, model=model, clip=clip)
    ours_model, ours_clip = out.result if hasattr(out, "result") else out
    core_model, core_clip = model, clip
    for row in stack.active():
        core_model, core_clip = nodes.LoraLoader().load_lora(core_model, core_clip, row.name,
                                                             row.strength_model, row.strength_clip)
    ours, ours_cond = image(ours_model, ours_clip)
    core, core_cond = image(core_model, core_clip)
    plain, plain_cond = image(model, clip)
    assert torch.equal(ours, core) and torch.equal(ours_cond, core_cond)
    assert (ours - plain).abs().max() > 1e-2 and (ours_cond - plain_cond).abs().max() > 1e-3
    # the user's model and clip are untouched
    assert model.patches == {} and clip.patcher.patches == {}
    assert torch.equal(image(model, clip)[0], plain)


def test_clip_only_and_missing_inputs(setup):
    model, clip, names, stack = setup
    apply_node = nodes.NODE_CLASS_MAPPINGS["MultiLoRAApplyStack"]
    out = apply_node.execute(lora_stack=stack, clip=clip)
    ours_model, ours_clip = out.result
    assert ours_model is None and ours_clip.patcher.patches
    with pytest.raises(ValueError, match="Apply LoRA Stack: connect 'model', 'clip' or both."):
        apply_node.execute(lora_stack=stack)
