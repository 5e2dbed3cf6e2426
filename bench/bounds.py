"""What bounds the targets the benchmark misses: two measurements on the GPU, one run.

1. CMLoRA's feature cache saves only the deep part of the UNet: per call, the shallow path (first-level input
   and output blocks + out, ``feature_cache.split_forward`` with no deep rows) against the full UNet, both
   replayed from CUDA graphs at batch 2k (k = 4 Composite branches × cond/uncond). Their ratio is the floor of
   CMLoRA-with-cache / Composite on non-refresh steps.
2. LoRA Switch pays one merge per switch: ``OnTheFlyLoras.merge_weights`` (W ← W₀ + Σ wᵢ ΔWᵢ on every
   targeted layer) timed on the device, k = 4, and the stock merged KSampler's per-image time for scale.

Usage (GPU machine): python bench/bounds.py --models sd15 sdxl --out $OUT
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "testbed"))  # the one ComfyUI boot helper

from bench_models import build_unet, conds, write_loras  # noqa: E402
from boot import boot_comfy  # noqa: E402


def graphed_ms(fn, reps: int = 20) -> float:
    """Milliseconds per replay of ``fn`` captured as a CUDA graph (after two eager warm-up calls)."""
    import torch
    fn()
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    graph.replay()
    start.record()
    for _ in range(reps):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / reps


def shallow_vs_full(kind: str, ml, batch: int) -> dict:
    import torch
    feature_cache = ml("host.feature_cache")
    patcher = build_unet(kind)
    unet = patcher.model.diffusion_model
    device = next(unet.parameters()).device
    size = 64 if kind == "sd15" else 128
    gen = torch.Generator(device=device).manual_seed(0)
    x = torch.randn(batch, 4, size, size, generator=gen, device=device, dtype=torch.float16)
    t = torch.full((batch,), 500.0, device=device)
    positive = conds(kind)[0][0]
    context = positive[0].to(device, torch.float16).expand(batch, -1, -1).contiguous()
    y = None if kind == "sd15" else torch.randn(batch, 2816, generator=gen, device=device, dtype=torch.float16)
    with torch.inference_mode():
        _, deep = feature_cache.split_forward(unet, x, t, context, y, {}, torch.arange(batch, device=device), None, None)
        none, none_cpu = torch.zeros(0, dtype=torch.long, device=device), torch.zeros(0, dtype=torch.long)
        full = graphed_ms(lambda: unet(x, t, context=context, y=y, transformer_options={}))
        shallow = graphed_ms(lambda: feature_cache.split_forward(unet, x, t, context, y, {}, none, deep, None,
                                                                 deep_rows_cpu=none_cpu))
    return {"model": kind, "batch": batch, "full_unet_ms": round(full, 2), "shallow_path_ms": round(shallow, 2),
            "shallow_over_full": round(shallow / full, 3)}


def merge_cost(kind: str, ml, k: int, folder: str) -> dict:
    import torch

    import folder_paths
    patcher = build_unet(kind)
    names, layers = write_loras(patcher, k, folder)
    folder_paths.add_model_folder_path("loras", folder, is_default=True)
    stack = ml("core.stack")
    engine = ml("host.engine").build_engine(patcher, [stack.LoraRow(n, 0.8) for n in names], "bench")
    model = patcher.model
    times = []
    with torch.inference_mode():
        for i in range(2 * k + 1):
            vector = tuple(1.0 if j == i % k else 0.0 for j in range(k))
            torch.cuda.synchronize()
            start = time.perf_counter()
            engine.merge_weights(model, vector)
            torch.cuda.synchronize()
            if i > 0:  # the first merge also makes the W₀ backups
                times.append(time.perf_counter() - start)
        engine.restore_weights()
    times.sort()
    return {"model": kind, "k": k, "lora_layers": layers, "merge_ms_median": round(1000 * times[len(times) // 2], 1)}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["sd15", "sdxl"])
    parser.add_argument("--out", default=os.path.join(HERE, "results"))
    args = parser.parse_args()
    ml = boot_comfy()
    import torch

    import comfy.model_management
    results = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "shallow": [], "merge": []}
    folder = tempfile.mkdtemp()
    for kind in args.models:
        for part, measure in (("shallow", lambda: shallow_vs_full(kind, ml, batch=8)),
                              ("merge", lambda: merge_cost(kind, ml, 4, folder))):
            try:
                results[part].append(measure())
            except Exception as error:  # keep the other measurements of the run
                results[part].append({"model": kind, "error": f"{type(error).__name__}: {error}"})
            print(json.dumps(results[part][-1]), flush=True)
            comfy.model_management.unload_all_models()
            torch.cuda.empty_cache()
    os.makedirs(args.out, exist_ok=True)
    with open(os.path.join(args.out, f"bounds-{time.strftime('%Y%m%d-%H%M%S')}.json"), "w") as f:
        json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
