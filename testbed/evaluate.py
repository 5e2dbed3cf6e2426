"""Composition evaluation on the trained testbed: which method keeps every concept?

    python testbed/evaluate.py --out DIR [--arch unet|dit] [--prompts 40] [--ks 1 2 3 4]
                               [--methods base merge switch switch_authors composite cmlora clora clora_authors
                                          regional_oracle regional_oracle_no_text regional_auto]
                               [--max-seconds S] [--total-seconds T] [--no-base]

Composition sets as in ComposLoRA (Zhong et al. 2024): one character LoRA plus k−1 LoRAs of other
categories, k = 2, 3, 4; prompts are captions of random scenes holding those concepts (the rest of the
scene — the other slot's plain shape, a plain background — varies and is scored as the base-image sanity
check). k = 1 is the reference row: each category's LoRA alone (merge only: at k = 1 Switch and Composite
are merge) on prompts holding just its concept, ``--prompts`` in total cycling over the 5 categories; its
per-category columns are each LoRA's own strength, and the ``base`` row beside it is the base model on the same
trigger + class prompts (its "all classes" column: does the base draw a creature for "a zorb creature"?). The
regional rows run when the pack has ``methods.regional`` and are skipped with a printed note otherwise; CLoRA on
the DiT is recorded as not applicable (no cross-attention). Each prompt is sampled with 4 noise samples (one batch,
seed = prompt index) by every method with the same seeds, euler/normal, 20 steps, cfg 5, LoRA strength 1.
The detector (testbed/detector.py) scores: per-concept presence, the per-image minimum over concepts of the
detector's presence probability (the papers' "min" idea), the all-present rate and the sanity rate. 95 %
intervals: bootstrap over prompts. Writes results.json, results.md and sheet_k{k}.png (rows: methods,
columns: first 8 prompts, seed 0).

Made for time-limited GPU runs: one flushed line per prompt per method; results_partial.json rewritten
after every prompt; a method that raises is recorded (traceback printed) and the run goes on; a (k, method)
stops before a prompt that would overrun ``--max-seconds`` (or what is left of ``--total-seconds``) and
reports how many prompts it covered, its intervals over those; SIGTERM still writes results.json/md.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from boot import boot_comfy  # noqa: E402

ml = boot_comfy()

import torch  # noqa: E402

import folder_paths  # noqa: E402

import comfy_model  # noqa: E402
import detector as detector_lib  # noqa: E402
import eval_core  # noqa: E402
import eval_report  # noqa: E402
import objectives  # noqa: E402
import world  # noqa: E402
from eval_core import (  # noqa: E402,F401
    ALL_METHODS,
    CFG,
    CONCEPT_WORDS,
    METHODS,
    SEEDS,
    STEPS,
    bootstrap,
    composition_prompts,
    lora_name,
    rows_for,
    score,
)


def sample(method: str, model, clip, rows, prompt: str, seed: int, arch: str = "unet"):
    """LATENT samples [SEEDS,C,64,64] of ``method`` through the pack's own engine functions."""
    return eval_core.sample(ml, method, model, clip, rows, prompt, seed, arch=arch)


def write_json(results: dict, path: str) -> None:
    with open(path + ".tmp", "w") as f:
        json.dump(results, f, indent=1)
    os.replace(path + ".tmp", path)  # a kill mid-write leaves the previous file whole


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--weights", default=comfy_model.WEIGHTS)
    parser.add_argument("--prompts", type=int, default=40, help="prompts per k (k = 1: in total over the 5 LoRAs)")
    parser.add_argument("--ks", nargs="*", type=int, default=[2, 3, 4],
                        help="1 = each LoRA alone (merge, and base when asked); none: only the base check")
    parser.add_argument("--arch", choices=objectives.ARCHS, default="unet")
    parser.add_argument("--methods", nargs="+", default=list(ALL_METHODS), choices=ALL_METHODS)
    parser.add_argument("--max-seconds", type=float, default=float("inf"),
                        help="time budget of one (k, method): stop before a prompt that would overrun it")
    parser.add_argument("--total-seconds", type=float, default=float("inf"),
                        help="budget of the whole run after loading: every (k, method) also stops within it")
    parser.add_argument("--no-base", action="store_true", help="skip the base model's caption-following check")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    start = time.perf_counter()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # `timeout`: still write results.json/md below
    folder_paths.add_model_folder_path("loras", os.path.join(objectives.folder(args.arch, args.weights), "loras"),
                                       is_default=True)
    model, clip = objectives.load(args.arch, args.weights, None)
    device = model.load_device
    ctx = {"ml": ml, "model": model, "clip": clip, "start": start, "arch": args.arch,
           "net": detector_lib.load_detector(os.path.join(args.weights, "detector.safetensors"), device)}
    methods = list(args.methods)
    if any(m in eval_core.REGIONAL for m in methods) and not eval_core.regional_available(ml):
        print("note: the pack has no multilora/methods/regional.py yet: regional rows skipped", flush=True)
        methods = [m for m in methods if m not in eval_core.REGIONAL]
    results = {"meta": {"arch": args.arch, "steps": STEPS, "cfg": CFG, "seeds_per_prompt": SEEDS,
                        "prompts_per_k": args.prompts, "sampler": f"euler/{eval_core.SCHEDULERS[args.arch]}",
                        "device": str(device), "argv": sys.argv[1:]}, "k": {}}
    partial = os.path.join(args.out, "results_partial.json")
    print(f"loaded in {time.perf_counter() - start:.1f} s on {device}", flush=True)

    def remaining() -> float:
        return args.total_seconds - (time.perf_counter() - start)
    try:
        if not args.no_base:
            try:
                results["base_caption_following"] = base_following(model, clip, ctx["net"], args.prompts, args.arch)
            except Exception as exc:
                traceback.print_exc()
                results["base_caption_following"] = {"error": f"{type(exc).__name__}: {exc}"}
            print("base", results["base_caption_following"], flush=True)
            write_json(results, partial)
        for k in args.ks:
            prompts = composition_prompts(k, args.prompts)
            k_methods = eval_core.methods_for(k, methods)
            entry, sheet = {}, []
            results["k"][str(k)] = {"prompts": [p for _, p, _ in prompts], "methods": entry}
            for method in k_methods:

                def on_prompt(e, method=method):
                    entry[method] = dict(e, in_progress=True)
                    write_json(results, partial)
                budget = min(args.max_seconds, remaining())
                entry[method], images = eval_core.run_method(method, k, prompts, ctx, budget, on_prompt)
                print(f"k={k} {method}", json.dumps({n: v for n, v in entry[method].items() if n != "traceback"}),
                      flush=True)
                write_json(results, partial)
                sheet.append(images)
            eval_report.save_sheet(sheet, k_methods, os.path.join(args.out, f"sheet_k{k}.png"))
    finally:
        results["meta"]["seconds"] = round(time.perf_counter() - start, 1)
        write_json(results, os.path.join(args.out, "results.json"))
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(eval_report.markdown(results, ALL_METHODS))
        print(eval_report.markdown(results, ALL_METHODS), flush=True)


def base_following(model, clip, net, count: int, arch: str = "unet") -> dict:
    """The base model alone on plain captions: rate at which every captioned attribute is detected."""
    gen = torch.Generator().manual_seed(77)
    hits, parts = [], {"left": [], "right": [], "background": []}
    for i in range(count):
        scenes = world.random_scenes(1, gen)
        images = eval_core.decode(model, sample("base", model, clip, (), world.caption(scenes, 0), 5000 + i, arch))
        with torch.no_grad():
            pred = detector_lib.predict(net, images.to(next(net.parameters()).device))
        ok_left = (pred["left"] == scenes.left) & ((scenes.left == 0) | (pred["left_colour"] == scenes.left_colour))
        ok_right = (pred["right"] == scenes.right) & ((scenes.right == 0) | (pred["right_colour"] == scenes.right_colour))
        ok_left = ok_left & (pred["vest"] == scenes.vest)
        ok_bg = pred["background"] == scenes.background
        parts["left"].append(ok_left.float())
        parts["right"].append(ok_right.float())
        parts["background"].append(ok_bg.float())
        hits.append((ok_left & ok_right & ok_bg).float())
    out = {"all_attributes": bootstrap(torch.stack(hits))}
    out.update({name: bootstrap(torch.stack(v)) for name, v in parts.items()})
    return out


if __name__ == "__main__":
    main()
