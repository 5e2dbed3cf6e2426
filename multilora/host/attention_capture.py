"""Cross-attention capture for CLoRA (Meral et al. 2024, arXiv 2403.19776, §3.2): per-token attention
probabilities A = softmax(q·kᵀ/√d) for the concept tokens only, at the cross-attention layers whose
resolution is latent/4 (SD1.5 512²: 16×16; SDXL 1024²: 32×32), averaged over heads and layers, for the
conditional chunks only.

The attn2 replacement returns ComfyUI's own optimized attention for every call, so outputs are those of the
stock model; only at the chosen resolution does it also compute the (small) logits q·kᵀ of the conditional
chunks to record the columns of the concept tokens. For the latent update, which needs the maps and nothing
the UNet computes after them, ``StopAfterCapture`` ends each model call once the last capture site has been
recorded (SD1.5: output blocks 6–11 and the output conv are skipped). Host module.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import torch

import comfy.ldm.modules.attention as comfy_attention

from ..core.errors import MultiLoRAError


class CrossAttentionRequired(MultiLoRAError):
    """The model has no UNet cross-attention (DiT families)."""


class CaptureComplete(Exception):
    """Raised by a ConceptAttention after the last site of a model call: nothing later changes its maps."""

    def __init__(self, capture: "ConceptAttention"):
        super().__init__("concept attention captured")
        self.capture = capture


def cross_attention_levels(diffusion_model) -> dict[tuple[str, int, int], int]:
    """Every cross-attention site (block, number, transformer_index, as ComfyUI keys them) → its level, the
    number of 2× downsamplings between the latent and that layer (counted from the UNet's structure)."""
    sites: dict[tuple[str, int, int], int] = {}
    level = 0
    groups = (("input", getattr(diffusion_model, "input_blocks", None)),
              ("middle", [getattr(diffusion_model, "middle_block", None)]),
              ("output", getattr(diffusion_model, "output_blocks", None)))
    for name, blocks in groups:
        if blocks is None:
            continue
        for number, block in enumerate(blocks):
            if block is None:
                continue
            for layer in block:
                kind = type(layer).__name__
                if kind == "Downsample":
                    level += 1
                transformer_blocks = getattr(layer, "transformer_blocks", None)
                for index, tb in enumerate(transformer_blocks or []):
                    if getattr(tb, "attn2", None) is not None:
                        sites[(name, 0 if name == "middle" else number, index)] = level
                if kind == "Upsample":
                    level -= 1
    return sites


def cross_attention_sites(diffusion_model) -> list[tuple[str, int, int]]:
    """Every (block, number, transformer_index) of a UNet's cross-attention layers."""
    return list(cross_attention_levels(diffusion_model))


def capture_level(diffusion_model, levels: dict[tuple[str, int, int], int] | None = None) -> int:
    """The paper's latent/4 level (2) when the UNet has cross-attention there, else the deepest level it has
    (``levels``: the model's ``cross_attention_levels`` when the caller has them already)."""
    found = set((cross_attention_levels(diffusion_model) if levels is None else levels).values())
    return 2 if 2 in found or not found else max(found)


@dataclass
class ConceptAttention:
    """attn2 replacement recording concept-token attention maps.

    ``columns``: cond index (position in the guider's cond list) → token positions to record; chunks of other
    cond indices (unconditional ones) are not recorded. ``maps[cond_index]`` collects one [rows, H·W, T]
    tensor per captured layer call; ``size`` is the (H, W) of the captured level. ``stop_after``: the number of
    capture sites a model call passes; with it set, the last of them raises ``CaptureComplete`` (only under a
    ``StopAfterCapture`` wrapper, which re-arms it for every call). ``index_cache``: (cond index, device) → the
    token positions as a device tensor; pass one dict for all captures of a run with the same ``columns``.
    """

    size: tuple[int, int]
    columns: dict[int, list[int]]
    enabled: bool = True
    maps: dict[tuple[int, int], dict[int, list[torch.Tensor]]] = field(default_factory=dict)
    stop_after: int | None = None
    index_cache: dict = field(default_factory=dict, repr=False)
    _armed: bool = field(default=False, repr=False)
    _seen: int = field(default=0, repr=False)

    def reset(self) -> None:
        self.maps = {}

    def arm(self) -> None:
        """Start counting capture sites for a new model call (StopAfterCapture)."""
        self._armed = self.stop_after is not None
        self._seen = 0

    def _positions(self, cond_index: int, positions: list[int], device: torch.device) -> torch.Tensor:
        # One host→device copy per cond and device for the whole run instead of one per layer call.
        key = (cond_index, device)
        index = self.index_cache.get(key)
        if index is None:
            index = torch.tensor(positions, device=device)
            self.index_cache[key] = index
        return index

    def _wanted(self, size: tuple[int, int]) -> bool:
        return tuple(size) == tuple(self.size)

    def __call__(self, q, k, v, extra_options):
        heads = extra_options["n_heads"]
        out = comfy_attention.optimized_attention(q, k, v, heads, attn_precision=extra_options.get("attn_precision"))
        shape = extra_options.get("activations_shape")
        if not self.enabled or shape is None or not self._wanted(tuple(shape[-2:])):
            return out
        level = self.maps.setdefault(tuple(int(d) for d in shape[-2:]), {})
        chunks = extra_options.get("cond_or_uncond") or [0]
        rows = q.shape[0] // len(chunks)
        dim = q.shape[-1] // heads
        for c, cond_index in enumerate(chunks):
            positions = self.columns.get(int(cond_index))
            if not positions:
                continue
            qc = q[c * rows:(c + 1) * rows].reshape(rows, -1, heads, dim).transpose(1, 2).float()
            kc = k[c * rows:(c + 1) * rows].reshape(rows, -1, heads, dim).transpose(1, 2).float()
            probs = torch.softmax(qc @ kc.transpose(-1, -2) * dim ** -0.5, dim=-1)
            index = self._positions(int(cond_index), positions, probs.device)
            level.setdefault(int(cond_index), []).append(probs.index_select(-1, index).mean(1))
        if self._armed:
            self._seen += 1
            if self._seen >= self.stop_after:
                self._armed = False
                raise CaptureComplete(self)
        return out

    def level(self) -> tuple[int, int] | None:
        """The (H, W) whose maps were recorded, None before any."""
        return tuple(self.size) if tuple(self.size) in self.maps else None

    def averaged(self, cond_index: int) -> torch.Tensor | None:
        """[rows, T, H, W]: the mean over captured layers of one cond's maps, reshaped with the layer's (H, W)."""
        size = self.level()
        recorded = self.maps.get(size, {}).get(cond_index) if size else None
        if not recorded:
            return None
        mean = torch.stack(recorded).mean(0)  # [rows, H·W, T]
        height, width = size
        return mean.transpose(1, 2).reshape(mean.shape[0], mean.shape[2], height, width)


class StopAfterCapture:
    """DIFFUSION_MODEL wrapper ending the UNet call once ``capture`` has recorded its last site (the latent
    update needs only the maps): returns zeros in place of the prediction, which the caller must not use."""

    def __init__(self, capture: ConceptAttention):
        self.capture = capture

    def __call__(self, executor, x, timesteps=None, context=None, y=None, control=None,
                 transformer_options: Mapping = {}, **kwargs):
        self.capture.arm()
        try:
            return executor(x, timesteps, context, y, control, transformer_options, **kwargs)
        except CaptureComplete as stop:
            if stop.capture is not self.capture:
                raise
            channels = getattr(executor.class_obj, "out_channels", x.shape[1])
            return x.new_zeros((x.shape[0], channels) + tuple(x.shape[2:]))
        finally:
            self.capture._armed = False


def install_capture(model_options: dict, diffusion_model, capture: ConceptAttention,
                    sites: list[tuple[str, int, int]] | None = None) -> None:
    """Put ``capture`` on every cross-attention site in (a copy of) model_options' patches_replace
    (``sites``: the model's cross-attention sites when the caller has them already)."""
    sites = cross_attention_sites(diffusion_model) if sites is None else sites
    if not sites:
        raise CrossAttentionRequired(
            "CLoRA: this model has no UNet cross-attention (Flux, SD3 and other DiT models are not supported). "
            "Use an SD1.x, SD2.x or SDXL checkpoint.")
    transformer_options = model_options.setdefault("transformer_options", {})
    replace = dict(transformer_options.get("patches_replace", {}))
    attn2 = dict(replace.get("attn2", {}))
    for site in sites:
        attn2[site] = capture
    replace["attn2"] = attn2
    transformer_options["patches_replace"] = replace


def capture_size(latent_height: int, latent_width: int, level: int = 2) -> tuple[int, int]:
    """The (H, W) after ``level`` 2× downsamplings (ComfyUI's convs round up): latent/4 at level 2
    (docs/algorithms.md §3.3)."""
    height, width = latent_height, latent_width
    for _ in range(level):
        height, width = -(-height // 2), -(-width // 2)
    return (height, width)
