"""Why does Merge beat Switch and Composite on the testbed at k = 2? A dilution check (issue 9 follow-up).

    python testbed/dilution_check.py --out DIR [--prompts 24] [--seeds 2]

Hypothesis (testbed/README.md, "Honest reading"): Merge adds every LoRA's full ΔW at every step, whereas
Composite averages k single-LoRA predictions (each concept's effect on ε is scaled by 1/k) and Switch
applies each LoRA on 1/k of the steps; with LoRAs this weak, the diluted concept no longer appears.
Variants on the same k = 2 prompts and seeds (evaluate.py's protocol: euler/normal, 20 steps, cfg 5,
seed = prompt index, the first ``--seeds`` noise samples of its batch):

* merge (strength 1), the reference;
* composite at strength 1 (the paper) and at strength k: each branch's ε deviation from the base
  prediction is roughly linear in the strength, so ×k undoes the 1/k of the average (to first order);
* switch with τ = 5 (the paper) and τ = 1: the same share of steps per LoRA, finer interleaving.

If Composite ×k closes the gap to Merge, dilution explains it. Writes DIR/dilution.json and .md.
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

import comfy_model  # noqa: E402
import detector as detector_lib  # noqa: E402
import eval_core  # noqa: E402
from eval_report import cell  # noqa: E402
import folder_paths  # noqa: E402
import world  # noqa: E402

K = 2
VARIANTS = {  # name: (method, strength, switch_every)
    "merge ×1": ("merge", 1.0, 5),
    "composite ×1": ("composite", 1.0, 5),
    f"composite ×{K}": ("composite", float(K), 5),
    "switch τ=5": ("switch", 1.0, 5),
    "switch τ=1": ("switch", 1.0, 1),
}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--weights", default=comfy_model.WEIGHTS)
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--seeds", type=int, default=2)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    folder_paths.add_model_folder_path("loras", os.path.join(args.weights, "loras"), is_default=True)
    model, clip = comfy_model.load_testbed(args.weights)
    net = detector_lib.load_detector(os.path.join(args.weights, "detector.safetensors"), model.load_device)
    prompts = eval_core.composition_prompts(K, args.prompts)
    results = {"k": K, "prompts": args.prompts, "seeds": args.seeds, "variants": {}}
    for name, (method, strength, every) in VARIANTS.items():
        stats, start = eval_core.new_stats(), time.perf_counter()
        for i, (cats, prompt, expected) in enumerate(prompts):
            rows = eval_core.rows_for(ml("stack"), cats, strength)
            latent = eval_core.sample(ml, method, model, clip, rows, prompt, i, seeds=args.seeds, switch_every=every)
            eval_core.add_scores(stats, eval_core.score(net, comfy_model.decode(latent), cats, expected), cats)
        results["variants"][name] = dict(eval_core.summarise(stats), seconds=round(time.perf_counter() - start, 1))
        print(name, json.dumps(results["variants"][name]), flush=True)
    with open(os.path.join(args.out, "dilution.json"), "w") as f:
        json.dump(results, f, indent=1)
    cats = [c for c in world.CATEGORIES
            if f"has_{c}" in next(iter(results["variants"].values()))]
    lines = [f"k = {K}, {args.prompts} prompts × {args.seeds} seeds, mean [95 % bootstrap over prompts]", "",
             "| variant | all present | min presence prob. | " + " | ".join(cats) + " | sanity |",
             "|---" * (4 + len(cats)) + "|"]
    for name, e in results["variants"].items():
        lines.append(f"| {name} | {cell(e['all'])} | {cell(e['min_prob'])} | "
                     + " | ".join(cell(e[f"has_{c}"]) for c in cats) + f" | {cell(e['sanity'])} |")
    with open(os.path.join(args.out, "dilution.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    main()
