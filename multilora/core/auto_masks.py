"""Automatic region masks for regional LoRA, from the attention of each row's concept tokens.

Phases (``AutoMaskPhases``), in sampling steps s = 0 … S−1 of the run's schedule:
- s < N (``auto_steps``): the rows with an automatic mask act everywhere (M_i ≡ 1, so those steps equal the
  on-the-fly stack) while the attention of their concept tokens to the image tokens is recorded and averaged;
- at the update points u_0 = N and u_j = N + j·M (``refresh_every`` M ≥ 1; M = 0: only u_0, the masks stay
  frozen) the masks are set from the attention recorded since the previous update: over steps 0 … N−1 for u_0,
  during step u_j − 1 (with the masks of the previous phase acting) for j ≥ 1.

Masks from attention (``concept_masks``), for concept i with token maps A_t ≥ 0 on the layer's grid:

    Â_t = (A_t − min A_t) / (max A_t − min A_t + ε)       per token, as CLoRA normalises (core.clora_masks)
    C_i = max_{t ∈ tokens(i)} Â_t                         a concept of several tokens covers each token's area
    M_i = [C_i ≥ λ] · [i = argmax_j C_j]                  λ = ``threshold`` ∈ [0, 1]

so a pixel belongs to at most one automatic row (the concept attending to it most, relative to its own peak)
and to none where every concept's attention is below λ of its peak: such gaps get only the rows without a
region (the region rule of ``core.regions``). [C_i ≥ λ] is CLoRA's threshold mask (the union over tokens of
[A_t ≥ λ·max A_t] on min-max normalised maps); λ = 0 makes the argmax a partition of the image. The masks are
then nearest-resized to the latent and go through ``normalize_regions`` (feather, overlaps with drawn masks).
Pure module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from .clora_masks import resize_masks
from .contrastive import normalize_maps
from .errors import InputError


@dataclass(frozen=True)
class AutoMaskPhases:
    """When attention is recorded and when masks are (re)set: ``auto_steps`` N ≥ 1, ``refresh_every`` M ≥ 0."""

    auto_steps: int = 3
    refresh_every: int = 0

    def __post_init__(self):
        if int(self.auto_steps) < 1:
            raise InputError(f"Regional LoRA: auto_steps must be at least 1, got {self.auto_steps}.")
        if int(self.refresh_every) < 0:
            raise InputError(f"Regional LoRA: refresh_every must be 0 (frozen) or more, got {self.refresh_every}.")

    def update_point(self, step: int) -> int | None:
        """The latest update point u ≤ ``step`` (None before the first, u_0 = N)."""
        n, m = int(self.auto_steps), int(self.refresh_every)
        if step < n:
            return None
        return n if m == 0 else n + (step - n) // m * m

    def records(self, step: int) -> bool:
        """Whether the attention of step ``step`` feeds the next update."""
        n, m = int(self.auto_steps), int(self.refresh_every)
        return step < n or (m > 0 and (step + 1 - n) % m == 0)


def concept_maps(token_maps: torch.Tensor, groups: Sequence[Sequence[int]], eps: float = 1e-8) -> torch.Tensor:
    """[B, T, h, w] token maps and the token columns of each concept → C [B, K, h, w] (module docstring)."""
    if token_maps.ndim != 4:
        raise ValueError(f"auto masks: token maps must be [B, T, h, w], got shape {tuple(token_maps.shape)}.")
    b, t, h, w = token_maps.shape
    normalised = normalize_maps(token_maps.float().reshape(b * t, h, w), eps).reshape(b, t, h, w)
    out = []
    for i, columns in enumerate(groups):
        if not columns:
            raise ValueError(f"auto masks: concept {i} has no token columns.")
        out.append(normalised[:, list(columns)].amax(dim=1))
    return torch.stack(out, dim=1)


def concept_masks(token_maps: torch.Tensor, groups: Sequence[Sequence[int]], threshold: float,
                  size: tuple[int, int] | None = None) -> torch.Tensor:
    """Float {0, 1} masks [B, K, H, W]: thresholded, argmax-disjoint concept maps, nearest-resized to ``size``."""
    lam = float(threshold)
    if not 0.0 <= lam <= 1.0:
        raise InputError(f"Regional LoRA: mask_threshold must be in [0, 1], got {threshold}.")
    c = concept_maps(token_maps, groups)
    winner = torch.nn.functional.one_hot(c.argmax(dim=1), c.shape[1]).permute(0, 3, 1, 2).bool()
    masks = (c >= lam) & winner
    if size is not None:
        masks = resize_masks(masks, size)
    return masks.float()
