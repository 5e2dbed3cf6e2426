"""CLoRA (Meral et al. 2024, arXiv 2403.19776) on the on-the-fly engine: the guider and the entry point.

Variants v = 0..K (``clora_prompts``) share one batched UNet call per step. At the latent/4 cross-attention
layers the concept tokens' attention maps A are captured (mean over layers and heads; cond chunks, or cond
and uncond: ``CloraSettings.attention_halves``).

- Latent update (steps i < opt_until·N, ``clora_sampler``): L = Σ_b NT-Xent_b over the concept groups' maps
  of image b (τ_c = 0.5). A sum, not a mean: ∂L/∂x_b = ∇L_b, so each image of a batch moves exactly as it
  would alone. α is defined for the VP latent z = x/√(1+σ²), so in ComfyUI's σ-space
  x ← x − α·(1+σ²)·∇ₓL. Extra ``refine_iters`` iterations at steps ⌊{0, 0.2, 0.4}·N⌋.
- Fusion: Mask_g = ⋃_t [A_t ≥ λ·max A_t] over concept g's token maps (from every variant, or from its own:
  ``mask_source``), nearest-resized to the latent; the base variant has a full mask, so each pixel averages
  the base and the variants covering it, and pixels no concept covers keep the base prediction; applied to
  cond and uncond separately, then the model's pre-CFG functions on the fused (cond, uncond) pair, then CFG
  (with its post-CFG functions), as ComfyUI's ``sampling_function`` does for one cond pair.
- After an update the predictions are recomputed at the moved latent, or (``recompute_after_update`` off)
  the last loss pass's noise predictions are kept: D' = D + (x' − x).
Host module.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Sequence

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.utils

from ..core.clora_masks import check_threshold, fuse_with_masks, masks_from_maps
from ..core.contrastive import concept_contrastive_loss, normalize_maps
from ..core.errors import MultiLoRAError
from ..core.routing import sample_sigmas_of_call, sigma_of_call, step_index
from ..core.stack import LoraRow
from ..host.attention_capture import (
    ConceptAttention,
    CrossAttentionRequired,
    StopAfterCapture,
    capture_level,
    capture_size,
    cross_attention_levels,
    cross_attention_sites,
    install_capture,
)
from ..host.engine import build_engine
from ..host.feature_cache import CheckpointedUNet
from ..host.onthefly import ROUTING_KEY, OnTheFlyLoras
from .clora_direct import RECORD_KEY, CallRecorder, RecordedCall, plain_conds
from .clora_gradient import gradient_ready  # looked up here at each pass: benchmarks swap it
from .clora_prompts import NODE, Variant, build_variants, encode, routing_table, split_rows  # noqa: F401 (re-exported)
from .clora_sampler import clora_sampler, refine_steps  # noqa: F401 (re-exported)
from .clora_settings import HALVES_BOTH, MASK_OWN, CloraRecord, CloraSettings, check_variant_settings

CHECKPOINT_KEY = "multilora.gradient_checkpointing"
STOP_KEY = "multilora.clora_stop_after_capture"


@dataclass
class KeptPredictions:
    """The last loss pass of an update: its x, σ, branch predictions and per-variant maps (all detached)."""

    x: torch.Tensor
    sigma: float
    outputs: list[torch.Tensor]
    maps: list[dict[int, torch.Tensor]]

    def fits(self, x: torch.Tensor, sigma: float) -> bool:
        return tuple(x.shape) == tuple(self.x.shape) and abs(sigma - self.sigma) <= 1e-6 * max(1.0, abs(sigma))


class CloraGuider(comfy.samplers.CFGGuider):
    """Masked fusion of K+1 prompt variants (one batched UNet call per step) plus the contrastive update."""

    def __init__(self, model_patcher, engine: OnTheFlyLoras, variants: list[Variant], settings: CloraSettings,
                 record: CloraRecord):
        super().__init__(model_patcher)
        self.engine = engine
        self.variants = variants
        self.settings = settings
        self.record = record
        self.routing = routing_table(len(variants) - 1, engine.count - (len(variants) - 1))
        conds = {}
        for v, variant in enumerate(variants):
            conds[f"c{v}"] = variant.positive
            conds[f"u{v}"] = variant.negative
        self.inner_set_conds(conds)
        self.cfg = settings.cfg
        self._levels: dict | None = None
        self._in_gradient_pass = False
        self._aliases: dict | None = None
        self._index_cache: dict = {}  # token positions on the device, for every capture of this guider
        self._schedule_source = None
        self._schedule: list[float] | None = None
        self._kept: KeptPredictions | None = None  # set by an update, used by the next step's first call
        self._recorded: RecordedCall | None = None  # the run's gradient-pass model call (clora_direct)

    def _capture_levels(self) -> dict:
        """Cross-attention site → level of this guider's UNet (its structure does not change)."""
        if self._levels is None:
            self._levels = cross_attention_levels(self.model_patcher.model.diffusion_model)
        return self._levels

    def _both_halves(self) -> bool:
        return self.settings.attention_halves == HALVES_BOTH

    def _cond_list(self, with_uncond: bool = True) -> list:
        out = []
        for v in range(len(self.variants)):
            out.append(self.conds[f"c{v}"])
            out.append(self.conds[f"u{v}"] if with_uncond else None)
        return out

    def _options(self, model_options: dict, capture: ConceptAttention) -> dict:
        options = comfy.model_patcher.create_model_options_clone(model_options)
        options["transformer_options"] = dict(options.get("transformer_options", {}))
        options["transformer_options"][ROUTING_KEY] = self.routing
        install_capture(options, self.model_patcher.model.diffusion_model, capture, list(self._capture_levels()))
        return options

    def _capture(self, x: torch.Tensor) -> ConceptAttention:
        columns = {}
        for v, var in enumerate(self.variants):
            positions = [p for g in sorted(var.groups) for p in var.groups[g]]
            columns[2 * v] = positions
            if self._both_halves():  # the uncond chunk at the cond prompt's token positions (authors' code)
                columns[2 * v + 1] = positions
        levels = self._capture_levels()
        height, width = x.shape[-2], x.shape[-1]
        size = capture_size(height, width, capture_level(self.model_patcher.model.diffusion_model, levels))
        # Sites whose activations have the captured size: a model call passes exactly these many captures.
        sites = sum(1 for level in levels.values() if capture_size(height, width, level) == size)
        return ConceptAttention(size, columns, stop_after=sites or None, index_cache=self._index_cache)

    def variant_maps(self, capture: ConceptAttention) -> list[dict[int, torch.Tensor]]:
        """Per concept g: variant v → the [rows, T, h, w] maps of g's tokens in v's prompt (cond, or the mean
        of the cond and uncond chunks' maps)."""
        per_concept: list[dict[int, torch.Tensor]] = [{} for _ in range(len(self.variants) - 1)]
        for v, variant in enumerate(self.variants):
            maps = capture.averaged(2 * v)
            if maps is None:
                continue
            if self._both_halves():
                uncond = capture.averaged(2 * v + 1)
                maps = maps if uncond is None else (maps + uncond) / 2
            offset = 0
            for g in sorted(variant.groups):
                count = len(variant.groups[g])
                per_concept[g][v] = maps[:, offset:offset + count]
                offset += count
        return per_concept

    def concept_maps(self, capture: ConceptAttention) -> list[list[torch.Tensor]]:
        """Per concept g: the [rows, T, h, w] maps of its tokens in every variant where they occur (the loss's
        groups)."""
        return [list(by_variant.values()) for by_variant in self.variant_maps(capture)]

    def mask_maps(self, per_variant: Sequence[dict[int, torch.Tensor]]) -> list[torch.Tensor]:
        """Per concept g: the [rows, T, h, w] maps its mask is built from, every variant's or g's own."""
        if self.settings.mask_source == MASK_OWN:
            return [by_variant[g + 1] for g, by_variant in enumerate(per_variant)]
        return [torch.cat(list(by_variant.values()), dim=1) for by_variant in per_variant]

    def loss(self, x: torch.Tensor, timestep: torch.Tensor, model_options: dict,
             keep_predictions: bool = False) -> torch.Tensor:
        """The contrastive loss at (x, σ), summed over the images of the batch. ``keep_predictions``: run the
        full UNet on every branch and keep its (detached) predictions and maps in ``self._kept``."""
        capture = self._capture(x)
        options = self._options(model_options, capture)
        if self.settings.gradient_checkpointing:
            # No early stop here: it would end a checkpointed block half-way, and backward recomputes blocks.
            comfy.patcher_extension.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
                                                         CHECKPOINT_KEY, CheckpointedUNet(self.engine), options,
                                                         is_model_options=True)
        elif not keep_predictions:  # the loss needs the maps only: skip the UNet after the last capture site
            comfy.patcher_extension.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
                                                         STOP_KEY, StopAfterCapture(capture), options,
                                                         is_model_options=True)
        recorder = None
        if not keep_predictions and self._recorded is None and plain_conds(self.conds):
            recorder = CallRecorder()
            comfy.patcher_extension.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, RECORD_KEY,
                                                         recorder, options, is_model_options=True)
        with_uncond = keep_predictions or self._both_halves()
        outputs = comfy.samplers.calc_cond_batch(self.inner_model, self._cond_list(with_uncond), x, timestep, options)
        if recorder is not None and not self.settings.gradient_checkpointing:
            self._recorded = RecordedCall.from_pass(recorder, self.inner_model, capture, x, timestep)
            if self._recorded is not None:
                self._recorded.source = model_options
        per_variant = self.variant_maps(capture)
        total = self._contrastive(per_variant, x.shape[0], x)
        if keep_predictions:
            self._kept = KeptPredictions(x.detach(), float(timestep.flatten()[0]), [o.detach() for o in outputs],
                                         [{v: m.detach() for v, m in d.items()} for d in per_variant])
        return total

    def _contrastive(self, per_variant: Sequence[dict[int, torch.Tensor]], images: int, like: torch.Tensor):
        groups = [list(by_variant.values()) for by_variant in per_variant]
        total = like.new_zeros(())
        for r in range(images):  # per image: no term couples two images of the batch
            total = total + concept_contrastive_loss([torch.cat([m[r] for m in g], dim=0) for g in groups],
                                                     self.settings.temperature)
        return total

    def _direct_value_and_gradient(self, x: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(L, ∇ₓL) through the recorded model call (clora_direct), without calc_cond_batch's per-pass work."""
        recorded = self._recorded
        latent = x.detach().clone().requires_grad_(True)  # inference tensors cannot require grad
        recorded.run(latent, sigma.detach().clone())
        value = self._contrastive(self.variant_maps(recorded.capture), latent.shape[0], latent)
        (grad,) = torch.autograd.grad(value, latent)
        return value.detach(), grad.detach()

    @contextlib.contextmanager
    def gradient_pass(self):
        """Autograd inside ComfyUI's inference mode: weights shared as normal tensors, the engine on its
        hooks; entered once for all iterations of an update (re-entering is free)."""
        if self._in_gradient_pass:
            yield
            return
        with torch.inference_mode(False), torch.enable_grad(), self.engine.hooks_only(), \
                gradient_ready(self.model_patcher.model.diffusion_model, aliases=self._aliases):
            self._in_gradient_pass = True
            try:
                yield
            finally:
                self._in_gradient_pass = False

    @contextlib.contextmanager
    def weight_aliases_kept(self):
        """Reuse the gradient passes' weight aliases and recorded call over the block (one sampling run), then drop
        them."""
        previous = self._aliases
        self._aliases = {} if previous is None else previous
        try:
            yield
        finally:
            self._aliases = previous
            if previous is None:
                self._recorded = None

    def _value_and_gradient(self, x: torch.Tensor, sigma: torch.Tensor, model_options: dict,
                            keep_predictions: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        with self.gradient_pass():
            if not keep_predictions and self._recorded is not None and self._recorded.fits(x, model_options):
                return self._direct_value_and_gradient(x, sigma)
            latent = x.detach().clone().requires_grad_(True)
            value = self.loss(latent, sigma.detach().clone(), model_options, keep_predictions=keep_predictions)
            (grad,) = torch.autograd.grad(value, latent)
        return value.detach(), grad.detach()

    def loss_gradient(self, x: torch.Tensor, sigma: torch.Tensor, model_options: dict) -> tuple[float, torch.Tensor]:
        """(L, ∇ₓL) with autograd enabled inside ComfyUI's inference mode."""
        value, grad = self._value_and_gradient(x, sigma, model_options)
        return float(value), grad

    def update_latent(self, x: torch.Tensor, sigma: torch.Tensor, iterations: int, model_options: dict) -> torch.Tensor:
        """x ← x − α·(1+σ²)·∇ₓL, ``iterations`` times (α in VP-latent units); records the mean loss per image."""
        scale = self.settings.step_size * (1.0 + float(sigma.flatten()[0]) ** 2)
        keep = not self.settings.recompute_after_update
        outer_inference = torch.is_inference_mode_enabled()
        values = []
        self._kept = None
        with self.gradient_pass():
            for it in range(iterations):
                comfy.model_management.throw_exception_if_processing_interrupted()
                value, grad = self._value_and_gradient(x, sigma, model_options, keep and it == iterations - 1)
                values.append(value)
                with torch.inference_mode(outer_inference):  # x stays the kind of tensor the sampler gave
                    x = x - scale * grad.to(x.dtype)
        if values:  # one host sync per update instead of one per iteration
            self.record.losses.extend(float(v) / x.shape[0] for v in torch.stack(values).tolist())
        return x

    def _step_of(self, timestep: torch.Tensor, model_options: dict) -> int:
        """Step index of a model call; the schedule is read to the host once per run, not once per step."""
        transformer_options = model_options.get("transformer_options", {})
        source = transformer_options.get("sample_sigmas")
        if source is not self._schedule_source:
            self._schedule_source = source
            self._schedule = sample_sigmas_of_call(transformer_options)
        sigma = sigma_of_call({"sigmas": timestep})
        return step_index(sigma, self._schedule) if self._schedule else 0

    def _branch_predictions(self, x, timestep, model_options) -> tuple[list[torch.Tensor], list[dict]]:
        """Every branch's prediction and the per-variant maps at (x, σ): kept from the update (noise
        predictions ε = (x − D)/σ unchanged, so D' = D + (x' − x)) or from one batched UNet call."""
        kept, self._kept = self._kept, None
        if kept is not None and kept.fits(x, sigma_of_call({"sigmas": timestep})):
            shift = x - kept.x.to(x.dtype)
            return [o + shift for o in kept.outputs], kept.maps
        capture = self._capture(x)
        options = self._options(model_options, capture)
        outputs = comfy.samplers.calc_cond_batch(self.inner_model, self._cond_list(), x, timestep, options)
        return outputs, self.variant_maps(capture)

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        step = self._step_of(timestep, model_options)  # before the UNet call: its host sync waits for nothing
        outputs, per_variant = self._branch_predictions(x, timestep, model_options)
        mask_maps = self.mask_maps(per_variant)
        # All rows at once ([B, T, h, w] maps): per-map normalisation and thresholds, as row by row.
        masks = masks_from_maps(mask_maps, self.settings.mask_threshold, tuple(x.shape[-2:]))
        if step >= len(self.record.steps):  # one entry per sampling step (multi-evaluation samplers: the first)
            self.record.steps.append([normalize_maps(m[0]) for m in mask_maps])  # on the device until to_cpu
        self.record.final_masks = masks[0]
        cond = [outputs[2 * v] for v in range(len(self.variants))]
        uncond = [outputs[2 * v + 1] for v in range(len(self.variants))]
        if step >= self.settings.apply_mask_after:
            full = torch.ones_like(masks[:, :1])
            weights = torch.cat([full, masks.to(full.dtype)], dim=1)  # the base variant covers every pixel
            c = fuse_with_masks(cond[0], cond, weights)
            u = fuse_with_masks(uncond[0], uncond, weights)
        else:
            c = torch.stack(cond).mean(0)
            u = torch.stack(uncond).mean(0)
        return self.guidance(c, u, x, timestep, model_options)

    def guidance(self, c: torch.Tensor, u: torch.Tensor, x, timestep, model_options: dict) -> torch.Tensor:
        """The model's pre-CFG functions on the fused (cond, uncond) pair, then CFG and its post-CFG functions,
        as core's ``sampling_function`` and Perp-Neg's guider run them. The hooks see the base variant's conds:
        the fused pair stands where core's single (cond, uncond) pair stands."""
        conds = [self.conds.get("c0"), self.conds.get("u0")]
        out = [c, u]
        for fn in model_options.get("sampler_pre_cfg_function", []):
            args = {"conds": conds, "conds_out": out, "cond_scale": self.cfg, "timestep": timestep, "input": x,
                    "sigma": timestep, "model": self.inner_model, "model_options": model_options}
            out = fn(args)
        return comfy.samplers.cfg_function(self.inner_model, out[0], out[1], self.cfg, x, timestep,
                                           model_options=model_options, cond=conds[0], uncond=conds[1])


def clora_sample(model, clip, prompt: str, negative: str, rows: Sequence[LoraRow], seed: int, steps: int,
                 sampler_name: str, scheduler: str, latent: dict, denoise: float, settings: CloraSettings):
    """Run CLoRA; returns (LATENT dict, CloraRecord). Inputs are not modified."""
    check_threshold(settings.mask_threshold)
    if not 0.0 <= settings.opt_until <= 1.0:
        raise MultiLoRAError(f"CLoRA: opt_until must be in [0, 1], got {settings.opt_until}.")
    check_variant_settings(settings, NODE)
    if not cross_attention_sites(model.model.diffusion_model):
        raise CrossAttentionRequired(
            "CLoRA: this model has no UNet cross-attention (Flux, SD3 and other DiT models are not supported). "
            "Use an SD1.x, SD2.x or SDXL checkpoint.")
    concepts, style = split_rows(rows)
    variants = build_variants(clip, prompt, negative, concepts, style)
    engine = build_engine(model, list(concepts) + list(style), NODE)
    clone = model.clone()
    engine.install(clone)
    latent_image = comfy.sample.fix_empty_latent_channels(clone, latent["samples"])
    record = CloraRecord([r.name for r in concepts], tuple(latent_image.shape[-2:]))
    guider = CloraGuider(clone, engine, variants, settings, record)
    sigmas = comfy.samplers.KSampler(clone, steps, clone.load_device, sampler_name, scheduler, denoise).sigmas
    noise = comfy.sample.prepare_noise(latent_image, seed, latent.get("batch_index"))
    import latent_preview
    callback = latent_preview.prepare_callback(clone, len(sigmas) - 1)
    samples = guider.sample(noise, latent_image, clora_sampler(sampler_name, len(sigmas) - 1, settings), sigmas,
                            denoise_mask=latent.get("noise_mask"), callback=callback,
                            disable_pbar=not comfy.utils.PROGRESS_BAR_ENABLED, seed=seed)
    record.to_cpu()
    if record.final_masks is None:  # no step ran (denoise 0): the latent comes back as is, no concept has a region
        record.final_masks = torch.zeros((len(concepts),) + record.latent_size, dtype=torch.bool)
    out = latent.copy()
    out["samples"] = samples.to(comfy.model_management.intermediate_device())
    return out, record
