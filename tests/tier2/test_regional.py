"""Regional LoRA (per-token routing) against ComfyUI's own merged LoRAs, layer by layer, on SD1.5, SDXL and Flux.

References are ComfyUI's merges (``comfy.sd.load_lora_for_models``, what LoraLoader does): LoRA a merged, LoRA b
merged, and both merged. Regions are the left and right halves of a 16 × 16 latent, which stay exactly 0/1 on
every token grid of the tiny models (UNet levels 16/8/4, Flux's 8 × 8 patch grid), so each token of each layer
must equal one of the merged references exactly up to float32 reassociation (tolerance as in
test_engine_equivalence: 1e-4 on outputs of magnitude ~1, while a LoRA shifts them by > 1e-2).
"""
import logging

import pytest
import torch

import comfy.sample
import comfy.sd
import comfy.utils
import folder_paths
import nodes

from support import lora_files, tiny_models
from support.layer_records import layer_outputs, run_wrapped

KINDS = ("sd15", "sdxl", "flux")
FORMAT = {"sd15": "kohya", "sdxl": "kohya", "flux": "diffusers"}
SIZE = 16
STRENGTHS = (0.8, 1.3)
ATOL, RTOL = 1e-4, 1e-4


@pytest.fixture(scope="module")
def models():
    return {kind: tiny_models.build_tiny(kind, seed=0) for kind in KINDS}


def loras(comfy_state, patcher, kind):
    names = lora_files.write_lora_set(patcher, comfy_state["loras_dir"], f"regional_{kind}", (1, 2), FORMAT[kind])
    folder_paths.filename_list_cache.clear()
    return names


def rows_of(ml, names):
    return [ml("core.stack").LoraRow(name=n, strength_model=s) for n, s in zip(names, STRENGTHS)]


def halves(size=SIZE):
    left = torch.zeros(size, size)
    left[:, : size // 2] = 1.0
    return left, 1.0 - left


@pytest.mark.parametrize("kind", KINDS)
def test_an_all_one_mask_equals_the_stack_and_comfyui_merged(comfy_state, ml, models, kind):
    """Row a's mask is all one (from a 4 × 4 MASK, resized), row b has none: both act everywhere."""
    patcher = models[kind]
    names = loras(comfy_state, patcher, kind)
    rows = rows_of(ml, names)
    clone = ml("methods.regional").regional_model(patcher, rows, [torch.ones(4, 4), None], "test")
    engine = lora_files.engine_of(clone, ml)
    x, sigma, cond = tiny_models.make_inputs(kind, batch=2, seed=5, size=SIZE)
    got = run_wrapped(clone, engine, patcher, x, sigma, cond)
    stack = ml("host.engine").build_engine(patcher, rows, "test")
    with stack.attached(patcher.model), stack.routed(torch.ones(2, 2)):
        want_stack = tiny_models.forward(patcher, x, sigma, **cond)
    torch.testing.assert_close(got, want_stack, atol=1e-6, rtol=1e-6)
    with tiny_models.patched(lora_files.merged_by_comfy(patcher, names, STRENGTHS)):
        want = tiny_models.forward(patcher, x, sigma, **cond)
    assert (want - tiny_models.forward(patcher, x, sigma, **cond)).abs().max() > 1e-2
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


@pytest.mark.parametrize("kind", KINDS)
def test_each_token_of_each_layer_gets_only_its_regions_lora(comfy_state, ml, models, kind):
    """Left-half tokens equal LoRA a merged, right-half tokens LoRA b merged; text tokens both (every LoRA)."""
    patcher = models[kind]
    names = loras(comfy_state, patcher, kind)
    rows = rows_of(ml, names)
    clone = ml("methods.regional").regional_model(patcher, rows, list(halves()), "test")
    engine = lora_files.engine_of(clone, ml)
    x, sigma, cond = tiny_models.make_inputs(kind, batch=2, seed=6, size=SIZE)
    record = {}
    run_wrapped(clone, engine, patcher, x, sigma, cond, record)
    ref_a = layer_outputs(patcher, lora_files.merged_by_comfy(patcher, names[:1], STRENGTHS[:1]), record)
    ref_b = layer_outputs(patcher, lora_files.merged_by_comfy(patcher, names[1:], STRENGTHS[1:]), record)
    ref_ab = layer_outputs(patcher, lora_files.merged_by_comfy(patcher, names, STRENGTHS), record)
    roles = engine.token_router.roles
    text_tokens = cond["c_crossattn"].shape[1]
    checked = {"conv": 0, "image": 0, "text": 0, "joint": 0}
    for path, (_, got) in record.items():
        a, b, ab = ref_a[path], ref_b[path], ref_ab[path]
        if got.ndim == 2:
            continue  # vector layers (timestep, modulation): per-row weights, covered by the stack tests
        if roles[path] == "text":
            torch.testing.assert_close(got, ab, atol=ATOL, rtol=RTOL, msg=path)
            checked["text"] += 1
            continue
        if got.ndim == 4:
            half = got.shape[-1] // 2
            torch.testing.assert_close(got[..., :half], a[..., :half], atol=ATOL, rtol=RTOL, msg=path)
            torch.testing.assert_close(got[..., half:], b[..., half:], atol=ATOL, rtol=RTOL, msg=path)
            checked["conv"] += 1
            continue
        prefix = text_tokens if roles[path] == "joint" else 0
        image = got.shape[1] - prefix
        side = int(round(image ** 0.5))
        assert side * side == image, path
        left = torch.zeros(side, side, dtype=torch.bool)
        left[:, : side // 2] = True
        left = torch.cat([torch.zeros(prefix, dtype=torch.bool), left.flatten()])
        if prefix:
            torch.testing.assert_close(got[:, :prefix], ab[:, :prefix], atol=ATOL, rtol=RTOL, msg=path)
        torch.testing.assert_close(got[:, left], a[:, left], atol=ATOL, rtol=RTOL, msg=path)
        torch.testing.assert_close(got[:, prefix:][:, ~left[prefix:]], b[:, prefix:][:, ~left[prefix:]],
                                   atol=ATOL, rtol=RTOL, msg=path)
        checked["joint" if prefix else "image"] += 1
    assert (ref_a[path] - ref_b[path]).abs().max() > 1e-3  # the two LoRAs differ on the layers compared
    expected = {"sd15": ("conv", "image", "text"), "sdxl": ("image", "text"), "flux": ("image", "text", "joint")}
    assert all(checked[r] > 0 for r in expected[kind]), checked


def test_text_tokens_policy_none_leaves_regional_loras_off_the_text(comfy_state, ml, models):
    patcher = models["flux"]
    names = loras(comfy_state, patcher, "flux")
    rows = rows_of(ml, names)
    left, right = halves()
    clone = ml("methods.regional").regional_model(patcher, rows, [left, None], "test", text_tokens="no LoRA")
    engine = lora_files.engine_of(clone, ml)
    x, sigma, cond = tiny_models.make_inputs("flux", batch=1, seed=7, size=SIZE)
    record = {}
    txt = [p for p in engine.layers if engine.token_router.roles[p] == "text"]
    run_wrapped(clone, engine, patcher, x, sigma, cond, record, txt)
    ref_b = layer_outputs(patcher, lora_files.merged_by_comfy(patcher, names[1:], STRENGTHS[1:]), record)
    assert txt
    for p in txt:  # row b has no region: it stays on the text; row a (regional) is off there
        torch.testing.assert_close(record[p][1], ref_b[p], atol=ATOL, rtol=RTOL, msg=p)


def test_regional_model_leaves_the_input_model_untouched(comfy_state, ml, models):
    patcher = models["sd15"]
    names = loras(comfy_state, patcher, "sd15")
    before = {k: v.clone() for k, v in patcher.model.state_dict().items()}
    wrappers = {k: dict(v) for k, v in patcher.wrappers.items()}
    clone = ml("methods.regional").regional_model(patcher, rows_of(ml, names), list(halves()), "test")
    engine = lora_files.engine_of(clone, ml)
    x, sigma, cond = tiny_models.make_inputs("sd15", batch=1, seed=8, size=SIZE)
    run_wrapped(clone, engine, patcher, x, sigma, cond)
    assert {k: dict(v) for k, v in patcher.wrappers.items()} == wrappers
    assert all(torch.equal(before[k], v) for k, v in patcher.model.state_dict().items())
    for name, module in patcher.model.named_modules():
        assert not module._forward_hooks, name


def test_bad_regions_are_named_errors(comfy_state, ml, models):
    regional = ml("methods.regional")
    error = ml("core.regions").RegionError
    patcher = models["sd15"]
    names = loras(comfy_state, patcher, "sd15")
    rows = rows_of(ml, names)
    with pytest.raises(error, match=r"^test: the mask of row 2 \(regional_sd15_2.safetensors\) is empty at the "
                                    r"latent's 16×16; paint the region"):
        regional.regional_model(patcher, rows, [torch.ones(SIZE, SIZE), torch.zeros(SIZE, SIZE)], "test")
    with pytest.raises(error, match=r"^test: 3 masks are connected but the stack has 2 enabled rows"):
        regional.regional_model(patcher, rows, [None, None, torch.ones(4, 4)], "test")
    with pytest.raises(error, match=r"^test: the mask of row 1 has NaN or infinite values"):
        regional.regional_model(patcher, rows, [torch.full((4, 4), float("nan"))], "test")
    with pytest.raises(error, match=r"^test: the mask of row 1 has shape \(4,\); connect a MASK"):
        regional.regional_model(patcher, rows, [torch.ones(4)], "test")


# --- nodes and sampling ----------------------------------------------------------------------------------
def sample(model, kind, noise, latent, positive, negative, steps=4):
    return comfy.sample.sample(model, noise, steps, 5.0, "euler", "normal", positive, negative, latent,
                               disable_pbar=True, seed=3)


@pytest.mark.parametrize("kind", ["sd15", "flux"])
def test_sampler_node_with_a_white_image_size_mask_equals_loraloader_ksampler(comfy_state, ml, models, kind, caplog):
    """A 64 × 64 white MASK (image size) on row 1 and none on row 2: the node resizes it, says so, and samples
    what KSampler samples on both LoRAs merged by ComfyUI."""
    patcher = models[kind]
    names = loras(comfy_state, patcher, kind)
    stack = ml("core.stack").LoraStack(tuple(rows_of(ml, names)))
    positive = tiny_models.make_conditioning(kind, seed=1)
    negative = tiny_models.make_conditioning(kind, seed=2)
    latent = tiny_models.make_latent(kind, size=8)
    node = nodes.NODE_CLASS_MAPPINGS["MultiLoRARegionalSampler"]
    with caplog.at_level(logging.WARNING, logger="multilora"):
        got = node.execute(model=patcher, lora_stack=stack, seed=3, steps=4, cfg=5.0, sampler_name="euler",
                           scheduler="normal", positive=positive, negative=negative, latent_image=latent,
                           denoise=1.0, mask_1=torch.ones(1, 64, 64)).result[0]["samples"]
    assert "KSampler (Regional LoRA): the mask of row 1 is 64×64; resized to the latent's 8×8" in caplog.text
    reference = lora_files.merged_by_comfy(patcher, names, STRENGTHS)
    want = nodes.KSampler().sample(reference, 3, 4, 5.0, "euler", "normal", positive, negative, latent, 1.0)[0]["samples"]
    base = nodes.KSampler().sample(patcher, 3, 4, 5.0, "euler", "normal", positive, negative, latent, 1.0)[0]["samples"]
    assert (want - base).abs().max() > 1e-1
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
    assert patcher.wrappers == {} and torch.count_nonzero(latent["samples"]) == 0


def test_each_image_of_a_batch_equals_the_same_noise_sampled_alone(comfy_state, ml, models):
    """Regions and routing are per image: batch 3 with a left/right split equals each image alone (same noise
    slice). Tolerance 1e-5 of the latent's magnitude: the tiny random UNet's latents reach |x| ≈ 400 and float32
    matmuls over a batch of 3 vs 1 round differently; the base model alone differs by 1.5e-3 (4e-6 relative), a
    coupling between images would show at the scale of the LoRAs' effect (> 1e-1)."""
    patcher = models["sd15"]
    names = loras(comfy_state, patcher, "sd15")
    clone = ml("methods.regional").regional_model(patcher, rows_of(ml, names), list(halves(8)), "test")
    positive = tiny_models.make_conditioning("sd15", seed=1)
    negative = tiny_models.make_conditioning("sd15", seed=2)
    latent = torch.zeros(3, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 11)
    batch = sample(clone, "sd15", noise, latent, positive, negative)
    for i in range(3):
        alone = sample(clone, "sd15", noise[i:i + 1], latent[i:i + 1], positive, negative)
        torch.testing.assert_close(batch[i:i + 1], alone, atol=1e-5 * float(batch.abs().max()), rtol=0)


def test_model_patch_node_works_with_core_ksampler_and_regions_change_the_image(comfy_state, ml, models):
    patcher = models["sd15"]
    names = loras(comfy_state, patcher, "sd15")
    stack = ml("core.stack").LoraStack(tuple(rows_of(ml, names)))
    node = nodes.NODE_CLASS_MAPPINGS["MultiLoRARegional"]
    left, right = halves(8)
    split = node.execute(model=patcher, lora_stack=stack, mask_1=left, mask_2=right).result[0]
    swapped = node.execute(model=patcher, lora_stack=stack, mask_1=right, mask_2=left).result[0]
    positive = tiny_models.make_conditioning("sd15", seed=1)
    negative = tiny_models.make_conditioning("sd15", seed=2)
    latent = tiny_models.make_latent("sd15", size=8)
    a = nodes.KSampler().sample(split, 3, 4, 5.0, "euler", "normal", positive, negative, latent, 1.0)[0]["samples"]
    b = nodes.KSampler().sample(swapped, 3, 4, 5.0, "euler", "normal", positive, negative, latent, 1.0)[0]["samples"]
    assert (a - b).abs().max() > 1e-2  # which LoRA goes where matters
    assert patcher.wrappers == {}
