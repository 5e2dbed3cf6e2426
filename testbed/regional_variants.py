"""Regional LoRA's choices on the testbed: where the background LoRA acts, and what the text tokens get.

    python testbed/regional_variants.py --arch unet|dit --out DIR [--ks 2 3] [--prompts 40]
                                        [--variants merge oracle:all:slots ...] [--weights W]

A variant is ``source:text:background``:
- source — ``oracle`` (the scene's regions, ``world.region_masks``) or ``auto`` (each row's mask from its concept
  word's attention, the node's defaults: 3 recording steps, then frozen, threshold 0.4);
- text — the ``text_tokens`` policy (``core.regions``): ``all`` (every LoRA, the default), ``none`` (no regional
  LoRA), ``words`` (each regional LoRA on its own concept words, every LoRA on the other tokens);
- background — where the background row acts: ``slots`` (outside both object slots: the oracle rows of
  evaluate.py), ``rest`` (outside the regions of the set's other concepts: a plain object's slot included),
  ``everywhere`` (no mask: the row acts on the whole image, as the node does for a row without a mask), or
  ``attention`` (auto only: its own concept word's mask).
``merge`` is ComfyUI's merged LoRAs, the reference. Protocol of evaluate.py (euler, 20 steps, cfg 5, 40 prompts × 4
seeds, seed = prompt index); besides each variant's bootstrap intervals, the paired difference to merge on the same
prompts (``vs_merge``: mean and 95 % interval of the per-prompt all-present difference). Writes DIR/<arch>_k<k>.json
after every variant and DIR/<arch>.md at the end. Variants can run as separate processes into subfolders of one
DIR (merge in one of them); ``--combine DIR`` merges every DIR/*/<arch>_k<k>.json into DIR and writes the table.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from boot import boot_comfy  # noqa: E402

ml = boot_comfy()

import torch  # noqa: E402

import folder_paths  # noqa: E402

import comfy_model  # noqa: E402
import detector as detector_lib  # noqa: E402
import eval_core  # noqa: E402
import objectives  # noqa: E402
import world  # noqa: E402

TEXT = {"all": "TEXT_ALL", "none": "TEXT_NONE", "words": "TEXT_CONCEPT"}
DEFAULT_VARIANTS = ("merge", "oracle:all:slots", "oracle:words:slots", "oracle:all:rest", "oracle:words:rest",
                    "oracle:all:everywhere", "oracle:words:everywhere", "auto:all:attention", "auto:words:attention",
                    "auto:all:everywhere", "auto:words:everywhere")


def parse(variant: str) -> tuple[str, str, str]:
    if variant == "merge":
        return "merge", "", ""
    parts = variant.split(":")
    source, text, background = parts if len(parts) == 3 else ("", "", "")
    allowed = {"oracle": ("slots", "rest", "everywhere"), "auto": ("attention", "everywhere")}.get(source, ())
    if text not in TEXT or background not in allowed:
        raise SystemExit(f"bad variant {variant!r}: source:text:background, e.g. oracle:words:rest")
    return source, text, background


def oracle_masks(categories, background: str) -> list:
    """``world.region_masks`` (its background rule is ``rest``) with the background row's region by ``background``."""
    masks = world.region_masks(categories)
    if "background" not in categories:
        return masks
    i = list(categories).index("background")
    if background == "everywhere":
        masks[i] = None
    elif background == "slots":
        masks[i] = 1 - torch.maximum(world.slot_region("left"), world.slot_region("right"))
    return masks


def patched_model(variant: str, model, clip, rows, prompt: str, categories):
    source, text, background = parse(variant)
    regions, regional, auto = ml("core.regions"), ml("methods.regional"), ml("methods.regional_auto")
    policy = getattr(regions, TEXT[text])
    if source == "oracle":
        masks = oracle_masks(categories, background)
        words = auto.text_concept_tokens(model, rows, masks, clip, prompt, "testbed", policy)
        return regional.regional_model(model, rows, masks, "testbed", text_tokens=policy, concept_tokens=words)
    if background == "everywhere":  # the background row without a concept word: no automatic mask, acts everywhere
        rows = tuple(dataclasses.replace(r, concept="") if c == "background" else r for r, c in zip(rows, categories))
    phases = ml("core.auto_masks").AutoMaskPhases()
    clone, _ = auto.auto_regional_model(model, rows, [None] * len(rows), "testbed", clip, prompt, phases,
                                        text_tokens=policy)
    return clone


def sample(variant: str, ctx: dict, rows, prompt: str, seed: int, categories) -> torch.Tensor:
    model, clip, arch = ctx["model"], ctx["clip"], ctx["arch"]
    if variant == "merge":
        return eval_core.sample(ml, "merge", model, clip, rows, prompt, seed, arch=arch)
    patched = patched_model(variant, model, clip, rows, prompt, categories)
    latent = torch.zeros(eval_core.SEEDS, objectives.channels(arch), world.SIZE, world.SIZE)
    return eval_core.sample_model(patched, clip, prompt, seed, latent, arch=arch)


def run(variant: str, k: int, ctx: dict, count: int) -> dict:
    """The summary of ``variant`` on the k-set prompts, with its per-prompt all-present means."""
    stats, t0 = eval_core.new_stats(), time.perf_counter()
    for i, (cats, prompt, expected) in enumerate(eval_core.composition_prompts(k, count)):
        rows = eval_core.rows_for(ml("core.stack"), cats, arch=ctx["arch"])
        images = eval_core.decode(ctx["model"], sample(variant, ctx, rows, prompt, i, cats))
        eval_core.add_scores(stats, eval_core.score(ctx["net"], images, cats, expected), cats)
    summary = eval_core.summarise(stats)
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    summary["per_prompt_all"] = [round(float(v), 4) for v in torch.stack(stats["all"]).mean(1)]
    return summary


def paired(diff: torch.Tensor, reps: int = 2000) -> tuple[float, float, float]:
    """Mean and 95 % bootstrap interval of per-prompt differences (prompts resampled)."""
    gen = torch.Generator().manual_seed(0)
    boot = diff[torch.randint(0, len(diff), (reps, len(diff)), generator=gen)].mean(1).sort().values
    return tuple(round(float(v), 3) for v in (diff.mean(), boot[int(0.025 * reps)], boot[int(0.975 * reps)]))


def with_pairs(entries: dict) -> dict:
    """``vs_merge`` for every variant of one k, when merge ran on the same prompts."""
    reference = entries.get("merge", {}).get("per_prompt_all")
    for variant, s in entries.items():
        if variant != "merge" and reference and len(s.get("per_prompt_all", ())) == len(reference):
            s["vs_merge"] = paired(torch.tensor(s["per_prompt_all"]) - torch.tensor(reference))
    return entries


def combine(out: str, arch: str) -> dict:
    """Every ``out/*/<arch>_k<k>.json`` (and ``out``'s own) merged per k, with the paired differences."""
    results: dict = {}
    for root in [out] + sorted(os.path.join(out, d) for d in os.listdir(out) if os.path.isdir(os.path.join(out, d))):
        for name in sorted(os.listdir(root)):
            if name.startswith(f"{arch}_k") and name.endswith(".json"):
                k = int(name[len(arch) + 2:-5])
                with open(os.path.join(root, name)) as f:
                    results.setdefault(k, {}).update(json.load(f))
    order = ["merge"] + list(DEFAULT_VARIANTS)
    return {k: with_pairs(dict(sorted(v.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99)))
            for k, v in sorted(results.items())}


def markdown(arch: str, results: dict) -> str:
    cols = ["all", "vs_merge"] + [f"has_{c}" for c in world.CATEGORIES]
    lines = [f"# Regional variants, {arch} testbed", "", "| k | variant | " + " | ".join(cols) + " |",
             "|---" * (len(cols) + 2) + "|"]
    for k, entries in results.items():
        for variant, s in entries.items():
            cells = [f"{v[0]:.2f} [{v[1]:.2f}, {v[2]:.2f}]" if isinstance(v := s.get(c), (list, tuple)) else "—"
                     for c in cols]
            lines.append(f"| {k} | {variant} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--arch", choices=objectives.ARCHS, default="unet")
    parser.add_argument("--out", required=True)
    parser.add_argument("--weights", default=comfy_model.WEIGHTS)
    parser.add_argument("--ks", nargs="+", type=int, default=[2, 3])
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS))
    parser.add_argument("--combine", action="store_true", help="merge the subfolders' results of --out; no sampling")
    args = parser.parse_args()
    if args.combine:
        results = combine(args.out, args.arch)
        for k, entries in results.items():
            with open(os.path.join(args.out, f"{args.arch}_k{k}.json"), "w") as f:
                json.dump(entries, f, indent=1)
        with open(os.path.join(args.out, f"{args.arch}.md"), "w") as f:
            f.write(markdown(args.arch, results))
        return
    for v in args.variants:
        parse(v)
    os.makedirs(args.out, exist_ok=True)
    folder_paths.add_model_folder_path("loras", os.path.join(objectives.folder(args.arch, args.weights), "loras"),
                                       is_default=True)
    model, clip = objectives.load(args.arch, args.weights, None)
    ctx = {"model": model, "clip": clip, "arch": args.arch,
           "net": detector_lib.load_detector(os.path.join(args.weights, "detector.safetensors"), model.load_device)}
    results: dict = {}
    for k in args.ks:
        results[k] = {}
        for variant in args.variants:
            results[k][variant] = summary = run(variant, k, ctx, args.prompts)
            with_pairs(results[k])
            print(f"{args.arch} k={k} {variant}: all {summary['all']} vs merge {summary.get('vs_merge')} "
                  f"({summary['seconds']} s)", flush=True)
            with open(os.path.join(args.out, f"{args.arch}_k{k}.json"), "w") as f:
                json.dump(results[k], f, indent=1)
    with open(os.path.join(args.out, f"{args.arch}.md"), "w") as f:
        f.write(markdown(args.arch, results))


if __name__ == "__main__":
    main()
