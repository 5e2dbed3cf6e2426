"""Frequency profiling of single-LoRA images for CMLoRA (Zou et al. 2025, arXiv 2502.04923, §3).

The paper splits LoRAs into high- and low-frequency ones by the spectrum of images each LoRA produces
alone. For a grayscale image x (mean over channels) of size H×W:
    A(u, v) = log(1 + |shift(FFT2(x))(u, v)|),
    P(r)    = mean of A over the pixels whose distance from the centre (H//2, W//2) rounds to r,
              r = 0 … r_max (r_max = the largest such radius, i.e. the corner),
    P̂(r)    = P(r) / max_r P(r),
    score   = mean of P̂(r) over r ≥ 0.2·r_max.
The score lies in [0, 1]; a larger score means more energy away from the low frequencies. A batch
[B, H, W, C] scores the mean of its images' scores. Ranking and the above-median split are in
``cmlora_schedule.partition``. Pure module: no ComfyUI imports.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..core.errors import InputError, MultiLoRAError

HIGH_RADIUS_FRACTION = 0.2


def _grayscale_batch(image: torch.Tensor) -> torch.Tensor:
    """[H, W], [H, W, C] or [B, H, W, C] → [B, H, W] float64 (mean over channels)."""
    if image.dim() == 2:
        return image.to(torch.float64).unsqueeze(0)
    if image.dim() == 3:
        return image.to(torch.float64).mean(dim=-1).unsqueeze(0)
    if image.dim() == 4:
        return image.to(torch.float64).mean(dim=-1)
    raise InputError("LoRA Frequency Profile: image must be [H, W], [H, W, C] or [B, H, W, C], got shape "
                     f"{tuple(image.shape)}.")


def radial_profile(gray: torch.Tensor) -> torch.Tensor:
    """Radial average of log(1 + |shifted FFT|) of one [H, W] image over integer (rounded) radii 0..r_max."""
    height, width = gray.shape
    amplitude = torch.log1p(torch.fft.fftshift(torch.fft.fft2(gray)).abs())
    ys = torch.arange(height, dtype=torch.float64) - height // 2
    xs = torch.arange(width, dtype=torch.float64) - width // 2
    radius = torch.sqrt(ys[:, None] ** 2 + xs[None, :] ** 2).round().long().flatten()
    sums = torch.bincount(radius, weights=amplitude.flatten())
    counts = torch.bincount(radius)
    # Every radius up to the corner is hit for H, W ≥ 2, but guard the division anyway.
    return sums / counts.clamp(min=1)


def _score_one(gray: torch.Tensor) -> float:
    """Mean of the max-normalised radial profile at r ≥ 0.2·r_max (0 for an all-zero spectrum)."""
    profile = radial_profile(gray)
    peak = float(profile.max())
    if peak <= 0.0:
        return 0.0
    r_max = profile.numel() - 1
    start = int(torch.ceil(torch.tensor(HIGH_RADIUS_FRACTION * r_max, dtype=torch.float64)))
    return float((profile[start:] / peak).mean())


def high_frequency_score(image: torch.Tensor) -> float:
    """High-frequency score of an image (see the module docstring); in [0, 1], batch → mean over images."""
    batch = _grayscale_batch(image)
    if batch.shape[-2] < 2 or batch.shape[-1] < 2:
        raise InputError(f"LoRA Frequency Profile: image must be at least 2×2 pixels, got {tuple(batch.shape[-2:])}.")
    return sum(_score_one(g) for g in batch) / batch.shape[0]


def check_profile_images(images: torch.Tensor, labels: Sequence[str], node: str) -> None:
    """MultiLoRAError unless ``images`` is [B, H, W, C] with H, W ≥ 2 and the first len(labels) images finite."""
    if images.dim() != 4 or images.shape[1] < 2 or images.shape[2] < 2:
        raise MultiLoRAError(f"{node}: 'images' must be a batch of images at least 2×2 pixels, got shape "
                             f"{list(images.shape)}. Connect decoded images (VAE Decode), one per enabled row.")
    for i, label in enumerate(labels):
        if not bool(torch.isfinite(images[i]).all()):
            raise MultiLoRAError(f"{node}: image {i + 1} of 'images' (for '{label}') has NaN/Inf pixels and cannot "
                                 "be scored. Decode it again (an fp16 VAE can overflow: try an fp32 or fixed VAE) "
                                 "or regenerate that image.")
