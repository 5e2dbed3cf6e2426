"""Composition evaluation on the trained testbed (issue 9): which method keeps every concept?

    python testbed/evaluate.py --out DIR [--prompts 40] [--methods merge switch composite cmlora clora]

Composition sets as in ComposLoRA (Zhong et al. 2024): one character LoRA plus k−1 LoRAs of other
categories, k = 2, 3, 4; prompts are captions of random scenes holding those concepts (the rest of the
scene — the other slot's plain shape, a plain background — varies and is scored as the base-image sanity
check). Each prompt is sampled with 4 noise samples (one batch, seed = prompt index) by every method with the
same seeds, euler/normal, 20 steps, cfg 5, LoRA strength 1. The detector (testbed/detector.py) scores:
per-concept presence, the per-image minimum over concepts of the detector's presence probability (the
papers' "min" idea), the all-present rate and the sanity rate. 95 % intervals: bootstrap over prompts.
Writes results.json, results.md and sheet_k{2,3,4}.png (rows: methods, columns: prompts, seed 0).
"""
from __future__ import annotations

import argparse
import itertools
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from boot import boot_comfy  # noqa: E402

ml = boot_comfy()

import torch  # noqa: E402

import comfy.sample  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402
import folder_paths  # noqa: E402
import comfy_model  # noqa: E402
import detector as detector_lib  # noqa: E402
import world  # noqa: E402

STEPS, CFG, SEEDS = 20, 5.0, 4
CONCEPT_WORDS = {"character": "zorb", "clothing": "plaid, vest", "background": "brick", "object": "lantern",
                 "style": ""}
METHODS = ("merge", "switch", "composite", "cmlora", "clora")


def lora_name(category: str) -> str:
    return f"testbed_{category}.safetensors"


def composition_prompts(k: int, count: int, seed: int = 0) -> list[tuple[tuple[str, ...], str, dict]]:
    """(categories, prompt, expected plain parts) for ``count`` prompts spread over the k-sets."""
    others = [c for c in world.CATEGORIES if c != "character"]
    sets = [("character",) + combo for combo in itertools.combinations(others, k - 1)]
    gen = torch.Generator().manual_seed(1000 * k + seed)
    out = []
    for i in range(count):
        cats = sets[i % len(sets)]
        scenes = world.random_scenes(1, gen, cats)
        if "object" not in cats and int(scenes.right[0]) == 0:
            scenes.right[0] = 1 + int(torch.randint(0, 3, (1,), generator=gen))
        expected = {}
        if "object" not in cats:
            expected["right"] = int(scenes.right[0])
            expected["right_colour"] = int(scenes.right_colour[0])
        if "background" not in cats:
            expected["background"] = int(scenes.background[0])
        out.append((cats, world.caption(scenes, 0), expected))
    return out


def rows_for(stack, categories) -> tuple:
    return tuple(stack.LoraRow(lora_name(c), 1.0, 1.0, concept=CONCEPT_WORDS[c], trigger=world.TRIGGERS[c],
                               category=c) for c in categories)


def encode(clip, text: str) -> list:
    cond, pooled = clip.encode_from_tokens(clip.tokenize(text), return_pooled=True)
    return [[cond, {"pooled_output": pooled}]]


def sample(method: str, model, clip, rows, prompt: str, seed: int):
    """LATENT samples [SEEDS,4,32,32] of ``method`` through the pack's own engine functions."""
    latent = torch.zeros(SEEDS, 4, world.SIZE, world.SIZE)
    if method == "clora":
        clora = ml("clora")
        out, _ = clora.clora_sample(model, clip, prompt, "", rows, seed, STEPS, "euler", "normal",
                                    {"samples": latent}, 1.0, clora.CloraSettings(cfg=CFG))
        return out["samples"]
    if method == "base":
        patched = model
    elif method == "merge":
        patched = model
        for row in rows:
            sd = comfy.utils.load_torch_file(folder_paths.get_full_path("loras", row.name), safe_load=True)
            patched, _ = comfy.sd.load_lora_for_models(patched, None, sd, row.strength_model, 0.0)
    elif method == "switch":
        patched = ml("methods").switch_model(model, rows, 5, "testbed")
    elif method == "composite":
        patched = ml("methods").composite_model(model, rows, None, "testbed")
    elif method == "cmlora":
        patched = ml("cmlora").cmlora_model(model, rows, 0.55, False, "testbed")
    else:
        raise ValueError(method)
    noise = comfy.sample.prepare_noise(latent, seed)
    return comfy.sample.sample(patched, noise, STEPS, CFG, "euler", "normal", encode(clip, prompt), encode(clip, ""),
                               latent, seed=seed, disable_pbar=True)


def score(net, images: torch.Tensor, categories, expected: dict) -> dict:
    """Per image: presence per concept, min presence probability, all present, plain parts correct."""
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
    return {"presence": per, "min_prob": torch.stack([p_concept[c] for c in categories]).min(0).values,
            "all": torch.stack(list(per.values())).min(0).values, "sanity": sanity}


def bootstrap(per_prompt: torch.Tensor, reps: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """Mean and 95 % percentile interval, resampling prompts (rows of [P, SEEDS])."""
    gen = torch.Generator().manual_seed(seed)
    means = per_prompt.mean(1)
    idx = torch.randint(0, len(means), (reps, len(means)), generator=gen)
    boot = means[idx].mean(1).sort().values
    return round(float(means.mean()), 3), round(float(boot[int(0.025 * reps)]), 3), round(float(boot[int(0.975 * reps)]), 3)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--weights", default=comfy_model.WEIGHTS)
    parser.add_argument("--prompts", type=int, default=40)
    parser.add_argument("--ks", nargs="+", type=int, default=[2, 3, 4])
    parser.add_argument("--methods", nargs="+", default=list(METHODS))
    parser.add_argument("--no-base", action="store_true", help="skip the base model's caption-following check")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    folder_paths.add_model_folder_path("loras", os.path.join(args.weights, "loras"), is_default=True)
    model, clip = comfy_model.load_testbed(args.weights)
    stack = ml("stack")
    device = model.load_device
    net = detector_lib.load_detector(os.path.join(args.weights, "detector.safetensors"), device)
    results = {"meta": {"steps": STEPS, "cfg": CFG, "seeds_per_prompt": SEEDS, "prompts_per_k": args.prompts,
                        "sampler": "euler/normal", "device": str(device)}, "k": {}}
    start = time.perf_counter()
    if not args.no_base:
        results["base_caption_following"] = base_following(model, clip, net, args.prompts)
        print("base", results["base_caption_following"], flush=True)
    for k in args.ks:
        prompts = composition_prompts(k, args.prompts)
        sheet, entry = [], {}
        for method in args.methods:
            stats = {"min_prob": [], "all": [], "sanity": [], **{f"has_{c}": [] for c in world.CATEGORIES}}
            t0 = time.perf_counter()
            images_row = []
            for i, (cats, prompt, expected) in enumerate(prompts):
                images = comfy_model.decode(sample(method, model, clip, rows_for(stack, cats), prompt, i))
                s = score(net, images, cats, expected)
                for name in ("min_prob", "all", "sanity"):
                    stats[name].append(s[name])
                for c in world.CATEGORIES:
                    stats[f"has_{c}"].append(s["presence"][c] if c in cats else None)
                if i < 8:
                    images_row.append(images[0])
            entry[method] = {name: bootstrap(torch.stack([v for v in values if v is not None]))
                             for name, values in stats.items() if any(v is not None for v in values)}
            entry[method]["seconds"] = round(time.perf_counter() - t0, 1)
            print(k, method, json.dumps(entry[method]), flush=True)
            sheet.append(torch.stack(images_row))
            results["k"][str(k)] = {"prompts": [p for _, p, _ in prompts], "methods": entry}
            with open(os.path.join(args.out, "results_partial.json"), "w") as f:  # survives a time limit
                json.dump(results, f, indent=1)
        results["k"][str(k)] = {"prompts": [p for _, p, _ in prompts], "methods": entry}
        save_sheet(torch.stack(sheet), args.methods, os.path.join(args.out, f"sheet_k{k}.png"))
    results["meta"]["seconds"] = round(time.perf_counter() - start, 1)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=1)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(markdown(results, args.methods))
    print(markdown(results, args.methods))


def base_following(model, clip, net, count: int) -> dict:
    """The base model alone on plain captions: rate at which every captioned attribute is detected."""
    gen = torch.Generator().manual_seed(77)
    hits, parts = [], {"left": [], "right": [], "background": []}
    for i in range(count):
        scenes = world.random_scenes(1, gen)
        images = comfy_model.decode(sample("base", model, clip, (), world.caption(scenes, 0), 5000 + i))
        with torch.no_grad():
            pred = detector_lib.predict(net, images.to(next(net.parameters()).device))
        ok_left = (pred["left"] == scenes.left) & ((scenes.left == 0) | (pred["left_colour"] == scenes.left_colour))
        ok_right = (pred["right"] == scenes.right) & ((scenes.right == 0) | (pred["right_colour"] == scenes.right_colour))
        ok_bg = pred["background"] == scenes.background
        parts["left"].append(ok_left.float())
        parts["right"].append(ok_right.float())
        parts["background"].append(ok_bg.float())
        hits.append((ok_left & ok_right & ok_bg).float())
    out = {"all_attributes": bootstrap(torch.stack(hits))}
    out.update({name: bootstrap(torch.stack(v)) for name, v in parts.items()})
    return out


def save_sheet(grid: torch.Tensor, labels, path: str) -> None:
    """[methods, prompts, 3, H, W] → PNG, ×4 nearest upscale, method names on the left."""
    from PIL import Image, ImageDraw
    m, p = grid.shape[:2]
    scale, pad = 4, 90
    tile = world.SIZE * scale
    sheet = Image.new("RGB", (pad + p * tile, m * tile), "white")
    draw = ImageDraw.Draw(sheet)
    for r in range(m):
        draw.text((4, r * tile + tile // 2 - 6), labels[r], fill="black")
        for c in range(p):
            img = (grid[r, c].permute(1, 2, 0).clamp(0, 1) * 255).byte().cpu().numpy()
            sheet.paste(Image.fromarray(img).resize((tile, tile), Image.NEAREST), (pad + c * tile, r * tile))
    sheet.save(path)


def markdown(results: dict, methods) -> str:
    def cell(v):
        return f"{v[0]:.2f} [{v[1]:.2f}, {v[2]:.2f}]"
    b = results.get("base_caption_following")
    lines = [] if b is None else [f"Base model caption following (all attributes detected): {cell(b['all_attributes'])}; "
             f"left {cell(b['left'])}, right {cell(b['right'])}, background {cell(b['background'])}", ""]
    for k, data in results["k"].items():
        lines += [f"### k = {k}", "", "| method | all present | min presence prob. | character | clothing | background | "
                  "object | style | plain parts (sanity) | s |", "|---|---|---|---|---|---|---|---|---|---|"]
        for method in [m for m in methods if m in data["methods"]]:
            e = data["methods"][method]
            per = [cell(e[f"has_{c}"]) if f"has_{c}" in e else "—" for c in world.CATEGORIES]
            lines.append(f"| {method} | {cell(e['all'])} | {cell(e['min_prob'])} | " + " | ".join(per)
                         + f" | {cell(e['sanity'])} | {e['seconds']} |")
        lines.append("")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
