"""The committed composition testbed (testbed/, issue 9) loads as real ComfyUI objects and is sound.

The trained weights are the ones testbed/train.py produced on the GPU; these checks run on the CPU: size
budget, text encoding used in training == CLIPTextEncode's, every LoRA key lands on the model through
ComfyUI's key map, the detector's held-out accuracy, and the pack's engine applying a testbed LoRA equals
ComfyUI's merged LoRA on the trained model.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

from support.pack_loader import REPO_ROOT

TESTBED = os.path.join(REPO_ROOT, "testbed")
WEIGHTS = os.path.join(TESTBED, "weights")
CATEGORIES = ("character", "clothing", "background", "object", "style")


@pytest.fixture(scope="module")
def tb():
    if TESTBED not in sys.path:
        sys.path.insert(0, TESTBED)  # the testbed folder only: the repo root must stay off sys.path
    import comfy_model
    import detector
    import world
    return comfy_model, detector, world


@pytest.fixture(scope="module")
def trained(tb):
    comfy_model = tb[0]
    return comfy_model.load_testbed(WEIGHTS, device=torch.device("cpu"))


def test_weights_stay_within_the_25_mb_budget():
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(WEIGHTS) for f in files)
    assert total <= 25 * 2**20, total
    assert sorted(os.listdir(os.path.join(WEIGHTS, "loras"))) == sorted(f"testbed_{c}.safetensors" for c in CATEGORIES)


def test_training_text_encoding_equals_clip_text_encode(tb, trained):
    comfy_model = tb[0]
    clip = trained[1]
    text = "a zorb wearing a plaid vest on the left and a lantern on the right, brick background, duotone style"
    reference = clip.encode_from_tokens(clip.tokenize(text))
    with torch.no_grad():
        ours = comfy_model.encode_ids(clip, [comfy_model.token_ids(clip, text)[0]])
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("category", CATEGORIES)
def test_every_lora_key_lands_on_the_trained_unet(trained, category):
    import comfy.lora
    import comfy.utils
    sd = comfy.utils.load_torch_file(os.path.join(WEIGHTS, "loras", f"testbed_{category}.safetensors"), safe_load=True)
    patches = comfy.lora.load_lora(sd, comfy.lora.model_lora_keys_unet(trained[0].model, {}))
    assert len(patches) == sum(k.endswith(".alpha") for k in sd) == 120
    assert all(k.startswith("lora_unet_") for k in sd)


def test_detector_accuracy_on_held_out_renders(tb):
    _, detector, world = tb
    net = detector.load_detector(os.path.join(WEIGHTS, "detector.safetensors"))
    gen = torch.Generator().manual_seed(2024)  # not the training stream nor train.py's held-out seed
    scenes = world.random_scenes(1024, gen, any_concept=0.4)
    accuracy = detector.evaluate(net, world.render(scenes, gen), scenes)
    assert min(accuracy.values()) >= 0.95, accuracy


def test_engine_with_a_testbed_lora_equals_comfy_merge(ml, tb, trained):
    import comfy.sd
    import comfy.utils
    import folder_paths
    world = tb[2]
    model, clip = trained
    folder_paths.add_model_folder_path("loras", os.path.join(WEIGHTS, "loras"))
    rows = (ml("core.stack").LoraRow("testbed_object.safetensors", 1.0),)
    engine = ml("host.engine")
    ours = engine.clone_with_engine(model, engine.build_engine(model, rows, "test"))
    sd = comfy.utils.load_torch_file(os.path.join(WEIGHTS, "loras", "testbed_object.safetensors"), safe_load=True)
    merged, _ = comfy.sd.load_lora_for_models(model, None, sd, 1.0, 0.0)
    import comfy.sample
    cond, pooled = clip.encode_from_tokens(clip.tokenize("a lantern on the right, gray background"), return_pooled=True)
    positive = [[cond, {"pooled_output": pooled}]]
    latent = torch.zeros(2, 4, world.SIZE, world.SIZE)
    noise = comfy.sample.prepare_noise(latent, 3)
    outs = [comfy.sample.sample(m, noise, 4, 5.0, "euler", "normal", positive, positive, latent, seed=3,
                                disable_pbar=True) for m in (ours, merged, model)]
    torch.testing.assert_close(outs[0], outs[1], atol=1e-3, rtol=1e-3)
    assert (outs[1] - outs[2]).abs().max() > 1e-2  # the LoRA changes the image
