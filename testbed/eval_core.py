"""The testbed evaluation's building blocks: prompts, sampling through the pack, detector scores, intervals.

Host module without side effects: it imports ``comfy.*`` but boots nothing, so ComfyUI must already be on
sys.path and booted (``testbed/evaluate.py`` boots it with ``boot.boot_comfy``; the tier-2 tests use the
suite's boot). Pack modules come through an ``ml(name)`` accessor passed by the caller, because the scripts
and the test suite load the pack under different module names.

Protocol (testbed/README.md): euler, ``STEPS`` = 20, cfg ``CFG`` = 5, LoRA strength 1, one batch of ``SEEDS`` = 4
noise samples per prompt (seed = prompt index); scheduler ``SCHEDULERS[arch]`` (UNet: normal, DiT: simple, each
family's usual one). ``ctx["arch"]`` picks the testbed ("unet", the default, or "dit"). k ≥ 2: ComposLoRA sets
(character + k−1 other categories); k = 1: one category alone (the reference row: how strong each LoRA is by
itself), with the base model on the same prompts beside it (does the base draw the class?).

Regional rows: ``regional_oracle`` feeds ``methods.regional.regional_model(model, rows, masks, node)`` the
scene generator's ground-truth regions (``world.region_masks``, one [64, 64] mask per row at latent resolution,
None = everywhere); ``regional_auto`` calls ``methods.regional.regional_auto_model`` with the arguments its
signature names among (model, rows, node/node_name, clip, prompt). Both are skipped, with a note, when the pack
has no ``methods.regional`` (``regional_available``).
"""
from __future__ import annotations

import importlib.util
import itertools
import sys
import time
import traceback
from typing import Callable, Sequence

import torch

import comfy.model_management
import comfy.sample
import comfy.sd
import comfy.utils
import folder_paths

import detector as detector_lib
import objectives
import world

STEPS, CFG, SEEDS = 20, 5.0, 4
SCHEDULERS = {"unet": "normal", "dit": "simple"}
CONCEPT_WORDS = {"character": "zorb", "clothing": "plaid, vest", "background": "brick", "object": "lantern",
                 "style": ""}
METHODS = ("merge", "switch", "switch_authors", "composite", "cmlora", "clora", "clora_authors", "regional_oracle",
           "regional_oracle_no_text", "regional_auto")
"""``switch_authors``: LoRA Switch with the released code's schedule; ``clora_authors``: CLoRA's "authors' code"
variant (clora_settings.VARIANTS); ``regional_oracle_no_text``: the oracle masks with text tokens routed to no regional
LoRA (``text_tokens`` "no LoRA" instead of "every LoRA"): the pairs the README's variant tables compare."""
CLORA_METHODS = ("clora", "clora_authors")
REGIONAL = ("regional_oracle", "regional_oracle_no_text", "regional_auto")
ALL_METHODS = ("base",) + METHODS
Prompt = tuple[tuple[str, ...], str, dict]  # (categories, caption, expected plain parts: detector head → code)


def lora_name(category: str, arch: str = "unet") -> str:
    return objectives.lora_file(arch, category)


def regional_available(ml: Callable) -> bool:
    """Whether the pack has the regional method (multilora/methods/regional.py)."""
    probe = ml("methods")
    return importlib.util.find_spec(f"{probe.__name__}.regional") is not None


def category_sets(k: int) -> list[tuple[str, ...]]:
    """k = 1: each category alone; k ≥ 2: the character plus every (k−1)-combination of the others."""
    if k == 1:
        return [(c,) for c in world.CATEGORIES]
    others = [c for c in world.CATEGORIES if c != "character"]
    return [("character",) + combo for combo in itertools.combinations(others, k - 1)]


def composition_prompts(k: int, count: int, seed: int = 0) -> list[Prompt]:
    """``count`` prompts cycling over the k-sets (k = 1: over the 5 categories, ``count`` in total). The
    slots and background no concept takes are plain and captioned; they are the sanity parts."""
    sets = category_sets(k)
    gen = torch.Generator().manual_seed(1000 * k + seed)
    out = []
    for i in range(count):
        cats = sets[i % len(sets)]
        scenes = world.random_scenes(1, gen, cats)
        if "object" not in cats and int(scenes.right[0]) == 0:
            scenes.right[0] = 1 + int(torch.randint(0, 3, (1,), generator=gen))
        if "character" not in cats and int(scenes.left[0]) == 0:  # k = 1 only: k ≥ 2 draws stay as before
            scenes.left[0] = 1 + int(torch.randint(0, 3, (1,), generator=gen))
        expected = {}
        if "character" not in cats:
            expected["left"] = int(scenes.left[0])
            expected["left_colour"] = int(scenes.left_colour[0])
        if "clothing" not in cats:
            expected["vest"] = int(scenes.vest[0])
        if "object" not in cats:
            expected["right"] = int(scenes.right[0])
            expected["right_colour"] = int(scenes.right_colour[0])
        if "background" not in cats:
            expected["background"] = int(scenes.background[0])
        out.append((cats, world.caption(scenes, 0), expected))
    return out


def rows_for(stack, categories: Sequence[str], strength: float = 1.0, arch: str = "unet") -> tuple:
    """LoraRows (``strength``, concept word, trigger, category) of the testbed LoRAs of ``categories``."""
    return tuple(stack.LoraRow(lora_name(c, arch), strength, strength, concept=CONCEPT_WORDS[c],
                               trigger=world.TRIGGERS[c], category=c) for c in categories)


def _regional(ml: Callable, method: str, model, clip, rows, prompt: str, categories: Sequence[str]):
    regional = ml("methods.regional")
    if method.startswith("regional_oracle"):
        text = ml("core.regions").TEXT_NONE if method == "regional_oracle_no_text" else ml("core.regions").TEXT_ALL
        return regional.regional_model(model, rows, world.region_masks(categories), "testbed", text_tokens=text)
    auto = ml("methods.regional_auto")
    phases = ml("core.auto_masks").AutoMaskPhases()  # the node's defaults: 3 recording steps, then frozen
    clone, _ = auto.auto_regional_model(model, rows, [None] * len(rows), "testbed", clip, prompt, phases)
    return clone


def decode(model, latent: torch.Tensor) -> torch.Tensor:
    """LATENT samples → RGB [B,3,H,W] in [0, 1] through the model's own latent format (pixels as latents)."""
    return world.from_latent(model.model.process_latent_in(latent.to(torch.float32).cpu()))


def encode(clip, text: str) -> list:
    cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


def sample(ml: Callable, method: str, model, clip, rows, prompt: str, seed: int, seeds: int = SEEDS,
           steps: int = STEPS, switch_every: int = 5, cache: bool = True, arch: str = "unet",
           categories: Sequence[str] = ()) -> torch.Tensor:
    """LATENT samples [seeds,C,64,64] of ``method`` (or "base": no LoRA) through the pack's own engine
    (``cache``: CMLoRA's feature cache, on as in the node's default; ``categories``: the rows' categories, for
    the oracle masks)."""
    latent = torch.zeros(seeds, objectives.channels(arch), world.SIZE, world.SIZE)
    scheduler = SCHEDULERS[arch]
    if method in CLORA_METHODS:
        clora = ml("methods.clora")
        options = ml("methods.clora_settings")
        variant = options.VARIANT_AUTHORS if method == "clora_authors" else options.VARIANT_PACK
        out, _ = clora.clora_sample(model, clip, prompt, "", rows, seed, steps, "euler", scheduler,
                                    {"samples": latent}, 1.0, options.CloraSettings.for_variant(variant, cfg=CFG))
        return out["samples"]
    if method == "base":
        patched = model
    elif method == "merge":
        patched = model
        for row in rows:
            sd = comfy.utils.load_torch_file(folder_paths.get_full_path("loras", row.name), safe_load=True)
            patched, _ = comfy.sd.load_lora_for_models(patched, None, sd, row.strength_model, 0.0)
    elif method == "switch":
        patched = ml("methods.switch_composite").switch_model(model, rows, switch_every, "testbed")
    elif method == "switch_authors":
        patched = ml("methods.switch_composite").switch_model(model, rows, switch_every, "testbed",
                                                              ml("core.routing").SWITCH_AUTHORS)
    elif method == "composite":
        patched = ml("methods.switch_composite").composite_model(model, rows, None, "testbed")
    elif method == "cmlora":
        patched = ml("methods.cmlora").cmlora_model(model, rows, 0.55, False, "testbed", cache=cache)
    elif method in REGIONAL:
        patched = _regional(ml, method, model, clip, rows, prompt, categories)
    else:
        raise ValueError(f"testbed: unknown method '{method}'; use one of {METHODS + ('base',)}")
    return sample_model(patched, clip, prompt, seed, latent, steps, arch)


def sample_model(patched, clip, prompt: str, seed: int, latent: torch.Tensor, steps: int = STEPS,
                 arch: str = "unet") -> torch.Tensor:
    """``patched`` sampled with the protocol (euler, ``SCHEDULERS[arch]``, cfg ``CFG``, empty negative) from the
    zero ``latent``'s noise of ``seed``."""
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(patched, noise, steps, CFG, "euler", SCHEDULERS[arch], encode(clip, prompt),
                               encode(clip, ""), latent, seed=seed, disable_pbar=True)


def score(net, images: torch.Tensor, categories: Sequence[str], expected: dict) -> dict:
    """Per image: presence per concept, min presence probability, all present, plain parts correct, and every
    set category's class drawn (generic member or the concept; style counts as its own class)."""
    with torch.no_grad():
        logits = net(images.to(next(net.parameters()).device))
    prob = {n: torch.softmax(v.float(), -1).cpu() for n, v in logits.items()}
    pred = {n: v.argmax(-1) for n, v in prob.items()}
    presence = detector_lib.concept_presence(pred)
    p_concept = {"character": prob["left"][:, world.LEFT_KINDS.index("zorb")], "clothing": prob["vest"][:, 1],
                 "background": prob["background"][:, world.BACKGROUND_NAMES.index("brick")],
                 "object": prob["right"][:, world.RIGHT_KINDS.index("lantern")], "style": prob["style"][:, 1]}
    per = {c: presence[c].float() for c in categories}
    sanity = torch.ones(images.shape[0])
    for head, value in expected.items():
        sanity = sanity * (pred[head] == value).float()
    classes = detector_lib.class_presence(pred)
    return {"presence": per, "min_prob": torch.stack([p_concept[c] for c in categories]).min(0).values,
            "all": torch.stack(list(per.values())).min(0).values, "sanity": sanity,
            "classes": torch.stack([classes[c].float() for c in categories]).min(0).values}


def bootstrap(per_prompt: torch.Tensor, reps: int = 2000, seed: int = 0,
              decimals: int = 3) -> tuple[float, float, float]:
    """Mean and 95 % percentile interval, resampling prompts (rows of [P, SEEDS])."""
    gen = torch.Generator().manual_seed(seed)
    means = per_prompt.mean(1)
    idx = torch.randint(0, len(means), (reps, len(means)), generator=gen)
    boot = means[idx].mean(1).sort().values
    return tuple(round(float(v), decimals) for v in (means.mean(), boot[int(0.025 * reps)], boot[int(0.975 * reps)]))


def new_stats() -> dict[str, list]:
    """Per-prompt score lists of one (k, method): min_prob, all, sanity, has_<category> (None: not in the set)."""
    return {"min_prob": [], "all": [], "sanity": [], "classes": [], **{f"has_{c}": [] for c in world.CATEGORIES}}


def add_scores(stats: dict[str, list], s: dict, categories: Sequence[str]) -> None:
    for name in ("min_prob", "all", "sanity", "classes"):
        stats[name].append(s[name])
    for c in world.CATEGORIES:
        stats[f"has_{c}"].append(s["presence"][c] if c in categories else None)


def summarise(stats: dict[str, list]) -> dict[str, tuple[float, float, float]]:
    """Bootstrap mean and interval of every score over the prompts it applies to."""
    return {name: bootstrap(torch.stack([v for v in values if v is not None]))
            for name, values in stats.items() if any(v is not None for v in values)}


def methods_for(k: int, methods: Sequence[str]) -> list[str]:
    """k = 1 is the LoRA alone: merge only (Switch and Composite of one LoRA are merge), and the base model on
    the same prompts when asked for (``base`` in ``methods``)."""
    if k == 1:
        return [m for m in ("base", "merge") if m in methods] or ["merge"]
    return [m for m in methods if m != "base"]


def run_method(method: str, k: int, prompts: Sequence[Prompt], ctx: dict, budget: float = float("inf"),
               on_prompt: Callable[[dict], None] | None = None, seeds: int = SEEDS, steps: int = STEPS,
               sheet_columns: int = 8) -> tuple[dict, list]:
    """Sample and score ``prompts`` (seed = prompt index) with ``method`` using ``ctx`` (ml, model, clip, net,
    optional run start); returns (entry: bootstrap summaries + prompts_covered/total, seconds, stopped_early or
    error, traceback; first sheet images). Stops before a prompt that would overrun ``budget`` seconds (from
    the last prompt's time); an exception ends this method only: printed, recorded, never raised."""
    stats, images_row = new_stats(), []
    entry = {"prompts_total": len(prompts), "prompts_covered": 0}
    arch = ctx.get("arch", "unet")
    t0, last_s = time.perf_counter(), 0.0
    try:
        for i, (cats, prompt, expected) in enumerate(prompts):
            elapsed = time.perf_counter() - t0
            if budget <= 0 or (i > 0 and elapsed + last_s > budget):  # the first prompt runs if any time is left
                entry["stopped_early"] = True
                print(f"k={k} {method}: stopping after {i}/{len(prompts)} prompts ({elapsed:.1f} s; budget "
                      f"{budget:.0f} s)", flush=True)
                break
            t1 = time.perf_counter()
            rows = rows_for(ctx["ml"]("core.stack"), cats, arch=arch) if method != "base" else ()
            if method in CLORA_METHODS and (arch == "dit" or sum(1 for c in cats if CONCEPT_WORDS[c]) < 2):
                # CLoRA contrasts ≥ 2 concept words; a style row has none (it is applied globally), so a
                # {character, style} set is outside what CLoRA does: counted, not scored. A DiT has no
                # cross-attention for CLoRA to read: every prompt is outside it.
                entry["not_applicable"] = entry.get("not_applicable", 0) + 1
                entry["prompts_covered"] = i + 1
                continue
            latent = sample(ctx["ml"], method, ctx["model"], ctx["clip"], rows, prompt, i, seeds, steps, arch=arch,
                            categories=cats)
            images = decode(ctx["model"], latent)
            s = score(ctx["net"], images, cats, expected)
            add_scores(stats, s, cats)
            if i < sheet_columns:
                images_row.append(images[0].cpu())
            last_s = time.perf_counter() - t1
            entry.update(summarise(stats), prompts_covered=i + 1, seconds=round(time.perf_counter() - t0, 1))
            print(f"k={k} {method} prompt {i + 1}/{len(prompts)} {last_s:.1f} s (method "
                  f"{time.perf_counter() - t0:.1f} s, run {time.perf_counter() - ctx.get('start', t0):.1f} s) "
                  f"all={float(s['all'].mean()):.2f} sanity={float(s['sanity'].mean()):.2f} | {prompt}", flush=True)
            if on_prompt is not None:
                on_prompt(entry)
    except Exception as exc:  # one failing method must not cost the others' results
        traceback.print_exc()
        sys.stderr.flush()
        entry.update(error=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc())
        if torch.cuda.is_available():
            comfy.model_management.soft_empty_cache()
    entry["seconds"] = round(time.perf_counter() - t0, 1)
    return entry, images_row
