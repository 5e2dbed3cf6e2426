"""CMLoRA's per-LoRA feature cache (Zou et al. 2025, arXiv 2502.04923, §3.3; docs/algorithms.md §4).

The UNet is split into a shallow path — the input blocks of the first level (before the first downsample)
and the output blocks that consume their skips — and the deep rest. Writing ``D`` for the deep feature
entering the last output level:

    full:     ε = out(S_out(D(S_in(x)), skips(S_in(x))))
    shallow:  ε ≈ out(S_out(D_cached, skips(S_in(x))))

On a cache-refresh step the dominant LoRA's branches run the full UNet and store D; every other branch runs
only S_in and S_out with its own cached D. Every branch runs full at step 0 (and whenever it has no cached
feature of the right shape). With a fresh cache (same x, σ and LoRA) the shallow path is exact.
Host module (re-implements ComfyUI 0.3.75's ``UNetModel._forward`` for the split; calls with ControlNet or
block patches fall back to the stock forward).
"""
from __future__ import annotations

from typing import Mapping

import torch
import torch.utils.checkpoint

from comfy.ldm.modules.diffusionmodules.openaimodel import Downsample, forward_timestep_embed, timestep_embedding

from ..core.routing import sample_sigmas_of_call, sigma_of_call, step_index
from ..host.onthefly import OnTheFlyLoras

UNSUPPORTED_PATCHES = ("emb_patch", "input_block_patch", "input_block_patch_after_skip", "output_block_patch")


def shallow_blocks(unet) -> int:
    """Number of input blocks before the first downsample (the first level)."""
    for index, block in enumerate(unet.input_blocks):
        if any(isinstance(layer, Downsample) for layer in block):
            return index
    return len(unet.input_blocks)


def run_block(module, h, emb, context, transformer_options: dict, block: tuple, output_shape=None, **extra):
    """One UNet block as ComfyUI runs it (``block`` keys the transformer patches)."""
    transformer_options["block"] = block
    return forward_timestep_embed(module, h, emb, context, transformer_options, output_shape, **extra)


def checkpointed(engine: OnTheFlyLoras | None):
    """``run_block`` under torch.utils.checkpoint: activations are recomputed in backward, with the LoRA
    routing of the forward pass restored around the recomputation (the routed context has ended by then)."""
    def run(module, h, emb, context, transformer_options, block, output_shape=None, **extra):
        rows = engine.current_rows if engine is not None else None

        def body(h, emb, context):
            with engine.routed(rows) if rows is not None else _null():
                return run_block(module, h, emb, context, dict(transformer_options), block, output_shape, **extra)
        return torch.utils.checkpoint.checkpoint(body, h, emb, context, use_reentrant=False)
    return run


def split_forward(unet, x, timesteps, context, y, transformer_options: dict, deep_rows: torch.Tensor,
                  cached: torch.Tensor | None, engine: OnTheFlyLoras | None, block_runner=run_block,
                  deep_rows_cpu: torch.Tensor | None = None, **kwargs):
    """UNet output with the deep part run only for ``deep_rows`` (others take ``cached``); returns
    (output, deep feature of every row). ``block_runner`` runs each block (plain or checkpointed);
    ``deep_rows_cpu`` (the same indices on the CPU) spares a device-to-host copy."""
    transformer_options["original_shape"] = list(x.shape)
    transformer_options["transformer_index"] = 0
    extra = {k: kwargs.get(k) for k in ("time_context", "image_only_indicator")}
    extra["num_video_frames"] = kwargs.get("num_video_frames", unet.default_num_video_frames)
    emb = unet.time_embed(timestep_embedding(timesteps, unet.model_channels, repeat_only=False).to(x.dtype))
    if unet.num_classes is not None:
        emb = emb + unet.label_emb(y)
    first = shallow_blocks(unet)
    outputs = len(unet.output_blocks)
    hs = []
    h = x
    for index in range(first):
        h = block_runner(unet.input_blocks[index], h, emb, context, transformer_options, ("input", index), **extra)
        hs.append(h)
    deep = cached.clone() if cached is not None else None
    if deep_rows.numel() > 0:
        rows = engine.current_rows if engine is not None else None
        cpu_index = deep_rows_cpu if deep_rows_cpu is not None else deep_rows.cpu()
        routed = engine.routed_subset(cpu_index, deep_rows) if rows is not None else _null()
        with routed:
            hd, embd = h.index_select(0, deep_rows), emb.index_select(0, deep_rows)
            ctxd = context.index_select(0, deep_rows)
            skips = []
            for index in range(first, len(unet.input_blocks)):
                hd = block_runner(unet.input_blocks[index], hd, embd, ctxd, transformer_options, ("input", index),
                                  **extra)
                skips.append(hd)
            if unet.middle_block is not None:
                hd = block_runner(unet.middle_block, hd, embd, ctxd, transformer_options, ("middle", 0), **extra)
            for index in range(outputs - first):
                hd = torch.cat([hd, skips.pop()], dim=1)
                shape = skips[-1].shape if skips else hs[-1].shape
                hd = block_runner(unet.output_blocks[index], hd, embd, ctxd, transformer_options, ("output", index),
                                  shape, **extra)
        if deep is None:
            deep = torch.zeros((x.shape[0],) + hd.shape[1:], dtype=hd.dtype, device=hd.device)
        deep = deep.index_copy(0, deep_rows, hd)
    h = deep
    for index in range(outputs - first, outputs):
        h = torch.cat([h, hs.pop()], dim=1)
        h = block_runner(unet.output_blocks[index], h, emb, context, transformer_options, ("output", index),
                         hs[-1].shape if hs else None, **extra)
    return unet.out(h.type(x.dtype)), deep


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


class FeatureCache:
    """DIFFUSION_MODEL wrapper: shallow-path reuse of each branch's cached deep feature (see module doc)."""

    def __init__(self, engine: OnTheFlyLoras, plan_for, count: int):
        self.engine = engine
        self.plan_for = plan_for  # (transformer_options) -> StepPlan of the call's step, or None
        self.count = count
        self.cache: dict[int, torch.Tensor] = {}
        self.full_branch_evaluations = 0
        self.shallow_branch_evaluations = 0

    def __call__(self, executor, x, timesteps=None, context=None, y=None, control=None,
                 transformer_options: Mapping = {}, **kwargs):
        unet = executor.class_obj
        patches = transformer_options.get("patches", {})
        plan = self.plan_for(transformer_options)
        chunks = transformer_options.get("cond_or_uncond")
        if control is not None or plan is None or not chunks or any(p in patches for p in UNSUPPORTED_PATCHES) \
                or getattr(unet, "predict_codebook_ids", False):
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        per = x.shape[0] // len(chunks)
        if plan.step == 0:
            self.cache = {}
        deep_rows, cached_parts, reusable = [], [], True
        for c, index in enumerate(chunks):
            lora = int(index) % self.count
            stored = self.cache.get(int(index))
            fresh = (plan.step == 0 or stored is None or stored.shape[0] != per
                     or (plan.refresh and lora == plan.dominant))
            if fresh:
                deep_rows += range(c * per, (c + 1) * per)
                self.full_branch_evaluations += 1
            else:
                self.shallow_branch_evaluations += 1
            cached_parts.append(stored)
        if any(p is None for p in cached_parts):
            cached = None
            reusable = False
        else:
            shapes = {tuple(p.shape[1:]) for p in cached_parts}
            reusable = len(shapes) == 1
            cached = torch.cat(cached_parts) if reusable else None
        if not reusable:  # a branch without a usable feature: everything runs full this call
            deep_rows = list(range(x.shape[0]))
        out, deep = self._split(unet, x, timesteps, context, y, control, transformer_options, deep_rows, cached, kwargs)
        for c, index in enumerate(chunks):
            self.cache[int(index)] = deep[c * per:(c + 1) * per].detach()
        return out

    def _split(self, unet, x, timesteps, context, y, control, transformer_options, deep_rows: list[int], cached,
               kwargs: dict):
        """``split_forward``, replayed from a CUDA graph per (shapes, deep rows, routing) where allowed."""
        cpu_index = torch.tensor(deep_rows, dtype=torch.long)
        tensors = {"x": x, "timesteps": timesteps, "context": context, "y": y, "cached": cached,
                   "deep_rows": cpu_index.to(x.device)}

        def eager():
            return split_forward(unet, x, timesteps, context, y, transformer_options, tensors["deep_rows"], cached,
                                 self.engine, deep_rows_cpu=cpu_index, **kwargs)
        graphs = self.engine.graphs
        plain = all(v is None or isinstance(v, (bool, int, float, str)) for v in kwargs.values())
        if not plain or not graphs.eligible(unet, x, control, transformer_options, wrappers=2):
            return eager()
        options = dict(transformer_options)

        def body(i):  # cpu_index only sets the hooked layer set here, which the key fixes
            return split_forward(unet, i["x"], i["timesteps"], i["context"], i["y"], options, i["deep_rows"],
                                 i["cached"], self.engine, deep_rows_cpu=cpu_index, **kwargs)
        # Which rows run deep is data (an index tensor the graph reads), only their count shapes the graph.
        key = graphs.signature(tensors, "split", tuple(sorted(kwargs.items())),
                               self.engine.graph_routing_key(subset=deep_rows))
        return graphs.run(key, tensors, body, eager)


def plan_lookup(branches) -> "callable":
    """StepPlan of a call from the CMLoRA branch wrapper's plan (None outside sampling)."""
    def lookup(transformer_options: Mapping):
        schedule = sample_sigmas_of_call(transformer_options)
        sigma = sigma_of_call(transformer_options)
        if schedule is None or sigma is None:
            return None
        steps = len(schedule) - 1
        plan = branches.plan(steps)
        return plan[step_index(sigma, schedule)]
    return lookup


class CheckpointedUNet:
    """DIFFUSION_MODEL wrapper running every UNet block under gradient checkpointing (CLoRA on SDXL):
    activation memory of the latent gradient drops to one block's, at the cost of a second forward."""

    def __init__(self, engine: OnTheFlyLoras | None):
        self.engine = engine

    def __call__(self, executor, x, timesteps=None, context=None, y=None, control=None,
                 transformer_options: Mapping = {}, **kwargs):
        unet = executor.class_obj
        patches = transformer_options.get("patches", {})
        if not torch.is_grad_enabled() or control is not None or any(p in patches for p in UNSUPPORTED_PATCHES):
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        everything = torch.arange(x.shape[0], device=x.device)
        out, _ = split_forward(unet, x, timesteps, context, y, transformer_options, everything, None, self.engine,
                               block_runner=checkpointed(self.engine), **kwargs)
        return out
