"""CLoRA (Meral et al. 2024, arXiv 2403.19776) on the on-the-fly engine: SPEC §3.

Variants v = 0..K share one batched UNet call per step: variant 0 is the base prompt with no concept LoRA,
variant i the prompt with concept i decorated by its trigger, LoRA i on the UNet (and on CLIP for its
prompt); style rows are global (every variant, never masked). At the latent/4 cross-attention layers the
concept tokens' attention maps are captured from the conditional chunks.

- Latent update (steps i < opt_until·N): L = NT-Xent over the concept groups' maps (τ_c = 0.5); the step
  size α is defined for the VP latent z = x/√(1+σ²), so in ComfyUI's σ-space x ← x − α·(1+σ²)·∇ₓL.
  Extra ``refine_iters`` iterations at steps ⌊{0, 0.2, 0.4}·N⌋. Predictions are recomputed after the update.
- Fusion: Mask_i = ∪ tokens [A ≥ λ·max A] over concept i's token maps from every variant (the loss's
  groups), nearest-resized to the latent; the base variant has a full mask, so each pixel averages the
  base and the variants covering it, and pixels no concept covers keep the base prediction; applied to
  cond and uncond separately, then CFG.
Multistep/ancestral samplers restart their history after each updated step of the optimisation phase.
Host module.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import Sequence

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.patcher_extension
import comfy.sample
import comfy.samplers
import comfy.utils

from ..host.attention_capture import (ConceptAttention, CrossAttentionRequired, StopAfterCapture, capture_level, capture_size,
                                cross_attention_levels, cross_attention_sites, install_capture)
from ..core.clora_masks import check_threshold, fuse_with_masks, masks_from_maps
from ..host.comfy_compat import weight_streamed
from ..core.contrastive import concept_contrastive_loss, normalize_maps
from ..host.engine import build_engine
from ..host.feature_cache import CheckpointedUNet
from ..methods.merge import merge_rows
from ..core.prompt_tokens import concept_positions, decorate_prompt
from ..core.errors import MultiLoRAError
from ..host.onthefly import ROUTING_KEY, OnTheFlyLoras
from ..core.routing import ByCondIndex, sample_sigmas_of_call, sigma_of_call, step_index
from ..core.stack import LoraRow

NODE = "CLoRA"
CHECKPOINT_KEY = "multilora.gradient_checkpointing"
STOP_KEY = "multilora.clora_stop_after_capture"


@dataclass
class Variant:
    """One prompt variant: its conds, the token positions of each concept group inside its prompt."""

    prompt: str
    positive: list
    negative: list
    groups: dict[int, list[int]]  # concept index → token positions in this variant's prompt


@dataclass
class CloraSettings:
    cfg: float
    mask_threshold: float = 0.4
    temperature: float = 0.5
    step_size: float = 20.0
    opt_until: float = 0.5
    refine_iters: int = 20
    refine_at: tuple[float, ...] = (0.0, 0.2, 0.4)
    apply_mask_after: int = 0
    gradient_checkpointing: bool = False


@dataclass
class CloraRecord:
    """What the preview node needs: per step, per concept, the token maps [T_g, h, w] (batch item 0)."""

    labels: list[str]
    latent_size: tuple[int, int]
    steps: list[list[torch.Tensor]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    final_masks: torch.Tensor | None = None

    def to_cpu(self) -> "CloraRecord":
        """Move the stored maps and masks to the CPU (the guider keeps them on the device while sampling)."""
        self.steps = [[m.cpu() for m in step] for step in self.steps]
        if self.final_masks is not None:
            self.final_masks = self.final_masks.cpu()
        return self


def split_rows(rows: Sequence[LoraRow]) -> tuple[list[LoraRow], list[LoraRow]]:
    """(concept rows, global style rows); CLoRA needs at least two LoRAs with concept words."""
    style = [r for r in rows if r.category == "style"]
    concepts = [r for r in rows if r.category != "style"]
    missing = [r.name for r in concepts if not r.concept_words()]
    if missing:
        raise MultiLoRAError(f"CLoRA: LoRA '{missing[0]}' has no concept word. Fill in the row's 'concept' "
                             "with the word of the prompt it should draw (or set its category to 'style').")
    if len(concepts) < 2:
        raise MultiLoRAError(f"CLoRA: needs at least 2 LoRAs with concept words, the stack has {len(concepts)}. "
                             "Add rows with a concept word each (style rows are global and do not count).")
    return concepts, style


def routing_table(concepts: int, style: int) -> ByCondIndex:
    """cond index 2v (cond) and 2v+1 (uncond) of variant v → LoRA weights: its concept LoRA + every style row."""
    count = concepts + style
    table = {}
    for v in range(concepts + 1):
        weights = [0.0] * concepts + [1.0] * style
        if v > 0:
            weights[v - 1] = 1.0
        table[2 * v] = table[2 * v + 1] = tuple(weights)
    return ByCondIndex(table, (0.0,) * count)


def refine_steps(steps: int, fractions: Sequence[float]) -> set[int]:
    """Steps with extra refinement iterations: ⌊f·N⌋ for each fraction (SPEC: 0, 10, 20 of 50)."""
    return {int(f * steps) for f in fractions}


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
    """Autograd through ComfyUI's ops on inference-mode weights (ENV.md recipe); all undone in ``finally``.

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

    def _capture_levels(self) -> dict:
        """Cross-attention site → level of this guider's UNet (its structure does not change)."""
        if self._levels is None:
            self._levels = cross_attention_levels(self.model_patcher.model.diffusion_model)
        return self._levels

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
        columns = {2 * v: [p for g in sorted(var.groups) for p in var.groups[g]] for v, var in enumerate(self.variants)}
        levels = self._capture_levels()
        height, width = x.shape[-2], x.shape[-1]
        size = capture_size(height, width, capture_level(self.model_patcher.model.diffusion_model, levels))
        # Sites whose activations have the captured size: a model call passes exactly these many captures.
        sites = sum(1 for level in levels.values() if capture_size(height, width, level) == size)
        return ConceptAttention(size, columns, stop_after=sites or None, index_cache=self._index_cache)

    def concept_maps(self, capture: ConceptAttention) -> list[list[torch.Tensor]]:
        """Per concept g: the [rows, T, h, w] maps of its tokens in every variant where they occur."""
        groups: list[list[torch.Tensor]] = [[] for _ in range(len(self.variants) - 1)]
        for v, variant in enumerate(self.variants):
            maps = capture.averaged(2 * v)
            if maps is None:
                continue
            offset = 0
            for g in sorted(variant.groups):
                count = len(variant.groups[g])
                groups[g].append(maps[:, offset:offset + count])
                offset += count
        return groups

    def loss(self, x: torch.Tensor, timestep: torch.Tensor, model_options: dict) -> torch.Tensor:
        """The contrastive loss at (x, σ) through the conditional branches of every variant."""
        capture = self._capture(x)
        options = self._options(model_options, capture)
        if self.settings.gradient_checkpointing:
            # No early stop here: it would end a checkpointed block half-way, and backward recomputes blocks.
            comfy.patcher_extension.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
                                                         CHECKPOINT_KEY, CheckpointedUNet(self.engine), options,
                                                         is_model_options=True)
        else:  # the loss needs the maps only: skip the UNet after the last capture site (outputs unused)
            comfy.patcher_extension.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL,
                                                         STOP_KEY, StopAfterCapture(capture), options,
                                                         is_model_options=True)
        comfy.samplers.calc_cond_batch(self.inner_model, self._cond_list(with_uncond=False), x, timestep, options)
        groups = self.concept_maps(capture)
        total = x.new_zeros(())
        rows = x.shape[0]
        for r in range(rows):
            per_concept = [torch.cat([m[r] for m in g], dim=0) for g in groups]
            total = total + concept_contrastive_loss(per_concept, self.settings.temperature)
        return total / rows

    @contextlib.contextmanager
    def gradient_pass(self):
        """Autograd inside ComfyUI's inference mode (ENV.md recipe): weights shared as normal tensors, the
        engine on its hooks; entered once for all iterations of an update (re-entering is free)."""
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
        """Reuse the gradient passes' weight aliases over the block (one sampling run), then drop them."""
        previous = self._aliases
        self._aliases = {} if previous is None else previous
        try:
            yield
        finally:
            self._aliases = previous

    def _value_and_gradient(self, x: torch.Tensor, sigma: torch.Tensor, model_options: dict) -> tuple[torch.Tensor, torch.Tensor]:
        with self.gradient_pass():
            latent = x.detach().clone().requires_grad_(True)
            value = self.loss(latent, sigma.detach().clone(), model_options)
            (grad,) = torch.autograd.grad(value, latent)
        return value.detach(), grad.detach()

    def loss_gradient(self, x: torch.Tensor, sigma: torch.Tensor, model_options: dict) -> tuple[float, torch.Tensor]:
        """(L, ∇ₓL) with autograd enabled inside ComfyUI's inference mode (ENV.md recipe)."""
        value, grad = self._value_and_gradient(x, sigma, model_options)
        return float(value), grad

    def update_latent(self, x: torch.Tensor, sigma: torch.Tensor, iterations: int, model_options: dict) -> torch.Tensor:
        """x ← x − α·(1+σ²)·∇ₓL, ``iterations`` times (α in VP-latent units, SPEC §3.5)."""
        scale = self.settings.step_size * (1.0 + float(sigma.flatten()[0]) ** 2)
        outer_inference = torch.is_inference_mode_enabled()
        values = []
        with self.gradient_pass():
            for _ in range(iterations):
                comfy.model_management.throw_exception_if_processing_interrupted()
                value, grad = self._value_and_gradient(x, sigma, model_options)
                values.append(value)
                with torch.inference_mode(outer_inference):  # x stays the kind of tensor the sampler gave
                    x = x - scale * grad.to(x.dtype)
        if values:  # one host sync per update instead of one per iteration
            self.record.losses.extend(float(v) for v in torch.stack(values).tolist())
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

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        step = self._step_of(timestep, model_options)  # before the UNet call: its host sync waits for nothing
        capture = self._capture(x)
        options = self._options(model_options, capture)
        outputs = comfy.samplers.calc_cond_batch(self.inner_model, self._cond_list(), x, timestep, options)
        groups = self.concept_maps(capture)
        size = tuple(x.shape[-2:])
        # All rows at once ([B, T, h, w] maps): per-map normalisation and thresholds, as row by row.
        masks = masks_from_maps([torch.cat(g, dim=1) for g in groups], self.settings.mask_threshold, size)
        if step >= len(self.record.steps):  # one entry per sampling step (multi-evaluation samplers: the first)
            self.record.steps.append([normalize_maps(torch.cat([m[0] for m in g], dim=0).flatten(0, -3))
                                      for g in groups])  # on the device until the run ends (CloraRecord.to_cpu)
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
        return comfy.samplers.cfg_function(self.inner_model, c, u, self.cfg, x, timestep, model_options=model_options)


def clora_sampler(sampler_name: str, steps_total: int, settings: CloraSettings) -> comfy.samplers.KSAMPLER:
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


def encode(clip, text: str) -> list:
    """CONDITIONING for ``text`` exactly as core CLIPTextEncode makes it."""
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def build_variants(clip, prompt: str, negative: str, concepts: Sequence[LoraRow], style: Sequence[LoraRow]) -> list[Variant]:
    """Variant 0 (base prompt) and one decorated variant per concept, each encoded with only its CLIP LoRAs."""
    for row in concepts:  # every concept word must be in the base prompt: fail before any encoding
        concept_positions(clip.tokenize, prompt, row.concept_words())
    variants = []
    for v in range(len(concepts) + 1):
        text = prompt
        lora_rows = list(style)
        if v > 0:
            row = concepts[v - 1]
            if row.trigger_words():
                for word in row.concept_words():
                    text = decorate_prompt(text, word, row.trigger_words())
            lora_rows = [row] + lora_rows
        _, variant_clip = merge_rows(None, clip, lora_rows, NODE)
        groups = {}
        for g, row in enumerate(concepts):
            words = list(row.concept_words()) + (list(row.trigger_words()) if v == g + 1 else [])
            found = concept_positions(variant_clip.tokenize, text, words)
            groups[g] = sorted({p for positions in found.values() for p in positions})
        variants.append(Variant(text, encode(variant_clip, text), encode(variant_clip, negative), groups))
    return variants


def clora_sample(model, clip, prompt: str, negative: str, rows: Sequence[LoraRow], seed: int, steps: int,
                 sampler_name: str, scheduler: str, latent: dict, denoise: float, settings: CloraSettings):
    """Run CLoRA; returns (LATENT dict, CloraRecord). Inputs are not modified."""
    check_threshold(settings.mask_threshold)
    if not 0.0 <= settings.opt_until <= 1.0:
        raise MultiLoRAError(f"CLoRA: opt_until must be in [0, 1], got {settings.opt_until}.")
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
