"""Autograd through ComfyUI's UNet inside its inference mode, for CLoRA's latent update ∇ₓL.

ComfyUI runs nodes under ``torch.inference_mode()`` and samplers under ``no_grad``, and its weights are
inference tensors, which autograd may not save. ``gradient_ready`` swaps them for normal tensors over the same
memory (no copy) or, where that is impossible, gives the ops per-forward copies; gradients are taken only
with respect to the latent, never the weights. ComfyUI's own ``comfy_extras/nodes_train.py`` is the in-tree
precedent (``inference_mode(False)``, frozen parameters). Host module.
"""
from __future__ import annotations

import contextlib

import torch

from ..host.comfy_compat import weight_streamed


def _shares_memory(p: torch.Tensor) -> bool:
    """A plain strided parameter (not a quantized/tensor-subclass one) that can be aliased."""
    return type(p) is torch.nn.Parameter and p.layout == torch.strided


def _normal_alias(p: torch.Tensor) -> torch.nn.Parameter:
    """A frozen normal (non-inference) Parameter over ``p``'s memory: no copy, and autograd may save it."""
    with torch.inference_mode(False):
        alias = torch.nn.Parameter(torch.empty(0, dtype=p.dtype, device=p.device), requires_grad=False)
        alias.set_(p.untyped_storage(), p.storage_offset(), p.size(), p.stride())
    return alias


def _cached_alias(p: torch.Tensor, aliases: dict | None) -> torch.nn.Parameter:
    """``_normal_alias(p)``, reused from ``aliases`` (id → (parameter, alias)) while it still views p's memory."""
    if aliases is None:
        return _normal_alias(p)
    entry = aliases.get(id(p))
    if entry is not None and entry[0] is p and entry[1].data_ptr() == p.data_ptr() \
            and entry[1].shape == p.shape and entry[1].stride() == p.stride():
        return entry[1]
    alias = _normal_alias(p)
    aliases[id(p)] = (p, alias)
    return alias


@contextlib.contextmanager
def gradient_ready(diffusion_model: torch.nn.Module, share_weights: bool = True, aliases: dict | None = None):
    """Autograd through ComfyUI's ops on inference-mode weights (normal tensors over inference weights); all undone
    in ``finally``.

    ``share_weights``: every plain inference-tensor parameter is swapped for a normal tensor over the same
    memory, so ops keep their plain forward and nothing is copied. The aliases have no version counter link
    to the weights: the caller must keep everything from writing the weights until backward is done (see
    ``OnTheFlyLoras.hooks_only``). Parameters that cannot be aliased (tensor subclasses) and, with ``share_weights=False``,
    all of them get per-forward copies instead (an identity weight/bias function forces ComfyUI's cast path
    to copy). Layers whose weights ComfyUI casts per call (lowvram offload, 0.33's dynamic VRAM) get a cloning
    function: their cast lands in a buffer the next layer reuses, and backward needs the weight it saw.
    Parameters still in use are frozen. ``aliases``: a dict kept by the caller to reuse the aliases
    over several passes (it holds the weights' memory: drop it when sampling ends)."""
    def identity(t):
        return t

    def owned_copy(t):
        return t.clone()
    swapped = []
    touched = []
    frozen = []
    try:
        for module in diffusion_model.modules():
            params = module._parameters
            needs_copies = not share_weights
            for name, p in list(params.items()):
                if p is None:
                    continue
                if share_weights and p.is_inference() and _shares_memory(p):
                    alias = _cached_alias(p, aliases)
                    swapped.append((params, name, p))
                    params[name] = alias
                    continue
                needs_copies = needs_copies or p.is_inference()
                if p.requires_grad:
                    frozen.append(p)
            streamed = weight_streamed(module)
            if (needs_copies or streamed) and isinstance(getattr(module, "weight_function", None), list):
                function = owned_copy if streamed else identity
                module.weight_function.append(function)
                module.bias_function.append(function)
                touched.append((module, function))
        with torch.inference_mode():
            for p in frozen:
                p.requires_grad_(False)
        yield
    finally:
        for params, name, original in reversed(swapped):
            params[name] = original
        for module, function in touched:
            module.weight_function.remove(function)
            module.bias_function.remove(function)
        with torch.inference_mode():
            for p in frozen:
                p.requires_grad_(True)
