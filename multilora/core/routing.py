"""Routing of batch chunks to LoRA sets.

ComfyUI concatenates the conds of one model call into one batch: chunk c holds the latents of cond
number ``cond_or_uncond[c]`` of the list the guider handed to ``calc_cond_batch``. A routing maps each
chunk to a weight per LoRA (0 = off), so one UNet call can evaluate several branches, each with its own
LoRA set: branch rows get Σ_i w_i·s_i·(α_i/r_i)·B_i(A_i x) added at every LoRA-targeted layer.

Also the step rule shared by the step-dependent methods: the step index of an evaluation at noise level σ
is floor-mapped into the run's sigma list, i(σ) = max{j : σ_j ≥ σ}, clipped to the last step; and LoRA
Switch's schedule (Zhong et al. 2024, arXiv 2402.16843): active = ⌊i/τ⌋ mod k, or the released code's
⌊max(i − 1, 0)/τ⌋ mod k (its first LoRA runs τ + 1 steps), τ ≥ 1.
Pure module: no ComfyUI imports.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Protocol, Sequence

from ..core.errors import InputError

Weights = tuple[float, ...]


def step_index(sigma: float, sample_sigmas: Sequence[float], rel_tol: float = 1e-5) -> int:
    """Floor-map σ into the decreasing schedule: max{j : σ_j ≥ σ}, clipped to [0, steps-1]."""
    steps = max(len(sample_sigmas) - 1, 1)
    index = 0
    for j, s in enumerate(sample_sigmas[:steps]):
        if float(s) >= sigma * (1.0 - rel_tol) - 1e-12:
            index = j
        else:
            break
    return min(index, steps - 1)


SWITCH_PAPER = "⌊i/τ⌋ mod k"
SWITCH_AUTHORS = "as the authors' code"
SWITCH_SCHEDULES = (SWITCH_PAPER, SWITCH_AUTHORS)


def switch_active_index(step: int, every: int, count: int, schedule: str = SWITCH_PAPER) -> int:
    """LoRA Switch (Zhong et al. 2024): the active LoRA at step i.

    ``SWITCH_PAPER``: ⌊i/τ⌋ mod k, every LoRA τ steps. ``SWITCH_AUTHORS``: the released code switches after
    step i when i > 0 and i mod τ = 0, so LoRA 0 runs steps 0..τ (τ + 1 steps) and the active LoRA is
    ⌊max(i − 1, 0)/τ⌋ mod k (the number of switches made before step i)."""
    if every < 1:
        raise InputError("switch_every must be >= 1")
    if schedule == SWITCH_PAPER:
        return (step // every) % count
    if schedule == SWITCH_AUTHORS:
        return (max(step - 1, 0) // every) % count
    raise InputError(f"switch schedule must be one of {list(SWITCH_SCHEDULES)}, got {schedule!r}")


def one_hot(index: int, count: int, value: float = 1.0) -> Weights:
    """Weights selecting only LoRA ``index`` of ``count``."""
    return tuple(value if i == index else 0.0 for i in range(count))


class Routing(Protocol):
    """Per-call routing: one weight vector (length k) per chunk of the batch."""

    def chunk_weights(self, cond_or_uncond: Sequence[int], transformer_options: Mapping) -> list[Weights]:
        ...


@dataclass(frozen=True)
class SameForAll:
    """Every chunk of every call gets the same LoRA weights (plain on-the-fly application).

    ``stable``: the vector stays the same over many calls, so the engine may merge it into the weights
    at once (False for routings that change every call)."""

    weights: Weights
    stable: bool = True

    def chunk_weights(self, cond_or_uncond: Sequence[int], transformer_options: Mapping) -> list[Weights]:
        return [self.weights] * len(cond_or_uncond)


@dataclass(frozen=True)
class ByCondIndex:
    """Chunk of cond index j gets ``table[j]``; unlisted indices get ``default`` (a guider's branches)."""

    table: Mapping[int, Weights]
    default: Weights

    def chunk_weights(self, cond_or_uncond: Sequence[int], transformer_options: Mapping) -> list[Weights]:
        return [self.table.get(int(j), self.default) for j in cond_or_uncond]


def sigma_of_call(transformer_options: Mapping) -> float | None:
    """The σ of the current model call, from ComfyUI's transformer_options (None outside sampling)."""
    sigmas = transformer_options.get("sigmas")
    if sigmas is None:
        return None
    try:
        return float(sigmas.flatten()[0])
    except AttributeError:
        return float(sigmas)


def sample_sigmas_of_call(transformer_options: Mapping) -> list[float] | None:
    """The run's sigma schedule from transformer_options, as floats (None outside sampling)."""
    sample_sigmas = transformer_options.get("sample_sigmas")
    if sample_sigmas is None:
        return None
    return [float(s) for s in sample_sigmas.flatten().tolist()]


@dataclass(frozen=True)
class SwitchRouting:
    """LoRA Switch: every chunk gets only the LoRA ``switch_active_index`` picks for the call's step i."""

    count: int
    every: int
    stable: bool = True  # one LoRA for τ steps: worth merging into the weights
    schedule: str = SWITCH_PAPER

    def active_for(self, transformer_options: Mapping) -> int:
        sigma = sigma_of_call(transformer_options)
        schedule = sample_sigmas_of_call(transformer_options)
        step = 0 if sigma is None or schedule is None else step_index(sigma, schedule)
        return switch_active_index(step, self.every, self.count, self.schedule)

    def chunk_weights(self, cond_or_uncond: Sequence[int], transformer_options: Mapping) -> list[Weights]:
        weights = one_hot(self.active_for(transformer_options), self.count)
        return [weights] * len(cond_or_uncond)
