"""Hardening, sampling settings and shapes for every sampler node, and the other nodes' inputs.

Each case runs the node on a clone carrying a σ recorder: the output has the input's shape and is finite, the
input latent is not modified, the run covers exactly the schedule of (steps, denoise), and nothing is left on
the user's MODEL.

Issue case → test (test_sampling_shapes_and_settings[<method>-<case>], method ∈ switch/composite/cmlora/clora)
- steps 1 → [*-steps1];  steps < τ → [*-steps_below_switch_every]
- denoise 0.01 and 1.0 → [*-denoise_0.01], [*-denoise_1] (and denoise 0: [*-denoise_0], the latent comes back)
- batch 4 → [*-batch4];  cfg 1.0 → [*-cfg1];  noise_mask latent → [*-inpaint]
- 64×64 (an 8×8 latent) → every case without its own latent, e.g. [*-denoise_1]
- 1536×640 → test_1536x640_latent_on_sdxl (true size, tiny SDXL; SD1.5's full-resolution attention is minutes
  on a CPU) and the same aspect ratio in [*-8x20]
- odd latent sizes → [*-7x9]
- out-of-range inputs of the other nodes → test_other_node_inputs_out_of_range, test_frequency_profile_*
"""
import pytest
import torch

import comfy.samplers
import nodes

from support import lora_files, tiny_models
from support.hardening import (  # noqa: F401
    APPLY_MODEL,
    METHODS,
    RUN_TOL,
    CallCounter,
    errors,
    fails_before_sampling,
    forget_dead_loaded_models,
    leak_state,
    refresh,
    run_node,
    samples_of,
    w,
)


def _latent(case):
    gen = torch.Generator().manual_seed(11)
    if case == "batch4":
        return {"samples": torch.zeros(4, 4, 8, 8)}
    if case == "8x20":
        return {"samples": torch.zeros(1, 4, 8, 20)}
    if case == "7x9":
        return {"samples": torch.zeros(1, 4, 7, 9)}
    if case in ("denoise_0.01", "denoise_0"):
        return {"samples": torch.randn((1, 4, 8, 8), generator=gen)}
    if case == "inpaint":
        mask = torch.zeros(1, 64, 64)
        mask[:, :, 32:] = 1.0  # right half is repainted, left half must come back unchanged
        return {"samples": torch.randn((1, 4, 8, 8), generator=gen), "noise_mask": mask}
    return None


SAMPLING_CASES = {"steps1": dict(steps=1), "steps_below_switch_every": dict(steps=3, switch_every=5),
                  "denoise_0.01": dict(denoise=0.01), "denoise_0": dict(denoise=0.0), "denoise_1": dict(denoise=1.0),
                  "batch4": {}, "8x20": {}, "7x9": {}, "inpaint": {}, "cfg1": dict(cfg=1.0)}


class SigmaRecorder(CallCounter):
    """APPLY_MODEL wrapper recording the σ of every UNet call."""

    def __init__(self):
        super().__init__()
        self.sigmas = []

    def __call__(self, executor, x, t, *args, **kwargs):
        self.sigmas.append(float(t.flatten()[0]))
        return super().__call__(executor, x, t, *args, **kwargs)


SAMPLING_PARAMS = [pytest.param(m, c, id=f"{m}-{c}") for m in METHODS for c in SAMPLING_CASES]


@pytest.mark.parametrize("method,case", SAMPLING_PARAMS)
def test_sampling_shapes_and_settings(w, ml, method, case):
    kw = dict(SAMPLING_CASES[case])
    if method != "switch":
        kw.pop("switch_every", None)
    latent = _latent(case)
    source = latent["samples"] if latent is not None else torch.zeros(1, 4, 8, 8)
    model = w.model.clone()
    recorder = SigmaRecorder()
    model.add_wrapper_with_key(APPLY_MODEL, "test.sigmas", recorder)
    result = run_node(w, method, model=model, latent=latent, **kw)
    out = result[0]["samples"]
    assert out.shape == source.shape and torch.isfinite(out).all()
    assert latent is None or torch.equal(latent["samples"], source)  # input not modified
    steps, denoise = kw.get("steps", 4), kw.get("denoise", 1.0)
    schedule = comfy.samplers.KSampler(w.model, steps, "cpu", "euler", "normal", denoise).sigmas
    if case == "denoise_0":
        assert recorder.sigmas == [] and torch.equal(out, source)
    else:  # the run covers exactly the schedule of (steps, denoise)
        assert recorder.sigmas and max(recorder.sigmas) == pytest.approx(float(schedule[0]), rel=1e-5)
        assert min(recorder.sigmas) == pytest.approx(float(schedule[-2]), rel=1e-5)
        assert (out - source).abs().max() > 1e-3
    if case == "denoise_0.01":
        assert float(schedule[0]) < 0.2
    if case == "batch4":
        assert all((out[i] - out[0]).abs().max() > 1e-3 for i in range(1, 4))  # each item its own noise
    if case == "inpaint":
        torch.testing.assert_close(out[..., :4], source[..., :4], atol=1e-4, rtol=1e-4)
        assert (out[..., 4:] - source[..., 4:]).abs().max() > 1e-2
    if case == "steps_below_switch_every" and method == "switch":  # only the first LoRA is ever active
        first = ml("core.stack").LoraStack(w.stack().rows[:1])
        torch.testing.assert_close(out, samples_of(w, method, stack=first, **kw), atol=RUN_TOL, rtol=RUN_TOL)
    if case == "cfg1" and method != "clora":  # ComfyUI skips the uncond pass: same result as computing it
        full = w.model.clone()
        full.model_options["disable_cfg1_optimization"] = True
        torch.testing.assert_close(out, samples_of(w, method, model=full, **kw), atol=RUN_TOL, rtol=RUN_TOL)
    if method == "clora":
        masks = result[2]
        assert masks.shape == (2, source.shape[-2] * 8, source.shape[-1] * 8)
    w.assert_clean()


@pytest.fixture(scope="module")
def sdxl(w):
    """A tiny SDXL (attention only at half resolution, as SDXL) and two attention LoRAs for it."""
    model = tiny_models.build_tiny("sdxl", seed=0)
    names = [w.scratch(f"hard_sdxl_{seed}.safetensors") for seed in (701, 702)]
    for seed, name in zip((701, 702), names):
        lora_files.write_lora(model, w.path(name), "kohya", seed=seed, rank=2, targets="attn")
    refresh()
    return model, names


@pytest.mark.parametrize("method", ["switch", "composite", "cmlora"])
def test_1536x640_latent_on_sdxl(w, sdxl, method):
    """A real 1536×640 image (80×192 latent): one step at cfg 1 (one batched UNet call) per method."""
    model, names = sdxl
    clean = leak_state(model)
    latent = {"samples": torch.zeros(1, 4, 80, 192)}
    recorder = SigmaRecorder()
    counted = model.clone()
    counted.add_wrapper_with_key(APPLY_MODEL, "test.sigmas", recorder)
    out = samples_of(w, method, model=counted, stack=w.stack(names), latent=latent, steps=1, cfg=1.0,
                     positive=tiny_models.make_conditioning("sdxl", seed=1),
                     negative=tiny_models.make_conditioning("sdxl", seed=2))
    assert out.shape == (1, 4, 80, 192) and torch.isfinite(out).all() and out.abs().max() > 0
    assert recorder.calls == 1 and torch.equal(latent["samples"], torch.zeros(1, 4, 80, 192))
    assert leak_state(model) == clean


def test_other_node_inputs_out_of_range(w, ml, errors):
    fails_before_sampling(w, "switch", ValueError, r"^KSampler \(LoRA Switch\): 'switch_every' is 0, out of range\. "
                          r"Set a value from 1 to 10000\.", switch_every=0)
    fails_before_sampling(w, "cmlora", ValueError,
                          r"^KSampler \(CMLoRA\): 'stage_switch' is 1\.2, out of range\. Set a value from 0 to 1\.",
                          stage_switch=1.2)
    fails_before_sampling(w, "cmlora", ValueError, r"ordering 'profiled scores' needs a score for every row",
                          ordering="profiled scores")
    preview = nodes.NODE_CLASS_MAPPINGS["MultiLoRAMaskPreview"]
    _, record, _ = run_node(w, "clora", steps=2, opt_until=0.0)
    masks, shown = preview.execute(attention_maps=record, mask_threshold=0.4, step=-1, average_steps=False,
                                   image=torch.rand(2, 50, 70, 3)).result  # odd size, batch of 2
    assert masks.shape == (2, 50, 70) and shown.shape == (2, 50, 70, 3)
    with pytest.raises(ValueError, match="step -3 is out of range"):
        preview.execute(attention_maps=record, mask_threshold=0.4, step=-3, average_steps=False)
    w.assert_clean()


def test_frequency_profile_bad_images(w, errors):
    """Too few, too small or NaN images (e.g. an overflowing fp16 VAE decode) are errors naming node and input."""
    profile = nodes.NODE_CLASS_MAPPINGS["MultiLoRAFrequencyProfile"]
    with pytest.raises(errors.StackError, match=r"^LoRA Frequency Profile: got 2 images for 3 enabled LoRAs\."):
        profile.execute(lora_stack=w.stack(), images=torch.rand(2, 16, 16, 3))
    with pytest.raises(errors.MultiLoRAError, match=r"^LoRA Frequency Profile: 'images' must be a batch of images at "
                                                    r"least 2×2 pixels, got shape \[3, 1, 1, 3\]\. Connect decoded"):
        profile.execute(lora_stack=w.stack(), images=torch.rand(3, 1, 1, 3))
    images = torch.rand(3, 16, 16, 3)
    images[1, 4, 4, 0] = float("nan")
    with pytest.raises(errors.MultiLoRAError, match=rf"^LoRA Frequency Profile: image 2 of 'images' \(for "
                                                    rf"'{w.good[1]}'\) has NaN/Inf pixels and cannot be scored\."):
        profile.execute(lora_stack=w.stack(), images=images)
    stack, text = profile.execute(lora_stack=w.stack(), images=torch.rand(3, 16, 16, 3)).result
    assert all(0 <= r.hf_score <= 1 for r in stack.rows) and len(text.splitlines()) == 3
