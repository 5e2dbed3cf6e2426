"""Contrastive objective of CLoRA (Meral et al. 2024, "Contrastive Test-Time Composition of Multiple
LoRA Models for Image Generation", arXiv 2403.19776, §3.2).

The cross-attention maps of one concept's tokens (its concept word and trigger, from every prompt
variant) form a group; maps of the same group are pulled together and maps of different groups pushed
apart with the NT-Xent / InfoNCE loss of SimCLR over cosine similarities:

    S_ab    = cos(m_a, m_b) / τ
    ℓ(a, b) = −log( exp(S_ab) / Σ_{c ≠ a} exp(S_ac) )         for a ≠ b in the same group
    L       = mean of ℓ(a, b) over all ordered positive pairs (a, b)

The denominator runs over every other map (positives and negatives). Groups of one map contribute no
pair; with no positive pair at all L = 0 (still attached to the graph). τ > 0, default 0.5 (the paper's).
Maps are min-max normalised per map first, m ← (m − min m) / (max m − min m + ε), ε = 1e-8.
Pure module: no ComfyUI imports.
"""
from __future__ import annotations

from typing import Hashable, Sequence

import torch
import torch.nn.functional as F

from ..core.errors import InputError


def normalize_maps(maps: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Per-map min-max normalisation over all dims after the first ([N, H, W] or [N, HW])."""
    if maps.ndim < 2:
        raise ValueError(f"normalize_maps expects [N, H, W] or [N, HW] maps, got shape {tuple(maps.shape)}.")
    flat = maps.flatten(1)
    low = flat.amin(dim=1, keepdim=True)
    high = flat.amax(dim=1, keepdim=True)
    return ((flat - low) / (high - low + eps)).reshape(maps.shape)


def nt_xent_loss(maps: torch.Tensor, groups: Sequence[Hashable], temperature: float = 0.5,
                 eps: float = 1e-8) -> torch.Tensor:
    """NT-Xent (SimCLR InfoNCE) over cosine similarities, mean over ordered same-group pairs a ≠ b."""
    if temperature <= 0:
        raise InputError(f"CLoRA: temperature must be > 0, got {temperature}.")
    flat = maps.flatten(1) if maps.ndim > 2 else maps
    count = flat.shape[0]
    if len(groups) != count:
        raise ValueError(f"nt_xent_loss: {count} maps but {len(groups)} group ids.")
    # The pair count comes from the group ids on the host, and the pair masks are built on the device from
    # them (fills only): no device-to-host sync and no host-to-device copy inside the loss, so a CUDA graph
    # may record it.
    index: dict[Hashable, int] = {}
    ids = [index.setdefault(g, len(index)) for g in groups]
    sizes = [ids.count(i) for i in range(len(index))]
    pairs = sum(n * (n - 1) for n in sizes)
    if pairs == 0:
        return flat.sum() * 0.0
    labels = _labels_on(ids, flat.device)
    eye = torch.eye(count, dtype=torch.bool, device=flat.device)
    positive = (labels[:, None] == labels[None, :]) & ~eye
    unit = F.normalize(flat, dim=1, eps=eps)
    logits = (unit @ unit.T / temperature).masked_fill(eye, float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    return -log_prob.masked_fill(~positive, 0.0).sum() / pairs


def _labels_on(ids: Sequence[int], device: torch.device) -> torch.Tensor:
    """``ids`` as a device tensor made by one fill per run of equal ids (no host-to-device copy)."""
    runs: list[list[int]] = []
    for i in ids:
        if runs and runs[-1][0] == i:
            runs[-1][1] += 1
        else:
            runs.append([i, 1])
    return torch.cat([torch.full((n,), i, dtype=torch.long, device=device) for i, n in runs])


def concept_contrastive_loss(maps_per_concept: Sequence[torch.Tensor], temperature: float = 0.5,
                             normalize: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """CLoRA loss: concept g's token maps ([T_g, H, W] or [T_g, HW]) form group g of ``nt_xent_loss``."""
    maps = [m.flatten(1) if m.ndim > 2 else m.reshape(1, -1) if m.ndim == 1 else m for m in maps_per_concept]
    stacked = torch.cat(maps, dim=0)
    if normalize:
        stacked = normalize_maps(stacked, eps)
    groups = [g for g, m in enumerate(maps) for _ in range(m.shape[0])]
    return nt_xent_loss(stacked, groups, temperature, eps)
