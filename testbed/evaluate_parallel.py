"""Run the testbed evaluation as several `evaluate.py` processes at once on one GPU, then merge their results.

    python testbed/evaluate_parallel.py --out DIR [--arch unet|dit] [--weights W] [--max-seconds S]
    python testbed/evaluate_parallel.py --out DIR [--arch A] --merge-only   # merge DIR/job*/results.json again
    python testbed/evaluate_parallel.py --out DIR [--arch A] --only 2 4     # re-run jobs 2 and 4, then merge all

The testbed models are tiny (64×64 pixels as latents), so one sampling process leaves most of an H100/H200
idle: the time goes to kernel launches and Python. Independent (k, method) groups therefore run as separate
processes side by side, each with its own output folder ``DIR/jobN`` and log ``DIR/jobN.log``; every
process evaluates the same prompts and seeds it would evaluate alone (prompts depend on k only), so the
merged tables equal one sequential run up to GPU kernel non-determinism. The merge writes
``DIR/results.json``, ``DIR/results.md`` and ``DIR/sheet_k{k}.png`` (the jobs' sheet rows stacked in
method order).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))

_TRAINING_FREE = ["merge", "switch", "switch_authors", "composite", "cmlora"]
JOBS_BY_ARCH = {
    "unet": (
        ["--ks", "1", "2", "--methods", "base"] + _TRAINING_FREE,
        ["--ks", "3", "--methods"] + _TRAINING_FREE + ["--no-base"],
        ["--ks", "4", "--methods"] + _TRAINING_FREE[:2] + ["--no-base"],  # k = 4 of all five overruns one budget
        ["--ks", "4", "--methods"] + _TRAINING_FREE[2:] + ["--no-base"],
        ["--ks", "2", "3", "4", "--methods", "regional_oracle", "--no-base"],
        ["--ks", "2", "--methods", "regional_auto", "--no-base"],
        ["--ks", "3", "--methods", "regional_auto", "--no-base"],
        ["--ks", "4", "--methods", "regional_auto", "--no-base"],
        ["--ks", "2", "3", "--methods", "regional_oracle_no_text", "--no-base"],
        ["--ks", "2", "--methods", "clora", "--no-base"],
        ["--ks", "3", "--methods", "clora", "--no-base"],
        ["--ks", "4", "--methods", "clora", "--no-base"],
        ["--ks", "2", "--methods", "clora_authors", "--no-base"],
        ["--ks", "3", "--methods", "clora_authors", "--no-base"],
    ),
    "dit": (  # no CLoRA: a DiT has no cross-attention for it to read
        ["--ks", "1", "2", "--methods", "base"] + _TRAINING_FREE,
        ["--ks", "3", "--methods"] + _TRAINING_FREE + ["--no-base"],
        ["--ks", "4", "--methods"] + _TRAINING_FREE + ["--no-base"],
        ["--ks", "2", "3", "4", "--methods", "regional_oracle", "--no-base"],
        ["--ks", "2", "--methods", "regional_auto", "--no-base"],
        ["--ks", "3", "--methods", "regional_auto", "--no-base"],
        ["--ks", "4", "--methods", "regional_auto", "--no-base"],
        ["--ks", "2", "3", "--methods", "regional_oracle_no_text", "--no-base"],
    ),
}
JOBS = JOBS_BY_ARCH["unet"]
"""One evaluate.py process per entry. CLoRA (a backward pass per refinement iteration) is the slowest
method, so each k of it gets a process of its own; the regional rows are skipped, with a note in the job's
log, while the pack has no methods/regional.py."""


def run_jobs(out: str, weights: str | None, max_seconds: float, prompts: int, arch: str = "unet",
             only: list[int] | None = None) -> None:
    """``only``: the job indices to run (the others' DIR/jobN folders, from an earlier call, are merged as they are)."""
    env = dict(os.environ, OMP_NUM_THREADS="2", MKL_NUM_THREADS="2")
    procs = []
    for i, job in enumerate(JOBS_BY_ARCH[arch]):
        if only is not None and i not in only:
            continue
        argv = [sys.executable, os.path.join(HERE, "evaluate.py"), "--arch", arch, "--out", os.path.join(out, f"job{i}"),
                "--max-seconds", str(max_seconds), "--total-seconds", str(max_seconds), "--prompts", str(prompts)] + job
        if weights:
            argv += ["--weights", weights]
        log = open(os.path.join(out, f"job{i}.log"), "w")
        procs.append((subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env), log, argv))
    start = time.perf_counter()
    for proc, log, argv in procs:
        code = proc.wait()
        log.close()
        print(f"{time.perf_counter() - start:.0f}s exit {code}: {' '.join(argv[2:])}", flush=True)


def merge(out: str, jobs: int | None = None) -> dict:
    """The jobs' results.json → one results dict (methods of a k united, in job order)."""
    merged = {"meta": {"jobs": []}, "k": {}}
    for i in range(jobs or max(len(j) for j in JOBS_BY_ARCH.values())):
        path = os.path.join(out, f"job{i}", "results.json")
        if not os.path.exists(path):
            print(f"job{i}: no results.json (see job{i}.log)", flush=True)
            continue
        with open(path) as f:
            part = json.load(f)
        merged["meta"]["jobs"].append(part["meta"])
        for key in ("arch", "steps", "cfg", "seeds_per_prompt", "prompts_per_k", "sampler", "device"):
            merged["meta"].setdefault(key, part["meta"].get(key))
        if "base_caption_following" in part:
            merged["base_caption_following"] = part["base_caption_following"]
        for k, data in part["k"].items():
            entry = merged["k"].setdefault(k, {"prompts": data["prompts"], "methods": {}})
            if entry["prompts"] != data["prompts"]:
                raise ValueError(f"job{i}: k = {k} prompts differ from an earlier job's")
            entry["methods"].update(data["methods"])
    return merged


def stack_sheets(out: str, k: str) -> None:
    """DIR/job*/sheet_k{k}.png stacked top to bottom (white padding to the widest)."""
    from PIL import Image
    parts = [Image.open(p) for i in range(max(len(j) for j in JOBS_BY_ARCH.values()))
             if os.path.exists(p := os.path.join(out, f"job{i}", f"sheet_k{k}.png"))]
    if not parts:
        return
    sheet = Image.new("RGB", (max(p.width for p in parts), sum(p.height for p in parts)), "white")
    y = 0
    for part in parts:
        sheet.paste(part, (0, y))
        y += part.height
    sheet.save(os.path.join(out, f"sheet_k{k}.png"))


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", required=True)
    parser.add_argument("--weights")
    parser.add_argument("--arch", choices=tuple(JOBS_BY_ARCH), default="unet")
    parser.add_argument("--max-seconds", type=float, default=480, help="budget of every job")
    parser.add_argument("--prompts", type=int, default=40, help="prompts per k (a smaller number: smoke test)")
    parser.add_argument("--merge-only", action="store_true")
    parser.add_argument("--only", type=int, nargs="+", help="run only these job indices (re-runs), then merge all")
    args = parser.parse_args()
    os.makedirs(args.out, exist_ok=True)
    if not args.merge_only:
        run_jobs(args.out, args.weights, args.max_seconds, args.prompts, args.arch, args.only)
    sys.path.insert(0, HERE)
    from boot import boot_comfy
    boot_comfy()
    import eval_report
    from eval_core import ALL_METHODS as METHODS
    merged = merge(args.out)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(merged, f, indent=1)
    report = eval_report.markdown(merged, METHODS)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(report)
    for k in merged["k"]:
        stack_sheets(args.out, k)
    print(report, flush=True)


if __name__ == "__main__":
    main()
