"""Regional LoRA (per-token routing) on Z-Image (ComfyUI's ``ZImage`` / ``Lumina2`` class, ``NextDiT``) against
ComfyUI's own merged LoRAs, layer by layer.

The tiny Z-Image pads its 20-token caption to 32 (12 ``cap_pad_token``) and its image tokens to a multiple of 32:
a 16 × 12 latent is an 8 × 6 patch grid, 48 tokens, + 16 ``x_pad_token``. So every kind of token is there: the
caption alone (``cap_embedder``), the padded caption (``context_refiner``), the bare grid (``x_embedder``), grid +
image pads (``noise_refiner``) and the joint [caption + pads; grid; image pads] (``layers``, ``final_layer``).
Regions are the left and right halves (3 of the 6 patch columns each), exactly 0/1 on the grid, so each grid token
of each layer must equal one merged reference (LoRA a or b alone), text tokens both merged, and image pad tokens
both at half strength (their rule: each LoRA by its share of the image). LoRA files use the diffusers names Z-Image
trainers write (``diffusion_model.layers.0.attention.to_q``: slices of the fused qkv), which ComfyUI 0.3.75 and 0.33
both map. Tolerances as in test_regional (1e-4, float32 reassociation; a LoRA moves outputs by > 1e-2). Lumina
Image 2.0 runs the same code: no pad tokens, grouped-query attention, kohya LoRAs on the fused qkv.

Automatic masks: the concept attention is recomputed by the test from each main layer's own tensors (its qkv output
after the engine's LoRA hook, the ``q_norm`` / ``k_norm`` modules, ComfyUI's ``apply_rope``, the block's freqs_cis):
the full softmax over the joint sequence's keys, restricted to image queries × caption keys and renormalised.
Concept tokens come from ComfyUI's real Z-Image tokenizer (Qwen3, chat template).
"""
import logging
import sys
import types

import pytest
import torch

import comfy.ldm.flux.math
import comfy.patcher_extension
import comfy.sample
import comfy.sd
import comfy.utils
import folder_paths
import nodes

from support import lora_files, tiny_models
from support.layer_records import layer_outputs, run_wrapped

H, W = 16, 12
STRENGTHS = (0.8, 1.3)
ATOL, RTOL = 1e-4, 1e-4
TARGETS = "attn+ff+proj+mod"


@pytest.fixture(scope="module")
def patcher():
    return tiny_models.build_tiny("zimage", seed=0)


@pytest.fixture(scope="module")
def names(comfy_state, patcher):
    found = lora_files.write_lora_set(patcher, comfy_state["loras_dir"], "regional_zimage", (1, 2), "diffusers",
                                      targets=TARGETS)
    folder_paths.filename_list_cache.clear()
    return found


def rows_of(ml, names, strengths=STRENGTHS):
    return [ml("core.stack").LoraRow(name=n, strength_model=s) for n, s in zip(names, strengths)]


def halves(h=H, w=W):
    left = torch.zeros(h, w)
    left[:, : w // 2] = 1.0
    return left, 1.0 - left


def inputs(batch=2, seed=6):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn((batch, 16, H, W), generator=gen)
    cap = torch.randn((batch, tiny_models.ZIMAGE_TEXT_TOKENS, tiny_models.ZIMAGE_CAP_DIM), generator=gen)
    return x, torch.full((batch,), 0.5), {"c_crossattn": cap, "num_tokens": tiny_models.ZIMAGE_TEXT_TOKENS}


def test_layout_roles_and_token_counts(ml, patcher, names):
    """The roles of every LoRA'd layer, and the token counts the router expects match what each layer sees."""
    rows = rows_of(ml, names)
    clone = ml("methods.regional").regional_model(patcher, rows, list(halves()), "test")
    engine = lora_files.engine_of(clone, ml)
    router = engine.token_router
    assert router.family == "lumina" and router.text_multiple == 32
    roles = router.roles
    assert roles["diffusion_model.cap_embedder.1"] == "text"
    assert roles["diffusion_model.context_refiner.0.attention.qkv"] == "text"
    assert roles["diffusion_model.x_embedder"] == "image"
    assert roles["diffusion_model.noise_refiner.0.feed_forward.w2"] == "image"
    assert roles["diffusion_model.layers.1.attention.out"] == "joint"
    assert roles["diffusion_model.final_layer.linear"] == "joint"
    record = {}
    run_wrapped(clone, engine, patcher, *inputs(batch=1), record=record)
    tokens = {p: int(x.shape[1]) for p, (x, _) in record.items() if x.ndim == 3}
    assert tokens["diffusion_model.cap_embedder.1"] == 20
    assert tokens["diffusion_model.context_refiner.0.attention.qkv"] == 32
    assert tokens["diffusion_model.x_embedder"] == 48
    assert tokens["diffusion_model.noise_refiner.0.attention.qkv"] == 64
    assert tokens["diffusion_model.layers.0.attention.qkv"] == 96
    assert tokens["diffusion_model.final_layer.linear"] == 96


def test_an_all_one_mask_equals_the_stack_and_comfyui_merged(ml, patcher, names):
    """Row a's mask is all one (a 4 × 4 MASK, resized), row b has none: both act on every token, pads included."""
    rows = rows_of(ml, names)
    clone = ml("methods.regional").regional_model(patcher, rows, [torch.ones(4, 4), None], "test")
    x, sigma, cond = inputs(batch=2, seed=5)
    got = run_wrapped(clone, lora_files.engine_of(clone, ml), patcher, x, sigma, cond)
    stack = ml("host.engine").build_engine(patcher, rows, "test")
    with stack.attached(patcher.model), stack.routed(torch.ones(2, 2)):
        want_stack = tiny_models.forward(patcher, x, sigma, **cond)
    torch.testing.assert_close(got, want_stack, atol=1e-6, rtol=1e-6)
    with tiny_models.patched(lora_files.merged_by_comfy(patcher, names, STRENGTHS)):
        want = tiny_models.forward(patcher, x, sigma, **cond)
    assert (want - tiny_models.forward(patcher, x, sigma, **cond)).abs().max() > 1e-2
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)


def test_each_token_of_each_layer_gets_only_its_regions_lora(ml, patcher, names):
    """Left-half grid tokens equal LoRA a merged, right-half LoRA b merged; caption and caption pads both LoRAs
    (every LoRA); image pads both at half strength (each LoRA's share of the image)."""
    rows = rows_of(ml, names)
    clone = ml("methods.regional").regional_model(patcher, rows, list(halves()), "test")
    engine = lora_files.engine_of(clone, ml)
    record = {}
    run_wrapped(clone, engine, patcher, *inputs(batch=2, seed=6), record=record)
    ref_a = layer_outputs(patcher, lora_files.merged_by_comfy(patcher, names[:1], STRENGTHS[:1]), record)
    ref_b = layer_outputs(patcher, lora_files.merged_by_comfy(patcher, names[1:], STRENGTHS[1:]), record)
    ref_ab = layer_outputs(patcher, lora_files.merged_by_comfy(patcher, names, STRENGTHS), record)
    ref_half = layer_outputs(patcher, lora_files.merged_by_comfy(patcher, names, [s / 2 for s in STRENGTHS]), record)
    roles = engine.token_router.roles
    grid = (H // 2) * (W // 2)
    left = torch.zeros(H // 2, W // 2, dtype=torch.bool)
    left[:, : W // 4] = True
    left = left.flatten()
    checked = {"text": 0, "image": 0, "image+pads": 0, "joint": 0}
    for path, (_, got) in record.items():
        a, b, ab, half = ref_a[path], ref_b[path], ref_ab[path], ref_half[path]
        if got.ndim == 2:
            continue  # vector layers (timestep, modulation): per-row weights, covered by the all-one test
        if roles[path] == "text":
            torch.testing.assert_close(got, ab, atol=ATOL, rtol=RTOL, msg=path)
            checked["text"] += 1
            continue
        prefix = 32 if roles[path] == "joint" else 0
        if prefix:
            torch.testing.assert_close(got[:, :prefix], ab[:, :prefix], atol=ATOL, rtol=RTOL, msg=path)
        image = slice(prefix, prefix + grid)
        torch.testing.assert_close(got[:, image][:, left], a[:, image][:, left], atol=ATOL, rtol=RTOL, msg=path)
        torch.testing.assert_close(got[:, image][:, ~left], b[:, image][:, ~left], atol=ATOL, rtol=RTOL, msg=path)
        pads = got.shape[1] - prefix - grid
        if pads:
            assert pads == 16, path
            torch.testing.assert_close(got[:, -pads:], half[:, -pads:], atol=ATOL, rtol=RTOL, msg=path)
        checked["joint" if prefix else "image+pads" if pads else "image"] += 1
        assert (a - b).abs().max() > 1e-3, path  # the two LoRAs differ on the layers compared
    assert checked == {"text": 6, "image": 1, "image+pads": 5, "joint": 11}, checked


def test_text_tokens_policy_none_leaves_regional_loras_off_the_caption(ml, patcher, names):
    """Row a regional, row b everywhere, text_tokens 'no LoRA': caption layers and the joint layers' caption part
    (its pads included) get LoRA b alone."""
    rows = rows_of(ml, names)
    left, _ = halves()
    clone = ml("methods.regional").regional_model(patcher, rows, [left, None], "test", text_tokens="no LoRA")
    engine = lora_files.engine_of(clone, ml)
    roles = engine.token_router.roles
    paths = [p for p in engine.layers if roles[p] in ("text", "joint")]
    record = {}
    run_wrapped(clone, engine, patcher, *inputs(batch=1, seed=7), record=record, paths=paths)
    ref_b = layer_outputs(patcher, lora_files.merged_by_comfy(patcher, names[1:], STRENGTHS[1:]), record)
    text = [p for p in paths if roles[p] == "text"]
    assert text and len(paths) > len(text)
    for p in paths:
        got, want = record[p][1], ref_b[p]
        if got.ndim == 3 and roles[p] == "joint":
            got, want = got[:, :32], want[:, :32]
        if got.ndim == 3:
            torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL, msg=p)


def test_each_image_of_a_batch_equals_the_same_noise_sampled_alone(ml, patcher, names):
    """Batch 3 with a left/right split equals each image alone (one model call each, same noise slice)."""
    clone = ml("methods.regional").regional_model(patcher, rows_of(ml, names), list(halves()), "test")
    engine = lora_files.engine_of(clone, ml)
    x, sigma, cond = inputs(batch=3, seed=9)
    batch = run_wrapped(clone, engine, patcher, x, sigma, cond)
    for i in range(3):
        one = {"c_crossattn": cond["c_crossattn"][i:i + 1], "num_tokens": cond["num_tokens"]}
        alone = run_wrapped(clone, engine, patcher, x[i:i + 1], sigma[i:i + 1], one)
        torch.testing.assert_close(batch[i:i + 1], alone, atol=1e-5, rtol=1e-5)


def test_reference_latents_and_unknown_layouts_are_named_errors(ml, patcher, names):
    regional = ml("methods.regional")
    error = ml("core.regions").RegionError
    clone = regional.regional_model(patcher, rows_of(ml, names), list(halves()), "test")
    x, sigma, cond = inputs(batch=1)
    with pytest.raises(error, match=r"^test: the conditioning holds reference latents \(Z-Image omni / edit mode\).*"
                                    r"Remove the ReferenceLatent node"):
        run_wrapped(clone, lora_files.engine_of(clone, ml), patcher, x, sigma,
                    {**cond, "ref_latents": [torch.zeros(1, 16, 8, 8)]})
    roles = ml("host.token_routing").token_roles

    class PixelSpace(torch.nn.Module):  # the attributes of 0.33's NextDiTPixelSpace that tell it apart
        cap_embedder = x_embedder = context_refiner = noise_refiner = layers = dec_net = torch.nn.Identity()
    with pytest.raises(error, match=r"^test: the pixel-space Z-Image \(PixelSpace\) decodes every patch"):
        roles(PixelSpace(), ["diffusion_model.layers.0.attention.qkv"], "test")


def test_sampler_node_with_a_white_mask_equals_loraloader_ksampler(comfy_state, ml, patcher, names, caplog):
    """KSampler (Regional LoRA) with a white image-size mask on row 1 and none on row 2 samples what KSampler
    samples on both LoRAs merged by ComfyUI (4 steps, cfg 4)."""
    stack = ml("core.stack").LoraStack(tuple(rows_of(ml, names)))
    positive = tiny_models.make_conditioning("zimage", seed=1)
    negative = tiny_models.make_conditioning("zimage", seed=2)
    latent = {"samples": torch.zeros(1, 16, H, W)}
    node = nodes.NODE_CLASS_MAPPINGS["MultiLoRARegionalSampler"]
    with caplog.at_level(logging.INFO, logger="multilora"):
        got = node.execute(model=patcher, lora_stack=stack, seed=3, steps=4, cfg=4.0, sampler_name="euler",
                           scheduler="simple", positive=positive, negative=negative, latent_image=latent,
                           denoise=1.0, mask_1=torch.ones(1, 8 * H, 8 * W)).result[0]["samples"]
    assert f"the mask of row 1 is {8 * W}×{8 * H}; resized to the latent's {W}×{H}" in caplog.text
    ksampler = nodes.KSampler()
    reference = lora_files.merged_by_comfy(patcher, names, STRENGTHS)
    want = ksampler.sample(reference, 3, 4, 4.0, "euler", "simple", positive, negative, latent, 1.0)[0]["samples"]
    base = ksampler.sample(patcher, 3, 4, 4.0, "euler", "simple", positive, negative, latent, 1.0)[0]["samples"]
    assert (want - base).abs().max() > 1e-1
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
    split = node.execute(model=patcher, lora_stack=stack, seed=3, steps=4, cfg=4.0, sampler_name="euler",
                         scheduler="simple", positive=positive, negative=negative, latent_image=latent, denoise=1.0,
                         mask_1=halves()[0], mask_2=halves()[1]).result[0]["samples"]
    assert (split - want).abs().max() > 1e-2  # the regions change the image
    assert patcher.wrappers == {} and torch.count_nonzero(latent["samples"]) == 0


def test_sampler_node_refuses_reference_latents_before_sampling(ml, patcher, names, monkeypatch):
    """ReferenceLatent's entry in the conditioning (Z-Image omni) is refused by the node, before any sampling."""
    stack = ml("core.stack").LoraStack(tuple(rows_of(ml, names)))
    positive = [[t, {**extra, "reference_latents": [torch.zeros(1, 16, H, W)]}]
                for t, extra in tiny_models.make_conditioning("zimage", seed=1)]
    negative = tiny_models.make_conditioning("zimage", seed=2)
    node = nodes.NODE_CLASS_MAPPINGS["MultiLoRARegionalSampler"]
    calls = []  # a spy on the node's sampling call: the router refuses the same at the first model call
    monkeypatch.setattr(sys.modules[node.__module__], "ksample", lambda *a, **k: calls.append(a))
    with pytest.raises(ml("core.regions").RegionError,
                       match=r"^KSampler \(Regional LoRA\): the conditioning holds reference latents"):
        node.execute(model=patcher, lora_stack=stack, seed=3, steps=4, cfg=4.0, sampler_name="euler",
                     scheduler="simple", positive=positive, negative=negative,
                     latent_image={"samples": torch.zeros(1, 16, H, W)}, denoise=1.0, mask_1=halves()[0])
    assert calls == [] and patcher.wrappers == {}
    assert "reference_latents" not in negative[0][1]


@pytest.mark.parametrize("mask_from", ["connected masks", "concept attention"])
def test_patch_node_refuses_reference_latents_when_any_sampler_starts(comfy_state, ml, patcher, names, mask_from):
    """Regional LoRA (model patch) meets the conditioning only in the sampler: ComfyUI's own KSampler on the patched
    model stops with the named error when sampling starts, before any model call, and leaves nothing patched."""
    if mask_from == "connected masks":
        node = nodes.NODE_CLASS_MAPPINGS["MultiLoRARegional"]
        stack = ml("core.stack").LoraStack(tuple(rows_of(ml, names)))
        (patched,) = node.execute(model=patcher, lora_stack=stack, mask_from=mask_from, mask_1=halves()[0]).result
    else:  # what the node runs for it, with a tokenizer stand-in for the CLIP input
        auto = ml("methods.regional_auto")
        patched, _ = auto.auto_regional_model(patcher, auto_rows(ml, names), [], "Regional LoRA", ZImageTokens(), PROMPT,
                                              ml("core.auto_masks").AutoMaskPhases(2, 0))
    positive = [[t, {**e, "reference_latents": [torch.zeros(1, 16, H, W)]}]
                for t, e in tiny_models.make_conditioning("zimage", seed=1)]
    calls = []
    handle = patcher.model.diffusion_model.register_forward_pre_hook(lambda *a: calls.append(1))
    try:
        with pytest.raises(ml("core.regions").RegionError,
                           match=r"^Regional LoRA: the conditioning holds reference latents \(Z-Image omni / edit mode\)"):
            nodes.KSampler().sample(patched, 3, 4, 4.0, "euler", "simple", positive,
                                    tiny_models.make_conditioning("zimage", seed=2),
                                    {"samples": torch.zeros(1, 16, H, W)})
    finally:
        handle.remove()
    assert calls == [] and patcher.wrappers == {}


def test_lumina2_same_code_no_pads_and_grouped_query_attention(comfy_state, ml):
    """Lumina Image 2.0 (same NextDiT, no pad tokens, 2 key/value heads for 4 query heads), kohya LoRAs on the fused
    qkv: an all-one mask equals ComfyUI's merge, and with halves each grid token of each layer gets its region's
    LoRA, the caption (20 tokens, unpadded, first in the joint layers) both."""
    lumina = tiny_models.build_tiny("lumina2", seed=0)
    found = lora_files.write_lora_set(lumina, comfy_state["loras_dir"], "regional_lumina2", (1, 2), "kohya",
                                      targets=TARGETS)
    folder_paths.filename_list_cache.clear()
    rows = rows_of(ml, found)
    regional = ml("methods.regional")
    x, sigma, cond = inputs(batch=2, seed=8)
    white = regional.regional_model(lumina, rows, [torch.ones(4, 4), None], "test")
    got = run_wrapped(white, lora_files.engine_of(white, ml), lumina, x, sigma, cond)
    with tiny_models.patched(lora_files.merged_by_comfy(lumina, found, STRENGTHS)):
        want = tiny_models.forward(lumina, x, sigma, **cond)
    assert (want - tiny_models.forward(lumina, x, sigma, **cond)).abs().max() > 1e-2
    torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    split = regional.regional_model(lumina, rows, list(halves()), "test")
    engine = lora_files.engine_of(split, ml)
    assert engine.token_router.text_multiple == 1
    record = {}
    run_wrapped(split, engine, lumina, x, sigma, cond, record=record)
    ref = {key: layer_outputs(lumina, lora_files.merged_by_comfy(lumina, n, s), record) for key, n, s in
           (("a", found[:1], STRENGTHS[:1]), ("b", found[1:], STRENGTHS[1:]), ("ab", found, STRENGTHS))}
    left = torch.zeros(H // 2, W // 2, dtype=torch.bool)
    left[:, : W // 4] = True
    left = left.flatten()
    seen = set()
    for path, (_, out) in record.items():
        role = engine.token_router.roles[path]
        if out.ndim == 2:
            continue
        if role == "text":
            torch.testing.assert_close(out, ref["ab"][path], atol=ATOL, rtol=RTOL, msg=path)
        else:
            prefix = tiny_models.ZIMAGE_TEXT_TOKENS if role == "joint" else 0
            assert out.shape[1] == prefix + left.numel(), path  # no pad tokens
            grid = out[:, prefix:]
            torch.testing.assert_close(out[:, :prefix], ref["ab"][path][:, :prefix], atol=ATOL, rtol=RTOL, msg=path)
            torch.testing.assert_close(grid[:, left], ref["a"][path][:, prefix:][:, left], atol=ATOL, rtol=RTOL, msg=path)
            torch.testing.assert_close(grid[:, ~left], ref["b"][path][:, prefix:][:, ~left], atol=ATOL, rtol=RTOL,
                                       msg=path)
        seen.add(role)
    assert seen == {"text", "image", "joint"}

# --- automatic masks (mask_from "concept attention") ------------------------------------------------------
PROMPT = "a cat and a dog"


class ZImageTokens:
    """A text-encoder stand-in with ComfyUI's real Z-Image tokenizer: only tokenize is needed."""

    def __init__(self):
        import comfy.text_encoders.z_image
        self.tokenizer = comfy.text_encoders.z_image.ZImageTokenizer()

    def tokenize(self, text, return_word_ids=False, **kwargs):
        return self.tokenizer.tokenize_with_weights(text, return_word_ids, **kwargs)


class JointAttentionRecorder:
    """Per step, the reference concept attention [rows, N, C] of the conditional chunk, mean over heads, per layer."""

    def __init__(self, positions, text, grid):
        self.positions, self.text, self.grid = positions, text, grid
        self.per_step: dict[int, list[torch.Tensor]] = {}
        self.step, self.chunks = 0, [0]

    def apply_model(self, executor, x, t, *args, **kwargs):
        options = args[3] if len(args) > 3 else kwargs.get("transformer_options", {})
        schedule = [float(s) for s in options["sample_sigmas"]]
        sigma = float(options["sigmas"].flatten()[0])
        self.step = max(j for j, s in enumerate(schedule[:-1]) if s >= sigma * (1 - 1e-5) - 1e-12)
        self.chunks = [int(c) for c in options.get("cond_or_uncond") or [0]]
        handles = self.hooks(executor.class_obj.diffusion_model)  # after the engine's: qkv with the LoRAs applied
        try:
            return executor(x, t, *args, **kwargs)
        finally:
            for h in handles:
                h.remove()

    def hooks(self, diffusion_model):
        handles = []
        for layer in diffusion_model.layers:
            state = {}
            attn = layer.attention
            handles.append(attn.register_forward_pre_hook(
                lambda m, a, kw, s=state: s.__setitem__("pe", kw.get("freqs_cis", a[2] if len(a) > 2 else None)),
                with_kwargs=True))
            handles.append(attn.qkv.register_forward_hook(lambda m, a, out, s=state, at=attn: self.add(at, out, s["pe"])))
        return handles

    def add(self, attn, qkv, pe):
        b, length, _ = qkv.shape
        heads, kv, d = attn.n_local_heads, attn.n_local_kv_heads, attn.head_dim
        xq, xk, _ = torch.split(qkv, [heads * d, kv * d, kv * d], dim=-1)
        xq, xk = attn.q_norm(xq.view(b, length, heads, d)), attn.k_norm(xk.view(b, length, kv, d))
        xq, xk = comfy.ldm.flux.math.apply_rope(xq, xk, pe)
        xk = xk.unsqueeze(3).repeat(1, 1, 1, heads // kv, 1).flatten(2, 3)
        q, k = xq.float().movedim(1, 2), xk.float().movedim(1, 2)
        full = torch.softmax(q @ k.transpose(-1, -2) / d ** 0.5, dim=-1)  # [B, heads, L, L]: the model's softmax
        start, n = self.text + (-self.text) % 32, self.grid[0] * self.grid[1]
        block = full[:, :, start:start + n, :self.text]
        probs = (block / block.sum(-1, keepdim=True)).mean(1)
        rows = b // len(self.chunks)
        keep = [probs[c * rows:(c + 1) * rows] for c, i in enumerate(self.chunks) if i == 0]
        if keep:
            self.per_step.setdefault(self.step, []).append(torch.stack(keep).mean(0)[..., self.positions])

    def maps(self, steps):
        found = torch.stack([m for s in steps for m in self.per_step[s]]).mean(0)
        return found.transpose(1, 2).reshape(found.shape[0], found.shape[2], *self.grid)


def auto_rows(ml, names, concepts=("cat", "dog")):
    return [ml("core.stack").LoraRow(name=n, strength_model=1.0, concept=c) for n, c in zip(names, concepts)]


def test_zimage_capture_equals_the_full_joint_softmax(ml, patcher):
    """One call of batch 2 (cond, uncond) on the padded 16 × 12 latent: NextDiTConceptAttention (caption-only
    softmax, q/k normed and rotated by the pack) equals the full joint softmax of every main layer restricted to
    image queries × caption keys (tolerance: float32 softmax of the same logits in two groupings)."""
    x, sigma, cond = inputs(batch=2, seed=4)
    positions = [2, 5, 6]
    capture = ml("host.dit_attention").NextDiTConceptAttention(positions, 32)
    recorder = JointAttentionRecorder(positions, tiny_models.ZIMAGE_TEXT_TOKENS, (H // 2, W // 2))
    recorder.chunks = [0, 1]
    handles = recorder.hooks(patcher.model.diffusion_model)
    try:
        with capture.recording(patcher.model.diffusion_model, [0, 1], (H, W)), torch.no_grad():
            patcher.model.apply_model(x, sigma, transformer_options={"cond_or_uncond": [0, 1]}, **cond)
    finally:
        for h in handles:
            h.remove()
    got = capture.averaged()
    assert got.shape == (1, 3, H // 2, W // 2)
    torch.testing.assert_close(got, recorder.maps([0]), atol=1e-6, rtol=1e-5)
    assert float(got.std()) > 1e-3  # image tokens attend differently: the comparison is not of constants


def test_auto_masks_on_zimage_are_the_rule_applied_to_the_concepts_attention(comfy_state, ml, patcher, names):
    """auto_steps 2 on the padded latent: steps 0–1 record (every LoRA everywhere), step 2 sets the masks that
    core.auto_masks and the region rule give for the reference attention of steps 0–1; the concept tokens are
    the Qwen3 tokens ' cat' and ' dog' of the chat-templated prompt."""
    rows = auto_rows(ml, names)
    positive = tiny_models.make_conditioning("zimage", seed=1)
    negative = tiny_models.make_conditioning("zimage", seed=2)
    auto_mod = ml("methods.regional_auto")
    clone, auto = auto_mod.auto_regional_model(patcher, rows, [], "test", ZImageTokens(), PROMPT,
                                               ml("core.auto_masks").AutoMaskPhases(2, 0), 0.4, positive=positive)
    assert auto.positions == [4, 7] and auto.groups == [[0], [1]]  # <|im_start|> user \n a ' cat' ' and' ' a' ' dog'
    recorder = JointAttentionRecorder(auto.positions, tiny_models.ZIMAGE_TEXT_TOKENS, (H // 2, W // 2))
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test.recorder", recorder.apply_model)
    latent = torch.zeros(1, 16, H, W)
    comfy.sample.sample(clone, comfy.sample.prepare_noise(latent, 3), 3, 4.0, "euler", "simple", positive, negative,
                        latent, disable_pbar=True, seed=3)
    steps = auto.record.steps
    assert len(steps) == 3 and all(torch.equal(m, torch.ones_like(m)) for s in steps[:2] for m in s)
    masks = ml("core.auto_masks").concept_masks(recorder.maps([0, 1]), auto.groups, auto.threshold, (H, W))
    want = ml("core.regions").normalize_regions([masks[:, 0], masks[:, 1]], (H, W), "test").maps
    assert 0 < float(want[0, 0].sum()) < H * W and 0 < float(want[0, 1].sum()) < H * W  # real regions
    torch.testing.assert_close(torch.cat(steps[2]), want[0], atol=0, rtol=0)


def test_auto_mask_errors_on_zimage_name_node_input_and_fix(ml, patcher, names):
    auto_mod = ml("methods.regional_auto")
    phases = ml("core.auto_masks").AutoMaskPhases(2, 0)
    with pytest.raises(ml("core.errors").ConceptNotFoundError,
                       match=r"^test: concept word 'horse' is not in the prompt 'a cat and a dog'\. Use a word"):
        auto_mod.auto_regional_model(patcher, auto_rows(ml, names, ("cat", "horse")), [], "test", ZImageTokens(),
                                     PROMPT, phases)
    clip_l = types.SimpleNamespace(tokenize=lambda text, **kwargs: {"l": [[(49406, 1.0), (49407, 1.0)]]})
    with pytest.raises(ml("core.regions").RegionError,
                       match=r"^test: automatic masks on Z-Image / Lumina 2 read the prompt's Qwen3 tokens .*gives "
                             r"\['l'\]\. Connect the Z-Image text encoder \(qwen_3_4b\), or connect masks"):
        auto_mod.auto_regional_model(patcher, auto_rows(ml, names), [], "test", clip_l, PROMPT, phases)
