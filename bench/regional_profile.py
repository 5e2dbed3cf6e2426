"""Where the regional sampler's extra GPU time goes on SDXL 1024²: torch.profiler over eager sampling.

    python bench/regional_profile.py --out $OUT [--model sdxl] [--k 2] [--steps 4]

Profiles (eager, after a warm-up) ComfyUI's merged-LoRA sampler and the regional sampler with user masks on the
same model, noise and k random rank-16 LoRAs as ``regional_bench.py``, and writes per method the table of aten
ops by their own CUDA time (``profile-<model>-k<k>.md``), so the difference between the two tables is the routing's
cost per op kind (the down/up projections of linear and conv LoRA layers, the mask products). Eager, not replayed:
a replayed graph shows as one launch in the profiler, but it runs the same kernels.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "testbed"))

from bench_models import build_unet, conds, write_loras  # noqa: E402
from boot import boot_comfy  # noqa: E402
from regional_bench import region_masks, sync  # noqa: E402
from run_bench import graphs  # noqa: E402


def profile(model, kind, steps, size):
    import torch

    import comfy.sample
    positive, negative = conds(kind)
    latent = torch.zeros(1, 4, size, size)
    noise = comfy.sample.prepare_noise(latent, 42)

    def once():
        comfy.sample.sample(model, noise, steps, 7.0, "euler", "simple", positive, negative, latent,
                            disable_pbar=True, seed=42)
        sync()
    once()
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=activities) as prof:
        once()
    return prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=25)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--model", default="sdxl", choices=["sd15", "sdxl"])
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--steps", type=int, default=4)
    args = parser.parse_args()
    ml = boot_comfy()
    import comfy.sd
    import comfy.utils
    import folder_paths
    patcher = build_unet(args.model)
    folder = tempfile.mkdtemp(prefix="regional-profile-")
    names, _ = write_loras(patcher, args.k, folder)
    folder_paths.add_model_folder_path("loras", folder, is_default=True)
    rows = [ml("core.stack").LoraRow(n, 0.8) for n in names]

    def merged():
        model = patcher
        for n in names:
            sd = comfy.utils.load_torch_file(os.path.join(folder, n), safe_load=True)
            model, _ = comfy.sd.load_lora_for_models(model, None, sd, 0.8, 0.0)
        return model
    size = 128
    masks = region_masks(args.k, size)
    parts = [f"# {args.model} 1024², k = {args.k}, {args.steps} steps, eager: aten ops by self CUDA time", ""]
    for label, make in (("merged (ComfyUI)", merged),
                        ("regional, user masks", lambda: ml("methods.regional").regional_model(
                            patcher, rows, masks, "bench"))):
        with graphs(False):
            table = profile(make(), args.model, args.steps, size)
        parts += [f"## {label}", "", "```", table, "```", ""]
        print(f"## {label}\n{table}", flush=True)
    with open(os.path.join(args.out, f"profile-{args.model}-k{args.k}.md"), "w") as f:
        f.write("\n".join(parts))


if __name__ == "__main__":
    main()
