"""CLoRA's fast gradient pass ==  the straightforward one, inside a real ComfyUI on the CPU.

Straightforward path (the first implementation, kept as ``gradient_ready(share_weights=False)``): ComfyUI's cast
path copies every weight and bias per forward (identity weight/bias functions) and the UNet runs to its end.
Fast path: the inference-mode weights are shared through normal-tensor aliases (no copies, ops on their plain
forward), the engine stays on its hooks, the UNet call stops after the last attention-capture site, and passes
after the first make the recorded model call directly (clora_direct).
Both run the same kernels on the same values along every path that reaches the loss, so the loss, ∇ₓL and the
updated latent are compared bit for bit (atol = rtol = 0).
"""
import contextlib
import functools

import pytest
import torch

import comfy.model_management
import comfy.sample
import comfy.samplers
import folder_paths
import nodes

from support import lora_files, tiny_models


@pytest.fixture(scope="module")
def inference_worlds(comfy_state, ml):
    """Per kind: a tiny model built under inference mode (weights are inference tensors, as in the executor),
    two concept LoRAs and a style LoRA on a clone, and three hand-made variants."""
    worlds = {}
    with torch.inference_mode():
        for kind in ("sd15", "sdxl"):
            model = tiny_models.build_tiny(kind, seed=4)
            names = lora_files.write_lora_set(model, comfy_state["loras_dir"], f"clora_fast_{kind}", (81, 82, 83))
            folder_paths.filename_list_cache.clear()
            s = ml("core.stack")
            rows = [s.LoraRow(names[0], 0.8, concept="cat"), s.LoraRow(names[1], 0.8, concept="dog"),
                    s.LoraRow(names[2], 0.5, category="style")]
            variants = [ml("methods.clora").Variant("p", tiny_models.make_conditioning(kind, seed=v),
                                            tiny_models.make_conditioning(kind, seed=9), {0: [2, 3], 1: [5]})
                        for v in range(3)]
            worlds[kind] = (model, rows, variants)
    return worlds


def straightforward(ml, monkeypatch):
    """A context running CLoRA's gradient pass the first way: per-forward weight copies, full UNet calls."""
    clora = ml("methods.clora")

    class FullForward:
        def __init__(self, capture):
            pass

        def __call__(self, executor, *args, **kwargs):
            return executor(*args, **kwargs)

    @contextlib.contextmanager
    def patched():
        with monkeypatch.context() as m:
            m.setattr(clora, "gradient_ready", functools.partial(clora.gradient_ready, share_weights=False))
            m.setattr(clora, "StopAfterCapture", FullForward)
            m.setattr(clora, "plain_conds", lambda conds: False)  # every pass through calc_cond_batch, none recorded
            yield
    return patched()


def run_probe(ml, world, probe, steps=6, **settings):
    """Sample with a KSAMPLER whose function is ``probe(guider, engine, x, sigmas, options)`` (under inference mode)."""
    clora = ml("methods.clora")
    model, rows, variants = world
    with torch.inference_mode():
        engine = ml("host.engine").build_engine(model, rows, "test")
        clone = model.clone()
        engine.install(clone)
        record = clora.CloraRecord(["a", "b"], (8, 8))
        guider = clora.CloraGuider(clone, engine, variants, clora.CloraSettings(cfg=5.0, **settings), record)

        def function(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
            probe(guider, engine, x, sigmas, extra_args["model_options"])
            return x

        latent = torch.zeros(1, 4, 8, 8)
        sigmas = comfy.samplers.KSampler(clone, steps, "cpu", "euler", "normal", 1.0).sigmas
        guider.sample(comfy.sample.prepare_noise(latent, 1), latent, comfy.samplers.KSAMPLER(function), sigmas,
                      disable_pbar=True, seed=1)
    return guider, engine


def start_latent(x, sigma):
    return torch.randn(x.shape, generator=torch.Generator().manual_seed(0)) * float(sigma)


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_fast_update_equals_the_straightforward_update(ml, inference_worlds, kind, monkeypatch):
    """Loss, ∇ₓL and the latent after 3 update iterations, bit for bit; aliases reused within a run."""
    seen = {}

    def probe(guider, engine, x, sigmas, options):
        x0 = seen["x0"] = start_latent(x, sigmas[1])
        sigma = sigmas[1:2].expand(x.shape[0])
        with straightforward(ml, monkeypatch):
            seen["ref_grad"] = guider.loss_gradient(x0, sigma, options)
            start = len(guider.record.losses)
            seen["ref_x"] = guider.update_latent(x0, sigma, 3, options)
            seen["ref_losses"] = guider.record.losses[start:]
        seen["grad"] = guider.loss_gradient(x0, sigma, options)
        with guider.weight_aliases_kept():  # as clora_sampler runs it: aliases made once, reused by later passes
            for key in ("x", "x_again"):
                start = len(guider.record.losses)
                seen[key] = guider.update_latent(x0, sigma, 3, options)
                seen[key + "_losses"] = guider.record.losses[start:]
            seen["aliases"] = len(guider._aliases)
            seen["direct"] = guider._recorded is not None and guider._recorded.fits(x0, options)
        assert guider._aliases is None and guider._recorded is None  # dropped when the run ends

    run_probe(ml, inference_worlds[kind], probe)
    assert seen["ref_grad"][1].abs().max() > 0 and seen["aliases"] > 0 and seen["direct"]
    assert seen["grad"][0] == seen["ref_grad"][0]
    torch.testing.assert_close(seen["grad"][1], seen["ref_grad"][1], atol=0, rtol=0)
    assert len(seen["ref_losses"]) == 3 and seen["x_losses"] == seen["ref_losses"] == seen["x_again_losses"]
    torch.testing.assert_close(seen["x"], seen["ref_x"], atol=0, rtol=0)
    torch.testing.assert_close(seen["x_again"], seen["ref_x"], atol=0, rtol=0)
    assert (seen["x"] - seen["x0"]).abs().max() > 0  # the update moved x


def test_gradient_pass_stops_after_the_last_capture_site(ml, inference_worlds):
    """The last output block (its ResBlock) and the output conv run in predict_noise, not in the gradient pass."""
    model, _, _ = inference_worlds["sd15"]
    unet = model.model.diffusion_model
    calls = {"out": 0, "last": 0}
    handles = [unet.out.register_forward_pre_hook(lambda *a: calls.__setitem__("out", calls["out"] + 1)),
               unet.output_blocks[-1][0].register_forward_pre_hook(lambda *a: calls.__setitem__("last", calls["last"] + 1))]
    seen = {}

    def probe(guider, engine, x, sigmas, options):
        guider.loss_gradient(start_latent(x, sigmas[1]), sigmas[1:2].expand(x.shape[0]), options)
        seen["after_gradient"] = dict(calls)
        guider.predict_noise(x, sigmas[1:2].expand(x.shape[0]), options)
        seen["after_predict"] = dict(calls)

    try:
        run_probe(ml, inference_worlds["sd15"], probe)
    finally:
        for h in handles:
            h.remove()
    assert seen["after_gradient"] == {"out": 0, "last": 0}
    assert seen["after_predict"] == {"out": 1, "last": 1}


def test_merged_weights_at_the_start_of_an_update(ml, inference_worlds, monkeypatch):
    """If the engine holds a merged LoRA vector when an update starts, the fast pass (which restores W₀ and stays
    on the hooks) gives the straightforward pass's gradient, and the weights end as W₀."""
    model, _, _ = inference_worlds["sd15"]
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    seen = {}

    def probe(guider, engine, x, sigmas, options):
        x0 = start_latent(x, sigmas[1])
        sigma = sigmas[1:2].expand(x.shape[0])
        for key, context in (("ref", straightforward(ml, monkeypatch)), ("fast", contextlib.nullcontext())):
            engine.merge_weights(guider.model_patcher.model, (1.0, 0.0, 1.0))
            assert engine._merged is not None
            with context:
                seen[key] = guider.loss_gradient(x0, sigma, options)
            seen[key + "_merged_after"] = engine._merged
            seen[key + "_merge_uniform"] = engine.merge_uniform

    run_probe(ml, inference_worlds["sd15"], probe)
    assert seen["fast"][0] == seen["ref"][0]
    torch.testing.assert_close(seen["fast"][1], seen["ref"][1], atol=0, rtol=0)
    assert seen["fast_merged_after"] is None and seen["fast_merge_uniform"] is True
    assert all(torch.equal(before[k], v) for k, v in model.model.state_dict().items())


def test_user_model_untouched_after_runs_and_cancel(ml, inference_worlds, comfy_state):
    """Same parameter objects, flags and bits after a full CLoRA run and after a Cancel inside the gradient
    pass (where the parameters are swapped for aliases); a core KSampler on the model samples bit-identically."""
    clora = ml("methods.clora")
    model, rows, variants = inference_worlds["sd15"]
    unet = model.model.diffusion_model
    params = dict(unet.named_parameters())
    flags = {k: p.requires_grad for k, p in params.items()}
    values = {k: p.clone() for k, p in params.items()}

    def base_sample():
        with torch.inference_mode():
            return nodes.common_ksampler(model, 5, 3, 5.0, "euler", "normal", tiny_models.make_conditioning("sd15", seed=1),
                                         tiny_models.make_conditioning("sd15", seed=2),
                                         tiny_models.make_latent("sd15"))[0]["samples"]

    def untouched():
        now = dict(unet.named_parameters())
        assert now.keys() == params.keys() and all(now[k] is params[k] for k in params)
        assert all(p.is_inference() for p in now.values())
        assert {k: p.requires_grad for k, p in now.items()} == flags
        assert all(torch.equal(now[k], values[k]) for k in params)
        assert sum(len(getattr(m, "weight_function", [])) + len(getattr(m, "bias_function", [])) for m in unet.modules()) == 0

    fresh = base_sample()
    with torch.inference_mode():
        clip = tiny_models.build_tiny_clip(seed=3)
        out, record = clora.clora_sample(model, clip, "a photo of a cat and a dog", "blurry",
                                         [rows[0], rows[1], rows[2]], 3, 4, "euler", "normal",
                                         {"samples": torch.zeros(1, 4, 8, 8)}, 1.0,
                                         clora.CloraSettings(cfg=5.0, refine_iters=2))
    assert torch.isfinite(out["samples"]).all() and len(record.losses) == 2 * (1 + 2)
    assert record.final_masks.device.type == "cpu" and all(m.device.type == "cpu" for s in record.steps for m in s)
    untouched()

    original = clora.CloraGuider._contrastive  # every gradient pass's loss, recorded call or not
    state = {"n": 0}

    def cancelling(self, *args, **kwargs):
        state["n"] += 1
        if state["n"] == 2:
            swapped = dict(unet.named_parameters())
            state["swapped"] = sum(swapped[k] is not params[k] and not swapped[k].is_inference() for k in params)
            raise comfy.model_management.InterruptProcessingException()
        return original(self, *args, **kwargs)

    clora.CloraGuider._contrastive = cancelling
    try:
        with pytest.raises(comfy.model_management.InterruptProcessingException), torch.inference_mode():
            clora.clora_sample(model, clip, "a photo of a cat and a dog", "blurry", list(rows), 3, 4, "euler",
                               "normal", {"samples": torch.zeros(1, 4, 8, 8)}, 1.0,
                               clora.CloraSettings(cfg=5.0, refine_iters=2))
    finally:
        clora.CloraGuider._contrastive = original
        comfy.model_management.interrupt_current_processing(False)
    assert state["swapped"] == len(params)  # the cancel hit while every weight was an alias
    untouched()
    torch.testing.assert_close(base_sample(), fresh, atol=0, rtol=0)


def test_quantized_like_parameters_fall_back_to_per_forward_copies(ml, inference_worlds, monkeypatch):
    """Parameters that cannot be aliased (tensor subclasses, e.g. quantized weights) keep the copy path, and
    the gradient is the same as with every weight aliased."""
    gradient = ml("methods.clora_gradient")
    seen = {}
    real = gradient._shares_memory

    def probe(guider, engine, x, sigmas, options):
        x0 = start_latent(x, sigmas[1])
        sigma = sigmas[1:2].expand(x.shape[0])
        seen["all"] = guider.loss_gradient(x0, sigma, options)
        with monkeypatch.context() as m:  # pretend the attention projections are not plain parameters
            m.setattr(gradient, "_shares_memory", lambda p: real(p) and p.ndim != 2)
            unet = guider.model_patcher.model.diffusion_model
            seen["copies"] = guider.loss_gradient(x0, sigma, options)
        seen["left"] = sum(len(m.weight_function) for m in unet.modules() if hasattr(m, "weight_function"))

    run_probe(ml, inference_worlds["sdxl"], probe)
    assert seen["copies"][0] == seen["all"][0] and seen["left"] == 0
    torch.testing.assert_close(seen["copies"][1], seen["all"][1], atol=0, rtol=0)


def test_masks_of_all_rows_at_once_equal_row_by_row(ml):
    """predict_noise thresholds the [B, T, h, w] maps of every row in one call; the masks are those of the
    former per-row loop, bit for bit (normalisation, thresholds and resize are per map)."""
    masks_from_maps = ml("core.clora_masks").masks_from_maps
    gen = torch.Generator().manual_seed(5)
    groups = [[torch.rand(3, 2, 4, 6, generator=gen), torch.rand(3, 1, 4, 6, generator=gen)],
              [torch.rand(3, 1, 4, 6, generator=gen) ** 3]]
    for threshold in (0.0, 0.4, 1.0):
        together = masks_from_maps([torch.cat(g, dim=1) for g in groups], threshold, (8, 11))
        by_row = torch.stack([masks_from_maps([torch.cat([m[r] for m in g], dim=0) for g in groups], threshold, (8, 11))
                              for r in range(3)])
        assert together.dtype == torch.bool and together.shape == (3, 2, 8, 11)
        assert torch.equal(together, by_row)


@pytest.mark.parametrize("kind,halves", [("sd15", "cond and uncond"), ("sdxl", "cond")])
def test_direct_passes_equal_calc_cond_batch_passes_at_every_sigma(ml, inference_worlds, kind, halves, monkeypatch):
    """After a run's first gradient pass the guider makes its recorded model call directly (x and σ repeated per
    chunk, conds kept on the device): (L, ∇ₓL) at new latents and other σ equal the calc_cond_batch pass bit
    for bit, with uncond chunks in the call (the authors' halves) and SDXL's vector cond."""
    clora = ml("methods.clora")
    seen = {"direct": [], "reference": []}

    def probe(guider, engine, x, sigmas, options):
        with guider.weight_aliases_kept():
            guider.loss_gradient(start_latent(x, sigmas[0]), sigmas[0:1].expand(x.shape[0]), options)  # recorded
            assert guider._recorded is not None and guider._recorded.chunks == (6 if halves != "cond" else 3)
            for i in (1, 3):
                x_i = start_latent(x, sigmas[i]) + i
                seen["direct"].append(guider.loss_gradient(x_i, sigmas[i:i + 1].expand(x.shape[0]), options))
            guider._recorded = None
            with monkeypatch.context() as m:
                m.setattr(clora, "plain_conds", lambda conds: False)
                for i in (1, 3):
                    x_i = start_latent(x, sigmas[i]) + i
                    seen["reference"].append(guider.loss_gradient(x_i, sigmas[i:i + 1].expand(x.shape[0]), options))

    run_probe(ml, inference_worlds[kind], probe, attention_halves=halves)
    for (value, grad), (ref_value, ref_grad) in zip(seen["direct"], seen["reference"]):
        assert value == ref_value and ref_grad.abs().max() > 0
        torch.testing.assert_close(grad, ref_grad, atol=0, rtol=0)
    assert seen["direct"][0][0] != seen["direct"][1][0]  # other x and σ: another loss


def test_conds_with_an_area_are_not_recorded_and_other_options_are_not_reused(ml, inference_worlds):
    """A cond limited to an area (or to some steps) changes what calc_cond_batch builds: such passes are never
    recorded. A recorded call serves only the model_options of its own run."""
    seen = {}

    def probe(guider, engine, x, sigmas, options):
        sigma = sigmas[1:2].expand(x.shape[0])
        guider.loss_gradient(start_latent(x, sigmas[1]), sigma, options)
        seen["plain"] = guider._recorded is not None
        seen["other_options"] = guider._recorded.fits(x, dict(options))
        guider._recorded = None
        first = guider.conds["c0"][0]
        guider.conds["c0"][0] = {**first, "area": (8, 8, 0, 0)}
        try:
            guider.loss_gradient(start_latent(x, sigmas[1]), sigma, options)
        finally:
            guider.conds["c0"][0] = first
        seen["area"] = guider._recorded is not None

    run_probe(ml, inference_worlds["sd15"], probe)
    assert seen == {"plain": True, "other_options": False, "area": False}

