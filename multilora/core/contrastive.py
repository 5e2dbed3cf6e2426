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
    # The pair masks come from the group ids on the host: no device-to-host sync inside the loss.
    index: dict[Hashable, int] = {}
    labels = torch.tensor([index.setdefault(g, len(index)) for g in groups])
    eye = torch.eye(count, dtype=torch.bool)
    positive = (labels[:, None] == labels[None, :]) & ~eye
    pairs = int(positive.sum())
    if pairs == 0:
        return flat.sum() * 0.0
    unit = F.normalize(flat, dim=1, eps=eps)
    logits = (unit @ unit.T / temperature).masked_fill(eye.to(flat.device), float("-inf"))
    log_prob = logits - torch.logsumexp(logits, dim=1, keepdim=True)
    return -log_prob.masked_fill(~positive.to(flat.device), 0.0).sum() / pairs


def concept_contrastive_loss(maps_per_concept: Sequence[torch.Tensor], temperature: float = 0.5,
                             normalize: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """CLoRA loss: concept g's token maps ([T_g, H, W] or [T_g, HW]) form group g of ``nt_xent_loss``."""
    maps = [m.flatten(1) if m.ndim > 2 else m.reshape(1, -1) if m.ndim == 1 else m for m in maps_per_concept]
    stacked = torch.cat(maps, dim=0)
    if normalize:
        stacked = normalize_maps(stacked, eps)
    groups = [g for g, m in enumerate(maps) for _ in range(m.shape[0])]
    return nt_xent_loss(stacked, groups, temperature, eps)
