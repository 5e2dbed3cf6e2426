"""LoRA Switch and LoRA Composite on the on-the-fly engine (Zhong et al. 2024, arXiv 2402.16843).

- Switch: the engine's default routing activates only LoRA ⌊i/τ⌋ mod k at step i (every chunk of the
  call; or the released code's schedule, ``core.routing.switch_active_index``), so any sampler node samples
  it; weights never change.
- Composite: a keyed CALC_COND_BATCH wrapper turns the guider's m conds into m·k branches
  (cond j with only LoRA i), hands them to ComfyUI's own ``calc_cond_batch`` in one list so they batch
  into as few UNet calls as its memory check allows, and returns Σ_i w_i·branch_{j,i} per cond.
Host module.
"""
from __future__ import annotations

from typing import Sequence

import comfy.patcher_extension
import comfy.samplers

from ..core.errors import MultiLoRAError
from ..core.fusion import expand_conds, fuse_branches, normalized_weights
from ..core.routing import SWITCH_PAPER, SWITCH_SCHEDULES, ByCondIndex, SameForAll, SwitchRouting, one_hot
from ..core.stack import LoraRow
from ..host.engine import build_engine
from ..host.onthefly import ROUTING_KEY, OnTheFlyLoras

COMPOSITE_KEY = "multilora.composite"


def switch_model(model, rows: Sequence[LoraRow], switch_every: int, node: str, schedule: str = SWITCH_PAPER):
    """A clone of ``model`` that applies only LoRA ``switch_active_index(i, τ, k, schedule)`` at step i."""
    if int(switch_every) < 1:
        raise MultiLoRAError(f"{node}: 'switch_every' must be at least 1 (got {switch_every}).")
    if schedule not in SWITCH_SCHEDULES:
        raise MultiLoRAError(f"{node}: 'schedule' must be one of {', '.join(repr(s) for s in SWITCH_SCHEDULES)} "
                             f"(got {schedule!r}). Pick one of these.")
    engine = build_engine(model, rows, node, SwitchRouting(len(rows), int(switch_every), schedule=schedule))
    clone = model.clone()
    engine.install(clone)
    return clone


class CompositeBranches:
    """CALC_COND_BATCH wrapper: every cond evaluated once per LoRA, fused with weights w (sum 1)."""

    def __init__(self, engine: OnTheFlyLoras, weights: Sequence[float], batched: bool = True):
        self.engine = engine
        self.weights = tuple(weights)
        self.batched = batched  # False: one calc_cond_batch per LoRA, like the authors' code (benchmarks)
        self.calls = 0

    def routing_for(self, owners: list[tuple[int, int]]) -> ByCondIndex:
        count = self.engine.count
        return ByCondIndex({index: one_hot(i, count) for index, (_, i) in enumerate(owners)}, (0.0,) * count)

    def __call__(self, executor, model, conds, x_in, timestep, model_options):
        expanded, owners = expand_conds(conds, self.engine.count)
        options = dict(model_options)
        options["transformer_options"] = dict(model_options.get("transformer_options", {}))
        options["transformer_options"][ROUTING_KEY] = self.routing_for(owners)
        self.calls += 1
        if self.batched:
            outputs = executor(model, expanded, x_in, timestep, options)
            return fuse_branches(outputs, len(conds), self.weights)
        per_lora = []
        for i in range(self.engine.count):
            options["transformer_options"][ROUTING_KEY] = SameForAll(one_hot(i, self.engine.count), stable=False)
            per_lora.append(executor(model, list(conds), x_in, timestep, options))
        outputs = [per_lora[i][j] for j in range(len(conds)) for i in range(self.engine.count)]
        return fuse_branches(outputs, len(conds), self.weights)


def composite_model(model, rows: Sequence[LoraRow], weights: Sequence[float] | None, node: str,
                    batched: bool = True):
    """A clone of ``model`` whose every cond prediction is the weighted mean over single-LoRA branches."""
    fusion = normalized_weights(weights if weights is not None else [1.0] * len(rows), node)
    engine = build_engine(model, rows, node)
    clone = model.clone()
    engine.install(clone)
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.CALC_COND_BATCH, COMPOSITE_KEY,
                               CompositeBranches(engine, fusion, batched))
    return clone


class CompositeGuider(comfy.samplers.CFGGuider):
    """CFG guider over LoRA Composite predictions; usable with SamplerCustomAdvanced and any SAMPLER/SIGMAS."""

    def __init__(self, model_patcher, rows: Sequence[LoraRow], weights: Sequence[float] | None = None,
                 node: str = "LoRA Composite Guider"):
        super().__init__(composite_model(model_patcher, rows, weights, node))
