"""CLoRA (docs/algorithms.md §3) inside a real ComfyUI: gradients through the UNet, fusion, masks, isolation, errors."""
import os

import pytest
import torch

import comfy.model_management
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import folder_paths
import nodes

from support import lora_files, tiny_models

PROMPT = "a photo of a cat and a dog in a park"


@pytest.fixture(scope="module")
def world(comfy_state, ml):
    model = tiny_models.build_tiny("sd15", seed=0)
    clip = tiny_models.build_tiny_clip(seed=0)
    names = lora_files.write_lora_set(model, comfy_state["loras_dir"], "clora", (51, 52, 53), clip=clip)
    folder_paths.filename_list_cache.clear()
    s = ml("core.stack")
    rows = [s.LoraRow(names[0], 0.8, concept="cat", trigger="sks", category="character"),
            s.LoraRow(names[1], 0.8, concept="dog", category="object"),
            s.LoraRow(names[2], 0.5, category="style")]
    return model, clip, rows


def settings(ml, **kw):
    base = dict(cfg=5.0, refine_iters=3)
    base.update(kw)
    return ml("methods.clora").CloraSettings(**base)


def run(ml, world, steps=4, size=(8, 12), **kw):
    model, clip, rows = world
    latent = {"samples": torch.zeros(1, 4, *size)}
    return ml("methods.clora").clora_sample(model, clip, PROMPT, "blurry", rows, 3, steps, "euler", "normal", latent, 1.0,
                                    settings(ml, **kw))


def hooks_left(model):
    return sum(len(m._forward_hooks) for m in model.model.modules())


def weight_functions_left(model):
    return sum(len(getattr(m, "weight_function", [])) + len(getattr(m, "bias_function", [])) for m in model.model.modules())


def test_end_to_end_sd15_non_square_and_inputs_untouched(ml, world):
    model, clip, rows = world
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    grad_flags = [p.requires_grad for p in model.model.parameters()]
    latent_in = {"samples": torch.zeros(1, 4, 8, 12)}
    latent, record = ml("methods.clora").clora_sample(model, clip, PROMPT, "blurry", rows, 3, 5, "euler", "normal",
                                              latent_in, 1.0, settings(ml))
    assert latent["samples"].shape == (1, 4, 8, 12) and torch.isfinite(latent["samples"]).all()
    assert torch.count_nonzero(latent_in["samples"]) == 0 and latent is not latent_in
    assert record.final_masks.shape == (2, 8, 12) and record.labels == [rows[0].name, rows[1].name]
    # 5 steps, opt_until 0.5 → steps 0 and 1 updated; both are refinement steps (⌊0.2·5⌋ = 1): 2 × (1 + 3)
    assert len(record.losses) == 8
    assert hooks_left(model) == 0 and weight_functions_left(model) == 0 and model.wrappers == {}
    assert all(torch.equal(before[k], v) for k, v in model.model.state_dict().items())
    assert [p.requires_grad for p in model.model.parameters()] == grad_flags
    assert clip.patcher.patches == {}


def test_loss_decreases_over_refinement_iterations(ml, world):
    _, record = run(ml, world, steps=4, refine_iters=6, opt_until=0.25)
    first_step = record.losses[:7]
    assert len(first_step) == 7 and first_step[-1] < first_step[0]


def test_gradient_matches_finite_difference(ml, world):
    """∇ₓL from autograd through the tiny UNet == central difference along a random direction."""
    model, clip, rows = world
    clora = ml("methods.clora")
    concepts, style = clora.split_rows(rows)
    variants = clora.build_variants(clip, PROMPT, "blurry", concepts, style)
    engine = ml("host.engine").build_engine(model, concepts + style, "test")
    clone = model.clone()
    engine.install(clone)
    guider = clora.CloraGuider(clone, engine, variants, settings(ml), clora.CloraRecord(["a", "b"], (8, 8)))
    seen = {}

    def probe(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        options = extra_args["model_options"]
        sigma = sigmas[2:3].expand(x.shape[0])
        x0 = x * 0 + torch.randn(x.shape, generator=torch.Generator().manual_seed(0)) * float(sigmas[2])
        value, grad = guider.loss_gradient(x0, sigma, options)
        direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
        h = 1e-2
        with torch.no_grad():
            plus = float(guider.loss(x0.double().float() + h * direction, sigma, options))
            minus = float(guider.loss(x0 - h * direction, sigma, options))
        seen.update(analytic=float((grad * direction).sum()), numeric=(plus - minus) / (2 * h), value=value)
        return x

    latent = torch.zeros(1, 4, 8, 8)
    sigmas = comfy.samplers.KSampler(clone, 6, "cpu", "euler", "normal", 1.0).sigmas
    guider.sample(comfy.sample.prepare_noise(latent, 1), latent, comfy.samplers.KSAMPLER(probe), sigmas, disable_pbar=True,
                  seed=1)
    assert abs(seen["numeric"]) > 1e-6
    assert seen["analytic"] == pytest.approx(seen["numeric"], rel=2e-2, abs=1e-5)
    assert hooks_left(model) == 0 and weight_functions_left(model) == 0


def test_lambda_zero_without_update_is_a_composite_over_variants(ml, world):
    model, clip, rows = world
    clora = ml("methods.clora")
    concepts, style = clora.split_rows(rows)
    variants = clora.build_variants(clip, PROMPT, "blurry", concepts, style)
    engine = ml("host.engine").build_engine(model, concepts + style, "test")
    clone = model.clone()
    engine.install(clone)
    branch_outputs = []

    def keep(executor, *args, **kwargs):
        out = executor(*args, **kwargs)
        branch_outputs.append([o.clone() for o in out])
        return out

    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, "test.keep", keep)
    s = settings(ml, mask_threshold=0.0, opt_until=0.0)
    guider = clora.CloraGuider(clone, engine, variants, s, clora.CloraRecord(["a", "b"], (8, 8)))
    steps = []
    latent = torch.zeros(1, 4, 8, 8)
    sigmas = comfy.samplers.KSampler(clone, 4, "cpu", "euler", "normal", 1.0).sigmas
    guider.sample(comfy.sample.prepare_noise(latent, 2), latent, clora.clora_sampler("euler", 4, s), sigmas,
                  callback=lambda i, den, x, n: steps.append(den.clone()), disable_pbar=True, seed=2)
    assert len(steps) == 4 and len(branch_outputs) == 4
    for denoised, outs in zip(steps, branch_outputs):
        c = torch.stack(outs[0::2]).mean(0)
        u = torch.stack(outs[1::2]).mean(0)
        torch.testing.assert_close(denoised, u + 5.0 * (c - u), atol=1e-5, rtol=1e-5)
        assert len(outs) == 2 * 3  # base + 2 concept variants, cond and uncond


def handmade_variants(ml, comfy_state, kind, seeds, prefix):
    """A tiny model of ``kind`` with two concept LoRAs installed on a clone, and three hand-made variants."""
    clora = ml("methods.clora")
    model = tiny_models.build_tiny(kind, seed=0)
    names = []
    for seed in seeds:
        name = f"{prefix}_{kind}_{seed}.safetensors"
        lora_files.write_lora(model, os.path.join(comfy_state["loras_dir"], name), "kohya", seed=seed)
        names.append(name)
    folder_paths.filename_list_cache.clear()
    s = ml("core.stack")
    rows = [s.LoraRow(n, 0.8, concept=w) for n, w in zip(names, ("cat", "dog"))]
    engine = ml("host.engine").build_engine(model, rows, "test")
    clone = model.clone()
    engine.install(clone)
    variants = [clora.Variant("p", tiny_models.make_conditioning(kind, seed=v), tiny_models.make_conditioning(kind, seed=9),
                              {0: [2, 3], 1: [5]}) for v in range(3)]
    return model, engine, clone, variants


def test_sdxl_capture_update_and_fusion(ml, comfy_state):
    """SDXL layout (linear proj, several transformer blocks per site) with hand-made variant conds."""
    clora = ml("methods.clora")
    model, engine, clone, variants = handmade_variants(ml, comfy_state, "sdxl", (61, 62), "clora")
    record = clora.CloraRecord(["a", "b"], (8, 8))
    st = settings(ml)
    guider = clora.CloraGuider(clone, engine, variants, st, record)
    latent = torch.zeros(1, 4, 8, 8)
    sigmas = comfy.samplers.KSampler(clone, 4, "cpu", "euler", "normal", 1.0).sigmas
    out = guider.sample(comfy.sample.prepare_noise(latent, 2), latent, clora.clora_sampler("euler", 4, st), sigmas,
                        disable_pbar=True, seed=2)
    assert torch.isfinite(out).all() and len(record.losses) == 2 * (1 + 3) and record.final_masks.shape == (2, 8, 8)
    assert hooks_left(model) == 0 and weight_functions_left(model) == 0


def test_cancel_mid_optimisation_leaves_nothing_patched(ml, world):
    model, clip, rows = world
    fresh = tiny_models.forward(model, *tiny_models.make_inputs("sd15")[:2], **tiny_models.make_inputs("sd15")[2])
    clora = ml("methods.clora")
    original = clora.CloraGuider._contrastive  # every gradient pass's loss, recorded call or not

    calls = {"n": 0}

    def cancelling(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            assert not any(p.requires_grad for p in model.model.parameters())  # inside the gradient set-up
            raise comfy.model_management.InterruptProcessingException()
        return original(self, *args, **kwargs)

    clora.CloraGuider._contrastive = cancelling
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException):
            run(ml, world)
    finally:
        clora.CloraGuider._contrastive = original
        comfy.model_management.interrupt_current_processing(False)
    assert hooks_left(model) == 0 and weight_functions_left(model) == 0 and model.wrappers == {}
    again = tiny_models.forward(model, *tiny_models.make_inputs("sd15")[:2], **tiny_models.make_inputs("sd15")[2])
    torch.testing.assert_close(again, fresh, atol=0, rtol=0)


def test_clear_errors_before_sampling(ml, world):
    model, clip, rows = world
    clora = ml("methods.clora")
    errors = ml("core.errors")
    latent = {"samples": torch.zeros(1, 4, 8, 8)}

    def go(prompt=PROMPT, rows=rows, model=model, **kw):
        return clora.clora_sample(model, clip, prompt, "", rows, 1, 2, "euler", "normal", latent, 1.0, settings(ml, **kw))

    with pytest.raises(errors.MultiLoRAError, match=r"CLoRA: concept word 'dog' is not in the prompt 'a cat and a puppy'\. "
                                                    r"Use a word that appears in the prompt\."):
        go("a cat and a puppy")
    with pytest.raises(errors.MultiLoRAError, match="CLoRA: needs at least 2 LoRAs with concept words, the stack has 1"):
        go(rows=[rows[0], rows[2]])
    with pytest.raises(ValueError, match=r"CLoRA: mask_threshold must be in \[0, 1\], got 1.5"):
        go(mask_threshold=1.5)
    with pytest.raises(errors.MultiLoRAError, match="CLoRA: this model has no UNet cross-attention"):
        go(model=tiny_models.build_tiny("flux"))


@pytest.mark.parametrize("tokenizer", ["sd1", "sdxl"])
def test_token_positions_against_comfyui_tokenizers(ml, tokenizer):
    import comfy.sd1_clip
    import comfy.sdxl_clip
    tok = comfy.sd1_clip.SD1Tokenizer() if tokenizer == "sd1" else comfy.sdxl_clip.SDXLTokenizer()
    pt = ml("core.prompt_tokens")
    tokenize = tok.tokenize_with_weights
    cases = {
        "a cat and a dog": {"cat": [2], "dog": [5]},
        "a (cat:1.2), a dog. a cat!": {"cat": [2, 8], "dog": [5]},
    }
    for prompt, expected in cases.items():
        assert pt.concept_positions(tokenize, prompt, list(expected)) == expected
    long_prompt = "a " * 80 + "cat"
    rows = tokenize(long_prompt)
    positions = pt.concept_positions(tokenize, long_prompt, ["cat"])["cat"]
    for key in rows:  # SDXL's g and l rows share positions
        flat = [t[0] for row in rows[key] for t in row]
        assert [flat[p] for p in positions] == pt.word_token_ids(tokenize, "cat")
    assert positions[0] > 77


def test_mask_preview_rethresholds_stored_maps_without_resampling(ml, world):
    _, record = run(ml, world, steps=4)
    preview = nodes.NODE_CLASS_MAPPINGS["MultiLoRAMaskPreview"]
    image = torch.rand(1, 64, 96, 3)
    loose = preview.execute(attention_maps=record, mask_threshold=0.1, step=-1, average_steps=False, image=image)
    tight = preview.execute(attention_maps=record, mask_threshold=0.9, step=-1, average_steps=False, image=image)
    masks_loose, shown = loose.result
    masks_tight = tight.result[0]
    assert masks_loose.shape == (2, 64, 96) and shown.shape == (1, 64, 96, 3)
    assert masks_loose.sum() > masks_tight.sum() > 0
    assert bool(((masks_tight > 0) <= (masks_loose > 0)).all())  # a higher λ only removes pixels
    assert loose.ui is not None and not torch.equal(shown, image)
    average = preview.execute(attention_maps=record, mask_threshold=0.4, step=0, average_steps=True).result
    assert average[1].shape == (1, 64, 96, 3)  # no image: black background at latent size × 8
    with pytest.raises(ValueError, match="step 99 is out of range"):
        preview.execute(attention_maps=record, mask_threshold=0.4, step=99, average_steps=False)


def test_gradient_and_run_under_inference_mode_like_the_executor(ml, comfy_state):
    """ComfyUI runs nodes under torch.inference_mode() with weights and conds created there: the latent
    update must still produce a finite-difference-exact gradient and leave the model clean."""
    with torch.inference_mode():
        model = tiny_models.build_tiny("sd15", seed=3)
        clip = tiny_models.build_tiny_clip(seed=3)
        names = lora_files.write_lora_set(model, comfy_state["loras_dir"], "clora_inf", (71, 72), clip=clip)
        folder_paths.filename_list_cache.clear()
        s = ml("core.stack")
        rows = [s.LoraRow(names[0], 0.8, concept="cat", trigger="sks"), s.LoraRow(names[1], 0.8, concept="dog")]
        assert next(model.model.parameters()).is_inference()
        clora = ml("methods.clora")
        concepts, style = clora.split_rows(rows)
        variants = clora.build_variants(clip, PROMPT, "blurry", concepts, style)
        engine = ml("host.engine").build_engine(model, concepts, "test")
        clone = model.clone()
        engine.install(clone)
        guider = clora.CloraGuider(clone, engine, variants, settings(ml), clora.CloraRecord(["a", "b"], (8, 8)))
        seen = {}

        def probe(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
            options = extra_args["model_options"]
            sigma = sigmas[1:2].expand(x.shape[0])
            x0 = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)) * float(sigmas[1])
            value, grad = guider.loss_gradient(x0, sigma, options)
            direction = torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
            h = 1e-2
            plus = float(guider.loss(x0 + h * direction, sigma, options))
            minus = float(guider.loss(x0 - h * direction, sigma, options))
            seen.update(analytic=float((grad * direction).sum()), numeric=(plus - minus) / (2 * h))
            return x

        latent = torch.zeros(1, 4, 8, 8)
        sigmas = comfy.samplers.KSampler(clone, 6, "cpu", "euler", "normal", 1.0).sigmas
        guider.sample(comfy.sample.prepare_noise(latent, 1), latent, comfy.samplers.KSAMPLER(probe), sigmas,
                      disable_pbar=True, seed=1)
        out, record = clora.clora_sample(model, clip, PROMPT, "blurry", rows, 3, 4, "euler", "normal",
                                         {"samples": torch.zeros(1, 4, 8, 8)}, 1.0, settings(ml))
    assert abs(seen["numeric"]) > 1e-6
    assert seen["analytic"] == pytest.approx(seen["numeric"], rel=2e-2, abs=1e-5)
    assert torch.isfinite(out["samples"]).all() and len(record.losses) > 0
    assert hooks_left(model) == 0 and weight_functions_left(model) == 0


@pytest.mark.parametrize("kind,expected", [
    ("sd15", [("input", 7), ("input", 8), ("output", 3), ("output", 4), ("output", 5)]),
    ("sdxl", [("input", 7), ("input", 8), ("middle", 0), ("output", 0), ("output", 1), ("output", 2)]),
])
def test_capture_sites_of_full_size_unets(ml, kind, expected):
    """latent/4 cross-attention sites of the real SD1.5 and SDXL layouts (built on the meta device)."""
    import importlib.util

    import comfy.supported_models

    from support.pack_loader import REPO_ROOT
    spec = importlib.util.spec_from_file_location("bench_configs", os.path.join(REPO_ROOT, "bench", "bench_models.py"))
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    config = (comfy.supported_models.SD15(dict(bench.SD15)) if kind == "sd15" else comfy.supported_models.SDXL(dict(bench.SDXL)))
    config.set_inference_dtype(torch.float16, None)
    with torch.device("meta"):
        model = config.get_model({}, "", device="meta")
    capture = ml("host.attention_capture")
    levels = capture.cross_attention_levels(model.diffusion_model)
    assert sorted({site[:2] for site, level in levels.items() if level == 2}) == expected
    assert capture.capture_level(model.diffusion_model) == 2
    assert capture.capture_size(64, 96) == (16, 24) and capture.capture_size(128, 128) == (32, 32)


def test_shallow_unet_falls_back_to_its_deepest_attention_level(ml, world):
    model, _, _ = world
    capture = ml("host.attention_capture")
    assert set(capture.cross_attention_levels(model.model.diffusion_model).values()) == {0, 1}
    assert capture.capture_level(model.model.diffusion_model) == 1


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_gradient_checkpointing_gives_the_same_gradient(ml, comfy_state, kind, monkeypatch):
    clora = ml("methods.clora")
    real_checkpoint = torch.utils.checkpoint.checkpoint
    checkpoint_calls = []

    def counting(*args, **kwargs):
        checkpoint_calls.append(1)
        return real_checkpoint(*args, **kwargs)

    monkeypatch.setattr(torch.utils.checkpoint, "checkpoint", counting)
    model, engine, clone, variants = handmade_variants(ml, comfy_state, kind, (101, 102), "clora_ckpt")
    grads = {}

    for flag in (False, True):
        guider = clora.CloraGuider(clone, engine, variants, settings(ml, gradient_checkpointing=flag),
                                   clora.CloraRecord(["a", "b"], (8, 8)))

        def probe(model_k, x, sigmas, extra_args=None, callback=None, disable=None, flag=flag, guider=guider):
            x0 = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)) * float(sigmas[1])
            grads[flag] = guider.loss_gradient(x0, sigmas[1:2].expand(x.shape[0]), extra_args["model_options"])
            return x

        latent = torch.zeros(1, 4, 8, 8)
        sigmas = comfy.samplers.KSampler(clone, 6, "cpu", "euler", "normal", 1.0).sigmas
        guider.sample(comfy.sample.prepare_noise(latent, 1), latent, comfy.samplers.KSAMPLER(probe), sigmas,
                      disable_pbar=True, seed=1)
    assert len(checkpoint_calls) > 0  # blocks really ran checkpointed
    assert grads[False][0] == pytest.approx(grads[True][0], rel=1e-5)
    assert grads[False][1].abs().max() > 0
    torch.testing.assert_close(grads[True][1], grads[False][1], atol=1e-6, rtol=1e-4)
    assert hooks_left(model) == 0 and weight_functions_left(model) == 0
