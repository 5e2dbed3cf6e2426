"""Regional LoRA's automatic masks on tiny SD1.5 and Flux models, against independent computations of the attention.

References: the concept-token attention recomputed by the test from the model's own tensors — on Flux the full
joint softmax over [text; image] keys of every double block (q, k and pe as ComfyUI's ``attention`` receives them,
RoPE by ComfyUI's ``apply_rope``), restricted to the image queries × text keys and renormalised; on SD1.5 the
softmax over the prompt tokens of q = to_q(x), k = to_k(context) read by forward hooks registered after the
engine's (so with the LoRAs applied) at the capture level. Masks expected from them follow core.auto_masks and
the region rule; the phase boundary is checked against the plain stack's denoised predictions step by step.
"""
import types

import pytest
import torch

import comfy.ldm.flux.layers
import comfy.ldm.flux.math
import comfy.patcher_extension
import comfy.sample
import folder_paths
import nodes

from support import lora_files, tiny_models

STEPS = 4
PROMPT = "a cat and a dog"


@pytest.fixture(scope="module")
def models():
    return {kind: tiny_models.build_tiny(kind, seed=0) for kind in ("sd15", "flux")}


@pytest.fixture(scope="module")
def clip():
    return tiny_models.build_tiny_clip(seed=0)


class FluxTokens:
    """A text-encoder stand-in with ComfyUI's real Flux tokenizer (CLIP-L + T5): only tokenize is needed."""

    def __init__(self):
        import comfy.text_encoders.flux
        self.tokenizer = comfy.text_encoders.flux.FluxTokenizer()

    def tokenize(self, text, return_word_ids=False, **kwargs):
        return self.tokenizer.tokenize_with_weights(text, return_word_ids, **kwargs)


def rows_of(ml, comfy_state, patcher, kind, concepts=("cat", "dog")):
    fmt = "diffusers" if kind == "flux" else "kohya"
    names = lora_files.write_lora_set(patcher, comfy_state["loras_dir"], f"auto_{kind}", (1, 2), fmt)
    folder_paths.filename_list_cache.clear()
    row = ml("core.stack").LoraRow
    return [row(name=n, strength_model=1.0, concept=c) for n, c in zip(names, concepts)]


def conds(kind, clip):
    if kind == "sd15":
        encode = lambda text: clip.encode_from_tokens_scheduled(clip.tokenize(text))
        return encode(PROMPT), encode("")
    return tiny_models.make_conditioning(kind, seed=1), tiny_models.make_conditioning(kind, seed=2)


def run(model, kind, positive, negative, steps=STEPS):
    """Sample 8×8 with euler; returns (latent, denoised x0 per step)."""
    latent = tiny_models.make_latent(kind, size=8)["samples"]
    noise = comfy.sample.prepare_noise(latent, 3)
    x0 = []
    out = comfy.sample.sample(model, noise, steps, 5.0, "euler", "normal", positive, negative, latent,
                              disable_pbar=True, seed=3, callback=lambda i, d, x, n: x0.append(d.clone()))
    return out, x0


class Recorder:
    """Independent concept attention per step (conditional chunk only), installed by keyed test wrappers."""

    def __init__(self, kind, positions, size):
        self.kind, self.positions, self.size = kind, positions, size
        self.per_step: dict[int, list[torch.Tensor]] = {}
        self.step, self.chunks = 0, [0]

    def _add(self, probs):  # probs [rows of all chunks, N, T] mean over heads
        rows = probs.shape[0] // len(self.chunks)
        keep = [probs[c * rows:(c + 1) * rows] for c, i in enumerate(self.chunks) if i == 0]
        if keep:
            self.per_step.setdefault(self.step, []).append(torch.stack(keep).mean(0)[..., self.positions])

    def apply_model(self, executor, x, t, *args, **kwargs):
        options = args[3] if len(args) > 3 else kwargs.get("transformer_options", {})
        schedule = [float(s) for s in options["sample_sigmas"]]
        sigma = float(options["sigmas"].flatten()[0])
        self.step = max(j for j, s in enumerate(schedule[:-1]) if s >= sigma * (1 - 1e-5) - 1e-12)
        self.chunks = [int(c) for c in options.get("cond_or_uncond") or [0]]
        return executor(x, t, *args, **kwargs)

    def outer(self, executor, *args, **kwargs):
        handles = []
        guider = executor.class_obj
        unet = guider.model_patcher.model.diffusion_model
        if self.kind == "sd15":
            for name, module in unet.named_modules():
                if name.endswith("attn2"):
                    state = {}
                    handles.append(module.to_q.register_forward_hook(lambda m, a, o, s=state: s.__setitem__("q", o)))
                    handles.append(module.to_k.register_forward_hook(
                        lambda m, a, o, s=state, h=module.heads: self._unet(s["q"], o, h)))
        try:
            return executor(*args, **kwargs)
        finally:
            for handle in handles:
                handle.remove()

    def _unet(self, q, k, heads):
        if q.shape[1] != self.size[0] * self.size[1]:
            return
        b, n, inner = q.shape
        qh = q.float().reshape(b, n, heads, -1).transpose(1, 2)
        kh = k.float().reshape(b, -1, heads, inner // heads).transpose(1, 2)
        self._add(torch.softmax(qh @ kh.transpose(-1, -2) / (inner // heads) ** 0.5, -1).mean(1))

    def flux_attention(self, original):
        def attention(q, k, v, pe, mask=None, transformer_options={}):
            if transformer_options.get("block_type") == "double":
                text = q.shape[2] - self.size[0] * self.size[1]
                qr, kr = comfy.ldm.flux.math.apply_rope(q, k, pe)
                full = torch.softmax(qr.float() @ kr.float().transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
                block = full[:, :, text:, :text]
                self._add((block / block.sum(-1, keepdim=True)).mean(1))
            return original(q, k, v, pe, mask=mask, transformer_options=transformer_options)
        return attention

    def maps(self, steps):
        """[rows, C, h, w] mean over the given steps' layer calls."""
        found = torch.stack([m for s in steps for m in self.per_step[s]]).mean(0)
        return found.transpose(1, 2).reshape(found.shape[0], found.shape[2], *self.size)


def install(clone, recorder):
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, "test.recorder", recorder.outer)
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test.recorder",
                               recorder.apply_model)


def expected_maps(ml, recorder, auto, steps, latent=(8, 8)):
    """The region maps the rule gives for the recorder's attention over ``steps``: [B, k, H, W]."""
    masks = ml("core.auto_masks").concept_masks(recorder.maps(steps), auto.groups, auto.threshold, latent)
    given = [masks[:, j] for j in range(masks.shape[1])]
    return ml("core.regions").normalize_regions(given, latent, "test").maps


@pytest.mark.parametrize("kind,refresh", [("sd15", 0), ("flux", 0), ("flux", 1)])
def test_auto_masks_are_the_rule_applied_to_the_concepts_attention(comfy_state, ml, models, clip, monkeypatch,
                                                                   kind, refresh):
    """auto_steps 2: steps 0–1 record (every LoRA everywhere), step 2 sets masks from their mean attention;
    refresh_every 1 sets them again at step 3 from step 2's attention, frozen keeps step 2's."""
    patcher = models[kind]
    rows = rows_of(ml, comfy_state, patcher, kind)
    positive, negative = conds(kind, clip)
    text_encoder = clip if kind == "sd15" else FluxTokens()
    auto_mod = ml("methods.regional_auto")
    clone, auto = auto_mod.auto_regional_model(patcher, rows, [], "test", text_encoder, PROMPT,
                                               ml("core.auto_masks").AutoMaskPhases(2, refresh), 0.4,
                                               positive=positive)
    size = (4, 4)  # tiny SD1.5: deepest cross-attention level 1 of an 8×8 latent; Flux: the 2×2-patch grid
    recorder = Recorder(kind, auto.positions, size)
    install(clone, recorder)
    if kind == "flux":
        monkeypatch.setattr(comfy.ldm.flux.layers, "attention", recorder.flux_attention(comfy.ldm.flux.layers.attention))
    run(clone, kind, positive, negative)
    steps = auto.record.steps
    assert len(steps) == STEPS and all(torch.equal(m, torch.ones_like(m)) for s in steps[:2] for m in s)
    want2 = expected_maps(ml, recorder, auto, [0, 1])
    assert 0 < float(want2[0, 0].sum()) < 64 and 0 < float(want2[0, 1].sum()) < 64  # real regions, not all/none
    torch.testing.assert_close(torch.cat(steps[2]), want2[0], atol=0, rtol=0)
    want3 = expected_maps(ml, recorder, auto, [2]) if refresh else want2
    torch.testing.assert_close(torch.cat(steps[3]), want3[0], atol=0, rtol=0)
    assert auto.updates == (2 if refresh else 1)
    if refresh:
        assert not torch.equal(want3, want2)  # the refresh did change the masks here


def test_flux_capture_equals_the_full_joint_softmax(ml, models):
    """One call: DiTConceptAttention (text-only softmax, per head) equals the full [text; image] softmax of every
    double block restricted to image queries × text keys and renormalised (tolerance: float32 softmax of the
    same logits in two groupings, 1e-6 on probabilities ≤ 1)."""
    patcher = models["flux"]
    x, sigma, cond = tiny_models.make_inputs("flux", batch=2, seed=4, size=8)
    positions = [2, 5, 6]
    capture = ml("host.dit_attention").DiTConceptAttention(positions)
    recorder = Recorder("flux", positions, (4, 4))
    recorder.chunks = [0, 1]
    original = comfy.ldm.flux.layers.attention
    comfy_flux = comfy.ldm.flux.layers
    try:
        comfy_flux.attention = recorder.flux_attention(original)
        with capture.recording(patcher.model.diffusion_model, [0, 1], (8, 8)), torch.no_grad():
            patcher.model.apply_model(x, sigma, transformer_options={"cond_or_uncond": [0, 1]}, **cond)
    finally:
        comfy_flux.attention = original
    got = capture.averaged()
    assert got.shape == (1, 3, 4, 4)
    torch.testing.assert_close(got, recorder.maps([0]), atol=1e-6, rtol=1e-5)
    assert float(got.std()) > 1e-3  # image tokens attend differently: the comparison is not of constants


def test_before_auto_steps_every_lora_acts_everywhere(comfy_state, ml, models):
    """The denoised predictions of steps 0 … N−1 equal the plain stack's (a regional model without masks);
    from step N on they differ (the masks act)."""
    patcher = models["flux"]
    rows = rows_of(ml, comfy_state, patcher, "flux")
    positive, negative = conds("flux", None)
    clone, auto = ml("methods.regional_auto").auto_regional_model(
        patcher, rows, [], "test", FluxTokens(), PROMPT, ml("core.auto_masks").AutoMaskPhases(2, 0), 0.4,
        positive=positive)
    stack = ml("methods.regional").regional_model(patcher, rows, [], "test")
    first, got = run(clone, "flux", positive, negative, steps=3)
    _, want = run(stack, "flux", positive, negative, steps=3)
    for i in range(2):
        torch.testing.assert_close(got[i], want[i], atol=0, rtol=0)
    assert (got[2] - want[2]).abs().max() > 1e-3
    again, _ = run(clone, "flux", positive, negative, steps=3)  # a second run starts over: everywhere, then masks
    torch.testing.assert_close(again, first, atol=0, rtol=0)


def test_sampler_node_and_mask_preview(comfy_state, ml, models, clip):
    patcher = models["sd15"]
    rows = rows_of(ml, comfy_state, patcher, "sd15")
    stack = ml("core.stack").LoraStack(tuple(rows))
    positive, negative = conds("sd15", clip)
    node = nodes.NODE_CLASS_MAPPINGS["MultiLoRARegionalSampler"]
    common = dict(model=patcher, lora_stack=stack, seed=3, steps=2, cfg=5.0, sampler_name="euler",
                  scheduler="normal", positive=positive, negative=negative,
                  latent_image=tiny_models.make_latent("sd15", size=8), denoise=1.0)
    latent, record = node.execute(**common, clip=clip, prompt=PROMPT, mask_from="concept attention",
                                  auto_steps=1, refresh_every=0).result
    assert len(record.steps) == 2 and record.names == tuple(r.name for r in rows)
    preview = nodes.NODE_CLASS_MAPPINGS["MultiLoRAMaskPreview"]
    masks, overlay = preview.execute(attention_maps=record, mask_threshold=0.5, step=-1, average_steps=False).result
    assert masks.shape == (2, 64, 64) and overlay.shape == (1, 64, 64, 3)
    want = torch.nn.functional.interpolate(torch.cat(record.steps[-1])[None], size=(64, 64), mode="nearest-exact")[0]
    torch.testing.assert_close(masks, (want >= 0.5).float())
    first, _ = preview.execute(attention_maps=record, mask_threshold=0.5, step=0, average_steps=False).result
    assert bool((first == 1).all())  # step 0: every LoRA everywhere
    left = torch.zeros(8, 8)
    left[:, :4] = 1
    _, drawn = node.execute(**common, mask_1=left).result
    masks, _ = preview.execute(attention_maps=drawn, mask_threshold=0.5, step=-1, average_steps=False).result
    torch.testing.assert_close(masks[0], left.repeat_interleave(8, 0).repeat_interleave(8, 1))


def test_errors_name_node_input_and_fix(comfy_state, ml, models, clip):
    auto_mod = ml("methods.regional_auto")
    phases = ml("core.auto_masks").AutoMaskPhases(2, 0)
    patcher = models["sd15"]
    rows = rows_of(ml, comfy_state, patcher, "sd15", concepts=("cat", "horse"))
    positive, _ = conds("sd15", clip)
    with pytest.raises(ml("core.errors").ConceptNotFoundError,
                       match=r"^test: concept word 'horse' is not in the prompt 'a cat and a dog'\. Use a word"):
        auto_mod.auto_regional_model(patcher, rows, [], "test", clip, PROMPT, phases, positive=positive)
    region_error = ml("core.regions").RegionError
    odd = types.SimpleNamespace(model=types.SimpleNamespace(diffusion_model=torch.nn.Linear(2, 2)))
    with pytest.raises(region_error, match=r"^test: automatic masks need .*; Linear models have none\. Connect masks"):
        auto_mod.auto_regional_model(odd, rows, [], "test", clip, PROMPT, phases)
    with pytest.raises(region_error, match=r"needs 'clip' connected and the positive prompt's text in 'prompt'"):
        auto_mod.auto_regional_model(patcher, rows, [], "test", None, PROMPT, phases)
    style = [r.__class__(name=r.name, strength_model=1.0, concept="cat", category="style") for r in rows]
    with pytest.raises(region_error, match=r"no row without a mask has a concept word"):
        auto_mod.auto_regional_model(patcher, style, [], "test", clip, PROMPT, phases)
    short = [[positive[0][0][:, :2], positive[0][1]]]
    rows = rows_of(ml, comfy_state, patcher, "sd15")
    with pytest.raises(region_error, match=r"the positive conditioning has 2 tokens; type in 'prompt' the text"):
        auto_mod.auto_regional_model(patcher, rows, [], "test", clip, PROMPT, phases, positive=short)
    with pytest.raises(ml("core.errors").InputError, match=r"auto_steps must be at least 1"):
        ml("core.auto_masks").AutoMaskPhases(0, 0)


def test_phases_and_mask_rule(ml):
    am = ml("core.auto_masks")
    frozen, refresh = am.AutoMaskPhases(3, 0), am.AutoMaskPhases(3, 2)
    assert [frozen.update_point(s) for s in range(7)] == [None, None, None, 3, 3, 3, 3]
    assert [refresh.update_point(s) for s in range(8)] == [None, None, None, 3, 3, 5, 5, 7]
    assert [s for s in range(8) if frozen.records(s)] == [0, 1, 2]
    assert [s for s in range(8) if refresh.records(s)] == [0, 1, 2, 4, 6]
    maps = torch.zeros(1, 3, 2, 4)
    maps[0, 0, :, 0] = 1.0   # concept a's token: column 0
    maps[0, 1, :, 1] = 0.5   # concept b's first token: column 1, weaker but normalised to 1
    maps[0, 2, :, 1:3] = 2.0  # concept b's second token: columns 1–2 (a concept covers each token's area)
    masks = am.concept_masks(maps, [[0], [1, 2]], threshold=0.5)
    assert masks[0, 0].tolist() == [[1, 0, 0, 0]] * 2 and masks[0, 1].tolist() == [[0, 1, 1, 0]] * 2
    whole = am.concept_masks(maps, [[0], [1, 2]], threshold=0.0)  # λ = 0: argmax splits the whole image
    assert bool((whole.sum(1) == 1).all())


class FluxClip(FluxTokens):
    """FluxTokens on a CLIP socket (the nodes check what arrives there); automatic masks encode nothing."""

    def encode_from_tokens(self, *args, **kwargs):
        raise AssertionError("automatic masks must not encode the prompt")


AUTO = dict(mask_from="concept attention", prompt=PROMPT, auto_steps=2, refresh_every=1, mask_threshold=0.4)
"""Automatic masks set after step 2 and found again at step 3: both update kinds happen in a 4-step run."""


def text_encoder(kind, clip):
    return clip if kind == "sd15" else FluxClip()


def ksampler(model, kind, positive, negative, steps=STEPS):
    latent = tiny_models.make_latent(kind, size=8)
    return nodes.KSampler().sample(model, 3, steps, 5.0, "euler", "normal", positive, negative, latent, 1.0)[0]["samples"]


def sampler_node(patcher, stack, kind, clip, positive, negative, steps=STEPS, **settings):
    node = nodes.NODE_CLASS_MAPPINGS["MultiLoRARegionalSampler"]
    latent, record = node.execute(model=patcher, lora_stack=stack, seed=3, steps=steps, cfg=5.0, sampler_name="euler",
                                  scheduler="normal", positive=positive, negative=negative,
                                  latent_image=tiny_models.make_latent(kind, size=8), denoise=1.0,
                                  clip=text_encoder(kind, clip), **settings).result
    return latent["samples"], record


def patch_node(patcher, stack, kind, clip, **settings):
    node = nodes.NODE_CLASS_MAPPINGS["MultiLoRARegional"]
    return node.execute(model=patcher, lora_stack=stack, clip=text_encoder(kind, clip), **settings).result[0]


def hook_counts(patcher):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in patcher.model.modules())


@pytest.mark.parametrize("kind", ["sd15", "flux"])
def test_patch_node_with_automatic_masks_under_core_ksampler_equals_the_sampler_node(comfy_state, ml, models, clip,
                                                                                     kind):
    """Same stack, settings and noise: Regional LoRA (model patch) + core KSampler gives the image of KSampler
    (Regional LoRA) exactly (the same calls in the same order), and the automatic masks did act (≠ the plain stack)."""
    patcher = models[kind]
    stack = ml("core.stack").LoraStack(tuple(rows_of(ml, comfy_state, patcher, kind)))
    positive, negative = conds(kind, clip)
    want, record = sampler_node(patcher, stack, kind, clip, positive, negative, **AUTO)
    got = ksampler(patch_node(patcher, stack, kind, clip, **AUTO), kind, positive, negative)
    torch.testing.assert_close(got, want, atol=0, rtol=0)
    assert len(record.steps) == STEPS and not all(bool((m == 1).all()) for m in record.steps[-1])
    plain = ksampler(patch_node(patcher, stack, kind, clip), kind, positive, negative)
    assert (got - plain).abs().max() > 1e-3


def test_patched_model_starts_over_in_every_run_and_leaves_the_input_model_alone(comfy_state, ml, models, clip):
    """One patched MODEL sampled 4, 3 and 4 steps: each run takes its steps from its own schedule (the 3-step run
    is the sampler node's 3-step image) and starts from the plain stack again (the two 4-step runs are identical).
    Afterwards the input model has no wrapper, no forward hook, the same model_options and the same weights."""
    patcher = models["flux"]
    stack = ml("core.stack").LoraStack(tuple(rows_of(ml, comfy_state, patcher, "flux")))
    positive, negative = conds("flux", clip)
    weights = {k: v.clone() for k, v in patcher.model.state_dict().items()}
    options, hooks = repr(patcher.model_options), hook_counts(patcher)
    patched = patch_node(patcher, stack, "flux", clip, **AUTO)
    first = ksampler(patched, "flux", positive, negative, steps=4)
    short = ksampler(patched, "flux", positive, negative, steps=3)
    again = ksampler(patched, "flux", positive, negative, steps=4)
    torch.testing.assert_close(again, first, atol=0, rtol=0)
    want_short, _ = sampler_node(patcher, stack, "flux", clip, positive, negative, steps=3, **AUTO)
    torch.testing.assert_close(short, want_short, atol=0, rtol=0)
    assert patcher.wrappers == {} and repr(patcher.model_options) == options
    assert hook_counts(patcher) == hooks == 0  # the engine's and the capture's hooks lived only during sampling
    for key, value in patcher.model.state_dict().items():
        assert torch.equal(value, weights[key]), key


def test_patch_node_refuses_bad_automatic_mask_inputs_before_sampling(comfy_state, ml, models, clip):
    """No clip, an empty prompt or a concept word absent from the prompt: the node's own errors at the node; a
    positive conditioning shorter than the prompt: at the start of sampling, before any model call."""
    patcher = models["sd15"]
    stack = ml("core.stack").LoraStack(tuple(rows_of(ml, comfy_state, patcher, "sd15", concepts=("cat", "horse"))))
    node = nodes.NODE_CLASS_MAPPINGS["MultiLoRARegional"]
    region_error = ml("core.regions").RegionError
    needs = r"^Regional LoRA: mask_from 'concept attention' needs 'clip' connected and the positive prompt's text"
    with pytest.raises(region_error, match=needs):
        node.execute(model=patcher, lora_stack=stack, **AUTO)
    with pytest.raises(region_error, match=needs):
        node.execute(model=patcher, lora_stack=stack, clip=clip, **{**AUTO, "prompt": "  "})
    with pytest.raises(ml("core.errors").ConceptNotFoundError,
                       match=r"^Regional LoRA: concept word 'horse' is not in the prompt 'a cat and a dog'\. Use a word"):
        node.execute(model=patcher, lora_stack=stack, clip=clip, **AUTO)
    stack = ml("core.stack").LoraStack(tuple(rows_of(ml, comfy_state, patcher, "sd15")))
    patched = node.execute(model=patcher, lora_stack=stack, clip=clip, **AUTO).result[0]
    positive, negative = conds("sd15", clip)
    calls = []
    patched.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test.calls",
                                 lambda executor, *a, **k: calls.append(1) or executor(*a, **k))
    short = [[positive[0][0][:, :2], positive[0][1]]]
    with pytest.raises(region_error, match=r"^Regional LoRA: the concept words sit at token 5 of 'prompt' but the "
                                           r"positive conditioning has 2 tokens"):
        ksampler(patched, "sd15", short, negative)
    assert calls == [] and patcher.wrappers == {}


class SDXLTokens(FluxTokens):
    """A text-encoder stand-in with ComfyUI's real SDXL tokenizer (CLIP-G + CLIP-L streams)."""

    def __init__(self):
        import comfy.sdxl_clip
        self.tokenizer = comfy.sdxl_clip.SDXLTokenizer()


def test_flux_concepts_come_from_t5_or_from_a_clip_that_has_only_clip_l(ml, clip):
    """On Flux the concept columns are T5 positions; a CLIP-L-only clip (a Flux-architecture model whose context is
    CLIP-L's hidden states, as the testbed's DiT) gives CLIP-L positions, as on a UNet; two CLIP streams are refused."""
    auto_mod = ml("methods.regional_auto")
    rows = [ml("core.stack").LoraRow(name=f"r{i}.safetensors", concept=c) for i, c in enumerate(("cat", "dog"))]
    unet = auto_mod.concept_columns(clip, PROMPT, rows, [0, 1], "unet", "test")
    assert unet == ([2, 5], [[0], [1]])
    assert auto_mod.concept_columns(clip, PROMPT, rows, [0, 1], "flux", "test") == unet
    t5, groups = auto_mod.concept_columns(FluxTokens(), PROMPT, rows, [0, 1], "flux", "test")
    assert groups == [[0], [1]] and t5 != unet and len(t5) == 2
    with pytest.raises(ml("core.regions").RegionError,
                       match=r"^test: automatic masks on Flux need the T5 tokens of the prompt; this clip gives "
                             r"\['g', 'l'\]\. Connect the Flux text encoder"):
        auto_mod.concept_columns(SDXLTokens(), PROMPT, rows, [0, 1], "flux", "test")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a second device (run on the GPU machine)")
def test_masks_found_on_the_sampling_device_make_a_cpu_plan(ml):
    """Attention masks arrive on the GPU; the plan is built on the CPU (the router copies it per layer)."""
    regions = ml("core.regions")
    masks = [torch.zeros(1, 8, 8, device="cuda"), None]
    masks[0][:, :, :4] = 1.0
    plan = regions.normalize_regions(masks, (8, 8), "test")
    assert plan.maps.device.type == "cpu" and plan.regional == (True, False)
    assert float(plan.maps[0, 0, :, :4].min()) == 1.0 and float(plan.maps[0, 0, :, 4:].max()) == 0.0
