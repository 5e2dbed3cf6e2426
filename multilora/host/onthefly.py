"""The on-the-fly multi-LoRA engine: forward hooks that add routed low-rank deltas, installed per run.

``OnTheFlyLoras`` holds the fused per-layer deltas of a stack (see ``lowrank``). ``install`` puts two keyed
ModelPatcher wrappers on a *clone* of the user's model:

- OUTER_SAMPLE: registers one forward hook per targeted layer when sampling starts and removes them in
  ``finally`` (normal end, Cancel, exceptions), so the shared module is clean after every run;
- APPLY_MODEL: turns ``transformer_options["cond_or_uncond"]`` and the routing found under
  ``transformer_options[ROUTING_KEY]`` (or the engine's default) into per-row LoRA weights for that call;
- DIFFUSION_MODEL: replays the UNet forward from CUDA graphs where that is safe (``cuda_graphs``), with the
  call's routing weights staged in a device buffer the graph reads.

When every row of a call has the same LoRA weights (LoRA Switch, a single stack applied on the fly) the
engine instead merges that weight vector into the targeted weights, W ← W₀ + Σ_i w_i ΔW_i (float32 sum,
rounded once, as ComfyUI merges), re-merging only when the vector changes and restoring W₀ from a backup
in ``finally``. Such calls then cost exactly what a merged LoRA costs; mixed calls use the hooks on W₀.
Host module.
"""
from __future__ import annotations

import contextlib
import logging
from typing import Iterator, Mapping, Sequence

import torch

import comfy.patcher_extension
import comfy.utils

from ..core.lowrank import LayerDeltas, apply_layer_deltas, merge_groups, merged_delta, merged_group_weights
from ..core.routing import Routing, SameForAll
from ..host.comfy_compat import weight_streamed
from ..host.cuda_graphs import GraphedUNet

log = logging.getLogger("multilora")

WRAPPER_KEY = "multilora.onthefly"
ROUTING_KEY = "multilora.routing"
# A merged layer's backup: (weight parameter, its original values, bias parameter, its original values).
_Backup = tuple[torch.nn.Parameter, torch.Tensor, torch.nn.Parameter | None, torch.Tensor | None]


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
        self._masks: dict = {}
        self._attached = 0
        self.calls = 0
        self.merge_uniform = True
        self._merged: tuple[float, ...] | None = None
        self._last_vector: tuple[float, ...] | None = None
        self._mergeable_cache: dict[int, bool] = {}
        self._backups: dict[str, _Backup] = {}
        self.merges = 0
        self._staged: dict = {}
        self._hooked_ids: dict[frozenset[int], int] = {}
        self._merge_groups: dict = {}  # device -> (MergeGroup list, per-layer paths): factors stacked once
        self._grouped: tuple[list, list[str]] | None = None  # this run's groups with their W₀ backups
        self._layer_set_ids: dict[frozenset[str], int] = {}
        self.token_router = None  # a TokenRouter: LoRA weights per token (regional LoRA), else per batch row
        self.graphs = GraphedUNet(self.stage_rows, self.graph_routing_key)

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
        previous = (self._rows, self._active, self._rows_cast, self._masks)
        self._rows = row_weights
        self._active = frozenset(int(i) for i in torch.nonzero(row_weights.abs().sum(0)).flatten().tolist())
        self._rows_cast = {}
        self._masks = {}
        try:
            yield
        finally:
            self._rows, self._active, self._rows_cast, self._masks = previous

    @property
    def current_rows(self) -> torch.Tensor | None:
        """The [B, k] routing weights of the model call in progress (None outside one)."""
        return self._rows

    @contextlib.contextmanager
    def hooks_only(self) -> Iterator[None]:
        """The engine on its hooks alone inside the block: W₀ back in the targeted weights and no merging, so
        nothing writes weights that a gradient pass shares."""
        previous = self.merge_uniform
        self.restore_weights()
        self.merge_uniform = False
        try:
            yield
        finally:
            self.merge_uniform = previous

    def _rows_on(self, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        key = (device, dtype)
        rows = self._rows_cast.get(key)
        if rows is None:
            # Convert from a staged buffer on the device where there is one: no host copy in a CUDA graph.
            staged = next((t for (d, _), t in self._rows_cast.items() if d == device), None)
            rows = staged.to(dtype) if staged is not None else self._rows.to(device=device, dtype=dtype)
            self._rows_cast[key] = rows
        return rows

    def hooked_layers_id(self, active: frozenset[int]) -> int:
        """A small id of the set of layers whose hooks act when LoRAs ``active`` are routed (cached)."""
        found = self._hooked_ids.get(active)
        if found is None:
            layers = frozenset(path for path, deltas in self.layers.items() if deltas.loras & active)
            found = self._layer_set_ids.setdefault(layers, len(self._layer_set_ids))
            self._hooked_ids[active] = found
        return found

    def graph_routing_key(self, subset: "Sequence[int] | None" = None) -> tuple:
        """What fixes the Python control flow of the call in progress (part of a CUDA graph's signature):
        the routed rows' shape and the set of layers whose hooks act — not the weights, which the graph
        reads from the staged rows. ``subset``: rows also routed on their own (CMLoRA's deep path)."""
        if self._rows is None:
            return ("unrouted",)
        key = ("routed", tuple(self._rows.shape), self.hooked_layers_id(self._active))
        if self.token_router is not None:
            key += self.token_router.key()
        if subset is not None:
            part = self._rows[list(subset)] if len(subset) else self._rows[:0]
            active = frozenset(int(i) for i in torch.nonzero(part.abs().sum(0)).flatten().tolist())
            key += (len(subset), self.hooked_layers_id(active))
        return key

    @contextlib.contextmanager
    def routed_subset(self, cpu_index: torch.Tensor, device_index: torch.Tensor) -> Iterator[None]:
        """Route only rows ``cpu_index`` of the current call (CMLoRA's deep path). Device copies of the
        rows already made for this call are sliced on the device (no host copy inside a CUDA graph)."""
        outer = dict(self._rows_cast)
        with self.routed(self._rows.index_select(0, cpu_index)):
            for (device, dtype), rows in outer.items():
                if device == device_index.device:
                    self._rows_cast[(device, dtype)] = rows.index_select(0, device_index)
            yield

    def stage_rows(self, device: torch.device, dtype: torch.dtype) -> None:
        """Copy the call's row weights into a buffer that lives for the run, so a replayed graph reads them (and
        the token router's region maps: no host copy may happen inside a capture)."""
        if self.token_router is not None:
            self.token_router.stage(device, dtype)
        if self._rows is None:
            return
        key = (device, dtype, tuple(self._rows.shape))
        buffer = self._staged.get(key)
        if buffer is None:
            buffer = self._staged[key] = torch.empty(self._rows.shape, device=device, dtype=dtype)
        buffer.copy_(self._rows)
        self._rows_cast[(device, dtype)] = buffer

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
            if self.token_router is not None:
                rows = self.token_router.weights(path, x, output, rows)
            return apply_layer_deltas(deltas, x, output, rows, self._masks)
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
            self.graphs.reset()
            self._staged.clear()
            self.restore_weights()
            self._mergeable_cache = {}  # the next run may load the model otherwise (lowvram, dynamic VRAM)

    def active_loras(self) -> frozenset[int]:
        """LoRAs in effect for the model call in progress (merged or routed)."""
        if self._rows is not None:
            return self._active
        if self._merged is not None:
            return frozenset(i for i, w in enumerate(self._merged) if w != 0)
        return frozenset()

    # --- merged fast path ----------------------------------------------------------------------------
    def _mergeable(self, base_model) -> bool:
        """Every targeted weight is a plain float tensor that the layer reads as it is: checked once per run.

        Not fp8/quantized, not patched per call, and not streamed: ComfyUI's lowvram offload keeps the weight on
        the CPU and 0.33's dynamic VRAM copies it into a GPU buffer kept resident (``_v``), so an in-place merge
        into ``module.weight`` would be slow there or never seen. A cast of a resident weight (manual_cast ops)
        reads ``module.weight`` at every call and may merge."""
        cached = self._mergeable_cache.get(id(base_model))
        if cached is None:
            device = getattr(base_model, "device", None)
            cached = all(self._plain_weight(comfy.utils.get_attr(base_model, path), device) for path in self.layers)
            self._mergeable_cache = {id(base_model): cached}
        return cached

    @staticmethod
    def _plain_weight(module: torch.nn.Module, device) -> bool:
        weight = getattr(module, "weight", None)
        if weight is None or weight.dtype not in (torch.float16, torch.bfloat16, torch.float32):
            return False
        if getattr(module, "weight_function", None) or getattr(module, "bias_function", None):
            return False
        return not weight_streamed(module, device)

    def _grouped_backups(self, base_model) -> tuple[list, list[str]]:
        """Same-shape low-rank layers as batched merge groups (with their stacked W₀ backups), and the
        paths left to the per-layer merge (dense parts, or weights that do not share a device/dtype)."""
        if not self.layers:
            return [], []
        first = comfy.utils.get_attr(base_model, next(iter(self.layers))).weight
        groups, rest = self._merge_groups.get(first.device) or merge_groups(self.layers, first.device)
        self._merge_groups = {first.device: (groups, rest)}
        grouped, rest = [], list(rest)
        for group in groups:
            params = [comfy.utils.get_attr(base_model, path).weight for path in group.paths]
            if any(p.device != first.device or p.dtype != params[0].dtype for p in params):
                rest += group.paths
                continue
            grouped.append((group, params, torch.stack([p.detach() for p in params])))
        return grouped, rest

    def merge_weights(self, base_model, vector: tuple[float, ...]) -> None:
        """Make every targeted layer hold W₀ + Σ_i vector_i ΔW_i (W₀ backed up on first change).

        Same-shape low-rank layers are merged a group at a time (one batched matmul and one multi-tensor
        copy per group instead of ~6 kernels per layer): the merge is launch-bound otherwise (SDXL: 722
        layers)."""
        if vector == self._merged:
            return
        on_device: dict = {}

        def vector_on(device):
            if device not in on_device:
                on_device[device] = torch.tensor(vector, dtype=torch.float32, device=device)
            return on_device[device]
        with torch.inference_mode():
            if self._grouped is None:
                self._grouped = self._grouped_backups(base_model)
            groups, rest = self._grouped
            for group, params, backup in groups:
                merged = merged_group_weights(group, backup, vector_on(backup.device))
                torch._foreach_copy_(params, list(merged.view((len(params),) + group.weight_shape).unbind(0)))
            for path in rest:
                deltas = self.layers[path]
                module = comfy.utils.get_attr(base_model, path)
                if path not in self._backups:
                    bias = getattr(module, "bias", None) if any(p.bias is not None for p in deltas.dense) else None
                    self._backups[path] = (module.weight, module.weight.detach().clone(),
                                           bias, None if bias is None else bias.detach().clone())
                weight, original, bias, original_bias = self._backups[path]
                weights = vector_on(original.device) if not deltas.dense else list(vector)
                delta_w, delta_b = merged_delta(deltas, weights, original.device)
                if delta_w is None:
                    weight.copy_(original)
                else:
                    weight.copy_(original.float() + delta_w)  # .float() may alias an fp32 backup: no in-place
                if bias is not None:
                    if delta_b is None:
                        bias.copy_(original_bias)
                    else:
                        bias.copy_((original_bias.float() + delta_b.to(original_bias.device)).to(original_bias.dtype))
        self._merged = vector
        self.merges += 1

    def restore_weights(self) -> None:
        """Put every backed-up W₀ back (exact copies) and forget the backups."""
        if not self._backups and self._grouped is None:
            self._merged = None
            return
        with torch.inference_mode():
            for _, params, backup in (self._grouped or ([], []))[0]:
                torch._foreach_copy_(params, list(backup.unbind(0)))
            for weight, original, bias, original_bias in self._backups.values():
                weight.copy_(original)
                if bias is not None:
                    bias.copy_(original_bias)
        self._backups.clear()
        self._grouped = None
        self._merged = None
        self._last_vector = None

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
        base_model = executor.class_obj
        vector = tuple(float(v) for v in rows[0]) if bool((rows == rows[0]).all()) else None
        # Merge a uniform vector at once when the routing says it is stable (Switch, a plain stack), else
        # once it comes twice in a row; calls that alternate LoRAs stay on the hooks instead of thrashing.
        repeat = vector is not None and (vector == self._merged or vector == self._last_vector
                                         or getattr(routing, "stable", False))
        self._last_vector = vector
        if self.token_router is not None:
            self.token_router.begin_call(x, c_crossattn, kwargs, cond_or_uncond)
            repeat = False  # weights differ per token: the hooks, never a merge
        if self.merge_uniform and repeat and self._attached and self._mergeable(base_model):
            self.merge_weights(base_model, vector)
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        if self._merged is not None:
            self.merge_weights(base_model, (0.0,) * self.count)
        with self.routed(rows):
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)

    def install(self, patcher) -> None:
        """Add this engine's keyed wrappers to ``patcher`` (a clone the caller owns)."""
        patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY,
                                     self._outer_sample_wrapper)
        patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY,
                                     self._apply_model_wrapper)
        patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, WRAPPER_KEY, self.graphs)
