"""The on-the-fly multi-LoRA engine: forward hooks that add routed low-rank deltas, installed per run.

``OnTheFlyLoras`` holds the fused per-layer deltas of a stack (see ``lowrank``). ``install`` puts two keyed
ModelPatcher wrappers on a *clone* of the user's model:

- OUTER_SAMPLE: registers one forward hook per targeted layer when sampling starts and removes them in
  ``finally`` (normal end, Cancel, exceptions), so the shared module is clean after every run;
- APPLY_MODEL: turns ``transformer_options["cond_or_uncond"]`` and the routing found under
  ``transformer_options[ROUTING_KEY]`` (or the engine's default) into per-row LoRA weights for that call.

Weights are never touched: switching or mixing LoRAs only changes routing. Host module.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Mapping, Sequence

import torch

import comfy.patcher_extension
import comfy.utils

from .lowrank import LayerDeltas, apply_layer_deltas
from .routing import Routing, SameForAll

log = logging.getLogger("multilora")

WRAPPER_KEY = "multilora.onthefly"
ROUTING_KEY = "multilora.routing"


class OnTheFlyLoras:
    """Fused deltas of k LoRAs over a model's layers, with per-call routing state."""

    def __init__(self, layers: dict[str, LayerDeltas], names: Sequence[str], default_routing: Routing | None = None):
        self.layers = layers
        self.names = tuple(names)
        self.count = len(self.names)
        self.default_routing: Routing = default_routing or SameForAll((1.0,) * self.count)
        self._rows: torch.Tensor | None = None
        self._active: frozenset[int] = frozenset()
        self._rows_cast: dict = {}
        self._attached = 0
        self.calls = 0

    # --- routing state for the current model call ---------------------------------------------------
    def row_weights_for(self, chunk_weights: Sequence[Sequence[float]], batch: int) -> torch.Tensor:
        """[batch, k] CPU weights: chunk c's vector repeated over its batch // chunks rows."""
        chunks = len(chunk_weights)
        if chunks == 0 or batch % chunks != 0:
            raise RuntimeError(f"multilora: batch {batch} does not split into {chunks} chunks")
        table = torch.tensor([list(w) for w in chunk_weights], dtype=torch.float32).reshape(chunks, self.count)
        return table.repeat_interleave(batch // chunks, dim=0)

    @contextlib.contextmanager
    def routed(self, row_weights: torch.Tensor) -> Iterator[None]:
        """Use ``row_weights`` ([B, k]) for the model calls inside the block."""
        previous = (self._rows, self._active, self._rows_cast)
        self._rows = row_weights
        self._active = frozenset(int(i) for i in torch.nonzero(row_weights.abs().sum(0)).flatten().tolist())
        self._rows_cast = {}
        try:
            yield
        finally:
            self._rows, self._active, self._rows_cast = previous

    def _rows_on(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (device, dtype)
        rows = self._rows_cast.get(key)
        if rows is None:
            rows = self._rows.to(device=device, dtype=dtype)
            self._rows_cast[key] = rows
        return rows

    # --- hooks ----------------------------------------------------------------------------------------
    def _hook(self, path: str, deltas: LayerDeltas):
        def hook(module, args, output):
            if self._rows is None or not (deltas.loras & self._active):
                return None
            x = args[0]
            rows = self._rows_on(output.device, output.dtype)
            if x.shape[0] != rows.shape[0]:
                raise RuntimeError(
                    f"multilora: layer {path} got batch {x.shape[0]} but the call has {rows.shape[0]} rows")
            return apply_layer_deltas(deltas, x, output, rows)
        return hook

    @contextlib.contextmanager
    def attached(self, base_model: torch.nn.Module) -> Iterator[None]:
        """Forward hooks on every targeted layer of ``base_model`` (a comfy BaseModel) inside the block."""
        handles = []
        try:
            for path, deltas in self.layers.items():
                module = comfy.utils.get_attr(base_model, path)
                handles.append(module.register_forward_hook(self._hook(path, deltas)))
            self._attached += 1
            yield
        finally:
            for handle in handles:
                handle.remove()
            if handles:
                self._attached -= 1

    # --- ModelPatcher wrappers ------------------------------------------------------------------------
    def _outer_sample_wrapper(self, executor, *args, **kwargs):
        guider = executor.class_obj
        with self.attached(guider.model_patcher.model):
            return executor(*args, **kwargs)

    def _apply_model_wrapper(self, executor, x, t, c_concat=None, c_crossattn=None, control=None,
                             transformer_options: Mapping = {}, **kwargs):
        routing: Routing = transformer_options.get(ROUTING_KEY, self.default_routing)
        cond_or_uncond = transformer_options.get("cond_or_uncond") or [0]
        rows = self.row_weights_for(routing.chunk_weights(cond_or_uncond, transformer_options), x.shape[0])
        self.calls += 1
        with self.routed(rows):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    def install(self, patcher) -> None:
        """Add this engine's keyed wrappers to ``patcher`` (a clone the caller owns)."""
        patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY,
                                     self._outer_sample_wrapper)
        patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY,
                                     self._apply_model_wrapper)


def set_routing(model_options: dict, routing: Routing) -> None:
    """Make calls under these model_options use ``routing`` (model_options must be the caller's copy)."""
    transformer_options = model_options.setdefault("transformer_options", {})
    transformer_options[ROUTING_KEY] = routing
