"""Method variants on the same prompts and seeds: why Merge wins here, and what CMLoRA's cache costs.

    python testbed/variant_check.py {dilution,cache} --out DIR [--k 2] [--prompts 24] [--seeds 2] [--weights W]

Each set samples evaluate.py's k-LoRA prompts with the protocol of evaluate.py (euler/normal, 20 steps, cfg 5,
seed = prompt index, the first ``--seeds`` noise samples of its batch) and scores them with the detector, plus
``grain`` (``detector.grain``: leftover high-frequency noise of the decoded image).

* ``dilution`` — does Merge beat Switch and Composite because each LoRA's effect is diluted? Merge adds every
  LoRA's full ΔW at every step, Composite averages k single-LoRA predictions (each concept's effect on ε
  scaled by 1/k), Switch applies each LoRA on 1/k of the steps. Variants: merge; composite at strength 1 (the
  paper) and at strength k (each branch's ε deviation from the base is roughly linear in the strength, so ×k
  undoes the 1/k of the average to first order); switch with τ = 5 (the paper) and τ = 1 (the same share of
  steps per LoRA, finer interleaving). If Composite ×k closes the gap to Merge, dilution explains it.
* ``cache`` — CMLoRA with and without its feature cache (docs/algorithms.md §4: non-refreshed LoRAs reuse their deep UNet
  feature for 1–2 steps), next to Merge and Composite. With the cache off and equal weights CMLoRA is
  Composite (docs/algorithms.md §6), so the pair isolates the cache's effect on concepts and on grain.

Writes DIR/<set>_k<k>.json and .md.
"""
from __future__ import annotations

import argparse
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
import world  # noqa: E402
from eval_report import cell  # noqa: E402


def variants(name: str, k: int) -> dict[str, dict]:
    """Variant label → keyword arguments of ``eval_core.sample`` (``strength``: of every LoRA row)."""
    if name == "dilution":
        return {"merge ×1": {"method": "merge"},
                "composite ×1": {"method": "composite"},
                f"composite ×{k}": {"method": "composite", "strength": float(k)},
                "switch τ=5": {"method": "switch", "switch_every": 5},
                "switch τ=1": {"method": "switch", "switch_every": 1}}
    return {"merge": {"method": "merge"},
            "composite": {"method": "composite"},
            "cmlora, cache on (default)": {"method": "cmlora", "cache": True},
            "cmlora, cache off": {"method": "cmlora", "cache": False}}


def markdown(results: dict) -> str:
    cats = [c for c in world.CATEGORIES if f"has_{c}" in next(iter(results["variants"].values()))]
    lines = [f"{results['set']}, k = {results['k']}, {results['prompts']} prompts × {results['seeds']} seeds, "
             "mean [95 % bootstrap over prompts]", "",
             "| variant | all present | min presence prob. | " + " | ".join(cats) + " | sanity | grain | s |",
             "|---" * (6 + len(cats)) + "|"]
    for name, e in results["variants"].items():
        lines.append(f"| {name} | {cell(e['all'])} | {cell(e['min_prob'])} | "
                     + " | ".join(cell(e[f"has_{c}"]) for c in cats)
                     + f" | {cell(e['sanity'])} | {cell(e['grain'], 4)} | {e['seconds']} |")
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("set", choices=["dilution", "cache"])
    parser.add_argument("--out", required=True)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--weights", default=comfy_model.WEIGHTS)
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    folder_paths.add_model_folder_path("loras", os.path.join(args.weights, "loras"), is_default=True)
    model, clip = comfy_model.load_testbed(args.weights)
    net = detector_lib.load_detector(os.path.join(args.weights, "detector.safetensors"), model.load_device)
    prompts = eval_core.composition_prompts(args.k, args.prompts)
    results = {"set": args.set, "k": args.k, "prompts": args.prompts, "seeds": args.seeds, "variants": {}}
    for name, kwargs in variants(args.set, args.k).items():
        kwargs = dict(kwargs)
        strength = kwargs.pop("strength", 1.0)
        stats, grains, start = eval_core.new_stats(), [], time.perf_counter()
        for i, (cats, prompt, expected) in enumerate(prompts):
            rows = eval_core.rows_for(ml("core.stack"), cats, strength)
            latent = eval_core.sample(ml, model=model, clip=clip, rows=rows, prompt=prompt, seed=i,
                                      seeds=args.seeds, **kwargs)
            images = comfy_model.decode(latent)
            eval_core.add_scores(stats, eval_core.score(net, images, cats, expected), cats)
            grains.append(detector_lib.grain(images))
        entry = dict(eval_core.summarise(stats), grain=eval_core.bootstrap(torch.stack(grains), decimals=4),
                     seconds=round(time.perf_counter() - start, 1))
        results["variants"][name] = entry
        print(name, json.dumps(entry), flush=True)
    stem = os.path.join(args.out, f"{args.set}_k{args.k}")
    with open(stem + ".json", "w") as f:
        json.dump(results, f, indent=1)
    report = markdown(results)
    with open(stem + ".md", "w") as f:
        f.write(report)
    print(report)


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
