"""Attention masks and masked fusion of CLoRA (Meral et al. 2024, arXiv 2403.19776, §3.3).

From concept i's normalised cross-attention maps A_t (one per token t of the concept, values ≥ 0):

    M_i = ⋃_t [ A_t ≥ λ · max A_t ],  with max A_t > 0          λ ∈ (0, 1]
    M_i = everything                                            λ = 0

nearest-resized to the latent size. The strict A > λ·max A would differ only on exact ties; the non-strict form
keeps both ends of the range meaningful: λ = 0 gives full masks (so CLoRA
with λ = 0 is Composite over all variants) and λ = 1 keeps each map's arg-max instead of nothing. An
all-zero map (max = 0) covers nothing for λ > 0.

Fusion of K variant predictions p_i with the base prediction p_0 (cond and uncond separately):

    p = Σ_i M_i p_i / Σ_i M_i     where Σ_i M_i > 0   (overlaps averaged)
    p = p_0                        elsewhere

Token maps arrive from attention as [B, HW, T] in row-major order of the layer's (H, W), H rows of W.
Also the mask preview: per-step map selection and an alpha-blended colour overlay.
Pure module: no ComfyUI imports.
"""
from __future__ import annotations

import colorsys
from typing import Sequence

import torch
import torch.nn.functional as F

from ..core.contrastive import normalize_maps
from ..core.errors import InputError

# Distinct colours for the first masks (Tableau 10); more are spread over hues by the golden angle.
_PALETTE: tuple[tuple[float, float, float], ...] = (
    (0.122, 0.467, 0.706), (1.000, 0.498, 0.055), (0.173, 0.627, 0.173), (0.839, 0.153, 0.157),
    (0.580, 0.404, 0.741), (0.549, 0.337, 0.294), (0.890, 0.467, 0.761), (0.498, 0.498, 0.498),
    (0.737, 0.741, 0.133), (0.090, 0.745, 0.812),
)


def check_threshold(threshold: float) -> float:
    """λ as a float, ValueError unless 0 ≤ λ ≤ 1."""
    value = float(threshold)
    if not 0.0 <= value <= 1.0:
        raise InputError(f"CLoRA: mask_threshold must be in [0, 1], got {threshold}.")
    return value


def reshape_tokens_to_map(attn: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Attention probabilities [B, HW, T] → token maps [B, T, H, W] (row-major: H rows of W)."""
    batch, pixels, tokens = attn.shape
    if pixels != height * width:
        raise ValueError(f"CLoRA: attention has {pixels} positions, the layer size {height}x{width} has "
                         f"{height * width}.")
    return attn.transpose(1, 2).reshape(batch, tokens, height, width)


def infer_layer_size(latent_size: tuple[int, int], pixels: int) -> tuple[int, int]:
    """(H, W) of a UNet level with ``pixels`` positions: latent size divided by 2^j, rounded up."""
    height, width = latent_size
    for level in range(8):
        h, w = -(-height // 2 ** level), -(-width // 2 ** level)
        if h * w == pixels:
            return h, w
    raise ValueError(f"CLoRA: no UNet level of a {height}x{width} latent has {pixels} positions.")


def threshold_masks(maps_per_concept: Sequence[torch.Tensor], threshold: float) -> torch.Tensor:
    """CLoRA masks: per concept, union over its maps [(B,) T_i, H, W] of [A ≥ λ·max A] → bool [(B,) K, H, W]."""
    lam = check_threshold(threshold)
    if not maps_per_concept:
        raise ValueError("CLoRA: no concept maps to threshold.")
    masks = []
    for i, maps in enumerate(maps_per_concept):
        if maps.ndim not in (3, 4) or maps.shape[-3] == 0:
            raise ValueError(f"CLoRA: concept {i} needs token maps [T, H, W] or [B, T, H, W] with T ≥ 1, "
                             f"got shape {tuple(maps.shape)}.")
        if lam == 0.0:
            masks.append(torch.ones(maps.shape[:-3] + maps.shape[-2:], dtype=torch.bool, device=maps.device))
            continue
        peak = maps.flatten(-2).amax(dim=-1)[..., None, None]
        hit = (maps >= lam * peak) & (peak > 0)
        masks.append(hit.any(dim=-3))
    return torch.stack(masks, dim=-3)


def resize_masks(masks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Nearest resize of [K, h, w] or [B, K, h, w] masks to (H, W), keeping the dtype."""
    height, width = int(size[0]), int(size[1])
    if tuple(masks.shape[-2:]) == (height, width):
        return masks.clone()
    lead = masks.shape[:-2]
    flat = masks.reshape(1, -1, *masks.shape[-2:]).float()
    # "nearest-exact" samples pixel centres, so a non-integer scale does not shift masks up-left.
    out = F.interpolate(flat, size=(height, width), mode="nearest-exact")
    out = out.reshape(*lead, height, width)
    return out > 0.5 if masks.dtype == torch.bool else out.to(masks.dtype)


def masks_from_maps(maps_per_concept: Sequence[torch.Tensor], threshold: float, size: tuple[int, int],
                    normalize: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Per-token min-max normalisation, thresholding and nearest resize to ``size`` → bool masks."""
    if normalize:
        maps_per_concept = [normalize_maps(m.flatten(0, -3), eps).reshape(m.shape) for m in maps_per_concept]
    return resize_masks(threshold_masks(maps_per_concept, threshold), size)


def fuse_with_masks(base_pred: torch.Tensor, preds: Sequence[torch.Tensor], masks: torch.Tensor) -> torch.Tensor:
    """Masked fusion: Σ M_i p_i / Σ M_i where some mask covers, the base prediction elsewhere."""
    count = len(preds)
    if masks.ndim not in (3, 4) or masks.shape[-3] != count:
        raise ValueError(f"CLoRA: {count} predictions need masks [K, H, W] or [B, K, H, W] with K = {count}, "
                         f"got shape {tuple(masks.shape)}.")
    if tuple(masks.shape[-2:]) != tuple(base_pred.shape[-2:]):
        raise ValueError(f"CLoRA: masks of size {tuple(masks.shape[-2:])} do not match predictions of size "
                         f"{tuple(base_pred.shape[-2:])}; resize them first.")
    if masks.ndim == 4 and masks.shape[0] not in (1, base_pred.shape[0]):
        raise ValueError(f"CLoRA: masks for {masks.shape[0]} samples, predictions for {base_pred.shape[0]}.")
    weights = masks.to(device=base_pred.device, dtype=base_pred.dtype)
    weights = weights.unsqueeze(0) if weights.ndim == 3 else weights  # [B or 1, K, H, W]
    total = weights.sum(dim=1, keepdim=True)  # [B or 1, 1, H, W]
    fused = torch.zeros_like(base_pred)
    for i, pred in enumerate(preds):
        fused = fused + weights[:, i:i + 1] * pred
    covered = total > 0
    return torch.where(covered, fused / torch.where(covered, total, torch.ones_like(total)), base_pred)


def maps_at_step(per_step: Sequence[Sequence[torch.Tensor]], step: int | None) -> list[torch.Tensor]:
    """Stored per-step concept maps at one step (negative counts from the end), or averaged when None."""
    count = len(per_step)
    if count == 0:
        raise InputError("CLoRA Mask Preview: the run stored no attention maps (no sampling step ran, e.g. denoise 0). "
                         "Sample with denoise > 0.")
    if step is None:
        return [torch.stack([maps[i] for maps in per_step]).mean(dim=0) for i in range(len(per_step[0]))]
    if not -count <= step < count:
        raise InputError(f"CLoRA Mask Preview: step {step} is out of range, the run stored {count} steps "
                         f"(0 to {count - 1}). Pick a step in that range.")
    return list(per_step[step])


def default_colors(count: int) -> list[tuple[float, float, float]]:
    """``count`` distinct RGB colours in 0..1: Tableau 10, then golden-angle hues."""
    colors = list(_PALETTE[:count])
    for j in range(len(colors), count):
        hue = (j * 0.618033988749895) % 1.0
        colors.append(colorsys.hsv_to_rgb(hue, 0.75, 0.95))
    return colors


def overlay(image: torch.Tensor, masks: torch.Tensor,
            colors: Sequence[Sequence[float]] | torch.Tensor | None = None, alpha: float = 0.5) -> torch.Tensor:
    """Alpha blend one colour per mask over an image [H, W, 3] or [B, H, W, 3]; overlaps mix colours."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"overlay: alpha must be in [0, 1], got {alpha}.")
    count = masks.shape[-3]
    palette = torch.as_tensor(default_colors(count) if colors is None else colors,
                              dtype=image.dtype, device=image.device).reshape(-1, 3)
    if palette.shape[0] < count:
        raise ValueError(f"overlay: {count} masks but only {palette.shape[0]} colours.")
    weights = resize_masks(masks, tuple(image.shape[-3:-1])).to(device=image.device, dtype=image.dtype)
    weights = weights.movedim(-3, -1)  # [..., H, W, K]
    total = weights.sum(dim=-1, keepdim=True)
    mixed = weights @ palette[:count] / total.clamp_min(1e-12)
    coverage = alpha * total.clamp(max=1.0)
    return (image * (1 - coverage) + mixed * coverage).clamp(0.0, 1.0)
