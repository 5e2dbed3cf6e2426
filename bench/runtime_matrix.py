"""Every method of the pack on ComfyUI ≥ 0.33's GPU runtime: dynamic VRAM on/off, --lowvram, fp8 weights.

For each memory configuration (``runtime_boot.CONFIGS``) and model (full-size SD1.5 512² / SDXL 1024² UNets with
random fp16 weights, saved once as a .safetensors file and loaded through ``comfy.sd.load_diffusion_model``, as
ComfyUI's UNETLoader does, so the runtime picks the patcher a user gets), one fresh process runs:

    merged          stock KSampler path on the model with the LoRAs merged by ComfyUI's LoRA loader
    merged+graphs   the same merged model replayed through the pack's CUDA-graph wrapper (no LoRA of its own)
    on-the-fly      the pack's engine with all k LoRAs on every chunk
    switch / composite / cmlora / clora   the pack's methods (CLoRA: random variant conds, fixed token slots)

each eager (MULTILORA_CUDA_GRAPHS=0) and graphed, and records per run: seconds per image, peak
``torch.cuda.max_memory_allocated``, graph replays, the final latent's max |graphed − eager|, the loaded-model
count and the GPU/host memory held after the run (a second copy of the model would show in both), and the
fraction of the UNet resident on the GPU. The parent then compares each config's eager latents with the
``static`` config's (same method) and writes ``runtime-<stamp>.json`` and ``.md`` to --out.

Usage (GPU machine, ComfyUI 0.33 tree in $COMFYUI_PATH):
    python bench/runtime_matrix.py --out $OUT [--models sd15 sdxl] [--configs dynamic static ...] [--steps 10]
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from runtime_boot import CONFIGS  # noqa: E402

METHODS = ("merged", "merged+graphs", "on-the-fly", "switch", "composite", "cmlora", "clora")


def graph_replays(model) -> int | None:
    """Replays of the pack's CUDA-graph wrapper on ``model`` (None: the model has none)."""
    import comfy.patcher_extension
    found = model.wrappers.get(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, {}).get("multilora.onthefly", [])
    return sum(w.replays for w in found if hasattr(w, "replays")) if found else None


# --- worker: one config × one model in its own process --------------------------------------------------
def worker(config: str, kind: str, work: str, steps: int, k: int, reserve_gb: float | None, methods) -> None:
    from runtime_boot import boot
    ml = boot(config, reserve_gb)
    import psutil
    import torch

    import comfy.model_management as mm
    import comfy.sample
    import comfy.samplers
    import comfy.sd
    import comfy.utils
    import folder_paths

    from bench_models import conds
    folder_paths.add_model_folder_path("loras", os.path.join(work, "loras"), is_default=True)
    options = {"dtype": torch.float8_e4m3fn} if config.startswith("fp8") else {}
    patcher = comfy.sd.load_diffusion_model(os.path.join(work, f"{kind}_unet.safetensors"), model_options=options)
    names = sorted(os.listdir(os.path.join(work, "loras")))[:k]
    stack, engine_mod, methods_mod, cmlora, clora = (ml(n) for n in ("core.stack", "host.engine", "methods.switch_composite",
                                                                     "methods.cmlora", "methods.clora"))
    categories = ("character", "style", "clothing", "background")
    rows = tuple(stack.LoraRow(n, 0.8, category=categories[i % 4], concept=f"w{i}") for i, n in enumerate(names))
    size = 64 if kind == "sd15" else 128
    positive, negative = conds(kind)
    latent = torch.zeros(1, 4, size, size)
    noise = comfy.sample.prepare_noise(latent, 42)
    process = psutil.Process()

    def merged():
        model = patcher
        for n in names:
            sd = comfy.utils.load_torch_file(os.path.join(work, "loras", n), safe_load=True)
            model, _ = comfy.sd.load_lora_for_models(model, None, sd, 0.8, 0.0)
        return model

    def sample(model):
        return comfy.sample.sample(model, noise, steps, 7.0, "euler", "normal", positive, negative, latent,
                                   disable_pbar=True, seed=42)

    def sample_clora(model_and_engine):
        model, engine = model_and_engine
        gen = torch.Generator().manual_seed(3)
        variants = [clora.Variant("p", [[positive[0][0] + 0.1 * torch.randn(positive[0][0].shape, generator=gen),
                                         dict(positive[0][1])]], negative, {g: [2 + 2 * g] for g in range(k)})
                    for _ in range(k + 1)]
        settings = clora.CloraSettings(cfg=7.0, refine_iters=2)
        sigmas = comfy.samplers.KSampler(model, steps, model.load_device, "euler", "normal", 1.0).sigmas
        record = clora.CloraRecord([str(i) for i in range(k)], (size, size))
        guider = clora.CloraGuider(model, engine, variants, settings, record)
        return guider.sample(noise, latent, clora.clora_sampler("euler", steps, settings), sigmas,
                             disable_pbar=True, seed=42)

    def clora_model():
        engine = engine_mod.build_engine(patcher, rows, "bench")
        return engine_mod.clone_with_engine(patcher, engine), engine

    makers = {
        "merged": (merged, sample),
        "merged+graphs": (lambda: engine_mod.with_graph_replay(merged()), sample),
        "on-the-fly": (lambda: engine_mod.clone_with_engine(patcher, engine_mod.build_engine(patcher, rows, "bench")),
                       sample),
        "switch": (lambda: methods_mod.switch_model(patcher, rows, 2, "bench"), sample),
        "composite": (lambda: methods_mod.composite_model(patcher, rows, None, "bench"), sample),
        "cmlora": (lambda: cmlora.cmlora_model(patcher, rows, 0.55, False, "bench", cache=True), sample),
        "clora": (clora_model, sample_clora),
    }
    for method in methods:
        make, run = makers[method]
        eager_out = None
        for graphed in ((False,) if method == "merged" else (False, True)):
            os.environ["MULTILORA_CUDA_GRAPHS"] = "1" if graphed else "0"
            entry = {"config": config, "model": kind, "method": method, "graphs": graphed, "k": k, "steps": steps}
            try:
                mm.unload_all_models()
                mm.soft_empty_cache()
                torch.cuda.reset_peak_memory_stats()
                rss0 = process.memory_info().rss
                made = make()
                model = made[0] if isinstance(made, tuple) else made
                times, outs = [], []
                for _ in range(2):  # warm-up (graph capture), then one timed image
                    torch.cuda.synchronize()
                    start = time.perf_counter()
                    outs.append(run(made).float().cpu())
                    torch.cuda.synchronize()
                    times.append(time.perf_counter() - start)
                out = outs[-1]
                graph_state = graph_replays(model)
                entry.update(
                    s_per_image=round(times[-1], 4), first_image_s=round(times[0], 3),
                    peak_gb=round(torch.cuda.max_memory_allocated() / 2**30, 3),
                    allocated_after_gb=round(torch.cuda.memory_allocated() / 2**30, 3),
                    host_rss_growth_gb=round((process.memory_info().rss - rss0) / 2**30, 3),
                    loaded_models=len(mm.current_loaded_models), model_gb=round(patcher.model_size() / 2**30, 3),
                    resident_fraction=round(patcher.loaded_size() / max(patcher.model_size(), 1), 3),
                    patcher=type(patcher).__name__, graph_replays=graph_state, finite=bool(torch.isfinite(out).all()),
                    latent_max_abs=round(float(out.abs().max()), 3),
                    max_abs_diff_repeat=float((outs[1] - outs[0]).abs().max()))
                torch.save(out, os.path.join(work, f"latent-{config}-{kind}-{method}-{int(graphed)}.pt"))
                if graphed and eager_out is not None:
                    entry["max_abs_diff_graphs_vs_eager"] = float((out - eager_out).abs().max())
                eager_out = out if not graphed else eager_out
                del made, model
            except Exception as error:  # reported, not hidden: the matrix shows which config breaks
                import traceback
                entry["error"] = f"{type(error).__name__}: {error}"
                entry["traceback"] = traceback.format_exc()[-2000:]
            print("RESULT " + json.dumps(entry), flush=True)


# --- parent: files, one process per (config, model), comparison, report ---------------------------------
def prepare(work: str, kinds, k: int) -> None:
    """Random full-size UNets saved as diffusion-model files, and k kohya LoRAs per model family."""
    code = ("import sys; sys.path.insert(0, %r); from runtime_boot import boot; boot('static'); "
            "import torch, comfy.utils; from bench_models import build_unet, write_loras; "
            "from safetensors.torch import save_file; import os\n"
            "for kind in %r:\n"
            "    p = build_unet(kind); folder = os.path.join(%r, 'loras-' + kind); os.makedirs(folder, exist_ok=True)\n"
            "    write_loras(p, %d, folder)\n"
            "    sd = {k: v.contiguous() for k, v in p.model.diffusion_model.state_dict().items()}\n"
            "    save_file(sd, os.path.join(%r, kind + '_unet.safetensors'))\n") % (HERE, list(kinds), work, k, work)
    subprocess.run([sys.executable, "-c", code], check=True)


def reserve_for(kind: str) -> float:
    """--reserve-vram (GB) that leaves free about half the fp16 UNet plus room for inference."""
    import torch
    free, _ = torch.cuda.mem_get_info()
    room = {"sd15": 0.8 + 2.0, "sdxl": 2.4 + 6.0}[kind]
    return max(0.0, free / 2**30 - room)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--work", default="/tmp/multilora-runtime")
    parser.add_argument("--models", nargs="+", default=["sd15", "sdxl"])
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=CONFIGS)
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--timeout", type=int, default=400, help="seconds per (config, model) process")
    parser.add_argument("--jobs", type=int, default=1,
                        help="(config, model) processes at once on the GPU; >1 makes the timings indicative only")
    parser.add_argument("--process-per-method", action="store_true",
                        help="one process per (config, model, method) instead of per (config, model)")
    parser.add_argument("--worker", nargs=2, metavar=("CONFIG", "MODEL"), help=argparse.SUPPRESS)
    parser.add_argument("--reserve", type=float, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        work = os.path.join(args.work, args.worker[1])
        worker(args.worker[0], args.worker[1], work, args.steps, args.k, args.reserve, args.methods)
        return
    os.makedirs(args.out, exist_ok=True)
    started = time.perf_counter()
    for kind in args.models:
        work = os.path.join(args.work, kind)
        os.makedirs(work, exist_ok=True)
        if not os.path.exists(os.path.join(work, f"{kind}_unet.safetensors")):
            prepare(args.work, [kind], args.k)
            os.replace(os.path.join(args.work, f"{kind}_unet.safetensors"), os.path.join(work, f"{kind}_unet.safetensors"))
            os.replace(os.path.join(args.work, "loras-" + kind), os.path.join(work, "loras"))
    reserves = {kind: reserve_for(kind) for kind in args.models}

    # One process per task: CPU threads split between the processes that run at once (oversubscribed torch
    # threads, not the GPU, made three concurrent SDXL processes 3-4x slower).
    threads = str(max(1, (os.cpu_count() or 1) // args.jobs))
    env = dict(os.environ, OMP_NUM_THREADS=threads, MKL_NUM_THREADS=threads)

    def run_one(task):
        config, kind, methods = task
        command = [sys.executable, os.path.abspath(__file__), "--out", args.out, "--work", args.work,
                   "--worker", config, kind, "--steps", str(args.steps), "--k", str(args.k), "--methods", *methods]
        if config.startswith("lowvram"):
            command += ["--reserve", f"{reserves[kind]:.2f}"]
        t0 = time.perf_counter()
        try:
            done = subprocess.run(command, capture_output=True, text=True, timeout=args.timeout, env=env)
            output, code = done.stdout + done.stderr, done.returncode
        except subprocess.TimeoutExpired as timeout:
            output, code = (timeout.stdout or b"").decode() + (timeout.stderr or b"").decode(), "timeout"
        found = [json.loads(line[7:]) for line in output.splitlines() if line.startswith("RESULT ")]
        if code != 0:
            found.append({"config": config, "model": kind, "method": " ".join(methods), "error": f"process exit {code}",
                          "log_tail": output[-3000:]})
        print(f"{config} {kind} {' '.join(methods)}: {len(found)} rows, exit {code}, {time.perf_counter() - t0:.0f}s", flush=True)
        with open(os.path.join(args.out, "runtime-partial.jsonl"), "a") as f:
            for entry in found:
                f.write(json.dumps(entry) + "\n")
        return found

    groups = [(m,) for m in args.methods] if args.process_per_method else [tuple(args.methods)]
    tasks = [(config, kind, methods) for kind in args.models for config in args.configs for methods in groups]
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        results = [entry for found in pool.map(run_one, tasks) for entry in found]
    for kind in args.models:
        compare_to_static(results, os.path.join(args.work, kind), kind)
    write_report(results, args, time.perf_counter() - started)


def compare_to_static(results: list, work: str, kind: str) -> None:
    """Each row's max |latent − the static config's eager latent of the same method|."""
    import torch
    for entry in results:
        if entry.get("model") != kind or "error" in entry or "method" not in entry:
            continue
        ref = os.path.join(work, f"latent-static-{kind}-{entry['method']}-0.pt")
        mine = os.path.join(work, f"latent-{entry['config']}-{kind}-{entry['method']}-{int(entry['graphs'])}.pt")
        if os.path.exists(ref) and os.path.exists(mine):
            entry["max_abs_diff_vs_static_eager"] = float((torch.load(mine) - torch.load(ref)).abs().max())


def write_report(results: list, args, seconds: float) -> None:
    import torch
    stamp = time.strftime("%Y%m%d-%H%M%S")
    version = open(os.path.join(os.environ["COMFYUI_PATH"], "comfyui_version.py")).read().split('"')[1]
    meta = {"gpu": torch.cuda.get_device_name(0), "torch": torch.__version__, "comfyui": version,
            "steps": args.steps, "k": args.k, "jobs": args.jobs, "sampler": "euler/normal, cfg 7, seed 42",
            "seconds": round(seconds)}
    with open(os.path.join(args.out, f"runtime-{stamp}.json"), "w") as f:
        json.dump({"meta": meta, "results": results}, f, indent=2)
    lines = [f"GPU: {meta['gpu']} · torch {meta['torch']} · ComfyUI {version} · k = {args.k}, {args.steps} steps, "
             f"{meta['sampler']}; one timed image after a warm-up image, {args.jobs} process(es) at once", "",
             "| model | config | method | graphs | s/image | peak GB | GPU GB after | host RSS growth GB | loaded "
             "models | resident | graph replays | latent max abs | max abs diff: image 2 vs 1 | graphs vs eager | vs static "
             "eager | error |",
             "|" + "---|" * 16]

    def cell(e, key, digits=None):
        v = e.get(key)
        return "—" if v is None else (f"{v:.2g}" if digits == "g" else str(v))
    for e in results:
        lines.append(" | ".join(["", e.get("model", ""), e.get("config", ""), e.get("method", ""),
                                 "on" if e.get("graphs") else "off", cell(e, "s_per_image"), cell(e, "peak_gb"),
                                 cell(e, "allocated_after_gb"), cell(e, "host_rss_growth_gb"), cell(e, "loaded_models"),
                                 cell(e, "resident_fraction"), cell(e, "graph_replays"), cell(e, "latent_max_abs"),
                                 cell(e, "max_abs_diff_repeat", "g"), cell(e, "max_abs_diff_graphs_vs_eager", "g"),
                                 cell(e, "max_abs_diff_vs_static_eager", "g"),
                                 (e.get("error") or "")[:120].replace("|", "/"), ""]).strip())
    with open(os.path.join(args.out, f"runtime-{stamp}.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
