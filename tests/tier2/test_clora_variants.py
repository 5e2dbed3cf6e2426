"""CLoRA's settings where the pack and the authors' released pipeline differ, the "authors' code" variant
as a whole (against a hand-written reference step), batch independence and pre-CFG hooks, inside a real
ComfyUI on the tiny SD1.5 model.

Each setting is checked for what it must change and for what it must leave alone: runs that differ only in
that setting agree bit for bit where the setting has no effect (no update, or λ = 0 full masks)."""
import pytest
import torch

import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import folder_paths

from support import lora_files, tiny_models

PROMPT = "a photo of a cat and a dog in a park"
CFG = 5.0


@pytest.fixture(scope="module")
def world(comfy_state, ml):
    model = tiny_models.build_tiny("sd15", seed=0)
    clip = tiny_models.build_tiny_clip(seed=0)
    names = lora_files.write_lora_set(model, comfy_state["loras_dir"], "clora_var", (81, 82, 83), clip=clip)
    folder_paths.filename_list_cache.clear()
    s = ml("core.stack")
    rows = [s.LoraRow(names[0], 0.8, concept="cat", trigger="sks", category="character"),
            s.LoraRow(names[1], 0.8, concept="dog", category="object"),
            s.LoraRow(names[2], 0.5, category="style")]
    return model, clip, rows


def settings(ml, **kw):
    base = {"cfg": CFG, "refine_iters": 2}
    base.update(kw)
    return ml("methods.clora").CloraSettings(**base)


def guider_for(ml, world, st, model=None):
    """A CloraGuider on a clone with the stack's engine, its record, and the run's sigmas (6 euler steps)."""
    model = world[0] if model is None else model
    clora = ml("methods.clora")
    concepts, style = clora.split_rows(world[2])
    variants = clora.build_variants(world[1], PROMPT, "blurry", concepts, style)
    engine = ml("host.engine").build_engine(model, concepts + style, "test")
    clone = model.clone()
    engine.install(clone)
    record = clora.CloraRecord(["cat", "dog"], (8, 8))
    guider = clora.CloraGuider(clone, engine, variants, st, record)
    sigmas = comfy.samplers.KSampler(clone, 6, "cpu", "euler", "normal", 1.0).sigmas
    return guider, record, sigmas


def sample(ml, world, st, model=None, seed=2, size=(8, 8)):
    """(final latent, per-step denoised, record) of a 6-step euler CLoRA run."""
    guider, record, sigmas = guider_for(ml, world, st, model)
    latent = torch.zeros(1, 4, *size)
    seen = []
    out = guider.sample(comfy.sample.prepare_noise(latent, seed), latent, ml("methods.clora").clora_sampler("euler", 6, st),
                        sigmas, callback=lambda i, den, x, n: seen.append(den.clone()), disable_pbar=True, seed=seed)
    return out, seen, record


# --- the variant preset -------------------------------------------------------------------------------
def test_variant_presets_set_the_four_fields_and_custom_keeps_them(ml):
    cs = ml("methods.clora_settings")
    pack = cs.CloraSettings.for_variant("pack", cfg=3.0, mask_source="own variant")
    assert (pack.mask_source, pack.recompute_after_update, pack.attention_halves) == ("union of variants", True, "cond")
    authors = cs.CloraSettings.for_variant("authors' code", cfg=3.0, step_size=7.0)
    assert (authors.mask_source, authors.recompute_after_update, authors.attention_halves) == \
        ("own variant", False, "cond and uncond")
    assert authors.step_size == 7.0 and authors.cfg == 3.0 and authors.variant() == "authors' code"
    assert (pack.refine_at, authors.refine_at) == ((0.0, 0.2, 0.4), (0.0, 0.1, 0.2))
    assert cs.CloraSettings(cfg=1.0, refine_at=(0.0, 0.1, 0.2)).variant() == "custom"
    custom = cs.CloraSettings.for_variant("custom", cfg=3.0, recompute_after_update=False)
    assert (custom.mask_source, custom.recompute_after_update, custom.attention_halves) == \
        ("union of variants", False, "cond")
    assert custom.variant() == "custom" and cs.CloraSettings(cfg=1.0).variant() == "pack"
    with pytest.raises(ml("core.errors").MultiLoRAError,
                       match=r"^KSampler \(CLoRA\): 'variant' must be one of 'pack', \"authors' code\", 'custom' "
                             r"\(got 'authors'\)\. Pick one of these\.$"):
        cs.CloraSettings.for_variant("authors", "KSampler (CLoRA)", cfg=3.0)


def test_bad_variant_field_is_a_named_error_before_sampling(ml, world):
    model, clip, rows = world
    errors = ml("core.errors")
    with pytest.raises(errors.MultiLoRAError, match=r"^CLoRA: 'mask_source' must be one of 'union of variants', "
                                                    r"'own variant' \(got 'mine'\)\. Pick one of these\.$"):
        ml("methods.clora").clora_sample(model, clip, PROMPT, "", rows, 1, 2, "euler", "normal",
                                         {"samples": torch.zeros(1, 4, 8, 8)}, 1.0, settings(ml, mask_source="mine"))


# --- batch independence -------------------------------------------------------------------------------
@pytest.mark.parametrize("variant", ["pack", "authors' code"])
def test_each_image_of_a_batch_equals_its_seed_sampled_alone(ml, world, variant):
    """batch_size 3 vs each image alone (ComfyUI's batch_index gives it the same noise). Tolerance: 3e-5 of the
    latent's largest value (the tiny model's latents reach ~400). Float32 results of one UNet call differ by
    ~1e-6 (relative) between batch sizes (BLAS blocking): 4e-4 absolute after 4 steps without any update,
    1.3e-3 with the updates, whose step α·(1+σ²) ≈ 4·10³ multiplies the gradient's rounding. A loss that
    couples images (a mean over the batch shrinks each image's step to 1/3) moves image 0 by 139."""
    model, clip, rows = world
    clora = ml("methods.clora")
    st = clora.CloraSettings.for_variant(variant, cfg=CFG, refine_iters=2)

    def run(latent):
        return clora.clora_sample(model, clip, PROMPT, "blurry", rows, 7, 4, "euler", "normal", latent, 1.0, st)[0]

    batch = run({"samples": torch.zeros(3, 4, 8, 8)})["samples"]
    for j in range(3):
        alone = run({"samples": torch.zeros(1, 4, 8, 8), "batch_index": [j]})["samples"]
        assert float((batch[j:j + 1] - alone).abs().max()) <= 3e-5 * float(alone.abs().max()), j
    assert float((batch[0] - batch[1]).abs().max()) > 1.0  # the images really are different samples


# --- pre-CFG hooks ------------------------------------------------------------------------------------
def test_pre_cfg_functions_run_on_the_fused_pair_before_cfg(ml, world):
    """As core's sampling_function (and Perp-Neg's guider): every model pre-CFG function gets the fused
    (cond, uncond) predictions and what it returns is what CFG combines."""
    st = settings(ml, opt_until=0.34)
    plain, _, _ = sample(ml, world, st)
    calls = []

    def identity(args):
        calls.append(args)
        return args["conds_out"]

    model = world[0].clone()
    model.set_model_sampler_pre_cfg_function(identity)
    same, _, _ = sample(ml, world, st, model=model)
    torch.testing.assert_close(same, plain, atol=0, rtol=0)
    assert len(calls) == 6 and all(len(a["conds_out"]) == 2 and a["cond_scale"] == CFG for a in calls)
    assert all(a["conds_out"][0].shape == a["input"].shape == (1, 4, 8, 8) for a in calls)
    uncond_seen = []

    def uncond_only(args):  # CFG of (u, u) is u: the step's denoised must be exactly the fused uncond
        u = args["conds_out"][1]
        uncond_seen.append(u.clone())
        return [u, u]

    model = world[0].clone()
    model.set_model_sampler_pre_cfg_function(uncond_only)
    changed, denoised, _ = sample(ml, world, st, model=model)
    assert len(denoised) == len(uncond_seen) == 6
    for den, u in zip(denoised, uncond_seen):
        torch.testing.assert_close(den, u, atol=0, rtol=0)
    assert float((changed - plain).abs().max()) > 1.0


# --- each setting: what it changes and what it leaves alone --------------------------------------------
def test_mask_source_own_variant_takes_each_loras_own_maps(ml, world):
    """Only step 0 is updated, before any fusion: both runs' updates agree; the own-variant maps of step 0 are
    the slices of the union's maps that come from that LoRA's variant; with λ = 0 (full masks) nothing
    differs."""
    union_out, _, union_rec = sample(ml, world, settings(ml, opt_until=0.2))
    own_out, _, own_rec = sample(ml, world, settings(ml, opt_until=0.2, mask_source="own variant"))
    assert own_rec.losses == union_rec.losses and len(own_rec.losses) == 3
    guider, _, _ = guider_for(ml, world, settings(ml))
    counts = [[len(v.groups[g]) for g in range(2)] for v in guider.variants]  # tokens of concept g in variant v
    for g in range(2):
        start = sum(counts[v][g] for v in range(g + 1))
        own, union = own_rec.steps[0][g], union_rec.steps[0][g]
        assert union.shape[0] == sum(counts[v][g] for v in range(3)) and own.shape[0] == counts[g + 1][g]
        torch.testing.assert_close(own, union[start:start + counts[g + 1][g]], atol=0, rtol=0)
    masks_from_maps = ml("core.clora_masks").masks_from_maps
    for rec in (own_rec, union_rec):  # what Mask Preview re-thresholds are the maps the run's masks came from
        assert torch.equal(masks_from_maps(rec.steps[-1], 0.4, (8, 8)), rec.final_masks)
    assert float((own_out - union_out).abs().max()) > 1e-2
    full_own, _, _ = sample(ml, world, settings(ml, mask_threshold=0.0, mask_source="own variant"))
    full_union, _, _ = sample(ml, world, settings(ml, mask_threshold=0.0))
    torch.testing.assert_close(full_own, full_union, atol=0, rtol=0)


def count_model_calls(model):
    """A clone of ``model`` counting UNet calls: (all, with uncond chunks). Gradient passes after a run's first
    go straight to apply_model (clora_direct), so the count is taken there, not at calc_cond_batch."""
    clone = model.clone()
    calls = {"all": 0, "full": 0}

    def count(executor, x, t, *args, **kwargs):
        options = args[3] if len(args) > 3 else kwargs.get("transformer_options", {})  # (c_concat, c_crossattn, control, options)
        chunks = options.get("cond_or_uncond", [])
        calls["all"] += 1
        calls["full"] += any(int(c) % 2 == 1 for c in chunks)  # the guider's cond list: c0, u0, c1, u1, …
        return executor(x, t, *args, **kwargs)

    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test.count", count)
    return clone, calls


def test_keeping_predictions_after_an_update_saves_one_unet_pass_per_updated_step(ml, world):
    """6 steps, updates at steps 0 and 1 with 1 + 2 iterations each: the pack runs 6 loss passes (cond only) and
    6 prediction passes; keeping the predictions makes the last loss pass of each update a full one and drops
    the prediction pass of steps 0 and 1. Without updates nothing differs."""
    runs = {}
    for keep in (False, True):
        model, calls = count_model_calls(world[0])
        runs[keep] = sample(ml, world, settings(ml, opt_until=0.34, recompute_after_update=not keep), model=model)
        runs[keep] += (dict(calls),)
    assert runs[False][3] == {"all": 12, "full": 6}
    assert runs[True][3] == {"all": 10, "full": 6}
    # step 0's update is the same (its last pass runs uncond rows in the batch too: float32 rounding only)
    assert runs[True][2].losses[:3] == pytest.approx(runs[False][2].losses[:3], rel=1e-5)
    assert float((runs[True][0] - runs[False][0]).abs().max()) > 1e-2
    plain, _, _ = sample(ml, world, settings(ml, opt_until=0.0))
    kept, _, _ = sample(ml, world, settings(ml, opt_until=0.0, recompute_after_update=False))
    torch.testing.assert_close(kept, plain, atol=0, rtol=0)


def test_attention_halves_averages_the_cond_and_uncond_maps(ml, world):
    """Maps of variant v = (cond chunk's + uncond chunk's)/2 at the cond prompt's token positions (hand-filled
    capture); in a run this changes the maps and the loss, never the UNet's predictions."""
    both, _, _ = guider_for(ml, world, settings(ml, attention_halves="cond and uncond"))
    cond, _, _ = guider_for(ml, world, settings(ml))
    capture = both._capture(torch.zeros(2, 4, 8, 8))
    assert sorted(capture.columns) == list(range(6)) and sorted(cond._capture(torch.zeros(2, 4, 8, 8)).columns) == [0, 2, 4]
    assert all(capture.columns[2 * v + 1] == capture.columns[2 * v] for v in range(3))
    gen = torch.Generator().manual_seed(4)
    h, w = capture.size
    capture.maps = {tuple(capture.size): {j: [torch.rand(2, h * w, len(capture.columns[j]), generator=gen) for _ in range(2)]
                                          for j in range(6)}}
    got_both, got_cond = both.variant_maps(capture), cond.variant_maps(capture)
    for v, variant in enumerate(both.variants):
        c, u = capture.averaged(2 * v), capture.averaged(2 * v + 1)
        offset = 0
        for g in sorted(variant.groups):
            n = len(variant.groups[g])
            torch.testing.assert_close(got_both[g][v], ((c + u) / 2)[:, offset:offset + n], atol=0, rtol=0)
            torch.testing.assert_close(got_cond[g][v], c[:, offset:offset + n], atol=0, rtol=0)
            offset += n
    no_update = {"opt_until": 0.0, "mask_threshold": 0.0}  # maps unused: the predictions alone make the result
    torch.testing.assert_close(sample(ml, world, settings(ml, attention_halves="cond and uncond", **no_update))[0],
                               sample(ml, world, settings(ml, **no_update))[0], atol=0, rtol=0)
    _, _, with_uncond = sample(ml, world, settings(ml, opt_until=0.2, attention_halves="cond and uncond"))
    _, _, cond_only = sample(ml, world, settings(ml, opt_until=0.2))
    assert abs(with_uncond.losses[0] - cond_only.losses[0]) > 1e-4


# --- the authors' variant as a whole: one step against a hand-written reference -----------------------
class HandAttention:
    """attn2 replacement computing attention by hand, softmax(q·kᵀ/√d)·v, and keeping the probabilities of
    every chunk at the captured size per cond index ([rows, heads, HW, 77] per layer call)."""

    def __init__(self, size):
        self.size, self.probs = tuple(size), {}

    def __call__(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        batch, _, inner = q.shape
        d = inner // heads
        qh, kh, vh = (t.reshape(batch, -1, heads, d).transpose(1, 2) for t in (q, k, v))
        p = torch.softmax(qh.float() @ kh.float().transpose(-1, -2) / d ** 0.5, dim=-1)
        if tuple(extra_options["activations_shape"][-2:]) == self.size:
            chunks = extra_options["cond_or_uncond"]
            rows = batch // len(chunks)
            for c, index in enumerate(chunks):
                self.probs.setdefault(int(index), []).append(p[c * rows:(c + 1) * rows])
        return (p.to(vh.dtype) @ vh).transpose(1, 2).reshape(batch, -1, inner)


def authors_reference_step(ml, guider, x, sigma, options, st):
    """The authors' step written out: one forward of every branch with autograd; maps of variant v = mean over
    layers, heads and both halves at v's token positions; L = Σ_images NT-Xent over the concept groups;
    x' = x − α(1+σ²)∇L; LoRA g's mask from its own variant's maps; the forward's noise predictions kept,
    D_i' = D_i + (x' − x); masked fusion per half, then CFG."""
    capture = ml("host.attention_capture")
    unet = guider.model_patcher.model.diffusion_model
    size = capture.capture_size(*x.shape[-2:], capture.capture_level(unet))
    hand = HandAttention(size)
    opts = comfy.model_patcher.create_model_options_clone(options)
    opts["transformer_options"] = dict(opts.get("transformer_options", {}))
    opts["transformer_options"][ml("host.onthefly").ROUTING_KEY] = guider.routing
    for block, number, index in capture.cross_attention_sites(unet):
        opts = comfy.model_patcher.set_model_options_patch_replace(opts, hand, "attn2", block, number, index)
    conds = [guider.conds[f"{half}{v}"] for v in range(3) for half in ("c", "u")]
    contrastive = ml("core.contrastive").concept_contrastive_loss
    with guider.gradient_pass():
        latent = x.detach().clone().requires_grad_(True)
        outs = comfy.samplers.calc_cond_batch(guider.inner_model, conds, latent, sigma.clone(), opts)
        maps = {}
        for v, variant in enumerate(guider.variants):
            probs = torch.cat([torch.stack(hand.probs[2 * v]), torch.stack(hand.probs[2 * v + 1])], dim=2)
            for g, positions in variant.groups.items():
                a = probs.mean(dim=(0, 2))[..., positions]  # [rows, HW, T]
                maps[v, g] = a.transpose(1, 2).reshape(x.shape[0], len(positions), *size)
        loss = sum(contrastive([torch.cat([maps[v, g][r] for v in range(3)]) for g in range(2)], st.temperature)
                   for r in range(x.shape[0]))
        (grad,) = torch.autograd.grad(loss, latent)
    moved = x - st.step_size * (1 + float(sigma[0]) ** 2) * grad
    masks = ml("core.clora_masks").masks_from_maps([maps[g + 1, g].detach() for g in range(2)], st.mask_threshold,
                                                   tuple(x.shape[-2:]))
    weights = torch.cat([torch.ones_like(masks[:, :1]), masks], dim=1).float()
    shift = moved - x
    fuse = ml("core.clora_masks").fuse_with_masks
    c = fuse(outs[0].detach() + shift, [outs[2 * v].detach() + shift for v in range(3)], weights)
    u = fuse(outs[1].detach() + shift, [outs[2 * v + 1].detach() + shift for v in range(3)], weights)
    return moved, u + st.cfg * (c - u), masks


def test_authors_variant_reproduces_a_hand_written_step(ml, world):
    st = ml("methods.clora").CloraSettings.for_variant("authors' code", cfg=CFG, refine_iters=0)
    guider, record, sigmas = guider_for(ml, world, st)
    seen = {}

    def probe(model_k, x, sigmas, extra_args=None, callback=None, disable=None):
        options = extra_args["model_options"]
        sigma = sigmas[1:2].expand(x.shape[0])
        x0 = torch.randn(x.shape, generator=torch.Generator().manual_seed(0)) * float(sigmas[1])
        seen["reference"] = authors_reference_step(ml, guider, x0, sigma, options, st)
        moved = guider.update_latent(x0, sigma, 1, options)
        seen["moved"], seen["denoised"] = moved, model_k(moved, sigma, **extra_args)
        seen["masks"] = record.final_masks.clone()
        seen["fresh"] = model_k(moved, sigma, **extra_args)  # nothing kept any more: a new UNet pass at x'
        return x

    latent = torch.zeros(2, 4, 8, 8)
    guider.sample(comfy.sample.prepare_noise(latent, 1), latent, comfy.samplers.KSAMPLER(probe), sigmas,
                  disable_pbar=True, seed=1)
    moved, denoised, masks = seen["reference"]
    assert torch.equal(seen["masks"], masks[0]) and 0 < int(masks.sum()) < masks.numel()
    # Hand attention vs ComfyUI's SDPA, float32: 3e-6 on x' (values up to 21), 6e-5 on D (up to 29; CFG 5
    # multiplies the branches' differences). The pack's choices move these by > 1: union masks, cond-only maps
    # (another loss and x'), a batch-mean loss (half the step here), and a fresh UNet pass at x' (below).
    torch.testing.assert_close(seen["moved"], moved, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(seen["denoised"], denoised, atol=3e-4, rtol=1e-4)
    assert float((seen["fresh"].detach() - denoised).abs().max()) > 1.0
