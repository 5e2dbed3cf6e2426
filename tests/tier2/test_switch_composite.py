"""LoRA Switch and LoRA Composite (docs/algorithms.md §1–2) against independent references built from ComfyUI's own
merged LoRAs. Tolerances: float32 CPU; a whole sampling run compounds the ~1e-6 per-call difference of
on-the-fly vs merged weights over the steps, so runs are compared at 1e-3 (a wrong LoRA or weight moves
latents by > 1e-1, asserted where it matters); single predictions at 1e-4."""

import pytest
import torch

import comfy.model_management
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.sd
import folder_paths
import nodes

from support import lora_files, tiny_models

CFG = 5.0


@pytest.fixture(scope="module")
def world(comfy_state, ml):
    out = {}
    for kind in ("sd15", "sdxl"):
        model = tiny_models.build_tiny(kind, seed=0)
        names = lora_files.write_lora_set(model, comfy_state["loras_dir"], f"sc_{kind}", (31, 32, 33))
        out[kind] = (model, names)
    folder_paths.filename_list_cache.clear()
    return out


def stack_of(ml, names, strengths=(0.9, 1.1, 0.7)):
    s = ml("core.stack")
    return s.LoraStack(tuple(s.LoraRow(n, st) for n, st in zip(names, strengths)))


def merged(model, name, strength):
    tensors = comfy.utils.load_torch_file(folder_paths.get_full_path("loras", name), safe_load=True)
    return comfy.sd.load_lora_for_models(model, None, tensors, strength, 0.0)[0]


def run(model, kind, sampler="euler", steps=6, denoise=1.0, batch=1, size=(8, 8), callback=None, seed=3):
    positive = tiny_models.make_conditioning(kind, batch=1, seed=1)
    negative = tiny_models.make_conditioning(kind, batch=1, seed=2)
    latent = torch.zeros((batch, 4, *size))
    noise = comfy.sample.prepare_noise(latent, seed)
    if denoise < 1.0:
        latent = torch.randn(latent.shape, generator=torch.Generator().manual_seed(9))
    return comfy.sample.sample(model, noise, steps, CFG, sampler, "normal", positive, negative, latent,
                               denoise=denoise, callback=callback, disable_pbar=True, seed=seed)


def node_out(result):
    return result.result[0]["samples"]


# --- Composite ----------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
@pytest.mark.parametrize("sampler", ["euler", "dpmpp_2m", "heun"])
def test_composite_with_one_lora_equals_loraloader_ksampler(ml, world, kind, sampler):
    model, names = world[kind]
    stack = stack_of(ml, names[:1])
    composite = ml("methods.switch_composite").composite_model(model, stack.active(), None, "test")
    reference = run(merged(model, names[0], 0.9), kind, sampler)
    torch.testing.assert_close(run(composite, kind, sampler), reference, atol=1e-3, rtol=1e-3)
    assert (reference - run(model, kind, sampler)).abs().max() > 1e-2


@pytest.mark.parametrize("batch,size", [(1, (8, 8)), (2, (8, 12))])
@pytest.mark.parametrize("k", [2, 3])
def test_composite_fused_prediction_is_mean_of_merged_predictions_every_step(ml, world, k, batch, size):
    model, names = world["sd15"]
    stack = stack_of(ml, names[:k])
    composite = ml("methods.switch_composite").composite_model(model, stack.active(), None, "test")
    seen = []
    run(composite, "sd15", batch=batch, size=size, callback=lambda i, den, x, n: seen.append((i, den.clone(), x.clone())))
    sigmas = comfy.samplers.KSampler(model, 6, "cpu", "euler", "normal", 1.0).sigmas
    pos = tiny_models.make_conditioning("sd15", seed=1)[0][0].expand(batch, -1, -1)
    neg = tiny_models.make_conditioning("sd15", seed=2)[0][0].expand(batch, -1, -1)
    merged_models = [merged(model, n, s) for n, s in zip(names[:k], (0.9, 1.1, 0.7))]
    assert len(seen) == 6
    for i, denoised, x in seen:
        sigma = sigmas[i].expand(batch)
        conds, unconds = [], []
        for m in merged_models:
            comfy.model_management.load_models_gpu([m])  # swaps the merged weights in, as sampling would
            conds.append(tiny_models.forward(m, x, sigma, c_crossattn=pos))
            unconds.append(tiny_models.forward(m, x, sigma, c_crossattn=neg))
        u, c = torch.stack(unconds).mean(0), torch.stack(conds).mean(0)
        # 6c − 5u multiplies float32 rounding of the two sides (~2e-5, different kernels on AMD EPYC) by up to
        # 11: 5e-4 here is 1e-4 per prediction; a wrong LoRA or weight moves these values by > 1e-1.
        torch.testing.assert_close(denoised, u + CFG * (c - u), atol=5e-4, rtol=5e-4)


def test_composite_batches_all_branches_in_one_unet_call(ml, world):
    model, names = world["sd15"]
    composite = ml("methods.switch_composite").composite_model(model, stack_of(ml, names).active(), None, "test")
    batches = []

    def count(executor, x, *args, **kwargs):
        batches.append(x.shape[0])
        return executor(x, *args, **kwargs)

    composite.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test.count", count)
    run(composite, "sd15", steps=3)
    assert batches == [6, 6, 6]  # 3 LoRAs × (cond, uncond) per step, one call each


def test_composite_guider_with_sampler_custom_advanced(ml, world):
    model, names = world["sd15"]
    stack = stack_of(ml, names[:2])
    guider_node = nodes.NODE_CLASS_MAPPINGS["MultiLoRACompositeGuider"]
    positive = tiny_models.make_conditioning("sd15", seed=1)
    negative = tiny_models.make_conditioning("sd15", seed=2)
    guider = guider_node.execute(model=model, lora_stack=stack, positive=positive, negative=negative, cfg=CFG).result[0]
    assert isinstance(guider, comfy.samplers.CFGGuider)
    sigmas = comfy.samplers.KSampler(model, 6, "cpu", "euler", "normal", 1.0).sigmas
    latent = torch.zeros(1, 4, 8, 8)
    noise = comfy.sample.prepare_noise(latent, 3)
    got = guider.sample(noise, latent, comfy.samplers.sampler_object("euler"), sigmas, seed=3, disable_pbar=True)
    composite = ml("methods.switch_composite").composite_model(model, stack.active(), None, "test")
    torch.testing.assert_close(got, run(composite, "sd15"), atol=1e-5, rtol=1e-5)


def test_composite_sampler_node_matches_patch_and_keeps_inputs(ml, world):
    model, names = world["sd15"]
    stack = stack_of(ml, names[:2])
    positive = tiny_models.make_conditioning("sd15", seed=1)
    negative = tiny_models.make_conditioning("sd15", seed=2)
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    node = nodes.NODE_CLASS_MAPPINGS["MultiLoRACompositeSampler"]
    out = node_out(node.execute(model=model, lora_stack=stack, seed=3, steps=6, cfg=CFG, sampler_name="euler",
                                scheduler="normal", positive=positive, negative=negative, latent_image=latent,
                                denoise=1.0))
    composite = ml("methods.switch_composite").composite_model(model, stack.active(), None, "test")
    torch.testing.assert_close(out, run(composite, "sd15"), atol=1e-5, rtol=1e-5)
    assert torch.count_nonzero(latent["samples"]) == 0 and model.wrappers == {}


# --- Switch -------------------------------------------------------------------------------------------
def expected_step(sigma, schedule):
    """Independent floor-mapping: the last step whose start sigma is ≥ σ."""
    steps = len(schedule) - 1
    best = 0
    for j in range(steps):
        if schedule[j] >= sigma - 1e-6 * max(1.0, sigma):
            best = j
    return best


def log_active_loras(switch):
    """Wrap ``switch``'s model calls: a list that fills with (σ, schedule, active LoRAs) per call."""
    engine = switch.wrappers[comfy.patcher_extension.WrappersMP.APPLY_MODEL]["multilora.onthefly"][0].__self__
    log = []

    def record(executor, x, t, *args, **kwargs):
        options = args[3] if len(args) > 3 else kwargs["transformer_options"]
        log.append((float(t[0]), [float(s) for s in options["sample_sigmas"]], sorted(engine.active_loras())))
        return executor(x, t, *args, **kwargs)

    switch.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test.record", record)
    return log


@pytest.mark.parametrize("sampler,steps,tau", [("euler", 7, 3), ("heun", 7, 2), ("euler", 6, 1)])
def test_switch_as_the_authors_code_gives_the_first_lora_tau_plus_one_steps(ml, world, sampler, steps, tau):
    """schedule "as the authors' code": switch after step i when i > 0 and i % τ == 0 (written as that loop)."""
    model, names = world["sd15"]
    methods = ml("methods.switch_composite")
    authors = ml("core.routing").SWITCH_AUTHORS
    switch = methods.switch_model(model, stack_of(ml, names).active(), tau, "test", authors)
    log = log_active_loras(switch)
    run(switch, "sd15", sampler=sampler, steps=steps)
    expected, active = [], 0
    for i in range(steps):
        expected.append(active)
        if i > 0 and i % tau == 0:
            active = (active + 1) % 3
    for sigma, schedule, loras in log:
        assert loras == [expected[expected_step(sigma, schedule)]], (sigma, schedule)
    node = nodes.NODE_CLASS_MAPPINGS["MultiLoRASwitch"]
    patched = node.execute(model=model, lora_stack=stack_of(ml, names), switch_every=tau, schedule=authors).result[0]
    torch.testing.assert_close(run(patched, "sd15", sampler=sampler, steps=steps),
                               run(methods.switch_model(model, stack_of(ml, names).active(), tau, "test", authors),
                                   "sd15", sampler=sampler, steps=steps), atol=0, rtol=0)
    with pytest.raises(ml("core.errors").MultiLoRAError, match=r"^LoRA Switch \(model patch\): 'schedule' is 'paper', "
                                                               r"which is not an option\. Pick one of: "):
        node.execute(model=model, lora_stack=stack_of(ml, names), switch_every=tau, schedule="paper")


@pytest.mark.parametrize("sampler,steps,denoise,tau", [
    ("euler", 7, 1.0, 3), ("heun", 7, 1.0, 2), ("dpm_2", 5, 1.0, 2), ("dpmpp_2m", 9, 0.6, 4), ("euler", 4, 1.0, 5)])
def test_switch_active_lora_follows_floor_i_over_tau_mod_k(ml, world, sampler, steps, denoise, tau):
    model, names = world["sd15"]
    switch = ml("methods.switch_composite").switch_model(model, stack_of(ml, names).active(), tau, "test")
    engine = switch.wrappers[comfy.patcher_extension.WrappersMP.APPLY_MODEL]["multilora.onthefly"][0].__self__
    log = []

    def record(executor, x, t, *args, **kwargs):
        options = args[3] if len(args) > 3 else kwargs["transformer_options"]
        log.append((float(t[0]), [float(s) for s in options["sample_sigmas"]], sorted(engine.active_loras())))
        return executor(x, t, *args, **kwargs)

    switch.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test.record", record)
    run(switch, "sd15", sampler=sampler, steps=steps, denoise=denoise)
    assert len(log) >= len(log[0][1]) - 1
    for sigma, schedule, active in log:
        assert active == [(expected_step(sigma, schedule) // tau) % 3], (sigma, schedule)
    assert {a[0] for _, _, a in log} == set(range(min(3, -(-(len(log[0][1]) - 1) // tau))))


def test_switch_with_one_lora_equals_loraloader_ksampler(ml, world):
    model, names = world["sdxl"]
    switch = ml("methods.switch_composite").switch_model(model, stack_of(ml, names[:1]).active(), 5, "test")
    torch.testing.assert_close(run(switch, "sdxl"), run(merged(model, names[0], 0.9), "sdxl"), atol=1e-3, rtol=1e-3)


def test_switch_sampler_node_and_model_patch_agree(ml, world):
    model, names = world["sd15"]
    stack = stack_of(ml, names)
    positive = tiny_models.make_conditioning("sd15", seed=1)
    negative = tiny_models.make_conditioning("sd15", seed=2)
    latent = {"samples": torch.zeros(2, 4, 8, 12)}
    node = nodes.NODE_CLASS_MAPPINGS["MultiLoRASwitchSampler"]
    out = node_out(node.execute(model=model, lora_stack=stack, seed=3, steps=6, cfg=CFG, sampler_name="euler",
                                scheduler="normal", positive=positive, negative=negative, latent_image=latent,
                                denoise=1.0, switch_every=2))
    patch = nodes.NODE_CLASS_MAPPINGS["MultiLoRASwitch"].execute(model=model, lora_stack=stack, switch_every=2).result[0]
    torch.testing.assert_close(out, run(patch, "sd15", batch=2, size=(8, 12)), atol=1e-5, rtol=1e-5)
    assert out.shape == (2, 4, 8, 12) and model.wrappers == {}


# --- errors -------------------------------------------------------------------------------------------
def test_clear_errors(ml, world, caplog):
    model, names = world["sd15"]
    s = ml("core.stack")
    errors = ml("core.errors")
    methods = ml("methods.switch_composite")
    switch_node = nodes.NODE_CLASS_MAPPINGS["MultiLoRASwitch"]
    with pytest.raises(errors.StackError, match="LoRA Switch: the LoRA stack is empty"):
        switch_node.execute(model=model, lora_stack=s.LoraStack(()), switch_every=5)
    off = s.LoraStack((s.LoraRow(names[0], enabled=False),))
    with pytest.raises(errors.StackError, match="LoRA Switch: every row of the LoRA stack is switched off"):
        switch_node.execute(model=model, lora_stack=off, switch_every=5)
    with pytest.raises(ValueError, match="LoRA Switch: 'switch_every' must be at least 1"):
        methods.switch_model(model, stack_of(ml, names).active(), 0, "LoRA Switch")
    sdxl_model, sdxl_names = world["sdxl"]
    flux = tiny_models.build_tiny("flux")
    with pytest.raises(errors.LoraFileError, match=r"KSampler \(LoRA Composite\): LoRA 'sc_sdxl_31.safetensors' "
                                                    r"matched 0 of its \d+ tensors in this Flux model"):
        methods.composite_model(flux, stack_of(ml, sdxl_names[:1]).active(), None, "KSampler (LoRA Composite)")
    caplog.clear()
    methods.composite_model(model, stack_of(ml, sdxl_names[:1]).active(), None, "KSampler (LoRA Composite)")
    assert any("matched" in r.getMessage() and "sc_sdxl_31" in r.getMessage() for r in caplog.records)


def test_sequential_branches_equal_batched_branches(ml, world):
    model, names = world["sd15"]
    rows = stack_of(ml, names).active()
    batched = run(ml("methods.switch_composite").composite_model(model, rows, None, "test"), "sd15", steps=4)
    sequential = run(ml("methods.switch_composite").composite_model(model, rows, None, "test", batched=False), "sd15", steps=4)
    torch.testing.assert_close(sequential, batched, atol=1e-3, rtol=1e-3)  # batch size changes BLAS blocking
