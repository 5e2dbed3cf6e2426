"""The committed composition testbed v3 (testbed/) loads as real ComfyUI objects and is sound.

Both testbeds — the SD1.5-class UNet and the tiny Flux-architecture DiT — with the weights testbed/train.py made
on the GPU; CPU checks: size budget, the training forwards equal ComfyUI's (text encoder with its pooled output,
the DiT's autograd forward, the FLOW parameterisation of the DiT's sampling), LoRA files in train.py's layout
land on every adapted layer through ComfyUI's key map and the pack's engine applies them as ComfyUI's merge
does, the detector's held-out accuracy. The trained LoRAs, when committed, are checked the same way.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

from support.pack_loader import REPO_ROOT

TESTBED = os.path.join(REPO_ROOT, "testbed")
WEIGHTS = os.path.join(TESTBED, "weights")
ARCHS = ("unet", "dit")


@pytest.fixture(scope="module")
def tb():
    if TESTBED not in sys.path:
        sys.path.insert(0, TESTBED)  # the testbed folder only: the repo root must stay off sys.path
    import comfy_model
    import detector
    import dit_model
    import objectives
    import train
    import world
    return {"comfy_model": comfy_model, "detector": detector, "dit_model": dit_model, "objectives": objectives,
            "train": train, "world": world}


@pytest.fixture(scope="module")
def trained(tb):
    return {arch: tb["objectives"].load(arch, WEIGHTS, torch.device("cpu")) for arch in ARCHS}


def random_lora(tb, arch, patcher, path, seed=0):
    """A LoRA file exactly as train.py writes one (kohya keys, rank 4), with random non-zero factors."""
    from safetensors.torch import save_file
    gen = torch.Generator().manual_seed(seed)
    layers = {n: tb["train"].LoraLayer(m, 4, gen)
              for n, m in tb["objectives"].lora_targets(arch, patcher.model.diffusion_model).items()}
    for layer in layers.values():
        layer.up.data.normal_(0, 0.05, generator=gen)
    save_file(tb["train"].kohya_state(arch, patcher, layers, 4), path)
    return len(layers)


def test_weights_stay_within_the_25_mb_budget_and_have_the_v3_layout():
    total = sum(os.path.getsize(os.path.join(d, f)) for d, _, files in os.walk(WEIGHTS) for f in files)
    assert total <= 25 * 2**20, total
    for name in ("unet.safetensors", "clip.safetensors", "detector.safetensors", "dit/dit.safetensors",
                 "dit/clip.safetensors"):
        assert os.path.isfile(os.path.join(WEIGHTS, name)), name


def test_training_text_encoding_and_pooled_output_equal_clip_text_encode(tb, trained):
    cm = tb["comfy_model"]
    clip = trained["dit"][1]
    text = "a zorb creature wearing a plaid vest on the left and a lantern lamp on the right, brick wall background"
    reference, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    with torch.no_grad():
        ours, ours_pooled = cm.encode_ids_pooled(clip, [cm.token_ids(clip, text)[0]])
    torch.testing.assert_close(ours, reference, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours_pooled, pooled, atol=1e-5, rtol=1e-5)


def test_dit_is_comfyuis_flux_and_its_training_forward_equals_comfyuis(tb, trained):
    import comfy.ldm.flux.model
    import comfy.model_base
    patcher = trained["dit"][0]
    assert isinstance(patcher.model, comfy.model_base.Flux)
    dm = patcher.model.diffusion_model
    assert isinstance(dm, comfy.ldm.flux.model.Flux) and len(dm.double_blocks) == 2 and len(dm.single_blocks) == 4
    gen = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 16, 64, 64, generator=gen), torch.randn(2, 77, 64, generator=gen)
    y = torch.randn(2, 64, generator=gen)
    sigma = torch.tensor([0.3, 0.9])
    with torch.no_grad():
        ours = tb["dit_model"].dit_forward(dm, x, sigma, ctx, y)
        torch.testing.assert_close(ours, dm(x, sigma, ctx, y), atol=1e-4, rtol=1e-4)
        # ComfyUI's FLOW/CONST: the model's x0 is x − σ·v, the parameterisation train.py's loss assumes
        x0 = patcher.model.apply_model(x, sigma, c_crossattn=ctx, y=y)
    torch.testing.assert_close(x0, x - sigma.view(-1, 1, 1, 1) * ours, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ARCHS)
def test_lora_files_in_train_layout_land_on_every_adapted_layer(tb, trained, arch, tmp_path):
    import comfy.lora
    import comfy.utils
    patcher = trained[arch][0]
    path = str(tmp_path / "lora.safetensors")
    layers = random_lora(tb, arch, patcher, path)
    assert layers == {"unet": 84, "dit": 24}[arch]
    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    sd = comfy.utils.load_torch_file(path, safe_load=True)
    assert len(comfy.lora.load_lora(sd, key_map)) == layers
    committed = os.path.join(tb["objectives"].folder(arch, WEIGHTS), "loras")
    for name in sorted(os.listdir(committed)) if os.path.isdir(committed) else ():
        sd = comfy.utils.load_torch_file(os.path.join(committed, name), safe_load=True)
        assert len(comfy.lora.load_lora(sd, key_map)) == sum(k.endswith(".alpha") for k in sd) == layers, name


def test_detector_accuracy_on_held_out_renders(tb):
    detector, world = tb["detector"], tb["world"]
    net = detector.load_detector(os.path.join(WEIGHTS, "detector.safetensors"))
    gen = torch.Generator().manual_seed(2024)  # not the training stream nor train.py's held-out seed
    scenes = world.random_scenes(512, gen, any_concept=0.4)
    accuracy = detector.evaluate(net, world.render(scenes, gen), scenes)
    assert min(accuracy.values()) >= 0.97, accuracy
    pred = detector.predict(net, world.render(scenes, gen))
    classes = detector.class_presence(pred)
    for category in world.CATEGORIES:  # a generic member is told from the concept, and both from neither
        assert float((classes[category] == scenes.has_class(category)).float().mean()) >= 0.97, category


@pytest.mark.parametrize("arch", ARCHS)
def test_engine_with_a_testbed_lora_equals_comfy_merge(ml, tb, trained, arch, tmp_path):
    import comfy.sample
    import comfy.sd
    import comfy.utils
    import folder_paths
    model, clip = trained[arch]
    name = f"testbed_test_{arch}.safetensors"
    folder_paths.add_model_folder_path("loras", str(tmp_path))
    random_lora(tb, arch, model, str(tmp_path / name), seed=1)
    rows = (ml("core.stack").LoraRow(name, 1.0),)
    engine = ml("host.engine")
    ours = engine.clone_with_engine(model, engine.build_engine(model, rows, "test"))
    sd = comfy.utils.load_torch_file(str(tmp_path / name), safe_load=True)
    merged, _ = comfy.sd.load_lora_for_models(model, None, sd, 1.0, 0.0)
    cond, pooled = clip.encode_from_tokens(clip.tokenize("a lantern lamp on the right, gray background"),
                                           return_pooled=True)
    positive = [[cond, {"pooled_output": pooled}]]
    latent = torch.zeros(1, tb["objectives"].channels(arch), 64, 64)
    noise = comfy.sample.prepare_noise(latent, 3)
    scheduler = "normal" if arch == "unet" else "simple"
    outs = [comfy.sample.sample(m, noise, 2, 5.0, "euler", scheduler, positive, positive, latent, seed=3,
                                disable_pbar=True) for m in (ours, merged, model)]
    torch.testing.assert_close(outs[0], outs[1], atol=2e-3, rtol=2e-3)
    assert (outs[1] - outs[2]).abs().max() > 1e-3  # the LoRA changes the image


@pytest.mark.parametrize("arch", ARCHS)
def test_base_training_steps_and_the_profile_stage_run_on_the_cpu(tb, arch, capsys):
    """train.py's base loop (3 steps at batch 2) moves the weights and logs finite losses; --profile's stage times
    its steps and lists the operators, on the same step function."""
    train, objectives = tb["train"], tb["objectives"]
    patcher, clip = objectives.build(arch, torch.device("cpu"))
    before = [p.detach().clone() for p in patcher.model.diffusion_model.parameters()]
    log, gen = {}, torch.Generator().manual_seed(0)
    train.train_base(arch, patcher, clip, 3, 2, float("inf"), gen, torch.device("cpu"), log)
    assert log[f"{arch}_base"]["steps"] == 3 and torch.isfinite(torch.tensor(log[f"{arch}_base"]["loss_last_100"]))
    after = list(patcher.model.diffusion_model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after))
    train.profile_base(arch, patcher, clip, 1, 2, gen, torch.device("cpu"))
    printed = capsys.readouterr().out
    assert f"{arch} base: " in printed and "steps/s at batch 2" in printed and "Self CPU" in printed
