"""The pack's main job on an embedded default: tiny demo models and LoRAs, every available method, one seed.

Boots a real ComfyUI headless on the CPU (or $COMFYUI_PATH), builds a tiny SD1.5-family model and two
demo LoRAs (unless --lora-dir points at real ones), samples the same seed with each method the pack has,
and writes one PNG per method (the latent's first three channels), a side-by-side sheet and a timing table
into demo_out/.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

from support.comfy_boot import boot, pack_module  # noqa: E402


def latent_to_image(samples):
    """First three latent channels, min-max scaled, as an RGB PIL image (the demo model has no real VAE)."""
    from PIL import Image
    x = samples[0, :3].float()
    x = (x - x.min()) / (x.max() - x.min() + 1e-8)
    array = (x.permute(1, 2, 0).numpy() * 255).astype("uint8")
    return Image.fromarray(array).resize((array.shape[1] * 16, array.shape[0] * 16), Image.NEAREST)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="demo_out")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    out_dir = os.path.abspath(args.out)
    state = boot()
    import folder_paths
    import nodes
    from PIL import Image
    from support import lora_files, tiny_models

    model = tiny_models.build_tiny("sd15", seed=0)
    names = []
    for seed, fmt in ((1, "kohya"), (2, "kohya")):
        name = f"demo_lora_{seed}.safetensors"
        lora_files.write_lora(model, os.path.join(state["loras_dir"], name), fmt, seed=seed)
        names.append(name)
    folder_paths.filename_list_cache.clear()
    stack_mod = pack_module("multilora.stack")
    engine_mod = pack_module("multilora.engine")
    stack = stack_mod.LoraStack(tuple(stack_mod.LoraRow(n, 0.8) for n in names))
    positive = tiny_models.make_conditioning("sd15", seed=1)
    negative = tiny_models.make_conditioning("sd15", seed=2)
    latent = tiny_models.make_latent("sd15", size=16)

    def merge():
        merged = nodes.NODE_CLASS_MAPPINGS["MultiLoRAApplyStack"].execute(lora_stack=stack, model=model).result[0]
        return merged

    def on_the_fly():
        engine = engine_mod.build_engine(model, stack.active(), "demo")
        return engine_mod.clone_with_engine(model, engine)

    methods_mod = pack_module("multilora.methods")
    methods = {
        "no LoRA": lambda: model,
        "Merge": merge,
        "on-the-fly (all LoRAs)": on_the_fly,
        "LoRA Switch": lambda: methods_mod.switch_model(model, stack.active(), 5, "demo"),
        "LoRA Composite": lambda: methods_mod.composite_model(model, stack.active(), None, "demo"),
        "CMLoRA": lambda: pack_module("multilora.cmlora").cmlora_model(model, stack.active(), 0.55, False, "demo"),
    }
    os.makedirs(out_dir, exist_ok=True)
    results, images = [], []
    for label, make_model in methods.items():
        start = time.perf_counter()
        patched = make_model()
        samples = nodes.common_ksampler(patched, args.seed, args.steps, 6.0, "euler", "normal",
                                        positive, negative, latent)[0]["samples"]
        seconds = time.perf_counter() - start
        image = latent_to_image(samples)
        file_name = "_".join(label.replace("(", "").replace(")", "").lower().split()[:2]).replace("-", "_") + ".png"
        image.save(os.path.join(out_dir, file_name))
        images.append(image)
        results.append({"method": label, "seconds": round(seconds, 3), "image": file_name})
    # CLoRA encodes its own prompt variants: it needs a CLIP (a tiny one here) and concept words.
    clip = tiny_models.build_tiny_clip(seed=0)
    clora_names = []
    for seed in (3, 4):
        name = f"demo_clora_{seed}.safetensors"
        lora_files.write_lora(model, os.path.join(state["loras_dir"], name), "kohya", seed=seed, clip=clip)
        clora_names.append(name)
    folder_paths.filename_list_cache.clear()
    clora = pack_module("multilora.clora")
    rows = [stack_mod.LoraRow(clora_names[0], 0.8, concept="cat", trigger="sks", category="character"),
            stack_mod.LoraRow(clora_names[1], 0.8, concept="dog", category="object")]
    start = time.perf_counter()
    out, record = clora.clora_sample(model, clip, "a cat and a dog in a park", "blurry", rows, args.seed,
                                     args.steps, "euler", "normal", latent, 1.0, clora.CloraSettings(cfg=6.0))
    seconds = time.perf_counter() - start
    image = latent_to_image(out["samples"])
    image.save(os.path.join(out_dir, "clora.png"))
    images.append(image)
    results.append({"method": "CLoRA (tiny CLIP prompt variants)", "seconds": round(seconds, 3), "image": "clora.png"})
    sheet = Image.new("RGB", (sum(i.width for i in images), images[0].height), "white")
    x = 0
    for image in images:
        sheet.paste(image, (x, 0))
        x += image.width
    sheet.save(os.path.join(out_dir, "sheet.png"))
    with open(os.path.join(out_dir, "timings.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    lines = ["| method | seconds (CPU) | image |", "|---|---|---|"]
    lines += [f"| {r['method']} | {r['seconds']} | {r['image']} |" for r in results]
    with open(os.path.join(out_dir, "timings.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {len(results)} images, sheet.png and timings to {out_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
