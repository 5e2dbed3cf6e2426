"""Step plan of CMLoRA (Zou et al. 2025, "Cached Multi-LoRA Composition", arXiv 2502.04923).

Partition. The k LoRAs of a stack are split into a high-frequency set H and a low-frequency set L (the
paper's FFT finding: character, clothing, style and object LoRAs add mostly high-frequency detail, a
background LoRA mostly low-frequency layout). "other" is not a category of the paper; it is put in H,
because a LoRA of unknown content is more likely a subject/detail LoRA than a layout one. With profiling
scores s_i (``frequency_profile.high_frequency_score``) the split is by score instead:
H = {i : s_i > median(s)}, L = the rest — a score equal to the median goes to L. Either set may be empty.

Cache refresh steps (non-uniform, interval c(i) depending on the position of step i in a run of T steps):
    r_0 = 0,  r_{n+1} = r_n + c(r_n),  c(i) = 2 if i < 0.375·T, 3 if i < 0.875·T, else 2,
kept while r_n < T. Step 0 is always a refresh.

Dominant LoRA. It changes only at refresh steps. At the n-th refresh step r with r < g·T (g = ``switch``,
default 0.55, range [0, 1]) it is H[n mod |H|]; at the m-th refresh step with r ≥ g·T (m counted from 0
again) it is (L ++ H)[m mod |L ++ H|], so the second stage starts with the first low-frequency LoRA.
If H is empty the first stage rotates over L (and the second over L ++ H = L); if L is empty the second
stage rotates over H.

Weights of the k LoRA predictions at every step (sum 1, Composite-style fusion):
    w_dominant = (k − 0.5)/(2k − 1.5),  w_other = 1/(2k − 1.5);  k = 1 → [1].
Pure module: no ComfyUI imports.
"""
from __future__ import annotations

import statistics
from dataclasses import dataclass
from typing import Sequence

from ..core.errors import InputError, StackError

HIGH_FREQUENCY_CATEGORIES: tuple[str, ...] = ("character", "clothing", "style", "object")
LOW_FREQUENCY_CATEGORIES: tuple[str, ...] = ("background",)
# Not in the paper; treated as high frequency (see the module docstring).
OTHER_CATEGORY = "other"

DEFAULT_SWITCH = 0.55
EARLY_FRACTION = 0.375
LATE_FRACTION = 0.875


@dataclass(frozen=True)
class StepPlan:
    """What CMLoRA does at one sampling step: refresh the cache?, which LoRA dominates, fusion weights."""

    step: int
    refresh: bool
    dominant: int
    weights: tuple[float, ...]


def _category_is_high(category: str) -> bool:
    """True for H categories and "other", False for L categories; ValueError for anything else."""
    name = category.strip().lower()
    if name in HIGH_FREQUENCY_CATEGORIES or name == OTHER_CATEGORY:
        return True
    if name in LOW_FREQUENCY_CATEGORIES:
        return False
    known = ", ".join(HIGH_FREQUENCY_CATEGORIES + LOW_FREQUENCY_CATEGORIES + (OTHER_CATEGORY,))
    raise StackError(f"CMLoRA: category '{category}' is not one of {known}. Pick one of those in the LoRA Stack.")


def partition(categories: Sequence[str],
              scores: Sequence[float | None] | None = None) -> tuple[list[int], list[int]]:
    """Split LoRA indices into (H, L) in stack order: by score above the median if every score is set, else by
    category."""
    count = len(categories)
    if scores is not None and len(scores) != count:
        raise StackError(f"CMLoRA: {len(scores)} frequency scores for {count} LoRAs. Give one score per LoRA.")
    if scores is not None and count > 0 and all(s is not None for s in scores):
        values = [float(s) for s in scores]
        median = statistics.median(values)
        high = [i for i, s in enumerate(values) if s > median]
    else:
        high = [i for i, c in enumerate(categories) if _category_is_high(c)]
    high_set = set(high)
    return high, [i for i in range(count) if i not in high_set]


def refresh_steps(steps: int) -> list[int]:
    """Non-uniform cache refresh steps: from 0, interval 2 before 37.5% of the run, 3 before 87.5%, then 2.

    The rule is the walk ``i = 0; while i < steps: emit i; i += c(i)`` with c(i) = 2 if i < 0.375·steps,
    3 if i < 0.875·steps, else 2 (the interval is chosen by the step it starts from). Examples:
      20 steps → [0, 2, 4, 6, 8, 11, 14, 17]
      50 steps → [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20, 23, 26, 29, 32, 35, 38, 41, 44, 46, 48]
    """
    if steps < 0:
        raise InputError(f"CMLoRA: steps must be >= 0, got {steps}.")
    out: list[int] = []
    i = 0
    while i < steps:
        out.append(i)
        if i < EARLY_FRACTION * steps:
            i += 2
        elif i < LATE_FRACTION * steps:
            i += 3
        else:
            i += 2
    return out


def dominant_sequence(steps: int, high: Sequence[int], low: Sequence[int],
                      switch: float = DEFAULT_SWITCH) -> list[int]:
    """Dominant LoRA per step: round-robin over H at refresh steps before switch·steps, then over L ++ H."""
    if not 0.0 <= switch <= 1.0:
        raise InputError(f"CMLoRA: switch fraction must be in [0, 1], got {switch}.")
    high, low = list(high), list(low)
    if not high and not low:
        raise StackError("CMLoRA: no LoRA to make dominant; both the high and the low set are empty.")
    first_stage = high or low
    second_stage = low + high
    refresh = set(refresh_steps(steps))
    boundary = switch * steps
    out: list[int] = []
    current = first_stage[0]
    first_count = second_count = 0
    for step in range(steps):
        if step in refresh:
            if step < boundary:
                current = first_stage[first_count % len(first_stage)]
                first_count += 1
            else:
                current = second_stage[second_count % len(second_stage)]
                second_count += 1
        out.append(current)
    return out


def lora_weights(count: int, dominant: int) -> list[float]:
    """CMLoRA fusion weights: dominant (k − 0.5)/(2k − 1.5), every other LoRA 1/(2k − 1.5)."""
    if count < 1:
        raise StackError(f"CMLoRA: needs at least 1 LoRA, got {count}.")
    if not 0 <= dominant < count:
        raise ValueError(f"CMLoRA: dominant LoRA index {dominant} is outside 0..{count - 1}.")
    if count == 1:
        return [1.0]
    denominator = 2.0 * count - 1.5
    other = 1.0 / denominator
    return [(count - 0.5) / denominator if i == dominant else other for i in range(count)]


def cmlora_plan(steps: int, categories: Sequence[str], scores: Sequence[float | None] | None = None,
                switch: float = DEFAULT_SWITCH) -> list[StepPlan]:
    """Full CMLoRA plan: partition, refresh schedule, dominant LoRA and fusion weights for every step."""
    count = len(categories)
    if count < 1:
        raise StackError("CMLoRA: the LoRA stack has no enabled LoRA. Enable at least one row.")
    high, low = partition(categories, scores)
    refresh = set(refresh_steps(steps))
    dominants = dominant_sequence(steps, high, low, switch)
    return [StepPlan(step, step in refresh, d, tuple(lora_weights(count, d))) for step, d in enumerate(dominants)]
