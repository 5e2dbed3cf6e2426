"""Per-token routing for the on-the-fly engine: which tokens of each LoRA-targeted layer are image tokens, and
the weights ``lowrank.apply_layer_deltas`` gets for them (the formula is in ``core.regions``).

Token roles, decided per layer from the model family and the layer's path:
- UNet (SD1.x, SDXL): convolutions work on the latent's grid at their level; token layers of the transformer
  blocks on its flattened grid; cross-attention keys and values (``attn2.to_k`` / ``attn2.to_v``) on text tokens.
- Flux-family DiTs (ComfyUI's ``Flux`` class and its subclasses): the double blocks' ``img_*`` layers, ``img_in``
  and ``final_layer`` on image tokens (the 2 × 2-patch grid, then any reference-image tokens); ``txt_*`` layers and
  ``txt_in`` on text tokens; the single blocks' ``linear1`` / ``linear2`` on [text; image] together.
- Lumina-family DiTs (ComfyUI's ``NextDiT``: Z-Image, Lumina 2; same layout in 0.3.75 and 0.33): ``cap_embedder``
  on the caption's T tokens and ``context_refiner`` on the caption padded with the learned ``cap_pad_token`` to a
  multiple of ``pad_tokens_multiple`` (Z-Image 32, Lumina 2 no padding); ``x_embedder`` on exactly the 2 × 2-patch
  grid; ``noise_refiner`` on [grid; image pad tokens] (``x_pad_token``, up to the same multiple); the main
  ``layers`` and ``final_layer`` on the joint [caption + its pads; grid; image pads], caption first. Reference
  latents (Z-Image's omni mode: reference images, their captions and SigLIP tokens before these, and a doubled
  timestep batch) and the pixel-space variant (``dec_net``, one patch per batch row) are refused.
- Layers that take one vector per image (timestep, pooled text, modulation) keep the per-row weights.
Text tokens get the row weights of every LoRA (``TEXT_ALL``), of the rows without a region (``TEXT_NONE``), or each
regional LoRA stays off the other regional rows' concept words on the positive prompt (``TEXT_CONCEPT``; positions
from the method, the positive rows from ``cond_or_uncond``).

Pad tokens (Lumina family): they carry no prompt word and no pixel, and the attention mask is None, so every token
attends to them. Caption pads are part of the text stream and follow the text policy, like the caption. Image pads
get each LoRA by its share of the image, w_i · mean_t M_i(t) over the grid (``core.regions.area_weights``): a LoRA
confined to a region reaches the tokens that every region reads only in proportion to its area (a regional LoRA at
full strength there would leak into the other regions through them; no LoRA at all would make an all-one mask
differ from the plain stack), and all-one masks give exactly the row weights, so they equal the on-the-fly stack
and ComfyUI's merged LoRAs on every token.
"""
from __future__ import annotations

import logging

import torch

import comfy.patcher_extension

from ..core.regions import (
    TEXT_ALL,
    TEXT_CONCEPT,
    RegionError,
    RegionPlan,
    area_weights,
    concept_keep,
    concept_text_weights,
    maps_on_grid,
    normalize_regions,
    spatial_weights,
    text_weights,
    token_grid,
    token_weights,
)

AUTO, IMAGE, TEXT, JOINT = "auto", "image", "text", "joint"
UNET, FLUX, LUMINA = "unet", "flux", "lumina"
UNET_TEXT_LAYERS = (".attn2.to_k", ".attn2.to_v")
LUMINA_ROLES = {"cap_embedder": TEXT, "context_refiner": TEXT, "x_embedder": IMAGE, "noise_refiner": IMAGE,
                "layers": JOINT, "final_layer": JOINT}


def model_family(diffusion_model: torch.nn.Module) -> str:
    """"unet", "flux" or "lumina" for the models whose token layout is known here; "" otherwise."""
    if hasattr(diffusion_model, "double_blocks") and hasattr(diffusion_model, "single_blocks") \
            and hasattr(diffusion_model, "img_in") and hasattr(diffusion_model, "txt_in"):
        return "flux"
    if all(hasattr(diffusion_model, name) for name in ("cap_embedder", "x_embedder", "context_refiner",
                                                       "noise_refiner", "layers")):
        return "lumina"
    if hasattr(diffusion_model, "input_blocks") and hasattr(diffusion_model, "output_blocks"):
        return "unet"
    return ""


def reference_latents_message(node: str) -> str:
    return (f"{node}: the conditioning holds reference latents (Z-Image omni / edit mode), which put reference-image "
            "tokens before the image's own; regional LoRA does not route that layout. Remove the ReferenceLatent node "
            "from the conditioning, or sample without regions (LoRA Stack).")


def refuse_reference_latents(diffusion_model: torch.nn.Module, conditionings, node: str) -> None:
    """RegionError before sampling when a Z-Image / Lumina conditioning carries ReferenceLatent's reference
    latents (the omni layout, which the router refuses at the first model call otherwise)."""
    if model_family(diffusion_model) != LUMINA:
        return
    for conditioning in conditionings:
        for entry in conditioning or ():
            if isinstance(entry, (list, tuple)) and len(entry) > 1 and isinstance(entry[1], dict) \
                    and entry[1].get("reference_latents"):
                raise RegionError(reference_latents_message(node))


class ReferenceLatentCheck:
    """OUTER_SAMPLE wrapper of a regional clone on a Lumina-family model: the guider's conds (any sampler node) are
    checked for reference latents when sampling starts, before the first step, since a model patch never sees the
    conditioning before that."""

    KEY = "multilora_regional_reference_check"

    def __init__(self, node: str):
        self.node = node

    def __call__(self, executor, *args, **kwargs):
        conds = getattr(getattr(executor, "class_obj", None), "conds", None)
        for entries in (conds.values() if isinstance(conds, dict) else ()):
            if any(isinstance(entry, dict) and entry.get("reference_latents") for entry in entries or ()):
                raise RegionError(reference_latents_message(self.node))
        return executor(*args, **kwargs)

    def install(self, patcher) -> None:
        if model_family(patcher.model.diffusion_model) == LUMINA:
            patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, self.KEY, self)


def caption_multiple(diffusion_model: torch.nn.Module) -> int:
    """The multiple a Lumina-family model pads its caption to in the joint sequence (1: no padding)."""
    if model_family(diffusion_model) != LUMINA:
        return 1
    return int(getattr(diffusion_model, "pad_tokens_multiple", None) or 1)


def token_roles(diffusion_model: torch.nn.Module, paths, node: str) -> dict[str, str]:
    """The role of every LoRA-targeted layer (paths as the engine keys them, e.g. ``diffusion_model.x.y``)."""
    family = model_family(diffusion_model)
    if not family:
        raise RegionError(f"{node}: regional LoRA does not know the token layout of {type(diffusion_model).__name__} "
                          "models; it supports UNets (SD1.x, SDXL), Flux-family DiTs and Z-Image / Lumina 2.")
    if family == LUMINA and getattr(diffusion_model, "dec_net", None) is not None:
        raise RegionError(f"{node}: the pixel-space Z-Image ({type(diffusion_model).__name__}) decodes every patch as "
                          "its own batch row, which regional LoRA cannot route; use a latent Z-Image model, or the "
                          "LoRA Stack without regions.")
    roles = {}
    for path in paths:
        if family == LUMINA:
            roles[path] = LUMINA_ROLES.get(path.split(".")[1] if path.count(".") else path, AUTO)
        elif family == UNET:
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
                 names=None, node: str = "Regional LoRA", text_multiple: int = 1,
                 concept_tokens: dict[int, list[int]] | None = None):
        self.masks = list(masks)
        self.roles = roles
        self.family = family
        self.text_policy = text_policy
        self.feather = feather
        self.names = names
        self.node = node
        self.patch = 2 if family in (FLUX, LUMINA) else 1
        self.text_multiple = max(1, int(text_multiple))  # the joint sequence's caption is padded to this multiple
        self.plan: RegionPlan | None = None
        self._plans: dict[tuple[int, int], RegionPlan] = {}
        self._device_maps: dict = {}
        self._latent: tuple[int, int] = (0, 0)
        self._text_tokens = 0
        self._cache: dict = {}
        if text_policy == TEXT_CONCEPT and concept_tokens is None:
            raise RegionError(f"{node}: text_tokens '{TEXT_CONCEPT}' needs the concept words' token positions.")
        self.concept_tokens = {int(i): sorted(int(p) for p in ps) for i, ps in (concept_tokens or {}).items()}
        self._chunks: tuple[int, ...] = (0,)
        self._raw_text, self._batch = 0, 1
        self._concept: dict = {}  # TEXT_CONCEPT's device tensors, made in ``stage`` (outside any graph capture)

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
        chunks = self._chunks if self.text_policy == TEXT_CONCEPT else ()
        return ("tokens", id(self), self._latent, self._text_tokens, self.text_policy, layout, chunks)

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
        self._plans, self._device_maps, self._cache, self.plan, self._concept = {}, {}, {}, None, {}

    def begin_call(self, x: torch.Tensor, context: torch.Tensor | None, conds=None, cond_or_uncond=None) -> None:
        """Start a model call on latent ``x`` ([B, C, H, W]) with text ``context`` ([B, T, C]), the call's other
        model inputs ``conds`` (apply_model's keyword arguments) and its chunks (``cond_or_uncond``: 0 = positive)."""
        if self.family == LUMINA and (conds or {}).get("ref_latents"):
            raise RegionError(reference_latents_message(self.node))
        self._latent = (int(x.shape[-2]), int(x.shape[-1]))
        self.plan = self.plan_for(self._latent)
        text = 0 if context is None or context.ndim != 3 else int(context.shape[1])
        self._text_tokens = text + (-text) % self.text_multiple
        self._raw_text, self._batch = text, int(x.shape[0])
        self._chunks = tuple(int(c) for c in (cond_or_uncond or (0,)))
        self._cache = {}

    def stage(self, device, dtype) -> None:
        """The current plan's maps in a device buffer for (latent, ``device``, ``dtype``), made before a CUDA-graph
        capture or replay (a host-to-device copy cannot be captured); ``set_maps`` refreshes it in place."""
        if self.plan is not None and (self._latent, device, dtype) not in self._device_maps:
            self._device_maps[(self._latent, device, dtype)] = self.plan.maps.to(device=device, dtype=dtype)
        if self.text_policy == TEXT_CONCEPT and self.plan is not None:
            for tokens in {self._raw_text, self._text_tokens}:
                self._concept_tensors(tokens, device)

    def _concept_tensors(self, tokens: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        """(keep [tokens, k], positive [B]) of ``TEXT_CONCEPT`` on ``device`` for this call's layout (cached)."""
        key = (tokens, self.plan.regional, self._chunks, self._batch, device)
        found = self._concept.get(key)
        if found is None:
            b, chunks = self._batch, self._chunks
            per = b // len(chunks) if b % len(chunks) == 0 else b
            positive = torch.tensor([chunks[min(n // per, len(chunks) - 1)] == 0 for n in range(b)])
            keep = concept_keep(tokens, len(self.plan.regional), self.plan.regional, self.concept_tokens)
            found = self._concept[key] = (keep.to(device), positive.to(device))
        return found

    def _maps_on(self, device, dtype, grid: tuple[int, int]) -> torch.Tensor:
        key = (device, dtype, grid)
        found = self._cache.get(key)
        if found is None:
            base = self._device_maps.get((self._latent, device, dtype))
            if base is None:  # a layer of another dtype: convert the staged buffer on the device, else stage now
                staged = next((b for (latent, d, _), b in self._device_maps.items()
                               if latent == self._latent and d == device), None)
                if staged is not None:
                    base = staged.to(dtype)
                else:
                    self.stage(device, dtype)
                    base = self._device_maps[(self._latent, device, dtype)]
            found = self._cache[key] = maps_on_grid(base, grid)
        return found

    def _cached(self, key, make):
        found = self._cache.get(key)
        if found is None:
            found = self._cache[key] = make()
        return found

    def _text(self, rows: torch.Tensor, tokens: int) -> torch.Tensor:
        """The text tokens' weights: [B, k] (every LoRA / no regional LoRA) or [B, tokens, k] (``TEXT_CONCEPT``)."""
        if self.text_policy != TEXT_CONCEPT:
            return text_weights(rows, self.plan.regional, self.text_policy)
        keep, positive = self._concept_tensors(tokens, rows.device)
        if positive.shape[0] != rows.shape[0]:  # a layer that sees part of the call's batch: every LoRA
            return rows
        return concept_text_weights(rows, keep.to(rows.dtype), positive)

    def weights(self, path: str, x: torch.Tensor, out: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
        """Row weights [B, k] → this layer's weights: [B, k] (vector or text layers), [B, N, k] or [B, k, h, w]."""
        role = self.roles.get(path, AUTO)
        if out.ndim == 2 or x.ndim == 2:
            return rows
        if role == TEXT:
            tokens = int(x.shape[1]) if x.ndim == 3 else 0
            return self._cached(("text", tokens, id(rows)), lambda: self._text(rows, tokens))
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
            maps = self._maps_on(rows.device, rows.dtype, grid)
            head = self._text(rows, prefix) if prefix else None
            tail = area_weights(rows, maps) if suffix and self.family == LUMINA else None  # image pad tokens
            return token_weights(rows, maps, prefix, suffix, head, tail)
        return self._cached(("tokens", grid, prefix, suffix, id(rows)), make)
