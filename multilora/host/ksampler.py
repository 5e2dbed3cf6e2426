"""KSampler-style sampling for a patched model or a guider: core KSampler's noise, sigmas, denoise,
progress bar, previews and Cancel, so the pack's sampler nodes behave exactly like the stock one.
Host module."""
from __future__ import annotations

import comfy.model_management
import comfy.sample
import comfy.samplers
import comfy.utils
import latent_preview


def ksample(model, seed: int, steps: int, cfg: float, sampler_name: str, scheduler: str, positive, negative,
            latent: dict, denoise: float = 1.0) -> dict:
    """The stock ``common_ksampler`` path on ``model`` (which may carry the pack's wrappers)."""
    latent_image = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    callback = latent_preview.prepare_callback(model, steps)
    samples = comfy.sample.sample(model, noise, steps, cfg, sampler_name, scheduler, positive, negative,
                                  latent_image, denoise=denoise, noise_mask=latent.get("noise_mask"),
                                  callback=callback, disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    out = latent.copy()
    out["samples"] = samples
    return out
