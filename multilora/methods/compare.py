"""Run several composition methods from one stack, seed and settings; time them and tile the images.

Host module behind the Compare node: every method goes through the same code the method's own node uses.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Callable, Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw

import comfy.model_management

from ..core.errors import MultiLoRAError
from ..core.stack import LoraRow
from ..host.ksampler import ksample
from ..methods.clora import CloraSettings, clora_sample, encode
from ..methods.cmlora import cmlora_model
from ..methods.merge import merge_rows
from ..methods.switch_composite import composite_model, switch_model

METHODS = ("Merge", "LoRA Switch", "LoRA Composite", "CLoRA", "CMLoRA")


@dataclass
class MethodResult:
    method: str
    seconds: float | None
    peak_gb: float | None
    image: torch.Tensor | None  # [H, W, 3] in 0..1
    note: str = ""


def _peak_reset(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)


def _peak_read(device) -> float | None:
    if device.type != "cuda":
        return None
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) / 2**30


def run_methods(model, clip, vae, rows: Sequence[LoraRow], prompt: str, negative: str, seed: int, steps: int,
                cfg: float, sampler_name: str, scheduler: str, latent: dict, switch_every: int,
                methods: Sequence[str], node: str) -> list[MethodResult]:
    """Each selected method's first image, wall time and peak GPU memory (None on CPU)."""
    _, stack_clip = merge_rows(None, clip, rows, node)
    positive, negative_cond = encode(stack_clip, prompt), encode(stack_clip, negative)
    device = comfy.model_management.get_torch_device()

    def sampled(patched) -> dict:
        return ksample(patched, seed, steps, cfg, sampler_name, scheduler, positive, negative_cond, latent)

    def merge() -> dict:
        merged_model, merged_clip = merge_rows(model, clip, rows, node)
        return ksample(merged_model, seed, steps, cfg, sampler_name, scheduler, encode(merged_clip, prompt),
                       encode(merged_clip, negative), latent)

    runners: dict[str, Callable[[], dict]] = {
        "Merge": merge,
        "LoRA Switch": lambda: sampled(switch_model(model, rows, switch_every, node)),
        "LoRA Composite": lambda: sampled(composite_model(model, rows, None, node)),
        "CMLoRA": lambda: sampled(cmlora_model(model, rows, 0.55, False, node)),
        "CLoRA": lambda: clora_sample(model, clip, prompt, negative, rows, seed, steps, sampler_name, scheduler,
                                      latent, 1.0, CloraSettings(cfg=cfg))[0],
    }
    results = []
    for method in methods:
        comfy.model_management.throw_exception_if_processing_interrupted()
        _peak_reset(device)
        start = time.perf_counter()
        try:
            out = runners[method]()
        except MultiLoRAError as exc:  # one method's input problem must not hide the others' results
            results.append(MethodResult(method, None, None, None, f"skipped: {exc}"))
            continue
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds = time.perf_counter() - start
        peak = _peak_read(device)
        image = vae.decode(out["samples"][:1])
        image = image.reshape((-1,) + tuple(image.shape[-3:]))[0].detach().float().clamp(0, 1).cpu()
        results.append(MethodResult(method, seconds, peak, image))
    return results


def labelled_grid(results: Sequence[MethodResult]) -> torch.Tensor:
    """[1, H + band, W·n, 3] image: one tile per method with its name and time written above it."""
    shown = [r for r in results if r.image is not None]
    if not shown:
        raise MultiLoRAError("Compare: no method produced an image (see the table for why).")
    height, width = shown[0].image.shape[:2]
    band = 24
    canvas = Image.new("RGB", (width * len(results), height + band), (24, 24, 24))
    draw = ImageDraw.Draw(canvas)
    for i, result in enumerate(results):
        if result.image is not None:
            tile = Image.fromarray((result.image.numpy() * 255).round().astype(np.uint8))
            canvas.paste(tile.resize((width, height)), (i * width, band))
        label = result.method if result.seconds is None else f"{result.method} {result.seconds:.1f}s"
        draw.text((i * width + 4, 6), label, fill=(240, 240, 240))
    return torch.from_numpy(np.asarray(canvas).astype(np.float32) / 255.0)[None]


def results_table(results: Sequence[MethodResult]) -> str:
    """Markdown table of time and peak memory per method."""
    lines = ["| method | seconds | peak GPU GB | note |", "|---|---|---|---|"]
    for r in results:
        seconds = "—" if r.seconds is None else f"{r.seconds:.2f}"
        peak = "—" if r.peak_gb is None else f"{r.peak_gb:.2f}"
        lines.append(f"| {r.method} | {seconds} | {peak} | {r.note} |")
    return "\n".join(lines)
