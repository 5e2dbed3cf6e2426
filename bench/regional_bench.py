"""GPU benchmark of Regional LoRA against ComfyUI's merged-LoRA sampler, same run (protocol of run_bench.py).

Models: SDXL 1024² (full-size random fp16 UNet), Flux.1-dev 1024² (full-size random bf16 transformer through
ComfyUI's Flux class) and Z-Image-Turbo 1024² (full-size random bf16 NextDiT through ComfyUI's ZImage class; cfg 1 as
Turbo samples, so one batch row per step; a 100-token caption, padded to 128 by the model; 4096 image tokens, no
image pads), k = 2 / 4 random rank-16 LoRAs (``bench_models``). Rows per (model, k):

    merged (a)          comfy.sample on the model with the k LoRAs merged by ComfyUI (stock, eager)
    merged + graphs (b) the same merged model replayed through the pack's CUDA-graph wrapper (the fair baseline)
    on-the-fly stack    the pack's engine, all LoRAs everywhere
    regional            each LoRA in its own region (k = 2: left / right halves; k = 4: quadrants), eager and graphed
    regional, auto      automatic masks (mask_from "concept attention", the node's defaults: 3 recording steps, then
                        frozen) from the concept words of ``PROMPT``, eager and graphed; the text encoder is not run
                        (the conditioning stays random), only ComfyUI's own tokenizer finds the concept tokens;
                        only on the families whose concept attention the pack reads (``regional_auto.check_family``)

Each row: seconds per image (median of --repeats after a warm-up), ms/step, peak torch.cuda.max_memory_allocated,
ratios to (a) and (b), peak memory as a multiple of (b), and graphed-vs-eager max |Δ latent|.
Usage (GPU): python bench/regional_bench.py --out $OUT [--models sdxl flux zimage] [--ks 2 4] [--steps 10]
CPU smoke test of the script itself (tiny Flux and Z-Image): python bench/regional_bench.py --tiny --out /tmp/x
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "testbed"))

from bench_models import build_flux, build_unet, build_zimage, conds, flux_conds, write_loras, zimage_conds  # noqa: E402
from boot import boot_comfy  # noqa: E402
from run_bench import graphs  # noqa: E402


def sync():
    import torch
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_gb() -> float:
    import torch
    return round(torch.cuda.max_memory_allocated() / 2**30, 2) if torch.cuda.is_available() else 0.0


def region_masks(k: int, size: int):
    """k = 2: left / right halves; k = 4: quadrants; else vertical stripes (image-space masks, 8 px per latent px)."""
    import torch
    side = size * 8
    masks = []
    for i in range(k):
        m = torch.zeros(side, side)
        if k == 4:
            r, c = divmod(i, 2)
            m[r * side // 2:(r + 1) * side // 2, c * side // 2:(c + 1) * side // 2] = 1.0
        else:
            m[:, i * side // k:(i + 1) * side // k] = 1.0
        masks.append(m)
    return masks


PROMPT = "a knight, a witch, a robot and a dragon"
CONCEPTS = ("knight", "witch", "robot", "dragon")


class TokenizerOnly:
    """What automatic masks read of a CLIP: ``tokenize`` (ComfyUI's real tokenizer of the family)."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def tokenize(self, text, **kwargs):
        return self.tokenizer.tokenize_with_weights(text, **kwargs)


def tokenizer_clip(kind: str) -> TokenizerOnly:
    if kind == "flux":
        from comfy.text_encoders.flux import FluxTokenizer
        return TokenizerOnly(FluxTokenizer(embedding_directory=None, tokenizer_data={}))
    if kind == "zimage":
        from comfy.text_encoders.z_image import ZImageTokenizer
        return TokenizerOnly(ZImageTokenizer(embedding_directory=None, tokenizer_data={}))
    if kind == "sdxl":
        from comfy.sdxl_clip import SDXLTokenizer
        return TokenizerOnly(SDXLTokenizer(embedding_directory=None, tokenizer_data={}))
    from comfy.sd1_clip import SD1Tokenizer
    return TokenizerOnly(SD1Tokenizer(embedding_directory=None, tokenizer_data={}))


CFG = {"flux": 3.5, "zimage": 1.0}
BUILD = {"flux": build_flux, "zimage": build_zimage}


def time_model(make, kind, steps, repeats, size, tiny):
    import torch

    import comfy.sample
    positive, negative = flux_conds(tiny) if kind == "flux" else zimage_conds(tiny) if kind == "zimage" else conds(kind)
    latent = torch.zeros(1, 16 if kind in BUILD else 4, size, size)
    noise = comfy.sample.prepare_noise(latent, 42)
    model = make()
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    times = []
    for r in range(repeats + 1):
        sync()
        start = time.perf_counter()
        out = comfy.sample.sample(model, noise, steps, CFG.get(kind, 7.0), "euler", "simple",
                                  positive, negative, latent, disable_pbar=True, seed=42)
        sync()
        if r:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"s_per_image": round(median, 4), "ms_per_step": round(1000 * median / steps, 2), "peak_gb": peak_gb()}, \
        out.float().cpu()


def run(kind, ml, ks, steps, repeats, tiny, results, out_dir):
    import comfy.sd
    import comfy.utils
    import folder_paths
    patcher = BUILD[kind](tiny) if kind in BUILD else build_unet(kind)
    size = 16 if tiny else 128
    folder = tempfile.mkdtemp(prefix=f"regional-{kind}-")
    names, layers = write_loras(patcher, max(ks), folder)
    folder_paths.add_model_folder_path("loras", folder, is_default=True)
    stack, engine, regional = ml("core.stack"), ml("host.engine"), ml("methods.regional")
    auto, phases = ml("methods.regional_auto"), ml("core.auto_masks").AutoMaskPhases()
    try:
        auto.check_family(patcher.model.diffusion_model, "bench")
        clip = tokenizer_clip(kind)
    except ml("core.regions").RegionError:
        clip = None  # no concept attention read on this family: no automatic-mask rows
    for k in ks:
        rows = [stack.LoraRow(n, 0.8) for n in names[:k]]
        concept_rows = [stack.LoraRow(n, 0.8, concept=c) for n, c in zip(names[:k], CONCEPTS)]

        def automatic():
            return auto.auto_regional_model(patcher, concept_rows, [None] * k, "bench", clip, PROMPT, phases)[0]

        def merged():
            model = patcher
            for n in names[:k]:
                sd = comfy.utils.load_torch_file(os.path.join(folder, n), safe_load=True)
                model, _ = comfy.sd.load_lora_for_models(model, None, sd, 0.8, 0.0)
            return model
        masks = region_masks(k, size)
        methods = [("merged (a), stock eager", merged, False),
                   ("merged + graph replay (b)", lambda: engine.with_graph_replay(merged()), True),
                   ("on-the-fly stack, graphs", lambda: engine.clone_with_engine(
                       patcher, engine.build_engine(patcher, rows, "bench")), True),
                   ("regional, user masks, eager", lambda: regional.regional_model(patcher, rows, masks, "bench"), False),
                   ("regional, user masks, graphs", lambda: regional.regional_model(patcher, rows, masks, "bench"), True),
                   ("regional, auto masks, eager", automatic, False),
                   ("regional, auto masks, graphs", automatic, True)][:None if clip is not None else -2]
        latents = {}
        for label, make, graphed in methods:
            with graphs(graphed):
                entry, latent = time_model(make, kind, steps, repeats, size, tiny)
            latents[label] = latent
            entry.update(model=kind, k=k, method=label, steps=steps, lora_layers=layers)
            results.append(entry)
            print(json.dumps(entry), flush=True)
        for found in ("user", "auto") if clip is not None else ("user",):
            eager, graphed = latents[f"regional, {found} masks, eager"], latents[f"regional, {found} masks, graphs"]
            row = next(r for r in results if r["model"] == kind and r["k"] == k
                       and r["method"] == f"regional, {found} masks, graphs")
            row["graphs_vs_eager"] = float((eager - graphed).abs().max())
        a = next(r for r in results if r["model"] == kind and r["k"] == k and r["method"].startswith("merged (a)"))
        b = next(r for r in results if r["model"] == kind and r["k"] == k and r["method"].startswith("merged + graph"))
        for r in results:
            if r["model"] == kind and r["k"] == k:
                r["ratio_a"] = round(r["s_per_image"] / a["s_per_image"], 3)
                r["ratio_b"] = round(r["s_per_image"] / b["s_per_image"], 3)
                r["peak_vs_b"] = round(r["peak_gb"] / b["peak_gb"], 3) if b["peak_gb"] else None
    write_report(results, out_dir)


def write_report(results, out_dir):
    import torch
    stamp = time.strftime("%Y%m%d-%H%M%S")
    version = open(os.path.join(os.environ.get("COMFYUI_PATH", ""), "comfyui_version.py")).read().split('"')[1] \
        if os.environ.get("COMFYUI_PATH") else "0.3.75"
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU"
    with open(os.path.join(out_dir, f"regional-{stamp}.json"), "w") as f:
        json.dump({"gpu": gpu, "torch": torch.__version__, "comfyui": version, "results": results}, f, indent=2)
    lines = [f"GPU: {gpu} · torch {torch.__version__} · ComfyUI {version} · 1024² (latent 128²), euler/simple, "
             "median after a warm-up", "",
             "| model | k | method | s/image | ms/step | peak GB | × (a) | × (b) | peak × (b) | graphs vs eager |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['k']} | {r['method']} | {r['s_per_image']} | {r['ms_per_step']} | "
                     f"{r['peak_gb']} | {r.get('ratio_a', '—')} | {r.get('ratio_b', '—')} | {r.get('peak_vs_b', '—')} | "
                     f"{r.get('graphs_vs_eager', '—')} |")
    with open(os.path.join(out_dir, f"regional-{stamp}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--models", nargs="+", default=["sdxl", "flux", "zimage"], choices=["sdxl", "flux", "zimage"])
    parser.add_argument("--ks", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--tiny", action="store_true",
                        help="tiny Flux and Z-Image on the CPU: checks the script, times nothing")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    ml = boot_comfy()
    results = []
    models = ["flux", "zimage"] if args.tiny else args.models
    for kind in models:
        run(kind, ml, args.ks, 2 if args.tiny else args.steps, 1 if args.tiny else args.repeats, args.tiny, results,
            args.out)


if __name__ == "__main__":
    main()
