"""CLoRA timing for the GPU benchmark: k concept LoRAs, random variant conds, the node's defaults (50 steps).

Used by ``run_bench.py --clora``; ``--profile`` adds one image with per-phase timers and one under
torch.profiler (top ops written next to the results).
"""
from __future__ import annotations

import contextlib
import json
import os
import statistics
import time

from bench_models import build_unet, conds, write_loras


def timed_phases(guider, totals: dict) -> None:
    """Accumulate synchronised wall time of the guider's two phases (instance attributes, this run only)."""
    import torch
    for name in totals:
        method = getattr(guider, name)

        def timed(*args, _method=method, _name=name, **kwargs):
            torch.cuda.synchronize()
            start = time.perf_counter()
            out = _method(*args, **kwargs)
            torch.cuda.synchronize()
            totals[_name] += time.perf_counter() - start
            return out
        setattr(guider, name, timed)


@contextlib.contextmanager
def profile_to(folder: str, name: str):
    """torch.profiler over one image; top ops by CUDA and by CPU time written to <folder>/<name>.txt."""
    import torch
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        yield
    torch.cuda.synchronize()
    table = prof.key_averages()
    with open(os.path.join(folder, f"{name}.txt"), "w") as f:
        f.write(table.table(sort_by="cuda_time_total", row_limit=30) + "\n\n")
        f.write(table.table(sort_by="self_cpu_time_total", row_limit=30) + "\n")


def run_clora(kind, ml, steps, repeats, ks, folder, partial=None, profile_dir=None):
    """CLoRA with k concept LoRAs, random variant conds (token positions fixed), the node's defaults."""
    import torch

    import comfy.model_management
    import comfy.sample
    import comfy.samplers
    import folder_paths
    clora = ml("methods.clora")
    patcher = build_unet(kind)
    names, layers = write_loras(patcher, max(ks), folder)
    folder_paths.add_model_folder_path("loras", folder, is_default=True)
    stack = ml("core.stack")
    size = 64 if kind == "sd15" else 128
    positive, negative = conds(kind)
    results = []
    for k in ks:
        rows = [stack.LoraRow(n, 0.8, concept=f"w{i}") for i, n in enumerate(names[:k])]
        engine = ml("host.engine").build_engine(patcher, rows, "bench")
        clone = patcher.clone()
        engine.install(clone)
        gen = torch.Generator().manual_seed(3)
        variants = []
        for v in range(k + 1):
            pos = [[positive[0][0] + 0.1 * torch.randn(positive[0][0].shape, generator=gen), dict(positive[0][1])]]
            variants.append(clora.Variant("p", pos, negative, {g: [2 + 2 * g] for g in range(k)}))
        settings = clora.CloraSettings(cfg=7.0)
        latent = torch.zeros(1, 4, size, size)
        noise = comfy.sample.prepare_noise(latent, 42)
        sigmas = comfy.samplers.KSampler(clone, steps, clone.load_device, "euler", "normal", 1.0).sigmas
        comfy.model_management.unload_all_models()
        times = []
        torch.cuda.reset_peak_memory_stats()
        phases = {"update_latent": 0.0, "predict_noise": 0.0}
        extra = 2 if profile_dir else 1  # after the timed images: one with phase timers, one profiled
        for r in range(repeats + 1 + extra):
            record = clora.CloraRecord([str(i) for i in range(k)], (size, size))
            guider = clora.CloraGuider(clone, engine, variants, settings, record)
            if r == repeats + 1:
                timed_phases(guider, phases)
            profiler = profile_to(profile_dir, f"clora-{kind}-k{k}") if r == repeats + 2 else None
            torch.cuda.synchronize()
            start = time.perf_counter()
            with profiler or contextlib.nullcontext():
                guider.sample(noise, latent, clora.clora_sampler("euler", steps, settings), sigmas, disable_pbar=True, seed=42)
            torch.cuda.synchronize()
            if 0 < r <= repeats:
                times.append(time.perf_counter() - start)
        median = statistics.median(times) if times else float("nan")
        entry = {"model": kind, "method": f"CLoRA ({steps} steps, refine at 3 steps)", "k": k,
                 "s_per_image": round(median, 3), "s_per_step": round(median / steps, 4),
                 "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2), "ratio": None,
                 "loss_first_last": [round(record.losses[0], 4), round(record.losses[-1], 4)],
                 "phase_s_last_image": {n: round(v, 3) for n, v in phases.items()}}
        results.append(entry)
        print(json.dumps(entry), flush=True)
        if partial:
            with open(partial, "a") as f:
                f.write(json.dumps(entry) + "\n")
    return results, layers
