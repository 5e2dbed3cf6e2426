"""Prediction fusion of LoRA Composite (Zhong et al. 2024, arXiv 2402.16843, §3.2).

Every step, each LoRA i alone gives a conditional c_i and an unconditional u_i prediction; the fused
prediction is ε = Σ_i w_i u_i + w·(Σ_i w_i c_i − Σ_i w_i u_i) with Σ w_i = 1 (uniform by default), which
equals the w-weighted mean of the per-LoRA CFG results because CFG is linear. Fusion is done per cond
*before* guidance, so any guider (CFG, Perp-Neg, DualCFG) and any multistep sampler sees fused
predictions. Pure module.
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..core.errors import InputError


def normalized_weights(weights: Sequence[float], node: str) -> tuple[float, ...]:
    """Fusion weights scaled to sum 1; all must be ≥ 0 and at least one > 0."""
    values = [float(w) for w in weights]
    if any(w < 0 for w in values) or sum(values) <= 0:
        raise InputError(f"{node}: fusion weights must be >= 0 with a positive sum, got {values}.")
    total = sum(values)
    return tuple(w / total for w in values)


def expand_conds(conds: Sequence[object], count: int) -> tuple[list[object], list[tuple[int, int]]]:
    """Branch list for ``count`` LoRAs: entry j·k + i is cond j with LoRA i (None conds stay None)."""
    expanded: list[object] = []
    owners: list[tuple[int, int]] = []
    for j, cond in enumerate(conds):
        for i in range(count):
            expanded.append(cond)
            owners.append((j, i))
    return expanded, owners


def fuse_branches(outputs: Sequence[torch.Tensor], conds: int, weights: Sequence[float]) -> list[torch.Tensor]:
    """Per cond j: Σ_i w_i · outputs[j·k + i] (ComfyUI returns zeros for a None cond; they stay zeros)."""
    count = len(weights)
    fused: list[torch.Tensor] = []
    for j in range(conds):
        branch = outputs[j * count:(j + 1) * count]
        total = branch[0] * weights[0]
        for i in range(1, count):
            total = total + branch[i] * weights[i]
        fused.append(total)
    return fused
