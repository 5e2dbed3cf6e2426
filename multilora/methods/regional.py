"""Regional LoRA: each LoRA of the stack acts only inside its subject's region, in one model call per cond.

In the spirit of LoRAShop (Dalva et al. 2025, arXiv 2505.23758) and FreeFuse (arXiv 2510.23515), which restrict
each LoRA's contribution to its subject's mask on the image tokens, the engine applies at every LoRA-targeted
layer (``core.regions``, ``core.lowrank``)

    y_t = W x_t + b + Σ_i w_i · M_i(t) · c_i B_i A_i x_t,

fused into one low-rank pass for all k LoRAs, so a step costs about one merged LoRA, not k branches. M_i is row
i's region resized to the layer's token grid (every level of a UNet, the patch grid of a DiT); rows without a
region act everywhere (M_i ≡ 1), which makes all-one masks exactly the on-the-fly stack. Text tokens (cross-
attention keys/values of a UNet, the text stream of a joint-attention DiT) get every LoRA by default, or only
the rows without a region (``text_tokens``). Works on UNets (SD1.x, SDXL), Flux-family DiTs and Z-Image /
Lumina 2 (``host.token_routing`` has each family's token layout and the rule for Z-Image's pad tokens).
"""
from __future__ import annotations

from typing import Sequence

import torch

from ..core.regions import TEXT_ALL, TEXT_POLICIES, RegionError, normalize_regions
from ..core.stack import LoraRow
from ..host.engine import build_engine, clone_with_engine
from ..host.token_routing import ReferenceLatentCheck, TokenRouter, caption_multiple, model_family, token_roles


def check_masks(rows: Sequence[LoraRow], masks: Sequence[torch.Tensor | None], node: str,
                latent_size: tuple[int, int] | None = None, feather: float = 0.0) -> tuple[str, ...]:
    """Refuse before sampling what ``normalize_regions`` refuses (empty masks, bad shapes), at the latent's size
    when it is known, else at the masks' own; returns the notes (resizing, overlaps) for the node to report."""
    if len(masks) > len(rows):
        raise RegionError(f"{node}: {len(masks)} masks are connected but the stack has {len(rows)} enabled rows; "
                          "connect mask_i only for enabled row i.")
    masks = list(masks) + [None] * (len(rows) - len(masks))
    present = [m for m in masks if m is not None]
    if not present:
        return ()
    first = present[0]
    size = latent_size or (tuple(int(s) for s in first.shape[-2:]) if isinstance(first, torch.Tensor) and first.ndim >= 2
                           else (1, 1))
    plan = normalize_regions(masks, size, node, feather, [r.name for r in rows])
    return plan.notes


def regional_model(model, rows: Sequence[LoraRow], masks: Sequence[torch.Tensor | None], node: str,
                   feather: float = 0.0, text_tokens: str = TEXT_ALL, concept_tokens: dict | None = None):
    """A clone of ``model`` that samples with ``rows`` routed per token by ``masks`` (one per row, None =
    everywhere; any resolution, resized to each call's latent). ``concept_tokens`` ({row: token positions of its
    concept words}, ``regional_auto.text_concept_tokens``) is needed by ``text_tokens`` = ``TEXT_CONCEPT``."""
    return regional_clone(model, regional_engine(model, rows, masks, node, feather, text_tokens, concept_tokens),
                          node)


def regional_clone(model, engine, node: str):
    """A clone of ``model`` with a regional ``engine`` installed, and the check that refuses a Z-Image conditioning
    with reference latents when sampling starts (``ReferenceLatentCheck``)."""
    clone = clone_with_engine(model, engine)
    ReferenceLatentCheck(node).install(clone)
    return clone


def regional_engine(model, rows: Sequence[LoraRow], masks: Sequence[torch.Tensor | None], node: str,
                    feather: float = 0.0, text_tokens: str = TEXT_ALL, concept_tokens: dict | None = None):
    """The engine of ``regional_model`` with its TokenRouter, not yet installed on a clone."""
    if text_tokens not in TEXT_POLICIES:
        raise RegionError(f"{node}: text_tokens must be one of {list(TEXT_POLICIES)}, got {text_tokens!r}.")
    diffusion_model = model.model.diffusion_model
    family = model_family(diffusion_model)
    masks = list(masks) + [None] * (len(rows) - len(masks))
    check_masks(rows, masks, node, feather=feather)
    engine = build_engine(model, rows, node)
    roles = token_roles(diffusion_model, engine.layers.keys(), node)
    engine.token_router = TokenRouter(masks, roles, family, text_tokens, feather, [r.name for r in rows], node,
                                      caption_multiple(diffusion_model), concept_tokens)
    return engine
