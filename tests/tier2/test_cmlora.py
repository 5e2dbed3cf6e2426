"""CMLoRA (docs/algorithms.md §4) and the frequency profile node inside a real ComfyUI."""

import pytest
import torch

import comfy.patcher_extension
import comfy.sample
import folder_paths
import nodes

from support import lora_files, tiny_models

CFG = 5.0
CATEGORIES = ("character", "background", "style")


@pytest.fixture(scope="module")
def world(comfy_state, ml):
    out = {}
    for kind in ("sd15", "sdxl"):
        model = tiny_models.build_tiny(kind, seed=0)
        names = lora_files.write_lora_set(model, comfy_state["loras_dir"], f"cml_{kind}", (81, 82, 83))
        s = ml("core.stack")
        out[kind] = (model, tuple(s.LoraRow(n, 0.9, category=c) for n, c in zip(names, CATEGORIES)))
    folder_paths.filename_list_cache.clear()
    return out


def run(model, kind, steps=8, callback=None):
    positive = tiny_models.make_conditioning(kind, seed=1)
    negative = tiny_models.make_conditioning(kind, seed=2)
    latent = torch.zeros(1, 4, 8, 8)
    return comfy.sample.sample(model, comfy.sample.prepare_noise(latent, 4), steps, CFG, "euler", "normal", positive,
                               negative, latent, callback=callback, disable_pbar=True, seed=4)


def branches_of(clone):
    return clone.wrappers[comfy.patcher_extension.WrappersMP.CALC_COND_BATCH]["multilora.composite"][0]


def test_equal_weights_reproduce_composite(ml, world):
    model, rows = world["sd15"]
    clone = ml("methods.cmlora").cmlora_model(model, rows, 0.55, False, "test", cache=False)
    wrapper = branches_of(clone)
    wrapper.weights_for = lambda options: (1 / 3, 1 / 3, 1 / 3)
    composite = ml("methods.switch_composite").composite_model(model, rows, None, "test")
    torch.testing.assert_close(run(clone, "sd15"), run(composite, "sd15"), atol=1e-6, rtol=1e-6)


def test_every_step_uses_the_plan_dominant_and_weights(ml, world):
    model, rows = world["sd15"]
    clone = ml("methods.cmlora").cmlora_model(model, rows, 0.55, False, "test", cache=False)
    outputs = []

    def keep(executor, *args, **kwargs):
        out = executor(*args, **kwargs)
        outputs.append([o.clone() for o in out])
        return out

    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, "test.keep", keep)
    denoised = []
    run(clone, "sd15", steps=8, callback=lambda i, d, x, n: denoised.append(d.clone()))
    plan = ml("core.cmlora_schedule").cmlora_plan(8, list(CATEGORIES))
    assert branches_of(clone).dominants == [p.dominant for p in plan]
    assert len({p.dominant for p in plan}) > 1  # the dominant LoRA actually rotates
    for step, (den, outs) in enumerate(zip(denoised, outputs)):
        w = plan[step].weights
        c = sum(w[i] * outs[i] for i in range(3))       # branches are ordered cond j·k + LoRA i
        u = sum(w[i] * outs[3 + i] for i in range(3))
        torch.testing.assert_close(den, u + CFG * (c - u), atol=1e-5, rtol=1e-5)


def test_sampler_node_on_sdxl_and_profiled_ordering(ml, world):
    model, rows = world["sdxl"]
    node = nodes.NODE_CLASS_MAPPINGS["MultiLoRACMLoRASampler"]
    s = ml("core.stack")
    stack = s.LoraStack(rows)
    kwargs = dict(model=model, lora_stack=stack, seed=4, steps=6, cfg=CFG, sampler_name="euler", scheduler="normal",
                  positive=tiny_models.make_conditioning("sdxl", seed=1),
                  negative=tiny_models.make_conditioning("sdxl", seed=2),
                  latent_image={"samples": torch.zeros(1, 4, 8, 8)}, denoise=1.0)
    out = node.execute(**kwargs).result[0]["samples"]
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all() and model.wrappers == {}
    with pytest.raises(ValueError, match="ordering 'profiled scores' needs a score for every row"):
        node.execute(**kwargs, ordering="profiled scores")
    scored = s.LoraStack(tuple(s.LoraRow(r.name, 0.9, category=r.category, hf_score=v) for r, v in zip(rows, (0.9, 0.1, 0.5))))
    assert torch.isfinite(node.execute(**{**kwargs, "lora_stack": scored}, ordering="profiled scores").result[0]["samples"]).all()


def test_frequency_profile_node_ranks_and_writes_scores(ml, world):
    _, rows = world["sd15"]
    s = ml("core.stack")
    stack = s.LoraStack(rows[:2])
    y, x = torch.meshgrid(torch.linspace(-1, 1, 64), torch.linspace(-1, 1, 64), indexing="ij")
    smooth = torch.exp(-(x ** 2 + y ** 2) * 3)[..., None].expand(64, 64, 3)
    checker = ((torch.arange(64)[:, None] + torch.arange(64)[None, :]) % 2).float()[..., None].expand(64, 64, 3)
    node = nodes.NODE_CLASS_MAPPINGS["MultiLoRAFrequencyProfile"]
    scored, text = node.execute(lora_stack=stack, images=torch.stack([checker, smooth])).result
    assert scored.rows[0].hf_score > scored.rows[1].hf_score and stack.rows[0].hf_score is None
    assert rows[0].name in text
    with pytest.raises(ml("core.errors").StackError, match="got 1 images for 2 enabled LoRAs"):
        node.execute(lora_stack=stack, images=smooth[None])


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_shallow_path_with_a_fresh_cache_reproduces_the_full_unet(ml, world, kind):
    model, _ = world[kind]
    unet = model.model.diffusion_model
    cache = ml("host.feature_cache")
    x, sigma, cond = tiny_models.make_inputs(kind, batch=2, seed=5)
    t = torch.tensor([500.0, 500.0])
    y = cond.get("y")
    with torch.no_grad():
        stock = unet(x, t, cond["c_crossattn"], y, transformer_options={})
        full, deep = cache.split_forward(unet, x, t, cond["c_crossattn"], y, {}, torch.arange(2), None, None)
        shallow, _ = cache.split_forward(unet, x, t, cond["c_crossattn"], y, {}, torch.arange(0), deep, None)
        mixed, _ = cache.split_forward(unet, x, t, cond["c_crossattn"], y, {}, torch.tensor([1]), deep, None)
        stale, _ = cache.split_forward(unet, x, t, cond["c_crossattn"], y, {}, torch.arange(0), deep.flip(0), None)
    torch.testing.assert_close(full, stock, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(shallow, stock, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(mixed, stock, atol=1e-5, rtol=1e-5)
    assert (stale - stock).abs().max() > 1e-3  # the deep feature really is used
    assert cache.shallow_blocks(unet) >= 1


@pytest.mark.parametrize("steps", [20, 50])
def test_full_unet_evaluations_follow_the_refresh_schedule(ml, world, steps):
    model, rows = world["sd15"]
    clone = ml("methods.cmlora").cmlora_model(model, rows, 0.55, False, "test", cache=True)
    feature_cache = clone.wrappers[comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL]["multilora.feature_cache"][0]
    out = run(clone, "sd15", steps=steps)
    refresh = ml("core.cmlora_schedule").refresh_steps(steps)
    k, conds = 3, 2
    expected_full = conds * (k + (len(refresh) - 1))  # all LoRAs at step 0, then the new dominant at each refresh
    assert feature_cache.full_branch_evaluations == expected_full
    assert feature_cache.shallow_branch_evaluations == conds * k * steps - expected_full
    assert torch.isfinite(out).all()
    reference = run(ml("methods.cmlora").cmlora_model(model, rows, 0.55, False, "test", cache=False), "sd15", steps=steps)
    assert (out - reference).abs().max() > 0  # the cache is in effect
