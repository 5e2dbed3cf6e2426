"""CLoRA's settings (Meral et al. 2024, arXiv 2403.19776), its two variants, and what a run records.

Paper parameters: λ = ``mask_threshold`` ∈ [0, 1] (0.4), τ_c = ``temperature`` > 0 (0.5), α = ``step_size``
in VP-latent units (20), updates while i < ``opt_until``·N (0.5), ``refine_iters`` extra iterations (20) at
steps ⌊``refine_at``·N⌋ (0, 0.2, 0.4).

Four choices where the pack and the authors' released SD1.5 pipeline differ, each a setting:

- ``mask_source``: concept g's mask M_g = ⋃_t [A_t ≥ λ·max A_t] over the maps of g's tokens from *every*
  prompt variant (``MASK_UNION``, the pack; the same maps the loss groups), or only from g's own variant
  v = g + 1 (``MASK_OWN``, the authors).
- ``recompute_after_update``: after the update x → x' at step i, the fused prediction comes from a fresh
  UNet call at x' (True, the pack), or keeps the noise predictions ε = (x − D)/σ of the last loss pass,
  D' = x' − σ·ε = D + (x' − x) (False, the authors: one UNet pass fewer per updated step).
- ``attention_halves``: maps A = mean over layers and heads of the cond chunk's attention (``HALVES_COND``,
  the pack), or also over the uncond chunk at the same token positions, A = (A_cond + A_uncond)/2
  (``HALVES_BOTH``, the authors).
- ``refine_at``: the steps of the extra iterations as fractions of N: (0, 0.2, 0.4), steps 0/10/20 of a 50-step
  run (the pack), or (0, 0.1, 0.2), steps 0/10/20 of the authors' code's 100 DDIM steps.

``VARIANTS`` names the two sets: "pack" (the default until measurement says otherwise) and "authors' code".
Plain torch; part of the CLoRA method.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..core.errors import MultiLoRAError

MASK_UNION = "union of variants"
MASK_OWN = "own variant"
MASK_SOURCES = (MASK_UNION, MASK_OWN)
HALVES_COND = "cond"
HALVES_BOTH = "cond and uncond"
ATTENTION_HALVES = (HALVES_COND, HALVES_BOTH)

VARIANT_PACK = "pack"
VARIANT_AUTHORS = "authors' code"
VARIANT_CUSTOM = "custom"
VARIANTS: dict[str, dict] = {
    VARIANT_PACK: {"mask_source": MASK_UNION, "recompute_after_update": True, "attention_halves": HALVES_COND,
                   "refine_at": (0.0, 0.2, 0.4)},
    VARIANT_AUTHORS: {"mask_source": MASK_OWN, "recompute_after_update": False, "attention_halves": HALVES_BOTH,
                      "refine_at": (0.0, 0.1, 0.2)},
}
VARIANT_NAMES = (VARIANT_PACK, VARIANT_AUTHORS, VARIANT_CUSTOM)


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
    mask_source: str = MASK_UNION
    recompute_after_update: bool = True
    attention_halves: str = HALVES_COND

    @classmethod
    def for_variant(cls, variant: str, node: str = "CLoRA", **values) -> CloraSettings:
        """Settings of ``variant``: "pack" / "authors' code" set the four differing fields (whatever
        ``values`` says for them), "custom" takes them from ``values``."""
        if variant not in VARIANT_NAMES:
            raise MultiLoRAError(f"{node}: 'variant' must be one of {', '.join(repr(v) for v in VARIANT_NAMES)} "
                                 f"(got {variant!r}). Pick one of these.")
        return cls(**{**values, **VARIANTS.get(variant, {})})

    def variant(self) -> str:
        """The name of the variant these settings are, "custom" for any other mix."""
        own = {name: getattr(self, name) for name in VARIANTS[VARIANT_PACK]}
        return next((name for name, preset in VARIANTS.items() if preset == own), VARIANT_CUSTOM)


def check_variant_settings(settings: CloraSettings, node: str = "CLoRA") -> None:
    """MultiLoRAError naming the input when a variant field has a value outside its options."""
    for name, options in (("mask_source", MASK_SOURCES), ("attention_halves", ATTENTION_HALVES)):
        if getattr(settings, name) not in options:
            raise MultiLoRAError(f"{node}: '{name}' must be one of {', '.join(repr(o) for o in options)} "
                                 f"(got {getattr(settings, name)!r}). Pick one of these.")
    if not isinstance(settings.recompute_after_update, bool):
        raise MultiLoRAError(f"{node}: 'recompute_after_update' must be true or false "
                             f"(got {settings.recompute_after_update!r}).")


@dataclass
class CloraRecord:
    """What the preview node needs: per step, per concept, the token maps [T_g, h, w] the masks were built
    from (batch item 0, normalised)."""

    labels: list[str]
    latent_size: tuple[int, int]
    steps: list[list[torch.Tensor]] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    final_masks: torch.Tensor | None = None

    def to_cpu(self) -> CloraRecord:
        """Move the stored maps and masks to the CPU (the guider keeps them on the device while sampling)."""
        self.steps = [[m.cpu() for m in step] for step in self.steps]
        if self.final_masks is not None:
            self.final_masks = self.final_masks.cpu()
        return self

