"""GPU benchmark (docs/benchmarking.md): every method of the pack against ComfyUI's merged-LoRA KSampler, one run.

Builds full-size SD1.5 (512²) and/or SDXL (1024²) UNets inside ComfyUI from their configs with random fp16
weights, writes random kohya LoRAs of realistic shape (rank 16 on attn q/k/v/out, feed-forward and
proj_in/out of every transformer block; ``bench_models``), and times, per method and k: wall seconds per
image (median of --repeats after one warm-up), seconds per step and peak torch.cuda.max_memory_allocated.
The baseline is comfy.sample.sample on the model with the same k LoRAs merged by ComfyUI's LoraLoader path.
The pack's methods replay their UNet calls from CUDA graphs (``multilora/host/cuda_graphs.py``); rows marked
"eager" run with MULTILORA_CUDA_GRAPHS=0, and every graphed row reports the largest difference of its final
latent from its eager twin (same seed) where both ran.
Usage (GPU machine): python bench/run_bench.py --models sd15 sdxl --out $OUT   (``--clora``: CLoRA instead)
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(REPO, "testbed"))  # the one ComfyUI boot helper (never the repo root)

from bench_models import SD15, SDXL, build_unet, conds, fill_random_, write_loras  # noqa: E402,F401
from boot import boot_comfy  # noqa: E402
from clora_bench import run_clora  # noqa: E402

GRAPHS_ENV = "MULTILORA_CUDA_GRAPHS"


@contextlib.contextmanager
def graphs(on: bool):
    """Build the method's engine with CUDA graphs on or off (the engine reads the switch when built)."""
    previous = os.environ.get(GRAPHS_ENV)
    os.environ[GRAPHS_ENV] = "1" if on else "0"
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(GRAPHS_ENV, None)
        else:
            os.environ[GRAPHS_ENV] = previous


def time_method(make_model, kind, steps, repeats):
    import torch

    import comfy.sample
    size = 64 if kind == "sd15" else 128
    positive, negative = conds(kind)
    latent = torch.zeros(1, 4, size, size)
    noise = comfy.sample.prepare_noise(latent, 42)
    model = make_model()
    times = []
    torch.cuda.reset_peak_memory_stats()
    for r in range(repeats + 1):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = comfy.sample.sample(model, noise, steps, 7.0, "euler", "normal", positive, negative, latent,
                                  disable_pbar=True, seed=42)
        torch.cuda.synchronize()
        if r > 0:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"s_per_image": round(median, 4), "s_per_step": round(median / steps, 5),
            "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)}, out.float().cpu()


def run_model(kind, ml, steps, repeats, ks, folder, partial=None, sequential_ks=(2, 4), cmlora_ks=(2, 4, 8),
              eager_ks=(1, 2, 4, 8)):
    import comfy.model_management
    import comfy.sd
    import comfy.utils
    import folder_paths
    t0 = time.perf_counter()
    patcher = build_unet(kind)
    names, layers = write_loras(patcher, max(ks), folder)
    print(f"built {kind} and {len(names)} LoRAs in {time.perf_counter() - t0:.1f}s", flush=True)
    folder_paths.add_model_folder_path("loras", folder, is_default=True)
    stack = ml("core.stack")
    methods = ml("methods.switch_composite")
    engine = ml("host.engine")
    cmlora = ml("methods.cmlora")
    categories = ("character", "clothing", "style", "background", "object")
    results = []
    outputs = {}

    def rows(k):
        return tuple(stack.LoraRow(n, 0.8) for n in names[:k])

    def merged(k):
        model = patcher
        for n in names[:k]:
            model, _ = comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(
                os.path.join(folder, n), safe_load=True), 0.8, 0.0)
        return model

    graphed_base = {}  # k -> baseline (b): the merged model replayed from the pack's CUDA graphs

    def record(method, k, make, base=None, graphed=None):
        comfy.model_management.unload_all_models()
        label = method if graphed is None else (method + (", CUDA graphs" if graphed else ", eager"))
        with graphs(graphed is not False):
            timing, out = time_method(make, kind, steps, repeats)
        entry = {"model": kind, "method": label, "k": k, **timing,
                 "ratio": None if base is None else round(timing["s_per_image"] / base["s_per_image"], 3)}
        if k in graphed_base:
            entry["ratio_to_graphed_merged"] = round(timing["s_per_image"] / graphed_base[k]["s_per_image"], 3)
        twin = outputs.get((method, k, not graphed)) if graphed is not None else None
        if twin is not None:
            entry["max_abs_diff_graphs_vs_eager"] = float((out - twin).abs().max())
        outputs[(method, k, graphed)] = out
        results.append(entry)
        print(json.dumps(entry), flush=True)
        if partial:
            with open(partial, "a") as f:
                f.write(json.dumps(entry) + "\n")
        return entry

    def both(method, k, make, base):
        if k in eager_ks:
            record(method, k, make, base, graphed=False)
        return record(method, k, make, base, graphed=True)

    record("plain KSampler (no LoRA)", 0, lambda: patcher)
    for k in ks:
        base = record("merged KSampler (baseline a, stock eager)", k, lambda: merged(k))
        base["ratio"] = 1.0
        graphed_base[k] = record("merged KSampler, pack's graph replay (baseline b)", k,
                                 lambda: engine.with_graph_replay(merged(k)), base)
        base["ratio_to_graphed_merged"] = round(base["s_per_image"] / graphed_base[k]["s_per_image"], 3)
        graphed_base[k]["ratio_to_graphed_merged"] = 1.0
        if k == 1:
            both("on-the-fly, all LoRAs", 1,
                 lambda: engine.clone_with_engine(patcher, engine.build_engine(patcher, rows(1), "bench")), base)
            continue
        both("LoRA Switch", k, lambda: methods.switch_model(patcher, rows(k), 5, "bench"), base)
        composite = both("LoRA Composite", k, lambda: methods.composite_model(patcher, rows(k), None, "bench"), base)
        if k in sequential_ks:
            record("LoRA Composite, sequential branches", k,
                   lambda: methods.composite_model(patcher, rows(k), None, "bench", batched=False), base, graphed=True)
        if k in cmlora_ks:
            cm_rows = tuple(stack.LoraRow(n, 0.8, category=categories[i % len(categories)]) for i, n in enumerate(names[:k]))
            for method, cache in (("CMLoRA (feature cache)", True), ("CMLoRA (no cache)", False)):
                e = record(method, k, lambda: cmlora.cmlora_model(patcher, cm_rows, 0.5, False, "bench", cache=cache),
                           base, graphed=True)
                e["ratio_to_composite"] = round(e["s_per_image"] / composite["s_per_image"], 3)
    return results, layers


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["sd15", "sdxl"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ks", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    parser.add_argument("--clora", action="store_true", help="time CLoRA (50 steps by default) instead")
    parser.add_argument("--profile", action="store_true", help="CLoRA: also profile one extra image (torch.profiler)")
    parser.add_argument("--cmlora-ks", nargs="*", type=int, default=[2, 4, 8], help="k values with CMLoRA rows")
    parser.add_argument("--eager-ks", nargs="*", type=int, default=[1, 2, 4, 8],
                        help="k values at which on-the-fly/Switch/Composite also run without CUDA graphs")
    parser.add_argument("--sequential-ks", nargs="*", type=int, default=[2, 4],
                        help="k values at which Composite also runs with one UNet call per LoRA")
    args = parser.parse_args()
    ml = boot_comfy()
    import comfyui_version
    import torch
    folder = tempfile.mkdtemp()
    all_results = []
    meta = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "comfyui": comfyui_version.__version__,
            "python": platform.python_version(), "steps": args.steps, "repeats": args.repeats,
            "sampler": "euler/normal, cfg 7, fp16, seed 42", "lora": "kohya rank 16, alpha 16"}
    for kind in args.models:
        os.makedirs(args.out, exist_ok=True)
        if args.clora:
            results, layers = run_clora(kind, ml, args.steps, args.repeats, args.ks, folder,
                                        os.path.join(args.out, f"partial-clora-{kind}.jsonl"),
                                        args.out if args.profile else None)
        else:
            results, layers = run_model(kind, ml, args.steps, args.repeats, args.ks, folder,
                                        os.path.join(args.out, f"partial-{kind}.jsonl"), tuple(args.sequential_ks),
                                        tuple(args.cmlora_ks), tuple(args.eager_ks))
        meta[f"{kind}_lora_layers"] = layers
        all_results += results
    os.makedirs(args.out, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with open(os.path.join(args.out, f"bench-{stamp}.json"), "w") as f:
        json.dump({"meta": meta, "results": all_results}, f, indent=2)
    lines = [f"GPU: {meta['gpu']} · torch {meta['torch']} · ComfyUI {meta['comfyui']} · {args.steps} steps, "
             f"{meta['sampler']}, median of {args.repeats} after warm-up", "",
             "| model | method | k | s/image | ms/step | peak GB | ratio to (a) stock merged, eager | ratio to (b) merged, "
             "graph replay | ratio to Composite (same k) | max abs diff, graphs vs eager |",
             "|---|---|---|---|---|---|---|---|---|---|"]

    def cell(e, key):
        return "—" if e.get(key) is None else (f"{e[key]:.2g}" if "diff" in key else e[key])
    for e in all_results:
        lines.append(f"| {e['model']} | {e['method']} | {e['k']} | {e['s_per_image']} | {e['s_per_step'] * 1000:.1f} | "
                     f"{e['peak_gb']} | {cell(e, 'ratio')} | {cell(e, 'ratio_to_graphed_merged')} | "
                     f"{cell(e, 'ratio_to_composite')} | "
                     f"{cell(e, 'max_abs_diff_graphs_vs_eager')} |")
    with open(os.path.join(args.out, f"bench-{stamp}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
