"""One model call through a regional clone's wrappers, with each LoRA'd layer's input and output recorded, and
the same layers re-run on those inputs with a reference model's merged weights: how the regional tests compare a
routed layer with the merged LoRA it must equal, token by token."""
from __future__ import annotations

import torch

import comfy.utils

from . import tiny_models


def run_wrapped(clone, engine, patcher, x, sigma, cond, record: dict | None = None, paths=None,
                cond_or_uncond=None):
    """One apply_model call through ``clone``'s wrappers (as a sampler makes it; ``cond_or_uncond``: the chunks of
    its batch, as calc_cond_batch sets them); with ``record``, each targeted layer's (input, output after the
    engine's hook) lands there under its path."""
    handles = []
    with engine.attached(patcher.model), torch.no_grad():
        try:
            for path in (paths or engine.layers) if record is not None else ():
                module = comfy.utils.get_attr(patcher.model, path)
                handles.append(module.register_forward_hook(
                    lambda m, args, out, p=path: record.__setitem__(p, (args[0].detach().clone(), out.detach().clone()))))
            options = {"wrappers": clone.wrappers}
            if cond_or_uncond is not None:
                options["cond_or_uncond"] = list(cond_or_uncond)
            return patcher.model.apply_model(x, sigma, transformer_options=options, **cond)
        finally:
            for h in handles:
                h.remove()


def layer_outputs(patcher, reference, record: dict) -> dict:
    """Each recorded layer applied to its recorded input with ``reference``'s merged weights."""
    with tiny_models.patched(reference), torch.no_grad():
        return {p: comfy.utils.get_attr(patcher.model, p)(x) for p, (x, _) in record.items()}
