"""CPU-side cost of one CLoRA gradient pass and one fused step: a proxy, not a GPU timing.

On the GPU the CLoRA run is launch/CPU bound, so what matters is how much host work (ops dispatched, Python,
copies) one ``CloraGuider.update_latent`` iteration and one ``predict_noise`` step cost. This script builds a
UNet with the full SD1.5 block layout but narrow channels (``--channels``, 32 instead of 320), a narrow text
width (``--context``, 64 instead of 768) and a small latent, so arithmetic is cheap and the dispatch overhead
dominates as it does on the H200. The model is built and run under ``torch.inference_mode`` like ComfyUI's
executor (weights are inference tensors). Two random kohya rank-16 LoRAs on every transformer layer, three
variants (base + 2 concepts), the node's defaults (docs/algorithms.md §3).

Reports, over ``--repeats`` passes (one update iteration: forward + backward of the 3 conditional variants;
one fused 6-branch step), the median and minimum wall time and the median process CPU time, and, from one pass
under torch.profiler, the number of aten ops, of those that would launch a kernel on a GPU, and of the
copy-related ones. Times on a shared 2-core machine are noisy: compare op counts first, then the minima.

Usage (CPU, ~1 min): .venv/bin/python bench/profile_cpu_clora.py [--reference] [--json FILE]
``--reference`` runs the gradient pass the straightforward way (per-forward weight copies, full UNet calls) in
the current checkout, so before/after can be compared in one tree.
"""
from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import statistics
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, "testbed"))  # the one ComfyUI boot helper (never the repo root)

import bench_models  # noqa: E402  (sibling module; imports nothing heavy at module level)
from boot import boot_comfy  # noqa: E402  (testbed/boot.py)


def sd15_layout(channels: int, context: int) -> dict:
    """SD1.5's unet_config (blocks, depths, heads) with ``channels`` instead of 320 and ``context`` instead of 768."""
    return {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
            "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": channels,
            "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4],
            "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": context, "num_heads": 8,
            "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "use_temporal_attention": False,
            "use_temporal_resblock": False}


def build_model(channels: int, context: int):
    import torch

    import comfy.model_patcher
    import comfy.supported_models
    config = comfy.supported_models.SD15(sd15_layout(channels, context))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, "", device="cpu")
    bench_models.fill_random_(model, torch.Generator().manual_seed(0))
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=torch.device("cpu"), offload_device=torch.device("cpu"))


# aten ops that only make tensor metadata or allocate: no kernel on a GPU.
NO_KERNEL = {"aten::view", "aten::reshape", "aten::_reshape_alias", "aten::as_strided", "aten::t", "aten::transpose",
             "aten::expand", "aten::unsqueeze", "aten::squeeze", "aten::slice", "aten::select", "aten::empty",
             "aten::empty_strided", "aten::empty_like", "aten::set_", "aten::detach", "aten::alias", "aten::permute",
             "aten::_unsafe_view", "aten::flatten", "aten::lift_fresh", "aten::resolve_conj", "aten::resolve_neg",
             "aten::result_type", "aten::is_nonzero", "aten::split", "aten::chunk", "aten::unbind", "aten::narrow",
             "aten::resize_", "aten::detach_", "aten::requires_grad_", "aten::item", "aten::_local_scalar_dense",
             "aten::unflatten", "aten::view_as", "aten::contiguous", "aten::numpy_T", "aten::_has_compatible_shallow_copy_type"}


def op_counts(run) -> dict:
    """aten ops dispatched by ``run()`` (one profiled call): all of them, the leaf ops that would launch a kernel
    on a GPU (no aten children, not a view/allocation), and the copy-related ones."""
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        run()
    events = [e for e in prof.events() if e.name.startswith("aten::")]
    kernels = sum(1 for e in events if e.name not in NO_KERNEL
                  and not any(c.name.startswith("aten::") for c in e.cpu_children))
    counts = {e.key: e.count for e in prof.key_averages()}
    aten = {k: v for k, v in counts.items() if k.startswith("aten::")}
    picked = ("aten::copy_", "aten::to", "aten::_to_copy", "aten::clone", "aten::mm", "aten::addmm",
              "aten::convolution", "aten::set_")
    return {"aten_ops": sum(aten.values()), "kernel_like_ops": kernels, **{k: aten.get(k, 0) for k in picked}}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--channels", type=int, default=32)
    parser.add_argument("--latent", type=int, default=8, help="latent side (8 = a 64² image)")
    parser.add_argument("--context", type=int, default=64,
                        help="text width (768 in SD1.5; small here so the 77-token projections do not dominate)")
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--reference", action="store_true",
                        help="gradient pass the straightforward way: per-forward weight copies, full UNet calls")
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    ml = boot_comfy(("--use-pytorch-cross-attention",))  # SDPA, as on the GPU
    import torch

    import comfy.sample
    import comfy.samplers
    import folder_paths
    torch.set_num_threads(args.threads)
    clora = ml("methods.clora")
    if args.reference:
        import inspect
        if "share_weights" not in inspect.signature(clora.gradient_ready).parameters:
            raise SystemExit("--reference: this checkout has only the straightforward path; run without it")
        clora.gradient_ready = functools.partial(clora.gradient_ready, share_weights=False)
        clora.StopAfterCapture = lambda capture: (lambda executor, *a, **k: executor(*a, **k))
    folder = tempfile.mkdtemp(prefix="clora-profile-")
    folder_paths.add_model_folder_path("loras", folder, is_default=True)
    results = {}

    with torch.inference_mode():  # as ComfyUI's executor: the model's weights are inference tensors
        patcher = build_model(args.channels, args.context)
        names, _ = bench_models.write_loras(patcher, 2, folder)  # the GPU benchmark's LoRAs (fp16 factors)
        stack = ml("core.stack")
        rows = [stack.LoraRow(n, 0.8, concept=f"w{i}") for i, n in enumerate(names)]
        engine = ml("host.engine").build_engine(patcher, rows, "bench")
        clone = patcher.clone()
        engine.install(clone)
        gen = torch.Generator().manual_seed(3)
        negative = [[torch.randn(1, 77, args.context, generator=gen), {}]]
        variants = [clora.Variant("p", [[torch.randn(1, 77, args.context, generator=gen), {}]], negative, {0: [2], 1: [4]})
                    for _ in range(3)]
        settings = clora.CloraSettings(cfg=7.0)
        record = clora.CloraRecord(["a", "b"], (args.latent, args.latent))
        guider = clora.CloraGuider(clone, engine, variants, settings, record)

        def probe(model, x, sigmas, extra_args=None, callback=None, disable=None):
            options = extra_args["model_options"]
            sigma = sigmas[0:1].expand(x.shape[0])
            s_in = x.new_ones([x.shape[0]])

            def update():
                return guider.update_latent(x, sigma, 1, options)

            # clora_sampler keeps the gradient passes' weight aliases for the run (where this checkout has them)
            session = getattr(guider, "weight_aliases_kept", contextlib.nullcontext)

            def step():
                return model(x, sigmas[0] * s_in, **extra_args)

            with session():
                for name, run in (("update_latent_pass", update), ("predict_noise_step", step)):
                    run()  # warm-up
                    times, cpu = [], []
                    for _ in range(args.repeats):
                        start, start_cpu = time.perf_counter(), time.process_time()
                        run()
                        times.append(time.perf_counter() - start)
                        cpu.append(time.process_time() - start_cpu)
                    results[name] = {"median_ms": round(1000 * statistics.median(times), 1),
                                     "min_ms": round(1000 * min(times), 1),
                                     "cpu_median_ms": round(1000 * statistics.median(cpu), 1), **op_counts(run)}
            return x

        latent = torch.zeros(1, 4, args.latent, args.latent)
        sigmas = comfy.samplers.KSampler(clone, 50, "cpu", "euler", "normal", 1.0).sigmas
        guider.sample(comfy.sample.prepare_noise(latent, 42), latent, comfy.samplers.KSAMPLER(probe), sigmas,
                      disable_pbar=True, seed=42)

    out = {"torch": torch.__version__, "threads": args.threads, "channels": args.channels, "context": args.context,
           "latent": args.latent,
           "targeted_layers": len(engine.layers), "reference": args.reference, **results}
    print(json.dumps(out, indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(out, f, indent=1)


if __name__ == "__main__":
    main()
