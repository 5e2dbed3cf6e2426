"""CLoRA's sampler (Meral et al. 2024, arXiv 2403.19776, §3.2): the latent update before each early step.

For steps i < ⌊opt_until·N⌉ the guider first moves x by its contrastive gradient (1 iteration, plus
``refine_iters`` at steps ⌊{0, 0.2, 0.4}·N⌋), then the chosen k-diffusion sampler takes step i from the
moved x; the remaining steps run in one call. A multistep/ancestral sampler therefore restarts its history
after each updated step. ``settings`` is a ``CloraSettings``. Host module.
"""
from __future__ import annotations

from typing import Sequence

import comfy.samplers

from ..core.errors import MultiLoRAError


def refine_steps(steps: int, fractions: Sequence[float]) -> set[int]:
    """Steps with extra refinement iterations: ⌊f·N⌋ for each fraction (the paper: steps 0, 10, 20 of 50)."""
    return {int(f * steps) for f in fractions}


def clora_sampler(sampler_name: str, steps_total: int, settings) -> comfy.samplers.KSAMPLER:
    """A SAMPLER that runs ``sampler_name`` step by step through the optimisation phase, updating x first."""
    base = comfy.samplers.sampler_object(sampler_name)
    if not isinstance(base, comfy.samplers.KSAMPLER):
        raise MultiLoRAError(f"CLoRA: sampler '{sampler_name}' is not supported; use a k-diffusion sampler "
                             "(euler, euler_ancestral, heun, dpm_2, dpmpp_2m, dpmpp_sde, lms, …).")
    function = base.sampler_function
    extra = dict(base.extra_options)

    def run(model, x, sigmas, extra_args=None, callback=None, disable=None):
        guider = model.inner_model
        n = len(sigmas) - 1
        optimise = min(n, int(round(settings.opt_until * n)))
        refine = refine_steps(n, settings.refine_at)
        model_options = (extra_args or {}).get("model_options", {})

        def shifted(offset):
            if callback is None:
                return None
            return lambda d: callback({**d, "i": d["i"] + offset})

        with guider.weight_aliases_kept():
            for i in range(optimise):
                iterations = 1 + (settings.refine_iters if i in refine else 0)
                x = guider.update_latent(x, sigmas[i:i + 1].expand(x.shape[0]), iterations, model_options)
                x = function(model, x, sigmas[i:i + 2], extra_args=extra_args, callback=shifted(i), disable=True,
                             **extra)
        if optimise < n:
            x = function(model, x, sigmas[optimise:], extra_args=extra_args, callback=shifted(optimise),
                         disable=disable, **extra)
        return x

    return comfy.samplers.KSAMPLER(run, extra_options={}, inpaint_options=base.inpaint_options)
