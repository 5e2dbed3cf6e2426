"""Per-token routing for the on-the-fly engine: which tokens of each LoRA-targeted layer are image tokens, and
the weights ``lowrank.apply_layer_deltas`` gets for them (the formula is in ``core.regions``).

Token roles, decided per layer from the model family and the layer's path:
- UNet (SD1.x, SDXL): convolutions work on the latent's grid at their level; token layers of the transformer
  blocks on its flattened grid; cross-attention keys and values (``attn2.to_k`` / ``attn2.to_v``) on text tokens.
- Flux-family DiTs (ComfyUI's ``Flux`` class and its subclasses): the double blocks' ``img_*`` layers, ``img_in``
  and ``final_layer`` on image tokens (the 2 × 2-patch grid, then any reference-image tokens); ``txt_*`` layers and
  ``txt_in`` on text tokens; the single blocks' ``linear1`` / ``linear2`` on [text; image] together.
- Layers that take one vector per image (timestep, pooled text, modulation) keep the per-row weights.
Text tokens get the row weights of every LoRA (``TEXT_ALL``) or of the rows without a region (``TEXT_NONE``).
"""
from __future__ import annotations

import logging

import torch

from ..core.regions import (
    TEXT_ALL,
    RegionError,
    RegionPlan,
    maps_on_grid,
    normalize_regions,
    spatial_weights,
    text_weights,
    token_grid,
    token_weights,
)

AUTO, IMAGE, TEXT, JOINT = "auto", "image", "text", "joint"
UNET_TEXT_LAYERS = (".attn2.to_k", ".attn2.to_v")


def model_family(diffusion_model: torch.nn.Module) -> str:
    """"unet" or "flux" for the models whose token layout is known here; "" otherwise."""
    if hasattr(diffusion_model, "double_blocks") and hasattr(diffusion_model, "single_blocks") \
            and hasattr(diffusion_model, "img_in") and hasattr(diffusion_model, "txt_in"):
        return "flux"
    if hasattr(diffusion_model, "input_blocks") and hasattr(diffusion_model, "output_blocks"):
        return "unet"
    return ""


def token_roles(diffusion_model: torch.nn.Module, paths, node: str) -> dict[str, str]:
    """The role of every LoRA-targeted layer (paths as the engine keys them, e.g. ``diffusion_model.x.y``)."""
    family = model_family(diffusion_model)
    if not family:
        raise RegionError(f"{node}: regional LoRA does not know the token layout of {type(diffusion_model).__name__} "
                          "models; it supports UNets (SD1.x, SDXL) and Flux-family DiTs.")
    roles = {}
    for path in paths:
        if family == "unet":
            roles[path] = TEXT if path.endswith(UNET_TEXT_LAYERS) else AUTO
        elif ".single_blocks." in path and path.rsplit(".", 1)[-1] in ("linear1", "linear2"):
            roles[path] = JOINT
        elif ".txt_" in path or path.endswith(".txt_in"):
            roles[path] = TEXT
        else:
            roles[path] = IMAGE
    return roles


class TokenRouter:
    """Region weights of one sampling run for the engine's hooks. ``begin_call`` is told each model call's latent
    and text length (the regions are normalised once per latent size), ``weights`` turns a layer's row weights
    [B, k] into per-token ones."""

    def __init__(self, masks, roles: dict[str, str], family: str, text_policy: str = TEXT_ALL, feather: float = 0.0,
                 names=None, node: str = "Regional LoRA"):
        self.masks = list(masks)
        self.roles = roles
        self.family = family
        self.text_policy = text_policy
        self.feather = feather
        self.names = names
        self.node = node
        self.patch = 2 if family == "flux" else 1
        self.plan: RegionPlan | None = None
        self._plans: dict[tuple[int, int], RegionPlan] = {}
        self._device_maps: dict = {}
        self._latent: tuple[int, int] = (0, 0)
        self._text_tokens = 0
        self._cache: dict = {}

    def plan_for(self, latent: tuple[int, int]) -> RegionPlan:
        """The regions normalised for a latent of ``latent`` = (H, W) (cached; the first one is logged)."""
        plan = self._plans.get(latent)
        if plan is None:
            plan = self._plans[latent] = normalize_regions(self.masks, latent, self.node, self.feather, self.names)
            for note in plan.notes:
                logging.getLogger("multilora").info("%s: %s", self.node, note)
        return plan

    def key(self) -> tuple:
        """What the weights' Python control flow depends on (joins a CUDA graph's signature)."""
        layout = (tuple(self.plan.maps.shape), self.plan.regional) if self.plan is not None else ()
        return ("tokens", id(self), self._latent, self._text_tokens, self.text_policy, layout)

    def set_maps(self, maps: torch.Tensor, regional: tuple[bool, ...] | None = None,
                 latent: tuple[int, int] | None = None) -> None:
        """New region maps for the current latent size (masks found or refreshed during sampling), copied into the
        device buffers a replayed graph reads. ``regional``: which rows now have a region (automatic masks); a new
        batch size or ``regional`` makes a new plan instead (its layout is part of ``key``, so graphs re-capture).
        ``latent``: the (H, W) whose maps these are, when not the current call's."""
        latent = self._latent if latent is None else (int(latent[0]), int(latent[1]))
        current = self.plan_for(latent)
        regional = current.regional if regional is None else tuple(bool(r) for r in regional)
        if maps.shape[1:] != current.maps.shape[1:] or len(regional) != maps.shape[1]:
            raise RegionError(f"{self.node}: new region maps {tuple(maps.shape)} do not match {tuple(current.maps.shape)}")
        self._cache = {}
        if tuple(maps.shape) != tuple(current.maps.shape) or regional != current.regional:
            plan = self._plans[latent] = RegionPlan(maps.detach().float().cpu().clone(), regional)
            self._device_maps = {key: b for key, b in self._device_maps.items() if key[0] != latent}
            if self.plan is current:
                self.plan = plan
            return
        current.maps.copy_(maps)
        for (size, _, _), buffer in self._device_maps.items():
            if size == latent:
                buffer.copy_(maps)

    def reset_maps(self) -> None:
        """Back to the masks given at construction (a new sampling run of automatic masks)."""
        self._plans, self._device_maps, self._cache, self.plan = {}, {}, {}, None

    def begin_call(self, x: torch.Tensor, context: torch.Tensor | None) -> None:
        """Start a model call on latent ``x`` ([B, C, H, W]) with text ``context`` ([B, T, C])."""
        self._latent = (int(x.shape[-2]), int(x.shape[-1]))
        self.plan = self.plan_for(self._latent)
        self._text_tokens = 0 if context is None or context.ndim != 3 else int(context.shape[1])
        self._cache = {}

    def _maps_on(self, device, dtype, grid: tuple[int, int]) -> torch.Tensor:
        key = (device, dtype, grid)
        found = self._cache.get(key)
        if found is None:
            base = self._device_maps.get((self._latent, device, dtype))
            if base is None:
                base = self._device_maps[(self._latent, device, dtype)] = self.plan.maps.to(device=device, dtype=dtype)
            found = self._cache[key] = maps_on_grid(base, grid)
        return found

    def _cached(self, key, make):
        found = self._cache.get(key)
        if found is None:
            found = self._cache[key] = make()
        return found

    def weights(self, path: str, x: torch.Tensor, out: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Row weights [B, k] → this layer's weights: [B, k] (vector or text layers), [B, N, k] or [B, k, h, w]."""
        role = self.roles.get(path, AUTO)
        if out.ndim == 2 or x.ndim == 2:
            return rows
        if role == TEXT:
            return self._cached(("text", id(rows)), lambda: text_weights(rows, self.plan.regional, self.text_policy))
        if out.ndim == 4:
            grid = (int(out.shape[-2]), int(out.shape[-1]))
            return self._cached(("conv", grid, id(rows)),
                                lambda: spatial_weights(rows, self._maps_on(rows.device, rows.dtype, grid)))
        if out.ndim != 3:
            return rows
        tokens = int(x.shape[1])
        prefix = self._text_tokens if role == JOINT else 0
        if role == AUTO:
            grid = token_grid(tokens, self._latent)
        else:
            grid = (-(-self._latent[0] // self.patch), -(-self._latent[1] // self.patch))
        if grid is None or tokens - prefix < grid[0] * grid[1]:
            raise RegionError(f"{self.node}: layer {path} has {tokens} tokens, which fit no grid of the "
                              f"{self._latent[1]}×{self._latent[0]} latent; this model's layout is not supported.")
        suffix = tokens - prefix - grid[0] * grid[1]

        def make():
            head = text_weights(rows, self.plan.regional, self.text_policy) if prefix else None
            return token_weights(rows, self._maps_on(rows.device, rows.dtype, grid), prefix, suffix, head)
        return self._cached(("tokens", grid, prefix, suffix, id(rows)), make)
