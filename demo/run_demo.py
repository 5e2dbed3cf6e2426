"""The pack's main job: the same seed, prompt and LoRAs through every method, side by side, with timings.

Two modes, one output layout (one PNG per method, ``sheet.png``, ``timings.md`` / ``timings.json`` in --out):

* embedded default (no --checkpoint; what ``make demo`` runs): a tiny generated SD1.5-family UNet and demo
  LoRAs, conditioning and latent made up, images are the latent's first three channels. Needs nothing but
  the venv; a check that every method runs, not a picture.
* real models (--checkpoint, --lora ...): ComfyUI's own CheckpointLoaderSimple, CLIP Text Encode and VAE
  Decode around the pack's methods, so the images are real images. Names are looked up in the ComfyUI
  install's models/checkpoints and models/loras (--comfyui or $COMFYUI_PATH; else the vendored 0.3.75 tree),
  or give file paths. CLoRA runs when at least two non-style LoRAs have a --concept word (each must be a
  word of --prompt).

Runs headless on the CPU (the tests' ComfyUI boot), so real-model timings are CPU timings; for GPU timings
use bench/run_bench.py or the workflows in ComfyUI.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "tests"))

METHODS = ("none", "merge", "onthefly", "switch", "composite", "cmlora", "clora")
LABELS = {"none": "no LoRA", "merge": "Merge", "onthefly": "on-the-fly (all LoRAs)", "switch": "LoRA Switch",
          "composite": "LoRA Composite", "cmlora": "CMLoRA", "clora": "CLoRA"}
CATEGORIES = ("character", "clothing", "style", "background", "object", "other")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--methods", default=",".join(METHODS),
                        help=f"comma-separated subset of {', '.join(METHODS)} (default: all)")
    real = parser.add_argument_group("real models")
    real.add_argument("--comfyui", metavar="PATH", help="a ComfyUI install (its models/ folders); "
                      "default $COMFYUI_PATH, else the vendored ComfyUI 0.3.75")
    real.add_argument("--checkpoint", metavar="NAME|PATH",
                      help="an SD1.x/SD2.x/SDXL checkpoint: a name in models/checkpoints or a file path")
    real.add_argument("--lora", action="append", default=[], metavar="NAME|PATH",
                      help="a LoRA (name in models/loras or a file path); repeat, in stack order")
    real.add_argument("--strength", action="append", type=float, default=[],
                      help="model and CLIP strength per --lora, in order (default 0.8)")
    real.add_argument("--category", action="append", default=[], choices=CATEGORIES,
                      help="stack category per --lora, in order (CMLoRA's ordering; default other)")
    real.add_argument("--concept", action="append", default=[],
                      help="CLoRA concept word(s) per --lora, in order ('' for none; style rows need none)")
    real.add_argument("--prompt", default="a knight and a dragon in a misty forest, oil painting")
    real.add_argument("--negative", default="blurry, low quality, deformed, watermark, text")
    real.add_argument("--width", type=int, default=512)
    real.add_argument("--height", type=int, default=512)
    real.add_argument("--cfg", type=float, default=7.0)
    real.add_argument("--sampler", default="euler")
    real.add_argument("--scheduler", default="normal")
    real.add_argument("--switch-every", type=int, default=5, help="LoRA Switch τ (default 5)")
    args = parser.parse_args(argv)
    args.methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown method(s) {sorted(unknown)}; choose from {', '.join(METHODS)}")
    if args.lora and not args.checkpoint:
        parser.error("--lora needs --checkpoint (the embedded default makes its own LoRAs)")
    for name in ("strength", "category", "concept"):
        if len(getattr(args, name)) > len(args.lora):
            parser.error(f"more --{name} than --lora values")
    if args.checkpoint and not args.lora:
        parser.error("--checkpoint needs at least one --lora")
    return args


def latent_to_image(samples):
    """First three latent channels, min-max scaled, as an RGB PIL image (the demo model has no real VAE)."""
    from PIL import Image
    x = samples[0, :3].float()
    x = (x - x.min()) / (x.max() - x.min() + 1e-8)
    array = (x.permute(1, 2, 0).numpy() * 255).astype("uint8")
    return Image.fromarray(array).resize((array.shape[1] * 16, array.shape[0] * 16), Image.NEAREST)


def pixels_to_image(pixels):
    """First image of a ComfyUI IMAGE batch ([B, H, W, C] in 0..1) as PIL."""
    from PIL import Image
    array = (pixels[0].detach().clamp(0, 1).cpu().float().numpy() * 255).round().astype("uint8")
    return Image.fromarray(array)


def resolve(kind: str, value: str) -> str:
    """A name in ComfyUI's ``kind`` folders; a file path adds its folder to them first."""
    import folder_paths
    if os.path.isfile(value):
        folder_paths.add_model_folder_path(kind, os.path.dirname(os.path.abspath(value)))
        folder_paths.filename_list_cache.clear()
        return os.path.basename(value)
    if value not in folder_paths.get_filename_list(kind):
        raise SystemExit(f"{kind[:-1]} '{value}' not found: not a file, and not in {folder_paths.get_folder_paths(kind)}")
    return value


def tiny_methods(args: argparse.Namespace, state: dict) -> dict[str, Callable]:
    """The embedded default: tiny model, made-up conditioning; each method returns a PIL image."""
    import folder_paths
    import nodes
    from support import lora_files, tiny_models
    from support.comfy_boot import pack_module

    model = tiny_models.build_tiny("sd15", seed=0)
    names = lora_files.write_lora_set(model, state["loras_dir"], "demo_lora", (1, 2))
    folder_paths.filename_list_cache.clear()
    stack_mod, engine_mod = pack_module("multilora.core.stack"), pack_module("multilora.host.engine")
    methods_mod = pack_module("multilora.methods.switch_composite")
    stack = stack_mod.LoraStack(tuple(stack_mod.LoraRow(n, 0.8) for n in names))
    positive = tiny_models.make_conditioning("sd15", seed=1)
    negative = tiny_models.make_conditioning("sd15", seed=2)
    latent = tiny_models.make_latent("sd15", size=16)

    def sample(patched):
        samples = nodes.common_ksampler(patched, args.seed, args.steps, 6.0, "euler", "normal",
                                        positive, negative, latent)[0]["samples"]
        return latent_to_image(samples)

    def on_the_fly():
        return engine_mod.clone_with_engine(model, engine_mod.build_engine(model, stack.active(), "demo"))

    def clora():
        # CLoRA encodes its own prompt variants: it needs a CLIP (a tiny one here) and concept words.
        clip = tiny_models.build_tiny_clip(seed=0)
        clora_names = lora_files.write_lora_set(model, state["loras_dir"], "demo_clora", (3, 4), clip=clip)
        folder_paths.filename_list_cache.clear()
        module = pack_module("multilora.methods.clora")
        rows = [stack_mod.LoraRow(clora_names[0], 0.8, concept="cat", trigger="sks", category="character"),
                stack_mod.LoraRow(clora_names[1], 0.8, concept="dog", category="object")]
        out, _ = module.clora_sample(model, clip, "a cat and a dog in a park", "blurry", rows, args.seed,
                                     args.steps, "euler", "normal", latent, 1.0, module.CloraSettings(cfg=6.0))
        return latent_to_image(out["samples"])

    apply_stack = nodes.NODE_CLASS_MAPPINGS["MultiLoRAApplyStack"]
    return {
        "none": lambda: sample(model),
        "merge": lambda: sample(apply_stack.execute(lora_stack=stack, model=model).result[0]),
        "onthefly": lambda: sample(on_the_fly()),
        "switch": lambda: sample(methods_mod.switch_model(model, stack.active(), 5, "demo")),
        "composite": lambda: sample(methods_mod.composite_model(model, stack.active(), None, "demo")),
        "cmlora": lambda: sample(pack_module("multilora.methods.cmlora").cmlora_model(model, stack.active(), 0.55, False, "demo")),
        "clora": clora,
    }


def real_methods(args: argparse.Namespace) -> tuple[dict[str, Callable], list[str]]:
    """Real checkpoint and LoRAs through ComfyUI's own loader, text encoder and VAE; returns the methods
    (each gives a PIL image) and notes on methods left out."""
    import nodes
    from support.comfy_boot import pack_module

    stack_mod = pack_module("multilora.core.stack")
    ckpt_name = resolve("checkpoints", args.checkpoint)
    model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(ckpt_name)[:3]
    rows = []
    for i, value in enumerate(args.lora):
        strength = args.strength[i] if i < len(args.strength) else 0.8
        rows.append(stack_mod.LoraRow(
            resolve("loras", value), strength, strength,
            category=args.category[i] if i < len(args.category) else "other",
            concept=args.concept[i] if i < len(args.concept) else ""))
    stack = stack_mod.LoraStack(tuple(rows))
    apply_stack = nodes.NODE_CLASS_MAPPINGS["MultiLoRAApplyStack"]
    methods_mod = pack_module("multilora.methods.switch_composite")
    engine_mod = pack_module("multilora.host.engine")
    latent = nodes.EmptyLatentImage().generate(args.width, args.height, 1)[0]

    def encode(text_clip):
        encoder = nodes.CLIPTextEncode()
        return encoder.encode(text_clip, args.prompt)[0], encoder.encode(text_clip, args.negative)[0]

    plain = encode(clip)
    # The multi-LoRA samplers apply the UNet parts themselves; the prompt gets every LoRA's text-encoder part.
    with_loras = encode(apply_stack.execute(lora_stack=stack, clip=clip).result[1])

    def sample(patched, conds):
        samples = nodes.common_ksampler(patched, args.seed, args.steps, args.cfg, args.sampler, args.scheduler,
                                        conds[0], conds[1], latent)[0]
        return pixels_to_image(vae.decode(samples["samples"]))

    def merge():
        merged_model, merged_clip = apply_stack.execute(lora_stack=stack, model=model, clip=clip).result
        return sample(merged_model, encode(merged_clip))

    def on_the_fly():
        engine = engine_mod.build_engine(model, stack.active(), "demo")
        return sample(engine_mod.clone_with_engine(model, engine), with_loras)

    def clora():
        module = pack_module("multilora.methods.clora")
        out, _ = module.clora_sample(model, clip, args.prompt, args.negative, list(stack.active()), args.seed,
                                     args.steps, args.sampler, args.scheduler, latent, 1.0,
                                     module.CloraSettings(cfg=args.cfg))
        return pixels_to_image(vae.decode(out["samples"]))

    methods = {
        "none": lambda: sample(model, plain),
        "merge": merge,
        "onthefly": on_the_fly,
        "switch": lambda: sample(methods_mod.switch_model(model, stack.active(), args.switch_every, "demo"), with_loras),
        "composite": lambda: sample(methods_mod.composite_model(model, stack.active(), None, "demo"), with_loras),
        "cmlora": lambda: sample(pack_module("multilora.methods.cmlora").cmlora_model(model, stack.active(), 0.55, False, "demo"),
                                 with_loras),
        "clora": clora,
    }
    notes = []
    if sum(1 for r in rows if r.concept_words() and r.category != "style") < 2:
        methods.pop("clora")
        notes.append("CLoRA left out: it needs --concept words for at least two non-style LoRAs")
    return methods, notes


def write_outputs(out_dir: str, results: list[dict], images: list, notes: list[str], header: str) -> None:
    from PIL import Image
    height = max(i.height for i in images)
    sheet = Image.new("RGB", (sum(i.width for i in images), height), "white")
    x = 0
    for image in images:
        sheet.paste(image, (x, 0))
        x += image.width
    sheet.save(os.path.join(out_dir, "sheet.png"))
    with open(os.path.join(out_dir, "timings.json"), "w", encoding="utf-8") as f:
        json.dump(results, f, indent=2)
    lines = [header, "", "| method | seconds | image |", "|---|---|---|"]
    lines += [f"| {r['method']} | {r['seconds']} | {r['image']} |" for r in results]
    lines += [""] + [f"- {note}" for note in notes] if notes else []
    with open(os.path.join(out_dir, "timings.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    print(f"wrote {len(results)} images, sheet.png and timings to {out_dir}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.comfyui:
        os.environ["COMFYUI_PATH"] = os.path.abspath(args.comfyui)
    from support.comfy_boot import boot
    state = boot()
    import torch
    out_dir = os.path.abspath(args.out)
    os.makedirs(out_dir, exist_ok=True)
    if args.checkpoint:
        methods, notes = real_methods(args)
        header = (f"checkpoint {os.path.basename(args.checkpoint)}, LoRAs "
                  f"{', '.join(os.path.basename(x) for x in args.lora)}; seed {args.seed}, {args.steps} steps, "
                  f"{args.sampler}/{args.scheduler}, CFG {args.cfg}, {args.width}x{args.height}, "
                  f"device {device_name()}")
    else:
        methods, notes = tiny_methods(args, state), []
        header = (f"embedded default: tiny generated SD1.5-family UNet, 2 demo LoRAs; seed {args.seed}, "
                  f"{args.steps} steps, euler/normal, CFG 6, 16x16 latent, device {device_name()}")
    results, images = [], []
    for key in args.methods:
        if key not in methods:
            continue
        start = time.perf_counter()
        with torch.inference_mode():  # as ComfyUI's executor runs every node
            image = methods[key]()
        seconds = time.perf_counter() - start
        file_name = f"{key}.png"
        image.save(os.path.join(out_dir, file_name))
        images.append(image)
        results.append({"method": LABELS[key], "seconds": round(seconds, 3), "image": file_name})
    write_outputs(out_dir, results, images, notes, header)
    return 0


def device_name() -> str:
    import comfy.model_management
    return str(comfy.model_management.get_torch_device())


if __name__ == "__main__":
    raise SystemExit(main())
