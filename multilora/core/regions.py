"""Regions of a regional LoRA stack, and the per-token LoRA weights they give every layer.

Regional LoRA applies LoRA i only where its subject is. With the fused low-rank form of ``lowrank``, the
per-token version of a layer y = W x + b over tokens t is

    y_t = W x_t + b + B_cat · (m_t ⊙ (A_cat x_t)),   m_t[col] = w_{lora(col)} · M_{lora(col)}(t)

where w_i is LoRA i's routing weight of the batch row and M_i(t) ∈ [0, 1] its region at token t, resized to
the layer's token grid (area average of the latent-resolution mask). Rows without a region have M_i ≡ 1: they
act everywhere (style, a background LoRA). With every M_i ≡ 1 this is exactly the on-the-fly stack.

Region rule (``normalize_regions``), on the latent grid:
- each mask is resized to the latent (area average), clipped to [0, 1] and optionally feathered (Gaussian
  blur of σ = ``feather`` latent pixels);
- overlaps: where the regional masks sum to more than 1 they are divided by that sum, so two subjects share
  a pixel instead of both LoRAs acting at full strength (Σ_i M_i(t) ≤ 1 over regional rows);
- gaps: where no regional mask covers a pixel, only the rows without a region act there (plus the base).

Text tokens (the prompt's keys/values on a UNet, the text stream of a joint-attention DiT) have no place in the
image; ``text_tokens`` decides what they get: every LoRA (``TEXT_ALL``), only the rows without a region
(``TEXT_NONE``), or each regional row on its own concept words (``TEXT_CONCEPT``): on the positive prompt's rows,
a token of row i's concept words gets no other regional LoRA,

    w_{n,t,j} = w_{n,j} · [n is not positive, or t ∉ ∪_{i regional, i ≠ j} P_i, or t ∈ P_j],

with P_i the token positions of row i's words; every other token, and the negative prompt, gets every LoRA.

Token grids: a layer whose input has N tokens of a latent H × W works at the grid (⌈H/s⌉, ⌈W/s⌉) whose area is
N, for the downsampling s of that layer (UNet levels s = 1, 2, 4, 8; a DiT's patch s = 2). Pure module.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch
import torch.nn.functional as F

from .errors import MultiLoRAError

GRID_FACTORS = (1, 2, 4, 8, 16, 32, 64)
TEXT_ALL = "every LoRA"
TEXT_NONE = "no LoRA"
TEXT_CONCEPT = "each LoRA on its words"
TEXT_POLICIES = (TEXT_ALL, TEXT_NONE, TEXT_CONCEPT)


class RegionError(MultiLoRAError):
    """A region mask that cannot be used (empty, wrong shape, not finite)."""


@dataclass(frozen=True)
class RegionPlan:
    """Regions on the latent grid: ``maps`` [Bm, k, H, W] (1 for rows without a region), ``regional[i]`` whether
    row i has a region, and what ``normalize_regions`` had to change (for the node's message)."""

    maps: torch.Tensor
    regional: tuple[bool, ...]
    notes: tuple[str, ...] = ()

    @property
    def latent_size(self) -> tuple[int, int]:
        return int(self.maps.shape[-2]), int(self.maps.shape[-1])


def _as_batch_hw(mask: torch.Tensor, node: str, row: int) -> torch.Tensor:
    """A ComfyUI MASK ([H, W] or [B, H, W]) as float [B, 1, H, W] on the CPU (masks found from attention arrive on
    the sampling device; the plan is built on the CPU and the router copies it to each layer's device)."""
    if not isinstance(mask, torch.Tensor) or mask.ndim not in (2, 3):
        shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
        raise RegionError(f"{node}: the mask of row {row} has shape {shape}; connect a MASK ([H, W] or [B, H, W]).")
    mask = mask.detach().float().cpu()
    if not bool(torch.isfinite(mask).all()):
        raise RegionError(f"{node}: the mask of row {row} has NaN or infinite values; connect a mask with values "
                          "in [0, 1].")
    return (mask[None] if mask.ndim == 2 else mask)[:, None]


def gaussian_blur(maps: torch.Tensor, sigma: float) -> torch.Tensor:
    """Separable Gaussian blur of [B, C, H, W] maps with σ = ``sigma`` pixels (replicate padding)."""
    if sigma <= 0:
        return maps
    radius = max(1, int(math.ceil(3 * sigma)))
    x = torch.arange(-radius, radius + 1, dtype=maps.dtype, device=maps.device)
    kernel = torch.exp(-0.5 * (x / sigma) ** 2)
    kernel = kernel / kernel.sum()
    c = maps.shape[1]
    out = F.pad(maps, (radius, radius, 0, 0), mode="replicate")
    out = F.conv2d(out, kernel.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    out = F.pad(out, (0, 0, radius, radius), mode="replicate")
    return F.conv2d(out, kernel.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def normalize_regions(masks: Sequence[torch.Tensor | None], latent_size: tuple[int, int], node: str,
                      feather: float = 0.0, names: Sequence[str] | None = None) -> RegionPlan:
    """Masks (one per stack row, None = everywhere) → the region plan on the latent grid (rule in the module
    docstring). Raises RegionError naming the row for a mask that is empty after resizing."""
    h, w = latent_size
    notes = []
    resized, batch = [], 1
    for i, mask in enumerate(masks):
        if mask is None:
            resized.append(None)
            continue
        m = _as_batch_hw(mask, node, i + 1)
        if tuple(m.shape[-2:]) != (h, w):
            notes.append(f"the mask of row {i + 1} is {m.shape[-1]}×{m.shape[-2]}; resized to the latent's {w}×{h}")
            m = F.adaptive_avg_pool2d(m, (h, w)) if m.shape[-2] >= h and m.shape[-1] >= w else \
                F.interpolate(m, size=(h, w), mode="bilinear", align_corners=False)
        m = gaussian_blur(m.clamp(0.0, 1.0), feather).clamp(0.0, 1.0)
        if float(m.amax()) <= 1e-3:
            label = f"row {i + 1}" + (f" ({names[i]})" if names else "")
            raise RegionError(f"{node}: the mask of {label} is empty at the latent's {w}×{h}; paint the region "
                              "where this LoRA's subject goes, or disconnect the mask to apply the LoRA everywhere.")
        if batch != 1 and m.shape[0] not in (1, batch):
            raise RegionError(f"{node}: the masks have batch sizes {batch} and {m.shape[0]}; use one mask per "
                              "image or the same number of masks on every row.")
        batch = max(batch, m.shape[0])
        resized.append(m)
    regional = tuple(m is not None for m in resized)
    maps = torch.ones(batch, len(masks), h, w)
    if any(regional):
        stacked = torch.cat([m.expand(batch, 1, h, w) for m in resized if m is not None], dim=1)
        total = stacked.sum(1, keepdim=True)
        if float(total.amax()) > 1.0 + 1e-6:
            notes.append("overlapping regions share their pixels (each divided by the masks' sum there)")
        stacked = stacked / total.clamp(min=1.0)
        index = [i for i, r in enumerate(regional) if r]
        maps[:, index] = stacked
    return RegionPlan(maps, regional, tuple(notes))


def token_grid(tokens: int, latent_size: tuple[int, int], factors: Sequence[int] = GRID_FACTORS
               ) -> tuple[int, int] | None:
    """The (h, w) = (⌈H/s⌉, ⌈W/s⌉) with h·w = ``tokens`` for the smallest listed s, or None."""
    h, w = latent_size
    for s in factors:
        gh, gw = -(-h // s), -(-w // s)
        if gh * gw == tokens:
            return gh, gw
    return None


def maps_on_grid(maps: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """[Bm, k, H, W] region maps area-averaged to [Bm, k, h, w] (ceil-divided grids keep every pixel)."""
    if tuple(maps.shape[-2:]) == tuple(grid):
        return maps
    return F.adaptive_avg_pool2d(maps, grid)


def spatial_weights(row_weights: torch.Tensor, grid_maps: torch.Tensor) -> torch.Tensor:
    """[B, k, h, w] weights w_{n,i}·M_i for a conv layer; row n takes map ``n mod Bm`` (chunks of a call repeat
    the images in order)."""
    b, bm = row_weights.shape[0], grid_maps.shape[0]
    maps = grid_maps if bm == b else grid_maps.repeat(b // bm, 1, 1, 1)
    return row_weights[:, :, None, None] * maps


def area_weights(row_weights: torch.Tensor, grid_maps: torch.Tensor) -> torch.Tensor:
    """[B, k] weights w_{n,i}·mean_t M_i(t): each LoRA by its share of the image grid (tokens that stand for no
    pixel, such as a DiT's image pad tokens); all-one maps give the row weights exactly."""
    b, bm = row_weights.shape[0], grid_maps.shape[0]
    share = grid_maps.mean(dim=(-2, -1))
    return row_weights * (share if bm == b else share.repeat(b // bm, 1))


def token_weights(row_weights: torch.Tensor, grid_maps: torch.Tensor, prefix: int = 0, suffix: int = 0,
                  prefix_weights: torch.Tensor | None = None, suffix_weights: torch.Tensor | None = None
                  ) -> torch.Tensor:
    """[B, prefix + h·w + suffix, k] weights for a token layer: w_{n,i}·M_i(t) on the image grid tokens (row-major
    as the models flatten them), ``prefix_weights`` ([B, k], default the row weights, or [B, prefix, k] per token)
    on ``prefix`` text tokens before them, and ``suffix_weights`` ([B, k], default the row weights) on ``suffix``
    extra tokens after them (reference-image tokens, image pad tokens)."""
    b, k = row_weights.shape
    image = spatial_weights(row_weights, grid_maps).flatten(2).transpose(1, 2)
    parts = []
    if prefix:
        head = row_weights if prefix_weights is None else prefix_weights
        parts.append(head if head.ndim == 3 else head[:, None, :].expand(b, prefix, k))
    parts.append(image)
    if suffix:
        tail = row_weights if suffix_weights is None else suffix_weights
        parts.append(tail[:, None, :].expand(b, suffix, k))
    return torch.cat(parts, dim=1) if len(parts) > 1 else image


def text_weights(row_weights: torch.Tensor, regional: Sequence[bool], policy: str) -> torch.Tensor:
    """[B, k] weights on text tokens: every LoRA (``TEXT_ALL``) or only the rows without a region (``TEXT_NONE``);
    ``TEXT_CONCEPT`` is per token (``concept_text_weights``)."""
    if policy == TEXT_ALL:
        return row_weights
    if policy == TEXT_NONE:
        keep = torch.tensor([0.0 if r else 1.0 for r in regional], dtype=row_weights.dtype, device=row_weights.device)
        return row_weights * keep
    raise RegionError(f"text token policy must be one of {list(TEXT_POLICIES)}, got {policy!r}")


def concept_keep(tokens: int, k: int, regional: Sequence[bool], positions: dict[int, Sequence[int]]) -> torch.Tensor:
    """[tokens, k] float 0/1 (CPU): which LoRA acts on which text token of the positive prompt under
    ``TEXT_CONCEPT`` (formula in the module docstring); ``positions[i]`` = the token positions of row i's concept
    words, positions past ``tokens`` ignored (a shorter context)."""
    keep = torch.ones(tokens, k)
    own = {i: {int(p) for p in ps if 0 <= int(p) < tokens} for i, ps in positions.items() if regional[i]}
    for i, ps in own.items():
        for j in own:
            if j != i:
                for t in ps - own[j]:
                    keep[t, j] = 0.0
    return keep


def concept_text_weights(row_weights: torch.Tensor, keep: torch.Tensor, positive: torch.Tensor) -> torch.Tensor:
    """[B, tokens, k] weights on text tokens under ``TEXT_CONCEPT``: ``keep`` ([tokens, k], ``concept_keep``, on
    the weights' device) on the batch rows of the positive prompt (``positive`` [B] bool), every LoRA elsewhere."""
    b = row_weights.shape[0]
    mask = torch.where(positive.view(b, 1, 1), keep.unsqueeze(0), torch.ones_like(keep)[None])
    return row_weights[:, None, :] * mask
