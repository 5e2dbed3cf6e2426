"""Replaying the UNet forward of a sampling run as CUDA graphs (docs/benchmarking.md).

At the sizes people sample at, ComfyUI's eager UNet is launch-bound: SD1.5 at 512², batch 2, runs in
21.7 ms eager and 11.3 ms replayed from a CUDA graph (docs/benchmarking.md), and the routed LoRA hooks add ~3 small
kernels per targeted layer on top. A DIFFUSION_MODEL wrapper records the whole forward once per call
signature and replays it:

    signature = shapes/dtypes of x, timesteps, context, y and tensor kwargs, + the engine's routing mode
    1st call with a signature: eager (warms cuBLAS/cuDNN, lets the hooks cast their factors once)
    2nd call: copy inputs into static buffers, capture, replay, return a clone of the static output
    later calls: copy inputs into the buffers, replay, clone the output
    later sampling runs: a signature already captured once is captured on its first call (already warm)

A replay recomputes everything from the *current contents* of its buffers and of the model's weights:
new latents, σ, conds and routing weights (the engine stages them in a device buffer before each call)
are picked up, and so are weights the engine merges in place (LoRA Switch). What a replay cannot pick up
is Python-side control flow, so a call is only graphed when nothing else can steer it: no transformer
patches or other DIFFUSION_MODEL wrappers, no ControlNet, no autograd (CLoRA's gradient pass), every
weight resident on the GPU without ComfyUI's cast/weight functions (no lowvram offload), and the hooked
layer set fixed by the signature. Anything else, or a capture that fails, runs eagerly. Graphs and their
memory are dropped when the sampling run ends. ``MULTILORA_CUDA_GRAPHS=0`` turns the feature off.
Host module.
"""
from __future__ import annotations

import logging
import os
from typing import Callable, Mapping

import torch

import comfy.model_management
import comfy.patcher_extension

log = logging.getLogger("multilora")

ENV_SWITCH = "MULTILORA_CUDA_GRAPHS"
BLOCKING_OPTIONS = ("patches", "patches_replace", "optimized_attention_override")


def graphs_enabled_by_env() -> bool:
    """False when the user set MULTILORA_CUDA_GRAPHS to 0/false/off."""
    return os.environ.get(ENV_SWITCH, "1").strip().lower() not in ("0", "false", "off", "no")


class CudaBackend:
    """torch.cuda graphs; one memory pool shared by the run's graphs (outputs are cloned after replay)."""

    def __init__(self):
        self.pool = None

    def available(self, x: torch.Tensor) -> bool:
        return x.is_cuda and not torch.cuda.is_current_stream_capturing()

    def capture(self, body: Callable[[], torch.Tensor]):
        """(graph, static output) with ``body``'s kernels recorded, not yet run."""
        if self.pool is None:
            self.pool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = body()
        return graph, out

    def reset(self) -> None:
        self.pool = None


class _Entry:
    __slots__ = ("inputs", "graph", "output", "seen")

    def __init__(self):
        self.inputs: dict[str, torch.Tensor] | None = None
        self.graph = None
        self.output: torch.Tensor | None = None
        self.seen = 0


class GraphedUNet:
    """The DIFFUSION_MODEL wrapper (see the module docstring).

    ``stage_rows(device, dtype)`` puts the current routing weights into static device buffers before a
    capture or replay; ``routing_key()`` names the routing that a captured graph has baked in. The run's
    engine passes both, so this module knows nothing else of it."""

    def __init__(self, stage_rows: Callable[[torch.device, torch.dtype], None], routing_key: Callable[[], tuple],
                 backend=None):
        self.stage_rows = stage_rows
        self.routing_key = routing_key
        self.backend = backend or CudaBackend()
        self.enabled = graphs_enabled_by_env()
        self.entries: dict[tuple, _Entry] = {}
        self.refused: set[tuple] = set()
        self.warm: set[tuple] = set()  # signatures captured in an earlier run: no eager warm-up call needed
        self._module_check: dict[int, bool] = {}
        self.captures = 0
        self.replays = 0

    def reset(self) -> None:
        """Forget every graph and its memory (end of a sampling run)."""
        self.entries.clear()
        self.refused.clear()
        self._module_check.clear()
        self.backend.reset()

    # --- eligibility -------------------------------------------------------------------------------
    def _modules_plain(self, unet) -> bool:
        """No layer casts or patches its weights per call (ComfyUI's lowvram / weight_function path)."""
        cached = self._module_check.get(id(unet))
        if cached is None:
            cached = not any(getattr(m, "comfy_cast_weights", False) or getattr(m, "weight_function", None)
                             or getattr(m, "bias_function", None) for m in unet.modules())
            self._module_check = {id(unet): cached}
        return cached

    def eligible(self, unet, x, control, transformer_options: Mapping, wrappers: int = 1) -> bool:
        """Whether a call may be graphed; ``wrappers`` = DIFFUSION_MODEL wrappers the caller accounts for."""
        if not self.enabled or control is not None or torch.is_grad_enabled():
            return False
        if not self.backend.available(x):
            return False
        if any(transformer_options.get(key) for key in BLOCKING_OPTIONS):
            return False
        found = comfy.patcher_extension.get_all_wrappers(
            comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, transformer_options)
        if len(found) != wrappers:
            return False
        return self._modules_plain(unet)

    @staticmethod
    def signature(tensors: Mapping[str, torch.Tensor | None], *extra) -> tuple:
        """Shapes/dtypes/devices of ``tensors`` plus the hashable ``extra`` parts."""
        shapes = tuple((name, None) if t is None else (name, tuple(t.shape), t.dtype, t.device)
                       for name, t in tensors.items())
        return (shapes,) + extra

    def run(self, key: tuple, tensors: dict[str, torch.Tensor | None], body: Callable[[dict], object],
            eager: Callable[[], object]):
        """``body(static inputs)`` replayed from the graph of ``key`` (eager on its first call).

        ``body`` returns a tensor or a tuple of tensors; the caller gets clones. ``eager()`` runs the call
        without graphs (first call, refused signatures, failed captures)."""
        if key in self.refused:
            return eager()
        self.stage_rows(tensors["x"].device, tensors["x"].dtype)
        entry = self.entries.setdefault(key, _Entry())
        entry.seen += 1
        if entry.graph is None and entry.seen < 2 and key not in self.warm:
            return eager()
        if entry.graph is None:
            entry.inputs = {name: None if t is None else t.detach().clone() for name, t in tensors.items()}
            try:
                entry.graph, entry.output = self.backend.capture(lambda: body(entry.inputs))
                self.captures += 1
                self.warm.add(key)
            except comfy.model_management.InterruptProcessingException:
                self.entries.pop(key, None)
                raise
            except Exception as error:  # a capture-unsafe op somewhere in the forward: stay eager
                log.warning("multilora: CUDA graph capture failed (%s: %s); this call signature runs eagerly.",
                            type(error).__name__, error)
                self.entries.pop(key, None)
                self.refused.add(key)
                return eager()
        else:
            for name, t in tensors.items():
                if t is not None:
                    entry.inputs[name].copy_(t)
        entry.graph.replay()
        self.replays += 1
        if isinstance(entry.output, tuple):
            return tuple(t.clone() for t in entry.output)
        return entry.output.clone()

    # --- the wrapper -------------------------------------------------------------------------------
    def __call__(self, executor, *args, **kwargs):
        """Graphs for UNet models (SD1.x/SD2/SDXL); DiTs (Flux, …) have other forward signatures: eager."""
        if not hasattr(executor.class_obj, "input_blocks") or len(args) > 6:
            return executor(*args, **kwargs)
        return self._unet_call(executor, *args, **kwargs)

    def _unet_call(self, executor, x, timesteps=None, context=None, y=None, control=None,
                   transformer_options: Mapping = {}, **kwargs):
        def eager():
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        if not self.eligible(executor.class_obj, x, control, transformer_options):
            return eager()
        tensors = {"x": x, "timesteps": timesteps, "context": context, "y": y}
        plain = {}
        for name, value in kwargs.items():
            if isinstance(value, torch.Tensor):
                tensors[name] = value
            elif value is None or isinstance(value, (bool, int, float, str)):
                plain[name] = value
            else:
                return eager()
        options = dict(transformer_options)

        def body(i):
            extra = {name: t for name, t in i.items() if name not in ("x", "timesteps", "context", "y")}
            return executor(i["x"], i["timesteps"], i["context"], i["y"], None, options, **extra, **plain)
        key = self.signature(tensors, "unet", tuple(sorted(plain.items())), self.routing_key())
        return self.run(key, tensors, body, eager)
