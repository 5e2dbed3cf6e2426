"""The pack's main job: the same prompts, seed and LoRAs through every method, side by side, scored.

Two modes, one output layout in --out: ``sheet.png`` (rows: methods, columns: prompts), one PNG per method and
prompt, ``timings.md`` / ``timings.json``.

* testbed (default; what ``make demo`` runs): the committed composition testbed (testbed/README.md) — a small
  SD1.5-architecture UNet and CLIP trained on a synthetic world, five concept LoRAs (zorb the character, a plaid
  vest, a brick wall, a lantern, duotone style) and the detector that tells whether each concept was drawn.
  Prompts with two and three concepts, every method with one seed; the sheet and timings.md give the
  detector's verdict per image (concept kept / missed). Everything is loaded through the testbed's own
  modules (``testbed/boot.py``, ``comfy_model``, ``eval_core``, ``detector``), so the demo follows the testbed
  when its weights change. CPU only; about 1–2 minutes on 2 cores.
* real models (--checkpoint, --lora ...): ComfyUI's own CheckpointLoaderSimple, CLIP Text Encode and VAE Decode
  around the pack's methods, one prompt, no detector. Names are looked up in the ComfyUI install's
  models/checkpoints and models/loras (--comfyui or $COMFYUI_PATH; else the vendored 0.3.75 tree), or give file
  paths. CLoRA runs when at least two non-style LoRAs have a --concept word (each must be a word of --prompt).

Runs headless on the CPU, so timings are CPU timings; for GPU timings use bench/run_bench.py.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import textwrap
import time
from collections.abc import Callable

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
TESTBED = os.path.join(REPO, "testbed")

METHODS = ("none", "merge", "onthefly", "switch", "composite", "cmlora", "clora", "regional", "regional_auto")
# on-the-fly = Merge, exactly; the regional rows need the testbed's scene layout (masks) and concept words
TESTBED_METHODS = ("none", "merge", "switch", "composite", "cmlora", "clora", "regional", "regional_auto")
TESTBED_ONLY = ("regional", "regional_auto")
LABELS = {"none": "no LoRA", "merge": "Merge", "onthefly": "on-the-fly stack", "switch": "LoRA Switch",
          "composite": "LoRA Composite", "cmlora": "CMLoRA", "clora": "CLoRA", "regional": "Regional (masks)",
          "regional_auto": "Regional (auto)"}
CATEGORIES = ("character", "clothing", "style", "background", "object", "other")
# The testbed's concept sets shown, by category (the testbed's prompts for each set; the first one of each).
DEMO_SETS = (("character", "object"), ("character", "background"), ("character", "object", "style"))
TESTBED_STEPS = 6  # the testbed protocol is 20; 6 euler steps keep its images and the demo in 2 minutes
# CLoRA's latent update is forward + backward through every prompt variant: the paper's 20 refinement
# iterations at three steps cost ~60 such passes, more than every other method together on a CPU.
CLORA_REFINE_ITERS = 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="demo_out", help="output folder (default demo_out)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--steps", type=int, help=f"sampling steps (testbed: {TESTBED_STEPS}; real models: 20)")
    parser.add_argument("--methods", help=f"comma-separated subset of {', '.join(METHODS)} (default: testbed "
                        f"{', '.join(TESTBED_METHODS)}; real models: all)")
    parser.add_argument("--clora-refine-iters", type=int, help="CLoRA's extra update iterations at 0/20/40 %% of "
                        f"the steps (testbed default {CLORA_REFINE_ITERS}; the node's and real models': 20)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice, one per core)")
    parser.add_argument("--testbed-weights", metavar="DIR", help="testbed weights folder (default: the testbed's own)")
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
    default_methods = tuple(m for m in METHODS if m not in TESTBED_ONLY) if args.checkpoint else TESTBED_METHODS
    args.methods = [m.strip() for m in (args.methods or ",".join(default_methods)).split(",") if m.strip()]
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown method(s) {sorted(unknown)}; choose from {', '.join(METHODS)}")
    if args.checkpoint and set(args.methods) & set(TESTBED_ONLY):
        parser.error(f"{', '.join(sorted(set(args.methods) & set(TESTBED_ONLY)))} run on the testbed only (their masks "
                     "come from its scene layout); on your own models use the Regional LoRA nodes")
    if args.lora and not args.checkpoint:
        parser.error("--lora needs --checkpoint (the default runs the testbed's own LoRAs)")
    for name in ("strength", "category", "concept"):
        if len(getattr(args, name)) > len(args.lora):
            parser.error(f"more --{name} than --lora values")
    if args.checkpoint and not args.lora:
        parser.error("--checkpoint needs at least one --lora")
    if args.steps is None:
        args.steps = 20 if args.checkpoint else TESTBED_STEPS
    if args.clora_refine_iters is None:
        args.clora_refine_iters = 20 if args.checkpoint else CLORA_REFINE_ITERS
    return args


class Tile:
    """One image of the sheet: a method on a prompt, with the detector's verdicts where there is one."""

    def __init__(self, image, seconds: float, cpu_seconds: float, verdicts: dict[str, bool] | None = None):
        self.image, self.seconds, self.cpu_seconds, self.verdicts = image, seconds, cpu_seconds, verdicts


class Column:
    """One prompt of the sheet: its text and the concept words the detector checks (empty: no detector)."""

    def __init__(self, prompt: str, concepts: list[str]):
        self.prompt, self.concepts = prompt, concepts


# --- testbed mode --------------------------------------------------------------------------------------------
def testbed_demo(args: argparse.Namespace) -> tuple[list[Column], dict[str, list[Tile]], dict]:
    """Every method on the testbed's 2- and 3-concept prompts, one seed, scored by its detector."""
    sys.path.insert(0, TESTBED)
    from boot import boot_comfy
    # PyTorch's SDPA on the CPU: ComfyUI's default there (split attention) takes twice as long on this UNet.
    ml = boot_comfy(("--use-pytorch-cross-attention",))
    import torch

    import folder_paths

    import comfy_model
    import detector as detector_lib
    import eval_core
    import world

    weights = args.testbed_weights or comfy_model.WEIGHTS
    loras = os.path.join(weights, "loras")
    needed = sorted({c for cats in DEMO_SETS for c in cats})
    missing = [name for name in map(eval_core.lora_name, needed) if not os.path.isfile(os.path.join(loras, name))]
    if missing and set(args.methods) - {"none"}:
        raise SystemExit(f"make demo: the testbed's concept LoRAs {', '.join(missing)} are not in {loras}. The "
                         "testbed's own README (testbed/README.md, 'State') says how they are trained; until then "
                         "only --methods none runs.")
    folder_paths.add_model_folder_path("loras", loras, is_default=True)
    model, clip = comfy_model.load_testbed(weights)
    net = detector_lib.load_detector(os.path.join(weights, "detector.safetensors"), model.load_device)
    stack = ml("core.stack")
    clora = ml("methods.clora")
    # v3 of the testbed decodes through the model's latent format; v2 has comfy_model.decode(latent).
    decode = ((lambda latent: eval_core.decode(model, latent)) if hasattr(eval_core, "decode")
              else comfy_model.decode)

    prompts = []
    for categories in DEMO_SETS:
        candidates = eval_core.composition_prompts(len(categories), 16)
        prompts.append(next(p for p in candidates if tuple(p[0]) == categories))
    columns = [Column(caption, [world.TRIGGERS[c] for c in cats]) for cats, caption, _ in prompts]

    def run(method: str, cats, caption: str):
        rows = eval_core.rows_for(stack, cats)
        if method == "clora":
            settings = clora.CloraSettings(cfg=eval_core.CFG, refine_iters=args.clora_refine_iters)
            channels = model.model.latent_format.latent_channels
            latent = {"samples": torch.zeros(1, channels, world.SIZE, world.SIZE)}
            out, _ = clora.clora_sample(model, clip, caption, "", rows, args.seed, args.steps, "euler", "normal",
                                        latent, 1.0, settings)
            return out["samples"]
        # CMLoRA's cache: None = the node's 'auto' (off on this SD1.5-architecture UNet). Regional with masks:
        # each LoRA's region drawn from the scene layout (world.region_masks), as a user would paint it.
        name = {"none": "base", "regional": "regional_oracle"}.get(method, method)
        return eval_core.sample(ml, name, model, clip, rows, caption, args.seed,
                                seeds=1, steps=args.steps, cache=None)

    tiles: dict[str, list[Tile]] = {}
    with torch.inference_mode():  # as ComfyUI's executor runs every node
        for method in args.methods:
            if method == "onthefly":
                print("demo: on-the-fly is left out on the testbed (it equals Merge exactly)", flush=True)
                continue
            tiles[method] = []
            for (cats, caption, expected), column in zip(prompts, columns):
                start, cpu = time.perf_counter(), time.process_time()
                latent = run(method, cats, caption)
                seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
                images = decode(latent)
                presence = eval_core.score(net, images, cats, expected)["presence"]
                verdicts = {world.TRIGGERS[c]: bool(presence[c][0] > 0.5) for c in cats}
                tiles[method].append(Tile(to_pil(images[0]), seconds, cpu, verdicts))
                print(f"demo: {LABELS[method]:<15} {seconds:6.1f} s  {verdict_text(verdicts)}  | {caption}",
                      flush=True)
    where = os.path.relpath(weights, REPO)
    meta = {"mode": "testbed", "seed": args.seed, "steps": args.steps, "sampler": "euler/normal",
            "cfg": eval_core.CFG, "clora_refine_iters": args.clora_refine_iters, "weights": where,
            "header": f"Composition testbed ({where}): trained SD1.5-architecture UNet, five concept LoRAs at "
                      f"strength 1, detector verdicts; seed {args.seed}, {args.steps} steps, euler/normal, "
                      f"CFG {eval_core.CFG:g}; CLoRA with {args.clora_refine_iters} refinement iteration(s) (the "
                      f"node's default: 20); CMLoRA's cache 'auto' (off on SD1.x)"}
    return columns, tiles, meta


def to_pil(image):
    """RGB [3, H, W] in [0, 1] → PIL."""
    from PIL import Image
    array = (image.detach().clamp(0, 1).permute(1, 2, 0).cpu().float().numpy() * 255).round().astype("uint8")
    return Image.fromarray(array)


def verdict_text(verdicts: dict[str, bool] | None) -> str:
    if not verdicts:
        return ""
    return ", ".join(f"{word} {'kept' if kept else 'missed'}" for word, kept in verdicts.items())


# --- real-model mode -----------------------------------------------------------------------------------------
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
        raise SystemExit(f"{kind[:-1]} '{value}' not found: not a file, and not in "
                         f"{folder_paths.get_folder_paths(kind)}")
    return value


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
                                     module.CloraSettings(cfg=args.cfg, refine_iters=args.clora_refine_iters))
        return pixels_to_image(vae.decode(out["samples"]))

    cmlora = pack_module("multilora.methods.cmlora")
    rows_on = stack.active()
    methods = {
        "none": lambda: sample(model, plain),
        "merge": merge,
        "onthefly": on_the_fly,
        "switch": lambda: sample(methods_mod.switch_model(model, rows_on, args.switch_every, "demo"), with_loras),
        "composite": lambda: sample(methods_mod.composite_model(model, rows_on, None, "demo"), with_loras),
        "cmlora": lambda: sample(cmlora.cmlora_model(model, rows_on, 0.55, False, "demo"), with_loras),
        "clora": clora,
    }
    notes = []
    if sum(1 for r in rows if r.concept_words() and r.category != "style") < 2:
        methods.pop("clora")
        notes.append("CLoRA left out: it needs --concept words for at least two non-style LoRAs")
    return methods, notes


def real_demo(args: argparse.Namespace) -> tuple[list[Column], dict[str, list[Tile]], dict]:
    sys.path.insert(0, os.path.join(REPO, "tests"))
    from support.comfy_boot import boot
    boot()
    import torch
    methods, notes = real_methods(args)
    tiles: dict[str, list[Tile]] = {}
    for key in args.methods:
        if key not in methods:
            continue
        start, cpu = time.perf_counter(), time.process_time()
        with torch.inference_mode():
            image = methods[key]()
        tiles[key] = [Tile(image, time.perf_counter() - start, time.process_time() - cpu)]
        print(f"demo: {LABELS[key]:<15} {tiles[key][0].seconds:6.1f} s", flush=True)
    meta = {"mode": "real", "seed": args.seed, "steps": args.steps, "notes": notes,
            "header": f"checkpoint {os.path.basename(args.checkpoint)}, LoRAs "
                      f"{', '.join(os.path.basename(x) for x in args.lora)}; seed {args.seed}, {args.steps} steps, "
                      f"{args.sampler}/{args.scheduler}, CFG {args.cfg}, {args.width}x{args.height}"}
    return [Column(args.prompt, [])], tiles, meta


# --- outputs -------------------------------------------------------------------------------------------------
def font(size: int):
    from PIL import ImageFont
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1: the fixed bitmap font
        return ImageFont.load_default()


def save_sheet(path: str, columns: list[Column], tiles: dict[str, list[Tile]], tile_px: int = 128) -> None:
    """Rows = methods (name and time), columns = prompts (text and concept words); under each tile the
    detector's verdict per concept, green kept, red missed."""
    from PIL import Image, ImageDraw
    small, normal = font(11), font(13)
    label_w, gap = 118, 8
    col_w = max(tile_px, 168)
    wrap = max(20, col_w // 6)
    header_lines = [textwrap.wrap(f"{i + 1}. {c.prompt}", wrap)[:4] for i, c in enumerate(columns)]
    header_h = 16 * max(len(h) for h in header_lines) + (18 if any(c.concepts for c in columns) else 0) + 6
    verdict_h = 14 * max((len(c.concepts) for c in columns), default=0)
    row_h = tile_px + verdict_h + gap
    width = label_w + len(columns) * (col_w + gap)
    sheet = Image.new("RGB", (width, header_h + len(tiles) * row_h + 4), "white")
    draw = ImageDraw.Draw(sheet)
    for c, (column, lines) in enumerate(zip(columns, header_lines)):
        x = label_w + c * (col_w + gap)
        for j, line in enumerate(lines):
            draw.text((x, 4 + 16 * j), line, fill="black", font=small)
        if column.concepts:
            draw.text((x, 4 + 16 * len(lines)), "concepts: " + ", ".join(column.concepts), fill=(40, 40, 160),
                      font=small)
    for r, (method, row) in enumerate(tiles.items()):
        y = header_h + r * row_h
        draw.text((4, y + tile_px // 2 - 14), LABELS[method], fill="black", font=normal)
        total = sum(t.seconds for t in row)
        draw.text((4, y + tile_px // 2 + 4), f"{total:.1f} s", fill=(90, 90, 90), font=small)
        for c, tile in enumerate(row):
            x = label_w + c * (col_w + gap)
            image = tile.image.resize((tile_px, round(tile_px * tile.image.height / tile.image.width)), Image.NEAREST)
            sheet.paste(image, (x, y))
            for j, (word, kept) in enumerate((tile.verdicts or {}).items()):
                draw.text((x, y + tile_px + 1 + 14 * j), f"{word}: {'kept' if kept else 'missed'}",
                          fill=(0, 130, 0) if kept else (200, 0, 0), font=small)
    sheet.save(path, optimize=True)


def write_outputs(out_dir: str, columns: list[Column], tiles: dict[str, list[Tile]], meta: dict,
                  wall: float) -> None:
    import torch
    for method, row in tiles.items():
        for i, tile in enumerate(row):
            tile.image.save(os.path.join(out_dir, f"{method}_{i + 1}.png"))
    save_sheet(os.path.join(out_dir, "sheet.png"), columns, tiles)
    scored = any(t.verdicts for row in tiles.values() for t in row)
    lines = [f"# make demo: {len(tiles)} methods × {len(columns)} prompt(s)", "", meta["header"] + ".", "",
             f"Device {device_name()}, {torch.get_num_threads()} torch thread(s), {os.cpu_count()} CPUs, load "
             f"average at the end {load_average()}; whole run {wall:.1f} s, {time.process_time():.1f} s of CPU time "
             "(boot, loading, sampling, scoring). CPU seconds below count every thread of this process: on a "
             "machine shared with other work they are the better guide to an idle machine's time.", "",
             "Prompts:"]
    lines += [f"{i + 1}. {c.prompt}" + (f" (concepts: {', '.join(c.concepts)})" if c.concepts else "")
              for i, c in enumerate(columns)]
    lines += ["", "| method | seconds, all prompts | seconds per image | CPU seconds |"
              + (" concepts kept |" if scored else ""), "|---|---|---|---|" + ("---|" if scored else "")]
    for method, row in tiles.items():
        total = sum(t.seconds for t in row)
        line = f"| {LABELS[method]} | {total:.1f} | {total / len(row):.1f} | {sum(t.cpu_seconds for t in row):.1f} |"
        if scored:
            kept = sum(sum(t.verdicts.values()) for t in row)
            line += f" {kept} of {sum(len(t.verdicts) for t in row)} |"
        lines.append(line)
    if scored:
        lines += ["", "Detector verdicts (kept = the testbed's detector finds the concept in the image):", "",
                  "| method | " + " | ".join(f"{i + 1}: {', '.join(c.concepts)}" for i, c in enumerate(columns)) + " |",
                  "|---" * (len(columns) + 1) + "|"]
        lines += [f"| {LABELS[m]} | " + " | ".join(verdict_text(t.verdicts) for t in row) + " |"
                  for m, row in tiles.items()]
        lines += ["", "One seed per prompt: a verdict here is an example, not a rate. The rates (40 prompts × 4 "
                  "seeds, with intervals) are in testbed/README.md."]
    lines += [f"- {note}" for note in meta.get("notes", ())]
    with open(os.path.join(out_dir, "timings.md"), "w", encoding="utf-8") as f:
        f.write("\n".join(lines) + "\n")
    record = {"meta": {**meta, "wall_seconds": round(wall, 1), "cpu_seconds": round(time.process_time(), 1),
                       "device": device_name(),
                       "torch_threads": torch.get_num_threads(), "load_average": load_average()},
              "prompts": [{"prompt": c.prompt, "concepts": c.concepts} for c in columns],
              "methods": {m: [{"seconds": round(t.seconds, 2), "cpu_seconds": round(t.cpu_seconds, 2),
                               "verdicts": t.verdicts, "image": f"{m}_{i + 1}.png"} for i, t in enumerate(row)]
                          for m, row in tiles.items()}}
    with open(os.path.join(out_dir, "timings.json"), "w", encoding="utf-8") as f:
        json.dump(record, f, indent=1)
    print("\n".join(lines))
    print(f"wrote sheet.png, {sum(len(r) for r in tiles.values())} images and timings.md/.json to {out_dir}")


def load_average() -> str:
    try:
        return ", ".join(f"{v:.1f}" for v in os.getloadavg())
    except OSError:
        return "n/a"


def device_name() -> str:
    import comfy.model_management
    return str(comfy.model_management.get_torch_device())


def main(argv: list[str] | None = None) -> int:
    start = time.perf_counter()
    args = parse_args(argv)
    if args.comfyui:
        os.environ["COMFYUI_PATH"] = os.path.abspath(args.comfyui)
    out_dir = os.path.abspath(args.out)
    os.makedirs(out_dir, exist_ok=True)
    if args.threads:
        import torch
        torch.set_num_threads(args.threads)
    columns, tiles, meta = real_demo(args) if args.checkpoint else testbed_demo(args)
    write_outputs(out_dir, columns, tiles, meta, time.perf_counter() - start)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
