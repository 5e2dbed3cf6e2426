"""Do CLoRA's masks land on their objects on the trained testbed, and could they? (CPU)

    python testbed/clora_mask_check.py [--scenes 8] [--clora-seeds 4] [--parts render sample clora clora16] [--json F]

world.py fixes where objects are (left slot centred at x = 9, right at x = 23, y = 16, radius 5–6.5, jitter
±1.5 px). Ground truth per object: ``half`` (its slot's half; a uniform map puts 0.5 of its mass there) and
``object`` (its pixels: exact for renders — the scene minus the same scene without it — and world.py's shape at the
slot centre, r = 5.75, for generated images). Map metrics: ``mass_half`` / ``mass_obj`` = fraction of a map's
mass (probabilities summed over the word's tokens, nearest-upsampled) in the region; mask metrics for CLoRA's
mask (docs/algorithms.md §3.6: per-token min-max, [A ≥ 0.4·max A], union over tokens): ``area`` (fraction of
the image), ``mask_half`` (fraction of the mask in the true half) and ``iou_obj``. Each row averages objects × images × σ.

1. ``render`` probe: clean renders noised to σ of the 20-step schedule, one UNet call each, attention of the cond.
   a. plain captions, base model, the two shape nouns;
   b. "a zorb on the left and a lantern on the right, <bg> background": the maps of CLoRA's three variants
      (base, +character LoRA, +object LoRA; trigger left out, see 3). The capture-level rows come from the
      pack's own ``ConceptAttention`` and ``masks_from_maps`` (``pack union`` = CLoRA's mask: every variant's
      maps of the concept, as ``CloraGuider.concept_maps``; ``pack own`` = the concept's own variant only;
      ``token mean`` = threshold of the mean of the normalised token maps; λ = 0.4, 0.6, 0.8; ``@16×16`` = the
      same from level 1, what the capture would give there). Rows: every site, every level (site mean).
2. ``sample`` probe: the base model sampling plain captions (euler/normal, 20 steps, cfg 5), attention of the
   cond averaged over the steps, per site and level, against world.py's shapes; plus where the pixels'
   attention goes (BOS, the nouns, other words, EOS/padding).
3. CLoRA end to end (``clora.clora_sample``, the node's defaults, as evaluate.py calls it; one seed per run):
   ``CloraRecord.final_masks`` (what Mask Preview shows) against world.py's shapes and the pixels drawn in the
   concept's colour, with the trigger as evaluate.py sets it (the concept word itself, which the pack no
   longer inserts a second time, so it now equals "none") and none;
   masks re-thresholded from the last step's stored maps; ``clora16``: what-if, the pack capturing 16×16 instead.
This UNet (3 levels) has cross-attention at 32×32 (input 1, output 4, 5), 16×16 (input 3, output 2, 3) and 8×8
(input 5, middle 0, output 0, 1); the pack captures latent/4 = 8×8, i.e. all four 8×8 sites.
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys

import torch
import torch.nn.functional as F

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import world  # noqa: E402

STEPS, CFG, LAMBDA, SIZE = 20, 5.0, 0.4, world.SIZE
CENTRES = {"left": 9.0, "right": 23.0}
PLAIN_POSITIONS = {"left": [3], "right": [10]}  # "a <colour> <shape> on the left and a <colour> <shape> …"
CONCEPTS = (("character", "zorb", "left", world.ZORB_BODY), ("object", "lantern", "right", world.LANTERN_GLOW))
MASK_LAMBDAS = (0.4, 0.6, 0.8)  # the node's default, then stricter thresholds on the same maps
SIGMA_STEPS = (2, 6, 10, 14, 18)  # schedule indices for the render probe: σ ≈ 8.1, 3.1, 1.5, 0.73, 0.23


# ---- ground truth and metrics (pure torch) ----

def half(side: str) -> torch.Tensor:
    """Bool [32, 32]: the slot's half of the image."""
    x = torch.arange(SIZE)
    return ((x < SIZE // 2) if side == "left" else (x >= SIZE // 2)).view(1, -1).expand(SIZE, -1).clone()


def footprint(kind: str, side: str, radius: float = 5.75) -> torch.Tensor:
    """Bool [32, 32]: world.py's shape of ``kind`` at the slot centre (no jitter), for generated images."""
    grid, one = torch.arange(SIZE, dtype=torch.float32) + 0.5, torch.ones(1, 1, 1, 1)
    masks = world._shape_masks(CENTRES[side] * one, 16.0 * one, radius * one, grid.view(1, 1, -1, 1), grid.view(1, 1, 1, -1))
    return masks[kind][0, 0]


def renders(scenes: world.SceneBatch, seed: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """(images [B,3,32,32], side → bool [B,32,32] exact object pixels): the same jitter without the object."""
    images = world.render(scenes, torch.Generator().manual_seed(seed))
    objects = {}
    for side in ("left", "right"):
        empty = world.SceneBatch(**{f: getattr(scenes, f).clone() for f in world.SceneBatch.__dataclass_fields__})
        getattr(empty, side).zero_()
        empty.vest.zero_()
        diff = (images - world.render(empty, torch.Generator().manual_seed(seed))).abs().amax(1)
        objects[side] = (diff > 0.01) & half(side)
    return images, objects


def upsample(a: torch.Tensor) -> torch.Tensor:
    """[..., h, w] → [..., 32, 32], nearest (UNet-level maps and masks onto the image grid)."""
    out = F.interpolate(a.reshape(1, -1, *a.shape[-2:]).float(), size=(SIZE, SIZE), mode="nearest-exact")
    return out.reshape(*a.shape[:-2], SIZE, SIZE)


def spec_masks(maps: torch.Tensor, lam: float = LAMBDA) -> torch.Tensor:
    """docs/algorithms.md §3.6 on [..., T, h, w]: per-token min-max, [A ≥ λ·max A], union over T → bool [..., h, w]."""
    flat = maps.flatten(-2)
    lo, hi = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)
    n = ((flat - lo) / (hi - lo + 1e-8)).view_as(maps)
    return (n >= lam * n.flatten(-2).amax(-1)[..., None, None]).any(-3)


def token_mean(maps: torch.Tensor) -> torch.Tensor:
    """[B, T, h, w] → [B, 1, h, w]: per-token min-max, then the mean over tokens (an alternative to the union)."""
    flat = maps.flatten(-2)
    lo, hi = flat.amin(-1, keepdim=True), flat.amax(-1, keepdim=True)
    return ((flat - lo) / (hi - lo + 1e-8)).view_as(maps).mean(-3, keepdim=True)


def scores(maps: torch.Tensor, masks: torch.Tensor, halves: torch.Tensor, objects: torch.Tensor,
           other: torch.Tensor | None = None) -> dict[str, list]:
    """Per image: mass of [B, T, h, w] maps in the true half / the object / the other slot's object, and the
    mask's area, in-half share and IoU with the object."""
    a = upsample(maps.float().sum(-3))
    m = upsample(masks.float()) > 0.5
    total = a.flatten(1).sum(1).clamp_min(1e-12)
    inter, union = (m & objects).flatten(1).sum(1), (m | objects).flatten(1).sum(1).clamp_min(1)
    return {"mass_half": ((a * halves).flatten(1).sum(1) / total).tolist(),
            "mass_obj": ((a * objects).flatten(1).sum(1) / total).tolist(),
            "mass_other": [] if other is None else ((a * other).flatten(1).sum(1) / total).tolist(),
            "area": m.flatten(1).float().mean(1).tolist(),
            "mask_half": ((m & halves).flatten(1).sum(1) / m.flatten(1).sum(1).clamp_min(1)).tolist(),
            "iou_obj": (inter / union).tolist()}


def add(table: dict, row: str, values: dict, low: bool = False) -> None:
    """Append per-image values to ``table[row]`` (and to ``table["σ ≤ 1.5"][row]`` when ``low``)."""
    for key, v in values.items():
        table.setdefault(row, {}).setdefault(key, []).extend(v)
    if low:
        add(table.setdefault("σ ≤ 1.5", {}), row, values)


def summary(table: dict) -> dict:
    return {row: summary(cols) if row == "σ ≤ 1.5" else {k: round(sum(v) / len(v), 3) for k, v in cols.items() if v}
            for row, cols in table.items()}


# ---- attention recording ----

class AttentionRecorder:
    """attn2 replacement: returns ``inner``'s output (the pack's ConceptAttention) or ComfyUI's attention, and
    records softmax(qkᵀ/√d) of cond index 0, averaged over heads: per site a list of [B, HW, 77] per call."""

    def __init__(self, inner=None):
        self.inner, self.maps, self.sizes = inner, {}, {}

    def __call__(self, q, k, v, extra):
        import comfy.ldm.modules.attention as attention
        heads = extra["n_heads"]
        out = self.inner(q, k, v, extra) if self.inner else attention.optimized_attention(
            q, k, v, heads, attn_precision=extra.get("attn_precision"))
        chunks = list(extra.get("cond_or_uncond") or [0])
        if 0 in chunks:
            rows, c, dim = q.shape[0] // len(chunks), chunks.index(0), q.shape[-1] // heads
            qc = q[c * rows:(c + 1) * rows].reshape(rows, -1, heads, dim).transpose(1, 2).float()
            kc = k[c * rows:(c + 1) * rows].reshape(rows, -1, heads, dim).transpose(1, 2).float()
            site = (extra["block"][0], extra["block"][1], extra.get("block_index", 0))
            self.maps.setdefault(site, []).append(torch.softmax(qc @ kc.transpose(-1, -2) * dim ** -0.5, -1).mean(1))
            self.sizes[site] = tuple(int(d) for d in extra["activations_shape"][-2:])
        return out

    def site_maps(self, site, positions) -> torch.Tensor:
        """[B, T, h, w]: mean over recorded calls at ``site`` of the ``positions`` columns."""
        mean = torch.stack(self.maps[site]).mean(0)[..., positions]
        return mean.transpose(1, 2).reshape(mean.shape[0], len(positions), *self.sizes[site])


def per_site_and_level(recorder: AttentionRecorder, levels: dict, positions) -> dict[str, torch.Tensor]:
    """Row name → [B, T, h, w] maps: every site, and every level's mean over its sites (as the capture averages)."""
    rows = {f"{b} {n}": recorder.site_maps((b, n, i), positions) for b, n, i in levels}
    for level in sorted(set(levels.values())):
        sites = [recorder.site_maps(s, positions) for s, lv in levels.items() if lv == level]
        rows[f"level {level} ({sites[0].shape[-2]}×{sites[0].shape[-1]})"] = torch.stack(sites).mean(0)
    return rows


def plain_scenes(count: int, seed: int) -> world.SceneBatch:
    """``count`` scenes with two different shapes in two different colours on a plain background."""
    gen, keep = torch.Generator().manual_seed(seed), []
    while len(keep) < count:
        s = world.random_scenes(1, gen)
        if int(s.left[0]) and int(s.right[0]) and s.left[0] != s.right[0] and s.left_colour[0] != s.right_colour[0]:
            keep.append(s)
    return world.SceneBatch(**{f: torch.cat([getattr(s, f) for s in keep]) for f in world.SceneBatch.__dataclass_fields__})


def encode_batch(clip, captions) -> torch.Tensor:  # one conditioning row per caption
    return torch.cat([clip.encode_from_tokens(clip.tokenize(c)) for c in captions])


def unet_call(model, x, sigma, context, replace: dict) -> None:
    """One cond-only UNet evaluation at σ with the attn2 replacements ``replace`` (site → fn); ``model``'s
    patches (a LoRA) are applied for the call and removed after it."""
    model.patch_model()
    try:
        with torch.inference_mode():
            model.model.apply_model(x, sigma.expand(x.shape[0]), c_crossattn=context,
                                    transformer_options={"patches_replace": {"attn2": replace}})
    finally:
        model.unpatch_model()


# ---- 1. render probe ----

def render_probe(ml, model, clip, scene_count: int = 8, sigma_steps=SIGMA_STEPS, seed: int = 0) -> dict:
    """Attention on noised clean renders: plain shape nouns (base model) and CLoRA's concept maps (with LoRAs)."""
    import comfy.samplers
    import comfy.sd
    import comfy.utils

    import comfy_model
    capture_lib, masks_lib = ml("host.attention_capture"), ml("core.clora_masks")
    dm = model.model.diffusion_model
    levels = capture_lib.cross_attention_levels(dm)
    size = capture_lib.capture_size(SIZE, SIZE, capture_lib.capture_level(dm, levels))
    sigmas = comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", STEPS)
    loras = {cat: comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(
        os.path.join(comfy_model.WEIGHTS, "loras", f"testbed_{cat}.safetensors"), safe_load=True), 1.0, 0.0)[0]
        for cat, *_ in CONCEPTS}
    variants = [model] + [loras[cat] for cat, *_ in CONCEPTS]
    plain = plain_scenes(scene_count, seed)
    concept = world.random_scenes(scene_count, torch.Generator().manual_seed(seed + 1), ("character", "object"))
    tables = {"plain": {}, "concepts": {}}
    for name, scenes in (("plain", plain), ("concepts", concept)):
        images, objects = renders(scenes, seed)
        captions = [world.caption(scenes, i) for i in range(len(scenes))]
        context = encode_batch(clip, captions)
        positions = ml("core.prompt_tokens").concept_positions(clip.tokenize, captions[0], ["zorb", "lantern"]) \
            if name == "concepts" else {"left": PLAIN_POSITIONS["left"], "right": PLAIN_POSITIONS["right"]}
        words = list(positions)
        for i, c in enumerate(captions):  # one set of token positions for the whole batch
            found = ml("core.prompt_tokens").concept_positions(clip.tokenize, c, [world.LEFT_KINDS[int(scenes.left[i])],
                                                                              world.RIGHT_KINDS[int(scenes.right[i])]])
            assert list(found.values()) == [positions[w] for w in words], (c, found)
        noise = torch.randn(images.shape[0], 4, SIZE, SIZE, generator=torch.Generator().manual_seed(seed + 2))
        for step in sigma_steps:
            sigma = sigmas[step:step + 1]
            low = float(sigma) <= 1.5
            x = world.to_latent(images) + sigma * noise
            models = variants if name == "concepts" else [model]
            captured, at16 = [], []  # per variant: [B, T_all, h, w] maps, the pack's (8×8) and level 1 (16×16)
            all_positions = [p for w in words for p in positions[w]]
            for v, m in enumerate(models):
                capture = capture_lib.ConceptAttention(size, {0: all_positions})
                recorder = AttentionRecorder(capture)
                unet_call(m, x, sigma, context, {site: recorder for site in levels})
                captured.append(capture.averaged(0))
                mine = per_site_and_level(recorder, levels, all_positions)
                # the recorder's level average is the pack's capture, so the 16×16 rows are what it would capture there
                torch.testing.assert_close(mine[f"level 2 ({size[0]}×{size[1]})"], captured[-1], atol=1e-6, rtol=1e-5)
                at16.append(mine["level 1 (16×16)"])
                if v > 0 or name == "plain":  # per-site rows: each word under its own LoRA (concepts) / base (plain)
                    for g, word in enumerate(words):
                        if name == "concepts" and g != v - 1:
                            continue
                        side, other = ("left", "right") if g == 0 else ("right", "left")
                        for row, maps in per_site_and_level(recorder, levels, positions[word]).items():
                            row = f"{word}: {row}" if name == "concepts" else row
                            add(tables[name], row, scores(maps, spec_masks(maps), half(side), objects[side],
                                                          objects[other]), low)
            offsets = [0]
            for w in words:
                offsets.append(offsets[-1] + len(positions[w]))
            mask_sets = {}
            for tag, per_variant in (("", captured), (" @16×16", at16)):
                groups = [[c[:, offsets[g]:offsets[g + 1]] for c in per_variant] for g in range(len(words))]
                mask_sets[f"pack union{tag}"] = [torch.cat(g, 1) for g in groups]
                if name == "concepts":
                    mask_sets[f"pack own{tag}"] = [groups[g][g + 1] for g in range(len(words))]
                mask_sets[f"token mean{tag}"] = [token_mean(torch.cat(g, 1)) for g in groups]
            for (row, per_word), lam in itertools.product(mask_sets.items(), MASK_LAMBDAS):
                masks = masks_lib.masks_from_maps(per_word, lam, (SIZE, SIZE))
                for g in range(len(words)):
                    side, other = ("left", "right") if g == 0 else ("right", "left")
                    add(tables[name], f"{words[g]}: {row} λ={lam}",
                        scores(per_word[g], masks[:, g], half(side), objects[side], objects[other]), low)
    out = {name: summary(t) for name, t in tables.items()}
    out["object_area"] = {s: round(float(o.float().mean()), 3) for s, o in renders(plain, seed)[1].items()}
    return out


# ---- 2. sample probe ----

def sample_probe(ml, model, clip, count: int = 8, seed: int = 5) -> dict:
    """The base model sampling plain captions: per site/level, step-averaged attention of the shape nouns."""
    import comfy.sample
    levels = ml("host.attention_capture").cross_attention_levels(model.model.diffusion_model)
    scenes = plain_scenes(count, seed)
    captions = [world.caption(scenes, i) for i in range(count)]
    recorder, clone = AttentionRecorder(), model.clone()
    for site in levels:
        clone.set_model_attn2_replace(recorder, *site)
    latent, negative = torch.zeros(count, 4, SIZE, SIZE), [[clip.encode_from_tokens(clip.tokenize("")), {}]]
    comfy.sample.sample(clone, comfy.sample.prepare_noise(latent, seed), STEPS, CFG, "euler", "normal",
                        [[encode_batch(clip, captions), {}]], negative, latent, seed=seed, disable_pbar=True)
    table: dict = {}
    for side, kinds in (("left", scenes.left), ("right", scenes.right)):
        truth = torch.stack([footprint(world.SHAPES[int(k)], side) for k in kinds])
        for row, maps in per_site_and_level(recorder, levels, PLAIN_POSITIONS[side]).items():
            add(table, row, scores(maps, spec_masks(maps), half(side), truth))
    last = 17  # EOS of the plain captions
    for row, maps in per_site_and_level(recorder, levels, list(range(77))).items():
        share = maps.mean((-1, -2))  # [B, 77]
        nouns = share[:, [3, 10]].sum(1)
        add(table, row, {"to_bos": share[:, 0].tolist(), "to_nouns": nouns.tolist(),
                         "to_words": (share[:, 1:last].sum(1) - nouns).tolist(), "to_eos": share[:, last:].sum(1).tolist()})
    return summary(table)


# ---- 3. CLoRA end to end ----

def clora_runs(ml, model, clip, seeds, with_trigger: bool, background: str = "gray", level: int | None = None) -> dict:
    """CLoRA's final masks (and images) for the zorb/lantern prompt, one run per seed. ``level``: what-if run
    capturing that UNet level instead of the pack's choice (clora.capture_level replaced for the runs)."""
    import comfy_model
    clora, stack = ml("methods.clora"), ml("core.stack")
    if level is not None:
        original = clora.capture_level
        clora.capture_level = lambda *_: level
        try:
            return clora_runs(ml, model, clip, seeds, with_trigger, background)
        finally:
            clora.capture_level = original
    rows = tuple(stack.LoraRow(f"testbed_{cat}.safetensors", 1.0, 1.0, concept=word,
                               trigger=world.TRIGGERS[cat] if with_trigger else "", category=cat)
                 for cat, word, _, _ in CONCEPTS)
    prompt = f"a zorb on the left and a lantern on the right, {background} background"
    table: dict = {}
    masks_from_maps = ml("core.clora_masks").masks_from_maps
    for seed in seeds:
        result, record = clora.clora_sample(model, clip, prompt, "", rows, seed, STEPS, "euler", "normal",
                                            {"samples": torch.zeros(1, 4, SIZE, SIZE)}, 1.0, clora.CloraSettings(cfg=CFG))
        image = comfy_model.decode(result["samples"])[0]
        for g, (_, word, side, rgb) in enumerate(CONCEPTS):
            maps = torch.stack([step[g] for step in record.steps]).mean(0)[None]  # normalised maps, step mean
            mask = record.final_masks[g][None]
            drawn = ((image - torch.tensor(rgb).view(3, 1, 1)).abs().amax(0) < 0.2)[None]
            s = scores(maps, mask, half(side)[None], footprint(word, side)[None])
            s["iou_drawn"] = scores(maps, mask, half(side)[None], drawn)["iou_obj"] if drawn.sum() >= 8 else []
            s["drawn_px"] = [float(drawn.sum())]
            add(table, f"{word}: final mask (pack)", s)
            last = record.steps[-1][g][None]  # the maps final_masks came from (normalised)
            same = torch.equal(masks_from_maps([last], LAMBDA, (SIZE, SIZE))[0, 0], record.final_masks[g])
            add(table, f"{word}: final mask (pack)", {"recomputed_equal": [float(same)]})
            for recipe, lam in (("union", 0.8), ("token mean", 0.4), ("token mean", 0.8)):
                m = masks_from_maps([last if recipe == "union" else token_mean(last)], lam, (SIZE, SIZE))[:, 0]
                add(table, f"{word}: last step {recipe} λ={lam}",
                    scores(last, m, half(side)[None], footprint(word, side)[None]))
    return summary(table)


def markdown(result: dict) -> str:
    lines = []
    for title, table in result.items():
        if not isinstance(table, dict) or not table or not all(isinstance(v, dict) for v in table.values()):
            lines += [f"{title}: {table}", ""]
            continue
        keys = list(dict.fromkeys(k for r in table.values() for k in r))
        lines += [f"### {title}", "", "| row | " + " | ".join(keys) + " |", "|---|" + "---|" * len(keys)]
        lines += [f"| {row} | " + " | ".join(str(r.get(k, "")) for k in keys) + " |" for row, r in table.items()] + [""]
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=8, help="images per probe")
    parser.add_argument("--clora-seeds", type=int, default=4, help="CLoRA runs (seeds 1..N) per trigger setting")
    parser.add_argument("--parts", nargs="+", default=["render", "sample", "clora", "clora16"],
                        choices=["render", "sample", "clora", "clora16"], help="clora16: what-if capture at 16×16")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    from boot import boot_comfy
    ml = boot_comfy()
    import folder_paths

    import comfy_model
    folder_paths.add_model_folder_path("loras", os.path.join(comfy_model.WEIGHTS, "loras"), is_default=True)
    model, clip = comfy_model.load_testbed()
    result = {}
    probe = render_probe(ml, model, clip, args.scenes) if "render" in args.parts else {}
    for name, title in (("plain", "plain shape nouns, base model"),
                        ("concepts", "zorb / lantern, each under its LoRA; pack rows = CLoRA's masks")):
        if not probe:
            break
        low = probe[name].pop("σ ≤ 1.5")
        result[f"render probe: {title}"] = probe[name]
        result[f"render probe, σ ≤ 1.5 only: {title}"] = low
        result["object area (fraction of the image)"] = probe["object_area"]
    if "sample" in args.parts:
        result["sample probe: base model, plain shape nouns, step-averaged"] = sample_probe(ml, model, clip, args.scenes)
    seeds = list(range(1, args.clora_seeds + 1))
    if "clora" in args.parts:
        result["CLoRA end to end, trigger = concept word (evaluate.py)"] = clora_runs(ml, model, clip, seeds, True)
        result["CLoRA end to end, no trigger"] = clora_runs(ml, model, clip, seeds, False)
    if "clora16" in args.parts:
        result["what-if: CLoRA capturing 16×16 (level 1), trigger"] = clora_runs(ml, model, clip, seeds, True, level=1)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
    print(markdown(result))


if __name__ == "__main__":
    main()
