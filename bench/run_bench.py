"""GPU benchmark (BENCH.md): every method of the pack against ComfyUI's merged-LoRA KSampler, one run.

Builds full-size SD1.5 (512²) and/or SDXL (1024²) UNets inside ComfyUI from their configs with random fp16
weights, writes random kohya LoRAs of realistic shape (rank 16 on attn q/k/v/out, feed-forward and
proj_in/out of every transformer block), and times, per method and k: wall seconds per image (median of
--repeats after one warm-up), seconds per step and peak torch.cuda.max_memory_allocated. The baseline is
comfy.sample.sample on the model with the same k LoRAs merged by ComfyUI's LoraLoader path.
Usage (GPU machine): python bench/run_bench.py --models sd15 sdxl --out $OUT
"""
from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "testbed"))  # the one ComfyUI boot helper (never the repo root)

from boot import boot_comfy  # noqa: E402

SD15 = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
        "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4],
        "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "use_temporal_attention": False,
        "use_temporal_resblock": False}
SDXL = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
        "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
        "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
        "context_dim": 2048, "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
        "use_temporal_attention": False, "use_temporal_resblock": False}
LORA_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")


def fill_random_(model, gen) -> None:
    """Random weights that keep activations O(1): N(0, 1/fan_in) matrices, N(0, 0.02²) biases, unit scales."""
    import torch
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, 1 / math.sqrt(p[0].numel()), generator=gen)
            elif name.endswith("bias"):
                p.normal_(0, 0.02, generator=gen)
            else:
                p.fill_(1.0)


def build_unet(kind: str):
    import torch
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    config = comfy.supported_models.SD15(dict(SD15)) if kind == "sd15" else comfy.supported_models.SDXL(dict(SDXL))
    config.set_inference_dtype(torch.float16, None)
    device = comfy.model_management.get_torch_device()
    model = config.get_model({}, "", device=device)
    fill_random_(model, torch.Generator(device=device).manual_seed(0))
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def write_loras(patcher, count: int, folder: str, rank: int = 16) -> list[str]:
    import torch
    from safetensors.torch import save_file
    state = patcher.model.state_dict()
    keys = [k for k in state if k.endswith(".weight") and (
        any(f".{t}.weight" in k for t in LORA_TARGETS) and "transformer_blocks" in k or k.endswith(("proj_in.weight", "proj_out.weight")))]
    names = []
    for i in range(count):
        gen = torch.Generator().manual_seed(100 + i)
        tensors = {}
        for key in keys:
            w = state[key]
            out_f, in_f = w.shape[0], w.shape[1]
            base = "lora_unet_" + key[len("diffusion_model."):-len(".weight")].replace(".", "_")
            extra = (1, 1) if w.ndim == 4 else ()
            tensors[f"{base}.lora_down.weight"] = (torch.randn((rank, in_f) + extra, generator=gen) / math.sqrt(in_f)).half()
            tensors[f"{base}.lora_up.weight"] = (torch.randn((out_f, rank) + extra, generator=gen) * 0.05 / math.sqrt(rank)).half()
            tensors[f"{base}.alpha"] = torch.tensor(float(rank))
        name = f"bench_{i}.safetensors"
        save_file(tensors, os.path.join(folder, name))
        names.append(name)
    return names, len(keys)


def conds(kind: str):
    import torch
    gen = torch.Generator().manual_seed(1)
    if kind == "sd15":
        return ([[torch.randn(1, 77, 768, generator=gen), {}]], [[torch.randn(1, 77, 768, generator=gen), {}]])
    extra = lambda: {"pooled_output": torch.randn(1, 1280, generator=gen), "width": 1024, "height": 1024}
    return ([[torch.randn(1, 77, 2048, generator=gen), extra()]], [[torch.randn(1, 77, 2048, generator=gen), extra()]])


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
        comfy.sample.sample(model, noise, steps, 7.0, "euler", "normal", positive, negative, latent,
                            disable_pbar=True, seed=42)
        torch.cuda.synchronize()
        if r > 0:
            times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return {"s_per_image": round(median, 4), "s_per_step": round(median / steps, 5),
            "peak_gb": round(torch.cuda.max_memory_allocated() / 2**30, 2)}


def run_model(kind, ml, steps, repeats, ks, folder, partial=None, sequential_ks=(2, 4), with_cmlora=True):
    import comfy.sd
    import comfy.utils
    import comfy.model_management
    import folder_paths
    t0 = time.perf_counter()
    patcher = build_unet(kind)
    names, layers = write_loras(patcher, max(ks), folder)
    print(f"built {kind} and {len(names)} LoRAs in {time.perf_counter() - t0:.1f}s", flush=True)
    folder_paths.add_model_folder_path("loras", folder, is_default=True)
    stack = ml("stack")
    methods = ml("methods")
    engine = ml("engine")
    cmlora = ml("cmlora")
    categories = ("character", "clothing", "style", "background", "object")
    results = []

    def rows(k):
        return tuple(stack.LoraRow(n, 0.8) for n in names[:k])

    def merged(k):
        model = patcher
        for n in names[:k]:
            model, _ = comfy.sd.load_lora_for_models(model, None, comfy.utils.load_torch_file(
                os.path.join(folder, n), safe_load=True), 0.8, 0.0)
        return model

    def record(method, k, make):
        comfy.model_management.unload_all_models()
        entry = {"model": kind, "method": method, "k": k, **time_method(make, kind, steps, repeats)}
        results.append(entry)
        print(json.dumps(entry), flush=True)
        if partial:
            with open(partial, "a") as f:
                f.write(json.dumps(entry) + "\n")
        return entry

    plain = record("plain KSampler (no LoRA)", 0, lambda: patcher)
    for k in ks:
        base = record("merged KSampler (baseline)", k, lambda: merged(k))
        if k == 1:
            e = record("on-the-fly, all LoRAs", 1, lambda: engine.clone_with_engine(patcher, engine.build_engine(patcher, rows(1), "bench")))
            e["ratio"] = round(e["s_per_image"] / base["s_per_image"], 3)
            continue
        for method, make in (("LoRA Switch", lambda: methods.switch_model(patcher, rows(k), 5, "bench")),
                             ("LoRA Composite", lambda: methods.composite_model(patcher, rows(k), None, "bench")),
                             ("LoRA Composite, sequential branches", lambda: methods.composite_model(patcher, rows(k), None, "bench", batched=False))):
            if "sequential" in method and k not in sequential_ks:
                continue
            e = record(method, k, make)
            e["ratio"] = round(e["s_per_image"] / base["s_per_image"], 3)
        if with_cmlora:
            cm_rows = tuple(stack.LoraRow(n, 0.8, category=categories[i % len(categories)]) for i, n in enumerate(names[:k]))
            for method, cache in (("CMLoRA (feature cache)", True), ("CMLoRA (no cache)", False)):
                e = record(method, k, lambda: cmlora.cmlora_model(patcher, cm_rows, 0.5, False, "bench", cache=cache))
                e["ratio"] = round(e["s_per_image"] / base["s_per_image"], 3)
    for e in results:
        if e["method"].startswith("merged"):
            e["ratio"] = 1.0
    plain["ratio"] = None
    return results, layers


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
    """CLoRA with k concept LoRAs, random variant conds (token positions fixed), SPEC defaults."""
    import torch
    import comfy.model_management
    import comfy.sample
    import comfy.samplers
    import folder_paths
    clora = ml("clora")
    patcher = build_unet(kind)
    names, layers = write_loras(patcher, max(ks), folder)
    folder_paths.add_model_folder_path("loras", folder, is_default=True)
    stack = ml("stack")
    size = 64 if kind == "sd15" else 128
    positive, negative = conds(kind)
    results = []
    for k in ks:
        rows = [stack.LoraRow(n, 0.8, concept=f"w{i}") for i, n in enumerate(names[:k])]
        engine = ml("engine").build_engine(patcher, rows, "bench")
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


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", nargs="+", default=["sd15", "sdxl"])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--ks", nargs="+", type=int, default=[1, 2, 4, 8])
    parser.add_argument("--out", default=os.path.join(REPO, "bench", "results"))
    parser.add_argument("--clora", action="store_true", help="time CLoRA (50 steps by default) instead")
    parser.add_argument("--profile", action="store_true", help="CLoRA: also profile one extra image (torch.profiler)")
    parser.add_argument("--no-cmlora", action="store_true", help="skip the CMLoRA rows")
    parser.add_argument("--sequential-ks", nargs="*", type=int, default=[2, 4],
                        help="k values at which Composite also runs with one UNet call per LoRA")
    args = parser.parse_args()
    ml = boot_comfy()
    import torch
    import comfyui_version
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
                                        not args.no_cmlora)
        meta[f"{kind}_lora_layers"] = layers
        all_results += results
    os.makedirs(args.out, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with open(os.path.join(args.out, f"bench-{stamp}.json"), "w") as f:
        json.dump({"meta": meta, "results": all_results}, f, indent=2)
    lines = [f"GPU: {meta['gpu']} · torch {meta['torch']} · ComfyUI {meta['comfyui']} · {args.steps} steps, "
             f"{meta['sampler']}, median of {args.repeats} after warm-up", "",
             "| model | method | k | s/image | s/step | peak GB | ratio to merged (same k) |", "|---|---|---|---|---|---|---|"]
    for e in all_results:
        lines.append(f"| {e['model']} | {e['method']} | {e['k']} | {e['s_per_image']} | {e['s_per_step']} | "
                     f"{e['peak_gb']} | {e['ratio'] if e['ratio'] is not None else '—'} |")
    with open(os.path.join(args.out, f"bench-{stamp}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
