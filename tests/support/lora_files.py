"""Writers of real safetensors LoRA / LyCORIS files for the tiny ComfyUI models of ``tiny_models``.

Every file is deterministic in ``seed`` and holds random, non-trivial factors scaled so that each
patched weight changes by 10-30 % of its Frobenius norm (strength 1).  ComfyUI must be booted first.

Formats (``fmt``) and the key layouts they produce (``<name>`` = module name in that layout):

* ``kohya``: ``<name>.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``.  SD1.5/SDXL names are
  ``lora_unet_<LDM path>`` (``naming="ldm"``, e.g. ``lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q``)
  or ``lora_unet_<diffusers path>`` (``naming="diffusers"``, what kohya sd-scripts writes, e.g.
  ``lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q``); Flux uses
  ``lora_unet_double_blocks_0_img_attn_qkv``.  1x1-conv ``proj_in``/``proj_out`` (SD1.5) get
  conv-shaped ``[r,in,1,1]`` / ``[out,r,1,1]`` factors.
* ``diffusers``: peft ``lora_A.weight`` / ``lora_B.weight``, no alpha.  SD1.5/SDXL:
  ``unet.<diffusers path>``, attention projections spelled ``attn1.processor.to_q`` /
  ``attn1.processor.to_out`` (ComfyUI 0.3.75 maps attention only in that spelling).  Flux:
  ``transformer.transformer_blocks.0.attn.to_q`` ... (slices of the fused ``img_attn.qkv``),
  ``add_q_proj``... (``txt_attn.qkv``), ``single_transformer_blocks.0.attn.to_q``/``proj_mlp``
  (slices of ``linear1``), plain linears, and ``diffusion_model.single_blocks.1.linear1_qkv``.
  Z-Image: the diffusers names ComfyUI's ``z_image_to_diffusers`` maps under ``diffusion_model.``
  (what Z-Image trainers write): ``diffusion_model.layers.0.attention.to_q`` / ``to_k`` / ``to_v`` (slices of
  the fused ``attention.qkv``), ``attention.to_out.0``, ``feed_forward.w1``..., the same in ``noise_refiner.N``
  and ``context_refiner.N``, ``all_x_embedder.2-1``, ``cap_embedder.1``, ``all_final_layer.2-1.linear`` and
  (``mod``) ``adaLN_modulation.0`` / ``all_final_layer.2-1.adaLN_modulation.1``; kohya names are the generic
  ``lora_unet_layers_0_attention_qkv``.
* ``diffusers_old``: like ``diffusers`` with the old attention-processor suffixes
  ``<name>_lora.down.weight`` / ``_lora.up.weight`` (SD1.5/SDXL only).
* ``locon``: ``kohya`` plus the 3x3 resblock convs (``in_layers.2``, ``out_layers.3``) with
  ``[r,in,3,3]`` down and ``[out,r,1,1]`` up; every other conv is Tucker-decomposed
  (``lora_mid.weight`` ``[r,r,3,3]`` with ``[r,in,1,1]`` down).  SD1.5/SDXL only.
* ``loha``: ``hada_w1_a`` / ``hada_w1_b`` / ``hada_w2_a`` / ``hada_w2_b`` / ``alpha`` (convs flattened).
* ``lokr``: ``lokr_w1`` with ``lokr_w2`` (full) on odd layers or ``lokr_w2_a`` / ``lokr_w2_b`` (+ alpha)
  on even ones; 3x3 convs use a 4-D ``lokr_w2``.
* ``dora``: ``kohya`` plus ``dora_scale``; even layers ``[out,1(,1,1)]`` (output axis), odd layers
  ``[1,in(,1,1)]`` (input axis).  NOTE: for the output axis ComfyUI 0.3.75 divides by the norm of the
  *original* weight (LyCORIS uses the merged one); ``LoraSpec.deltas`` follows ComfyUI.
* ``full_diff``: ``<name>.diff`` (dense weight diff) and ``<name>.diff_b`` (bias diff, where the
  layer has a bias), kohya names.

``targets`` is a ``+``-joined subset of ``attn`` (attention q/k/v/out), ``ff`` (feed-forward),
``proj`` (SpatialTransformer proj_in/proj_out; Z-Image's patch and caption embedders and output linear),
``conv`` (3x3 resblock convs; used by ``locon``, ``loha``, ``lokr`` and ``full_diff`` only) and ``mod`` (Flux /
Z-Image modulation linears).
"""

from __future__ import annotations

import logging
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Union

import safetensors.torch
import torch

import comfy.lora
import comfy.lora_convert
import comfy.model_base
import comfy.model_patcher
import comfy.sd
import comfy.utils
import comfy.weight_adapter

LoraFormat = Literal["kohya", "diffusers", "diffusers_old", "locon", "loha", "lokr", "dora", "full_diff"]
LORA_FORMATS: tuple[str, ...] = ("kohya", "diffusers", "diffusers_old", "locon", "loha", "lokr", "dora", "full_diff")
FORMATS_BY_KIND: dict[str, tuple[str, ...]] = {
    "sd15": LORA_FORMATS,
    "sdxl": LORA_FORMATS,
    "flux": ("kohya", "diffusers", "loha", "lokr", "dora", "full_diff"),
    "zimage": ("kohya", "diffusers"),
    "lumina2": ("kohya",),  # ComfyUI's diffusers map slices qkv as if key/value heads were as many as query heads
}
"""Which formats ``write_lora`` supports for each tiny model family."""
EXPECTED_ADAPTER: dict[str, str] = {
    "kohya": "lora", "diffusers": "lora", "diffusers_old": "lora", "locon": "lora", "dora": "lora",
    "loha": "loha", "lokr": "lokr", "full_diff": "diff",
}
"""``adapter_kind`` of every patch ComfyUI builds from a file of each format."""

PatchKey = Union[str, tuple[str, tuple[int, int, int]]]
"""A key of ComfyUI's patch dict: a model state-dict key, or ``(key, (dim, start, length))`` for a slice."""

_KOHYA_STYLE = {"kohya", "locon", "loha", "lokr", "dora", "full_diff"}
_CONV_FORMATS = {"locon", "loha", "lokr", "full_diff"}
_TARGET_GROUPS = {"attn", "ff", "proj", "conv", "mod"}
_UNET_ATTN = re.compile(r"\.transformer_blocks\.\d+\.attn[12]\.(to_q|to_k|to_v|to_out\.0)$")
_UNET_FF = re.compile(r"\.transformer_blocks\.\d+\.ff\.net\.(0\.proj|2)$")
_UNET_PROJ = re.compile(r"\.\d+\.(proj_in|proj_out)$")
_UNET_CONV = re.compile(r"\.\d+\.(in_layers\.2|out_layers\.3)$")
_CLIP_LAYERS = tuple(comfy.lora.LORA_CLIP_MAP.items())


@dataclass(frozen=True)
class LayerTarget:
    """One weight (or one slice of a fused weight) that a LoRA file patches."""

    name: str
    """Key prefix of this layer inside the LoRA file."""
    model_key: str
    """State-dict key of the patched weight in the ComfyUI model (``diffusion_model.…`` / ``clip_l.…``)."""
    group: str
    """attn / ff / proj / conv / mod / te."""
    offset: tuple[int, int, int] | None = None
    """``(dim, start, length)`` when only a slice of a fused weight is patched."""

    @property
    def patch_key(self) -> PatchKey:
        """The key ComfyUI's ``load_lora`` gives this layer's patch."""
        return self.model_key if self.offset is None else (self.model_key, self.offset)


@dataclass
class LoraSpec:
    """A LoRA state dict plus what it should do to the model."""

    state_dict: dict[str, torch.Tensor]
    fmt: str
    targets: list[LayerTarget]
    deltas: dict[PatchKey, torch.Tensor] = field(default_factory=dict)
    """Expected change (float32) of every patched tensor or slice at strength 1, as ComfyUI applies it."""

    @property
    def patch_keys(self) -> list[PatchKey]:
        """Keys ``comfy.lora.load_lora`` should return (bias keys included for ``full_diff``)."""
        return list(self.deltas)

    @property
    def model_keys(self) -> list[str]:
        """Unique model state-dict keys this file changes, in file order."""
        keys: list[str] = []
        for key in self.deltas:
            name = key if isinstance(key, str) else key[0]
            if name not in keys:
                keys.append(name)
        return keys

    def dense_deltas(self, model_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Full-size expected change of each model tensor (slices of fused weights summed in place)."""
        out: dict[str, torch.Tensor] = {}
        for key, delta in self.deltas.items():
            name, offset = (key, None) if isinstance(key, str) else key
            full = out.setdefault(name, torch.zeros_like(model_state[name], dtype=torch.float32))
            if offset is None:
                full += delta
            else:
                full.narrow(*offset).add_(delta)
        return out


def adapter_kind(patch: Any) -> str:
    """Name of a loaded patch: ``lora`` / ``loha`` / ``lokr`` / ... for adapters, ``diff`` / ``set`` for tuples."""
    if isinstance(patch, comfy.weight_adapter.WeightAdapterBase):
        return patch.name
    if isinstance(patch, tuple) and patch and isinstance(patch[0], str):
        return patch[0]
    return type(patch).__name__


def _parse_groups(targets: str) -> set[str]:
    """Split ``"attn+ff+proj"`` into a validated set of group names."""
    groups = {t.strip() for t in targets.split("+") if t.strip()}
    unknown = groups - _TARGET_GROUPS
    if unknown:
        raise ValueError(f"unknown target groups {sorted(unknown)}; known: {sorted(_TARGET_GROUPS)}")
    return groups


def _kind_of(model: Any) -> str:
    """Family of a ComfyUI model object: sd15 / sdxl / flux / zimage / lumina2."""
    if isinstance(model, comfy.model_base.Flux):
        return "flux"
    if isinstance(model, comfy.model_base.Lumina2):
        return "zimage" if model.model_config.unet_config.get("z_image_modulation") else "lumina2"
    if isinstance(model, comfy.model_base.SDXL):
        return "sdxl"
    if isinstance(model, comfy.model_base.BaseModel) and "num_res_blocks" in model.model_config.unet_config:
        return "sd15"
    raise ValueError(f"unsupported model {type(model).__name__}")


def _diffusers_attn_spelling(path: str) -> str:
    """``…attn1.to_q`` -> ``…attn1.processor.to_q`` and ``…to_out.0`` -> ``…processor.to_out`` (ComfyUI's map)."""
    path = path.replace(".to_", ".processor.to_")
    return path[:-2] if path.endswith(".to_out.0") else path


def _unet_targets(model: Any, groups: set[str], fmt: str, naming: str) -> list[LayerTarget]:
    """Targets of a SD1.5/SDXL UNet, named for ``fmt`` / ``naming``."""
    ldm_to_diffusers: dict[str, str] = {}
    for dif, ldm in sorted(comfy.utils.unet_to_diffusers(model.model_config.unet_config).items()):
        ldm_to_diffusers.setdefault(ldm, dif)
    use_conv = "conv" in groups and fmt in _CONV_FORMATS
    out: list[LayerTarget] = []
    for key in model.state_dict():
        if not (key.startswith("diffusion_model.") and key.endswith(".weight")):
            continue
        path = key[len("diffusion_model."):-len(".weight")]
        if _UNET_ATTN.search(path):
            group = "attn"
        elif _UNET_FF.search(path):
            group = "ff"
        elif _UNET_PROJ.search(path):
            group = "proj"
        elif _UNET_CONV.search(path) and use_conv:
            group = "conv"
        else:
            continue
        if group not in groups:
            continue
        dif_path = ldm_to_diffusers[path + ".weight"][:-len(".weight")]
        if fmt in _KOHYA_STYLE:
            base = path if naming == "ldm" else dif_path
            name = "lora_unet_" + base.replace(".", "_")
        else:
            name = "unet." + _diffusers_attn_spelling(dif_path)
        out.append(LayerTarget(name=name, model_key=key, group=group))
    return out


def _flux_targets(model: Any, groups: set[str], fmt: str) -> list[LayerTarget]:
    """Targets of a Flux DiT: generic ``lora_unet_`` names, or diffusers names with fused-weight slices."""
    cfg = model.model_config.unet_config
    hidden, depth, single = int(cfg["hidden_size"]), int(cfg["depth"]), int(cfg["depth_single_blocks"])
    mlp_hidden = int(hidden * cfg.get("mlp_ratio", 4.0))
    out: list[LayerTarget] = []
    if fmt in _KOHYA_STYLE:
        layers: list[tuple[str, str]] = []
        for i in range(depth):
            for sub in ("img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_attn.proj"):
                layers.append((f"double_blocks.{i}.{sub}", "attn"))
            for sub in ("img_mlp.0", "img_mlp.2", "txt_mlp.0", "txt_mlp.2"):
                layers.append((f"double_blocks.{i}.{sub}", "ff"))
            for sub in ("img_mod.lin", "txt_mod.lin"):
                layers.append((f"double_blocks.{i}.{sub}", "mod"))
        for i in range(single):
            layers += [(f"single_blocks.{i}.linear1", "attn"), (f"single_blocks.{i}.linear2", "attn"),
                       (f"single_blocks.{i}.modulation.lin", "mod")]
        for path, group in layers:
            if group in groups:
                out.append(LayerTarget("lora_unet_" + path.replace(".", "_"), f"diffusion_model.{path}.weight", group))
        return out
    if fmt != "diffusers":
        raise ValueError(f"format {fmt!r} is not supported for Flux")
    for i in range(depth):
        src, dst = f"transformer.transformer_blocks.{i}", f"diffusion_model.double_blocks.{i}"
        if "attn" in groups:
            for j, proj in enumerate(("to_q", "to_k", "to_v")):
                out.append(LayerTarget(f"{src}.attn.{proj}", f"{dst}.img_attn.qkv.weight", "attn", (0, j * hidden, hidden)))
            for j, proj in enumerate(("add_q_proj", "add_k_proj", "add_v_proj")):
                out.append(LayerTarget(f"{src}.attn.{proj}", f"{dst}.txt_attn.qkv.weight", "attn", (0, j * hidden, hidden)))
            out.append(LayerTarget(f"{src}.attn.to_out.0", f"{dst}.img_attn.proj.weight", "attn"))
            out.append(LayerTarget(f"{src}.attn.to_add_out", f"{dst}.txt_attn.proj.weight", "attn"))
        if "ff" in groups:
            for name, sub in (("ff.net.0.proj", "img_mlp.0"), ("ff.net.2", "img_mlp.2"),
                              ("ff_context.net.0.proj", "txt_mlp.0"), ("ff_context.net.2", "txt_mlp.2")):
                out.append(LayerTarget(f"{src}.{name}", f"{dst}.{sub}.weight", "ff"))
        if "mod" in groups:
            out.append(LayerTarget(f"{src}.norm1.linear", f"{dst}.img_mod.lin.weight", "mod"))
            out.append(LayerTarget(f"{src}.norm1_context.linear", f"{dst}.txt_mod.lin.weight", "mod"))
    for i in range(single):
        src, dst = f"transformer.single_transformer_blocks.{i}", f"diffusion_model.single_blocks.{i}"
        linear1 = f"{dst}.linear1.weight"
        if "attn" in groups:
            if i % 2 == 0:
                for j, proj in enumerate(("to_q", "to_k", "to_v")):
                    out.append(LayerTarget(f"{src}.attn.{proj}", linear1, "attn", (0, j * hidden, hidden)))
            else:
                out.append(LayerTarget(f"{dst}.linear1_qkv", linear1, "attn", (0, 0, 3 * hidden)))
            out.append(LayerTarget(f"{src}.proj_out", f"{dst}.linear2.weight", "attn"))
        if "ff" in groups:
            out.append(LayerTarget(f"{src}.proj_mlp", linear1, "ff", (0, 3 * hidden, mlp_hidden)))
        if "mod" in groups:
            out.append(LayerTarget(f"{src}.norm.linear", f"{dst}.modulation.lin.weight", "mod"))
    return out


def _zimage_targets(model: Any, groups: set[str], fmt: str) -> list[LayerTarget]:
    """Targets of a Z-Image / Lumina 2 NextDiT: diffusers names (fused qkv as q/k/v slices) or generic kohya names."""
    cfg = model.model_config.unet_config
    modulation = "adaLN_modulation.0" if cfg.get("z_image_modulation") else "adaLN_modulation.1"
    hidden, refiners = int(cfg["dim"]), int(cfg.get("n_refiner_layers", 2))
    blocks = [(f"layers.{i}", True) for i in range(int(cfg["n_layers"]))]
    blocks += [(f"noise_refiner.{i}", True) for i in range(refiners)]
    blocks += [(f"context_refiner.{i}", False) for i in range(refiners)]
    layers: list[tuple[str, str, str, tuple[int, int, int] | None]] = []  # (file name, model path, group, slice)
    for block, modulated in blocks:
        if fmt == "diffusers":
            for j, proj in enumerate(("to_q", "to_k", "to_v")):
                layers.append((f"{block}.attention.{proj}", f"{block}.attention.qkv", "attn", (0, j * hidden, hidden)))
            layers.append((f"{block}.attention.to_out.0", f"{block}.attention.out", "attn", None))
        else:
            layers += [(f"{block}.attention.qkv", f"{block}.attention.qkv", "attn", None),
                       (f"{block}.attention.out", f"{block}.attention.out", "attn", None)]
        layers += [(f"{block}.feed_forward.{w}", f"{block}.feed_forward.{w}", "ff", None) for w in ("w1", "w2", "w3")]
        if modulated:
            layers.append((f"{block}.{modulation}", f"{block}.{modulation}", "mod", None))
    final = "all_final_layer.2-1" if fmt == "diffusers" else "final_layer"
    layers += [("all_x_embedder.2-1" if fmt == "diffusers" else "x_embedder", "x_embedder", "proj", None),
               ("cap_embedder.1", "cap_embedder.1", "proj", None),
               (f"{final}.linear", "final_layer.linear", "proj", None),
               (f"{final}.adaLN_modulation.1", "final_layer.adaLN_modulation.1", "mod", None)]
    out = []
    for name, path, group, offset in layers:
        if group in groups:
            name = "diffusion_model." + name if fmt == "diffusers" else "lora_unet_" + name.replace(".", "_")
            out.append(LayerTarget(name, f"diffusion_model.{path}.weight", group, offset))
    return out


def _clip_targets(clip: comfy.sd.CLIP, fmt: str) -> list[LayerTarget]:
    """Text-encoder targets (q/k/v/out_proj, fc1/fc2 of every CLIP-L layer) named for ``fmt``."""
    keys = clip.cond_stage_model.state_dict().keys()
    out: list[LayerTarget] = []
    for layer in range(64):
        for hf_name, kohya_name in _CLIP_LAYERS:
            key = f"clip_l.transformer.text_model.encoder.layers.{layer}.{hf_name}.weight"
            if key not in keys:
                continue
            if fmt in _KOHYA_STYLE:
                name = f"lora_te_text_model_encoder_layers_{layer}_{kohya_name}"
            else:
                name = f"text_encoder.text_model.encoder.layers.{layer}.{hf_name}"
            out.append(LayerTarget(name, key, "te"))
    return out


def _rescale(factors: dict[str, torch.Tensor], scaled: tuple[str, ...],
             delta_fn: Callable[[dict[str, torch.Tensor]], torch.Tensor],
             weight: torch.Tensor, ratio: float) -> dict[str, torch.Tensor]:
    """Scale the ``scaled`` factors evenly so that ``‖delta_fn(factors)‖ = ratio·‖weight‖``."""
    raw = delta_fn(factors).norm().clamp_min(1e-12)
    gain = float(ratio * weight.norm() / raw) ** (1.0 / len(scaled))
    return {k: v * gain if k in scaled else v for k, v in factors.items()}


def _split(n: int) -> tuple[int, int]:
    """``n = a * b`` with ``a <= b`` and ``a`` the largest divisor not above ``sqrt(n)``."""
    a = max(d for d in range(1, math.isqrt(n) + 1) if n % d == 0)
    return a, n // a


def _lora_delta(scale: float, shape: torch.Size) -> Callable[[dict[str, torch.Tensor]], torch.Tensor]:
    """Delta of a (LoCon / Tucker) LoRA: ``scale · up @ [mid] @ down`` reshaped to ``shape``."""
    def delta(f: dict[str, torch.Tensor]) -> torch.Tensor:
        up = f["up"].flatten(1)
        if "mid" in f:
            prod = torch.einsum("oa,abkl,bi->oikl", up, f["mid"], f["down"].flatten(1))
        else:
            prod = up @ f["down"].flatten(1)
        return scale * prod.reshape(shape)
    return delta


def _dora_delta(weight: torch.Tensor, lora_delta: torch.Tensor, dora_scale: torch.Tensor) -> torch.Tensor:
    """Change made by DoRA at strength 1, following ComfyUI 0.3.75 ``weight_decompose``."""
    merged = weight + lora_delta
    if dora_scale.shape[0] == weight.shape[0]:
        norm = weight.reshape(weight.shape[0], -1).norm(dim=1).reshape(dora_scale.shape)
    else:
        norm = merged.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1).reshape(dora_scale.shape)
    norm = norm + torch.finfo(weight.dtype).eps
    return merged * (dora_scale / norm) - weight


def _emit_layer(sd: dict[str, torch.Tensor], deltas: dict[PatchKey, torch.Tensor], target: LayerTarget,
                weight: torch.Tensor, bias: tuple[str, torch.Tensor] | None, fmt: str, index: int,
                gen: torch.Generator, rank: int, alpha: float | None, dtype: torch.dtype) -> None:
    """Write the tensors of one layer in ``fmt`` into ``sd`` and record its expected delta(s)."""
    ratio = 0.1 + 0.2 * float(torch.rand((), generator=gen))
    shape = weight.shape
    out_dim, in_flat = shape[0], math.prod(shape[1:])
    kernel = tuple(shape[2:])
    is_spatial = len(kernel) > 0 and math.prod(kernel) > 1
    name = target.name

    def randn(*size: int) -> torch.Tensor:
        return torch.randn(size, generator=gen)

    def store(suffix: str, tensor: torch.Tensor) -> torch.Tensor:
        sd[name + suffix] = tensor.to(dtype).contiguous()
        return sd[name + suffix].float()

    def store_alpha() -> None:
        if alpha is not None:
            sd[name + ".alpha"] = torch.tensor(float(alpha), dtype=dtype)

    if fmt in ("kohya", "locon", "dora", "diffusers", "diffusers_old"):
        r = max(1, min(rank, out_dim, in_flat))
        scale = 1.0
        if fmt not in ("diffusers", "diffusers_old") and alpha is not None:
            scale = float(torch.tensor(float(alpha), dtype=dtype)) / r
        tucker = fmt == "locon" and is_spatial and index % 2 == 0
        ones = (1,) * len(kernel)
        if tucker:
            factors = {"up": randn(out_dim, r, *ones), "mid": randn(r, r, *kernel), "down": randn(r, shape[1], *ones)}
        else:
            factors = {"up": randn(out_dim, r, *ones), "down": randn(r, *shape[1:])}
        delta_fn = _lora_delta(scale, shape)
        factors = _rescale(factors, tuple(factors), delta_fn, weight, ratio)
        if fmt == "diffusers":
            stored = {"up": store(".lora_B.weight", factors["up"]), "down": store(".lora_A.weight", factors["down"])}
        elif fmt == "diffusers_old":
            stored = {"up": store("_lora.up.weight", factors["up"]), "down": store("_lora.down.weight", factors["down"])}
        else:
            stored = {k: store(f".lora_{k}.weight", v) for k, v in factors.items()}
            store_alpha()
        delta = delta_fn(stored)
        if fmt == "dora":
            if index % 2 == 0:
                base = weight.reshape(out_dim, -1).norm(dim=1).reshape(out_dim, *(1,) * (len(shape) - 1))
            else:
                merged = weight + delta
                base = merged.transpose(0, 1).reshape(shape[1], -1).norm(dim=1)
                base = base.reshape(1, shape[1], *(1,) * (len(shape) - 2))
            magnitude = store(".dora_scale", base * (1.0 + 0.15 * (2 * torch.rand(base.shape, generator=gen) - 1)))
            delta = _dora_delta(weight, delta, magnitude)
        deltas[target.patch_key] = delta
        return

    if fmt == "loha":
        r = max(1, min(rank, out_dim, in_flat))
        scale = 1.0 if alpha is None else float(torch.tensor(float(alpha), dtype=dtype)) / r

        def loha_delta(f: dict[str, torch.Tensor]) -> torch.Tensor:
            return scale * ((f["w1_a"] @ f["w1_b"]) * (f["w2_a"] @ f["w2_b"])).reshape(shape)

        factors = {"w1_a": randn(out_dim, r), "w1_b": randn(r, in_flat), "w2_a": randn(out_dim, r), "w2_b": randn(r, in_flat)}
        factors = _rescale(factors, tuple(factors), loha_delta, weight, ratio)
        stored = {k: store(f".hada_{k}", v) for k, v in factors.items()}
        store_alpha()
        deltas[target.patch_key] = loha_delta(stored)
        return

    if fmt == "lokr":
        o1, o2 = _split(out_dim)
        i1, i2 = _split(shape[1])
        low_rank = index % 2 == 0 and not is_spatial
        r = max(1, min(rank, o2, i2))
        scale = 1.0
        if low_rank and alpha is not None:
            scale = float(torch.tensor(float(alpha), dtype=dtype)) / r

        def lokr_delta(f: dict[str, torch.Tensor]) -> torch.Tensor:
            w2 = f["w2_a"] @ f["w2_b"] if "w2_a" in f else f["w2"]
            w1 = f["w1"]
            if w2.dim() == 4:
                w1 = w1[:, :, None, None]
            return scale * torch.kron(w1, w2).reshape(shape)

        if low_rank:
            factors = {"w1": randn(o1, i1), "w2_a": randn(o2, r), "w2_b": randn(r, i2)}
        elif is_spatial:
            factors = {"w1": randn(o1, i1), "w2": randn(o2, i2, *kernel)}
        else:
            factors = {"w1": randn(o1, i1), "w2": randn(o2, i2)}
        factors = _rescale(factors, tuple(factors), lokr_delta, weight, ratio)
        stored = {k: store(f".lokr_{k}", v) for k, v in factors.items()}
        store_alpha()
        deltas[target.patch_key] = lokr_delta(stored)
        return

    if fmt == "full_diff":
        diff = randn(*shape)
        deltas[target.patch_key] = store(".diff", diff * (ratio * weight.norm() / diff.norm()))
        if bias is not None:
            bias_key, bias_value = bias
            diff_b = randn(*bias_value.shape)
            deltas[bias_key] = store(".diff_b", diff_b * (ratio * bias_value.norm() / diff_b.norm()))
        return

    raise ValueError(f"unknown LoRA format {fmt!r}; known: {LORA_FORMATS}")


def _emit_all(sd: dict[str, torch.Tensor], deltas: dict[PatchKey, torch.Tensor], targets: list[LayerTarget],
              model_state: dict[str, torch.Tensor], fmt: str, gen: torch.Generator, rank: int,
              alpha: float | None, dtype: torch.dtype) -> None:
    """Emit every target of one model (index counts per group, so alternating variants cover each group)."""
    counters: dict[str, int] = {}
    for target in targets:
        weight = model_state[target.model_key].detach().float()
        if target.offset is not None:
            weight = weight.narrow(*target.offset)
        bias = None
        bias_key = target.model_key[:-len("weight")] + "bias"
        if fmt == "full_diff" and target.offset is None and bias_key in model_state:
            bias = (bias_key, model_state[bias_key].detach().float())
        index = counters.get(target.group, 0)
        counters[target.group] = index + 1
        _emit_layer(sd, deltas, target, weight.clone(), bias, fmt, index, gen, rank, alpha, dtype)


def build_lora(patcher: comfy.model_patcher.ModelPatcher, fmt: str = "kohya", seed: int = 0, rank: int = 4,
               alpha: float | None = 2.0, targets: str = "attn+ff+proj+conv", naming: str = "ldm",
               clip: comfy.sd.CLIP | None = None, dtype: torch.dtype = torch.float32) -> LoraSpec:
    """Build (in memory) a LoRA of format ``fmt`` for ``patcher``'s model; see the module doc for layouts.

    ``naming`` ("ldm" or "diffusers") picks the ``lora_unet_`` spelling of kohya-style SD1.5/SDXL
    files.  With ``clip`` the file also patches that text encoder (``lora_te_…`` or
    ``text_encoder.…`` keys, same format).  ``dtype`` is the storage dtype of the tensors.
    """
    if naming not in ("ldm", "diffusers"):
        raise ValueError(f"naming must be 'ldm' or 'diffusers', not {naming!r}")
    if fmt not in LORA_FORMATS:
        raise ValueError(f"unknown LoRA format {fmt!r}; known: {LORA_FORMATS}")
    groups = _parse_groups(targets)
    model: Any = patcher.model
    kind = _kind_of(model)
    if fmt not in FORMATS_BY_KIND[kind]:
        raise ValueError(f"format {fmt!r} is not supported for {kind}")
    if kind == "flux":
        layer_targets = _flux_targets(model, groups, fmt)
    elif kind in ("zimage", "lumina2"):
        layer_targets = _zimage_targets(model, groups, fmt)
    else:
        layer_targets = _unet_targets(model, groups, fmt, naming)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    sd: dict[str, torch.Tensor] = {}
    deltas: dict[PatchKey, torch.Tensor] = {}
    _emit_all(sd, deltas, layer_targets, model.state_dict(), fmt, gen, rank, alpha, dtype)
    if clip is not None:
        te_targets = _clip_targets(clip, fmt)
        _emit_all(sd, deltas, te_targets, clip.cond_stage_model.state_dict(), fmt, gen, rank, alpha, dtype)
        layer_targets = layer_targets + te_targets
    return LoraSpec(state_dict=sd, fmt=fmt, targets=layer_targets, deltas=deltas)


def build_te_lora(clip: comfy.sd.CLIP, fmt: str = "kohya", seed: int = 0, rank: int = 4,
                  alpha: float | None = 2.0, dtype: torch.dtype = torch.float32) -> LoraSpec:
    """Build (in memory) a text-encoder-only LoRA for the tiny CLIP (all q/k/v/out/fc1/fc2 layers)."""
    if fmt not in LORA_FORMATS or fmt == "locon":
        raise ValueError(f"format {fmt!r} is not supported for text encoders")
    targets = _clip_targets(clip, fmt)
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    sd: dict[str, torch.Tensor] = {}
    deltas: dict[PatchKey, torch.Tensor] = {}
    _emit_all(sd, deltas, targets, clip.cond_stage_model.state_dict(), fmt, gen, rank, alpha, dtype)
    return LoraSpec(state_dict=sd, fmt=fmt, targets=targets, deltas=deltas)


def save_spec(spec: LoraSpec, path: str | os.PathLike[str]) -> None:
    """Write ``spec.state_dict`` to ``path`` as safetensors; same spec, byte-identical file.

    The metadata holds a single entry: safetensors orders several metadata entries at random.
    """
    tensors = {k: spec.state_dict[k] for k in sorted(spec.state_dict)}
    safetensors.torch.save_file(tensors, os.fspath(path), metadata={"format": "pt"})


def write_lora(patcher: comfy.model_patcher.ModelPatcher, path: str | os.PathLike[str], fmt: str = "kohya",
               seed: int = 0, rank: int = 4, alpha: float | None = 2.0, targets: str = "attn+ff+proj+conv",
               naming: str = "ldm", clip: comfy.sd.CLIP | None = None,
               dtype: torch.dtype = torch.float32) -> list[str]:
    """Write a real safetensors LoRA for ``patcher``'s model; return the model keys it changes.

    The keys are model state-dict keys (``diffusion_model.…weight``, plus ``…bias`` for
    ``full_diff`` and ``clip_l.…`` when ``clip`` is given), unique, in file order.  Arguments as in
    ``build_lora``.
    """
    spec = build_lora(patcher, fmt, seed, rank, alpha, targets, naming, clip, dtype)
    save_spec(spec, path)
    return spec.model_keys


def write_te_lora(clip: comfy.sd.CLIP, path: str | os.PathLike[str], seed: int = 0, rank: int = 4,
                  alpha: float | None = 2.0, fmt: str = "kohya", dtype: torch.dtype = torch.float32) -> list[str]:
    """Write a text-encoder-only LoRA (``lora_te_text_model_encoder_layers_N_…``); return the clip keys."""
    spec = build_te_lora(clip, fmt, seed, rank, alpha, dtype)
    save_spec(spec, path)
    return spec.model_keys


class _NotLoadedCollector(logging.Handler):
    """Logging handler collecting the keys of ComfyUI's 'lora key not loaded: X' warnings."""

    prefix = "lora key not loaded: "

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.keys: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if message.startswith(self.prefix):
            self.keys.append(message[len(self.prefix):])


def load_with_comfy(lora_sd: dict[str, torch.Tensor], patcher: comfy.model_patcher.ModelPatcher | None = None,
                    clip: comfy.sd.CLIP | None = None) -> tuple[dict[PatchKey, Any], list[str]]:
    """Load a LoRA state dict the way ``comfy.sd.load_lora_for_models`` does.

    Returns ComfyUI's patch dict (``{model_key or (key, offset): adapter}``) and the file keys that
    ComfyUI left unloaded (its 'lora key not loaded' warnings).
    """
    key_map: dict[str, Any] = {}
    if patcher is not None:
        key_map = comfy.lora.model_lora_keys_unet(patcher.model, key_map)
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    converted = comfy.lora_convert.convert_lora(lora_sd)
    root = logging.getLogger()
    collector = _NotLoadedCollector()
    old_level = root.level
    root.addHandler(collector)
    if root.getEffectiveLevel() > logging.WARNING:
        root.setLevel(logging.WARNING)
    try:
        patches = comfy.lora.load_lora(converted, key_map)
    finally:
        root.removeHandler(collector)
        root.setLevel(old_level)
    return patches, collector.keys


def write_lora_set(model, folder: str, prefix: str, seeds, fmt: str = "kohya",
                   clip: comfy.sd.CLIP | None = None, targets: str = "attn+ff+proj+conv") -> list[str]:
    """One LoRA file of format ``fmt`` per seed for ``model`` (and ``clip``, when given) in ``folder``
    (``<prefix>_<seed>.safetensors``); their names."""
    names = []
    for seed in seeds:
        name = f"{prefix}_{seed}.safetensors"
        write_lora(model, os.path.join(folder, name), fmt, seed=seed, clip=clip, targets=targets)
        names.append(name)
    return names


def merged_by_comfy(patcher: comfy.model_patcher.ModelPatcher, names, strengths) -> comfy.model_patcher.ModelPatcher:
    """A clone of ``patcher`` with the ``loras``-folder files ``names`` merged at ``strengths`` by ComfyUI itself
    (``comfy.sd.load_lora_for_models``, what LoraLoader does): the reference the engine's outputs must equal."""
    import folder_paths
    model = patcher
    for name, strength in zip(names, strengths):
        sd = comfy.utils.load_torch_file(folder_paths.get_full_path("loras", name), safe_load=True)
        model, _ = comfy.sd.load_lora_for_models(model, None, sd, strength, 0.0)
    return model


def engine_of(clone: comfy.model_patcher.ModelPatcher, ml):
    """The on-the-fly engine a pack clone carries (its apply_model wrapper's owner)."""
    return clone.wrappers["apply_model"][ml("host.onthefly").WRAPPER_KEY][0].__self__
