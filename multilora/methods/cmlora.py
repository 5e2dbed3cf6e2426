"""CMLoRA (Zou et al. 2025, arXiv 2502.04923) on the on-the-fly engine (docs/algorithms.md §4).

Every step is a LoRA Composite over all k LoRAs whose fusion weights follow the frequency-ordered plan of
``cmlora_schedule``: the dominant LoRA (round-robin over the high-frequency set until g·N, then over the
low set first) weighs (k−0.5)/(2k−1.5), every other LoRA 1/(2k−1.5). The step of a model evaluation is
floor-mapped from its σ into the run's schedule (docs/algorithms.md §0). With ``cache`` on, ``feature_cache`` lets
non-refreshed branches reuse their deep UNet feature (UNet models; DiTs run without the cache). ``cache`` None
("auto") picks it per model family from the measurements (docs/benchmarking.md, testbed/README.md): on for
SDXL, where the shallow path is 0.10 of a UNet call and the cache cuts CMLoRA k = 4 from 1.01× to 0.39×
Composite's time; off for SD1.x/SD2.x and the rest, where the shallow path is about half the UNet, the saving
is about a quarter (1.05–1.08× → 0.79× Composite) and the stale deep features double the images' leftover
grain on the testbed. Host module.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import comfy.patcher_extension
import comfy.supported_models

from ..core.cmlora_schedule import cmlora_plan
from ..core.errors import InputError, StackError
from ..core.routing import sample_sigmas_of_call, sigma_of_call, step_index
from ..core.stack import LoraRow
from ..host.engine import build_engine
from ..host.feature_cache import FeatureCache, plan_lookup
from ..methods.switch_composite import COMPOSITE_KEY, CompositeBranches

CACHE_KEY = "multilora.feature_cache"
CACHE_AUTO, CACHE_ON, CACHE_OFF = "auto", "on", "off"
CACHE_CHOICES = (CACHE_AUTO, CACHE_ON, CACHE_OFF)


def cache_by_family(model) -> bool:
    """The feature cache's "auto" setting for ``model``: on for SDXL-family UNets only (the measured saving)."""
    return isinstance(getattr(model.model, "model_config", None), comfy.supported_models.SDXL)


def resolve_cache(model, cache: bool | str | None) -> bool:
    """``cache`` as on/off: a bool as given, "on"/"off", or None/"auto" by model family."""
    if cache is None or cache == CACHE_AUTO:
        return cache_by_family(model)
    return cache is True or cache == CACHE_ON


class DominantWeightedBranches(CompositeBranches):
    """Composite branches fused with the CMLoRA weights of the current step."""

    def __init__(self, engine, categories: Sequence[str], scores: Sequence[float] | None, switch: float):
        super().__init__(engine, (1.0 / engine.count,) * engine.count)
        self.categories = list(categories)
        self.scores = scores
        self.switch = switch
        self._plans: dict[int, list] = {}
        self.dominants: list[int] = []

    def plan(self, steps: int) -> list:
        """The run's StepPlan list (cached per step count)."""
        plan = self._plans.get(steps)
        if plan is None:
            plan = cmlora_plan(steps, self.categories, self.scores, self.switch)
            self._plans = {steps: plan}
        return plan

    def weights_for(self, transformer_options: Mapping) -> tuple[float, ...]:
        schedule = sample_sigmas_of_call(transformer_options)
        sigma = sigma_of_call(transformer_options)
        if schedule is None or sigma is None:
            return self.weights
        entry = self.plan(len(schedule) - 1)[step_index(sigma, schedule)]
        self.dominants.append(entry.dominant)
        return tuple(entry.weights)

    def __call__(self, executor, model, conds, x_in, timestep, model_options):
        options = dict(model_options.get("transformer_options", {}))
        options.setdefault("sigmas", timestep)
        self.weights = self.weights_for(options)
        return super().__call__(executor, model, conds, x_in, timestep, model_options)


def cmlora_model(model, rows: Sequence[LoraRow], switch: float, use_scores: bool, node: str,
                 cache: bool | str | None = None):
    """A clone of ``model`` sampling with CMLoRA's dominant-weighted Composite, with or without the cache
    (``resolve_cache``: None or "auto" by model family)."""
    if not 0.0 <= switch <= 1.0:
        raise InputError(f"{node}: 'stage_switch' must be in [0, 1], got {switch}.")
    scores = None
    if use_scores:
        scores = [row.hf_score for row in rows]
        if any(s is None for s in scores):
            missing = next(r.name for r in rows if r.hf_score is None)
            raise StackError(f"{node}: ordering 'profiled scores' needs a score for every row; '{missing}' has "
                             "none. Run the stack through 'LoRA Frequency Profile' first or order by categories.")
    engine = build_engine(model, rows, node)
    clone = model.clone()
    engine.install(clone)
    branches = DominantWeightedBranches(engine, [r.category for r in rows], scores, switch)
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, COMPOSITE_KEY, branches)
    if resolve_cache(model, cache) and hasattr(model.model.diffusion_model, "input_blocks"):
        clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, CACHE_KEY,
                                   FeatureCache(engine, plan_lookup(branches), engine.count))
    return clone
