"""Where a sampling run's time goes, step by step: the first steps (eager warm-up, CUDA-graph capture) against the
replayed ones, for ComfyUI's merged LoRAs replayed from graphs and the regional sampler (SDXL 1024²).

    python bench/step_times.py --out $OUT [--ks 2 4] [--steps 20] [--runs 3]

Same model, LoRAs, masks, conds and noise as ``regional_bench.py``. Each method samples ``--runs`` times with one
engine (as a user queueing the same workflow); the sampler's per-step callback records the time after a device
synchronisation, so each step's ms include its model call. Writes ``steps-<stamp>.json`` / ``.md``: per method and
run, the first step, the median of the later ones and the run's total, so a fixed per-run cost (capture) separates
from the per-step one.
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
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "testbed"))

from bench_models import build_unet, conds, write_loras  # noqa: E402
from boot import boot_comfy  # noqa: E402
from regional_bench import region_masks, sync  # noqa: E402
from run_bench import graphs  # noqa: E402


def timed_runs(model, steps: int, runs: int, size: int) -> list[list[float]]:
    import torch

    import comfy.sample
    positive, negative = conds("sdxl")
    latent = torch.zeros(1, 4, size, size)
    noise = comfy.sample.prepare_noise(latent, 42)
    out = []
    for _ in range(runs):
        marks = []

        def callback(step, x0, x, total):
            sync()
            marks.append(time.perf_counter())
        sync()
        start = time.perf_counter()
        comfy.sample.sample(model, noise, steps, 7.0, "euler", "normal", positive, negative, latent,
                            disable_pbar=True, seed=42, callback=callback)
        sync()
        times = [start] + marks
        out.append([round(1000 * (b - a), 2) for a, b in zip(times, times[1:])])
    return out


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--ks", nargs="+", type=int, default=[2, 4])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    ml = boot_comfy()
    import torch

    import comfy.sd
    import comfy.utils
    import folder_paths
    patcher = build_unet("sdxl")
    folder = tempfile.mkdtemp(prefix="steps-sdxl-")
    names, _ = write_loras(patcher, max(args.ks), folder)
    folder_paths.add_model_folder_path("loras", folder, is_default=True)
    stack, engine, regional = ml("core.stack"), ml("host.engine"), ml("methods.regional")
    results = []
    for k in args.ks:
        rows = [stack.LoraRow(n, 0.8) for n in names[:k]]

        def merged():
            model = patcher
            for n in names[:k]:
                sd = comfy.utils.load_torch_file(os.path.join(folder, n), safe_load=True)
                model, _ = comfy.sd.load_lora_for_models(model, None, sd, 0.8, 0.0)
            return engine.with_graph_replay(model)
        methods = (("merged + graph replay", merged),
                   ("regional, user masks, graphs", lambda: regional.regional_model(patcher, rows, region_masks(k, 128),
                                                                                    "bench")))
        for label, make in methods:
            with graphs(True):
                runs = timed_runs(make(), args.steps, args.runs, 128)
            for r, steps in enumerate(runs):
                entry = {"k": k, "method": label, "run": r + 1, "first_ms": steps[0],
                         "later_median_ms": statistics.median(steps[1:]), "total_s": round(sum(steps) / 1000, 4),
                         "steps_ms": steps}
                results.append(entry)
                print(json.dumps({key: v for key, v in entry.items() if key != "steps_ms"}), flush=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    with open(os.path.join(args.out, f"steps-{stamp}.json"), "w") as f:
        json.dump({"gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "CPU",
                   "torch": torch.__version__, "steps": args.steps, "results": results}, f, indent=1)
    lines = [f"SDXL 1024², euler/normal, cfg 7, {args.steps} steps, one engine per method over {args.runs} runs", "",
             "| k | method | run | first step ms | later steps, median ms | run s |", "|---|---|---|---|---|---|"]
    lines += [f"| {e['k']} | {e['method']} | {e['run']} | {e['first_ms']} | {e['later_median_ms']} | {e['total_s']} |"
              for e in results]
    with open(os.path.join(args.out, f"steps-{stamp}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
