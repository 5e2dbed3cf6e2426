"""Turning LoRA files into per-layer routed deltas for one model, through ComfyUI's own loaders.

Each file goes through ``comfy.lora_convert.convert_lora`` and ``comfy.lora.load_lora`` with the model's
key map, exactly as core's LoraLoader does, so every format core reads (kohya, diffusers/peft, LoCon,
LoHa, LoKr, DoRA, full diffs, Flux fused-qkv slices) is understood the same way. Plain LoRA/LoCon
adapters stay low-rank factors; everything else becomes a dense ΔW computed once with the adapter's own
``calculate_weight``. Host module.
"""
from __future__ import annotations

import contextlib
import logging
import math
import threading
from dataclasses import dataclass
from typing import Iterator

import torch

import comfy.lora
import comfy.lora_convert
import comfy.utils
import comfy.weight_adapter

from ..core.errors import LoraFileError, UnsupportedAdapterError
from ..core.lowrank import (
    CONV,
    GROUP_NORM,
    LAYER_NORM,
    LINEAR,
    DensePart,
    LayerDeltas,
    LayerSpec,
    LowRankPart,
    fuse_layer,
)

log = logging.getLogger("multilora")

TEXT_ENCODER_PREFIXES = ("lora_te", "text_encoder", "te_", "lora_te1_", "lora_te2_", "text_encoders.")
FAMILY_NAMES = {"SD15": "SD1.5", "SD20": "SD2.x", "SD21UnclipL": "SD2.1 unCLIP", "SD21UnclipH": "SD2.1 unCLIP",
                "SDXL": "SDXL", "SDXLRefiner": "SDXL refiner", "SD3": "SD3", "Flux": "Flux"}


@dataclass(frozen=True)
class LoraSource:
    """One LoRA to put in the bank: its tensors, UNet strength and a name for messages."""

    name: str
    tensors: dict
    strength: float


def layer_spec(module: torch.nn.Module) -> LayerSpec | None:
    """The hook-relevant description of a layer, or None for layer types the engine cannot route."""
    weight = getattr(module, "weight", None)
    shape = tuple(weight.shape) if weight is not None else ()
    if isinstance(module, torch.nn.Linear):
        return LayerSpec(LINEAR, module.out_features, shape)
    if isinstance(module, (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d)):
        if module.padding_mode != "zeros":
            return None
        return LayerSpec(CONV, module.out_channels, shape, module.stride, module.padding, module.dilation,
                         module.groups)
    if isinstance(module, torch.nn.LayerNorm):
        return LayerSpec(LAYER_NORM, shape[0] if shape else 0, shape, norm_shape=tuple(module.normalized_shape),
                         eps=module.eps)
    if isinstance(module, torch.nn.GroupNorm):
        return LayerSpec(GROUP_NORM, module.num_channels, shape, num_groups=module.num_groups, eps=module.eps)
    return None


def tucker_down(down: torch.Tensor, mid: torch.Tensor) -> torch.Tensor:
    """LoCon with a Tucker core: fold mid (r×r×kh×kw) into down (r×in×1×1) → a conv kernel r×in×kh×kw."""
    d = down.float().flatten(1)                      # [r_d, in]
    m = mid.float()                                  # [r, r_d, kh, kw]
    kernel = torch.einsum("rdhw,di->rihw", m, d)     # Σ_d mid[r,d] · down[d,i]
    return kernel


def model_family(model) -> str:
    """Human name of a comfy BaseModel's family ("SD1.5", "SDXL", "Flux"), from its supported_models config."""
    config = getattr(model, "model_config", None)
    name = type(config).__name__ if config is not None else type(model).__name__
    return FAMILY_NAMES.get(name, name)


@contextlib.contextmanager
def loader_errors(name: str, node: str) -> Iterator[None]:
    """Turn what ComfyUI's LoRA loader raises on malformed files into a LoraFileError naming node and LoRA."""
    try:
        yield
    except KeyError as exc:  # e.g. a lora_up.weight whose lora_down.weight is missing
        missing = exc.args[0] if exc.args else exc
        raise LoraFileError(
            f"{node}: LoRA '{name}' is missing tensor '{missing}' that another tensor of the same layer needs. "
            "The file is incomplete or damaged; download it again."
        ) from exc
    except (IndexError, RuntimeError, TypeError, ValueError) as exc:
        if isinstance(exc, LoraFileError):
            raise
        raise LoraFileError(
            f"{node}: LoRA '{name}' could not be interpreted by ComfyUI's LoRA loader ({exc}). The file is "
            "damaged or in a format this ComfyUI does not know; update ComfyUI or use another version."
        ) from exc


def unet_patches(model, tensors: dict, name: str, node: str) -> dict:
    """ComfyUI's patch dict {model_key: adapter} for the UNet part of a LoRA file."""
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    with loader_errors(name, node):
        converted = comfy.lora_convert.convert_lora(tensors)
        patches = comfy.lora.load_lora(converted, key_map, log_missing=False)
    family = model_family(model)
    text_encoder = sum(1 for k in converted if k.startswith(TEXT_ENCODER_PREFIXES))
    if not patches:
        hint = " It only has text-encoder weights." if text_encoder and text_encoder == len(converted) else (
            " It was probably trained for another model family.")
        raise LoraFileError(
            f"{node}: LoRA '{name}' matched 0 of its {len(tensors)} tensors in this {family} model.{hint} "
            "Use a LoRA made for this checkpoint's family."
        )
    loaded = next((a.loaded_keys for a in patches.values() if getattr(a, "loaded_keys", None)), None)
    unet_tensors = len(converted) - text_encoder
    if loaded is not None and len(loaded) < unet_tensors:
        log.warning("%s: LoRA '%s' matched %d of its %d diffusion-model tensors in this %s model; the rest are "
                    "ignored (is it made for this model family?)", node, name, len(loaded), unet_tensors, family)
    return patches


def misfit(node: str, name: str, key: str, weight_shape: tuple[int, ...], problem: str) -> LoraFileError:
    """The error for a LoRA tensor whose shape does not fit the layer it targets."""
    return LoraFileError(
        f"{node}: LoRA '{name}' does not fit layer '{key}' (weight shape {list(weight_shape)}): {problem}. "
        "The file is damaged or made for another model; use a LoRA made for this checkpoint."
    )


def check_factors(up: torch.Tensor, down: torch.Tensor, weight_shape: tuple[int, ...], offset, key: str,
                  name: str, node: str) -> None:
    """LoraFileError unless B (out×r) @ A (r×in) fits the weight (or its offset slice), with r ≥ 1 on both sides."""
    shapes = f"shapes {list(up.shape)} and {list(down.shape)}"
    if up.dim() < 2 or down.dim() < 2:
        raise misfit(node, name, key, weight_shape, f"its up/down factors must be matrices, got {shapes}")
    rank_up, rank_down = up.flatten(1).shape[1], down.shape[0]
    if rank_up == 0 or rank_down == 0:
        raise misfit(node, name, key, weight_shape, f"its factors have rank 0 ({shapes})")
    if rank_up != rank_down:
        raise misfit(node, name, key, weight_shape,
                     f"the up factor has rank {rank_up} but the down factor rank {rank_down} ({shapes})")
    rows = offset[2] if offset is not None else weight_shape[0]
    if up.shape[0] != rows:
        raise misfit(node, name, key, weight_shape,
                     f"the up factor of shape {list(up.shape)} gives {up.shape[0]} outputs, the layer has {rows}")
    inputs = math.prod(weight_shape[1:])
    if down.flatten(1).shape[1] != inputs:
        raise misfit(node, name, key, weight_shape, f"the down factor of shape {list(down.shape)} takes "
                     f"{down.flatten(1).shape[1]} inputs, the layer has {inputs}")


class _ThreadErrors(logging.Handler):
    """ERROR records logged by this thread while attached (messages only)."""

    def __init__(self):
        super().__init__(logging.ERROR)
        self.thread = threading.get_ident()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if record.thread == self.thread:
            self.messages.append(record.getMessage())


@contextlib.contextmanager
def logged_errors() -> Iterator[list[str]]:
    """The ERROR messages logged (to the root logger's tree) inside the block, by this thread. ComfyUI's
    weight adapters (LoHa, LoKr, DoRA, OFT, …) catch their own failures, log "ERROR <name> <key> <exc>" and
    return W unchanged, which would silently make that layer's ΔW zero."""
    handler = _ThreadErrors()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        yield handler.messages
    finally:
        root.removeHandler(handler)


def _dense_delta(adapter, weight: torch.Tensor, key, strength: float, offset, name: str, node: str) -> torch.Tensor:
    """ΔW = adapter applied to a float32 copy of W, minus W (full shape, zero outside an offset slice).
    An adapter that fails (and only logs it, as ComfyUI's do) is a LoraFileError naming the layer."""
    base = weight.detach().to(torch.float32).clone()
    target = base.narrow(offset[0], offset[1], offset[2]) if offset is not None else base
    original = target.clone()
    if isinstance(adapter, comfy.weight_adapter.WeightAdapterBase):
        with logged_errors() as failures:
            try:
                patched = adapter.calculate_weight(target.clone(), key, strength, 1.0, offset, lambda a: a,
                                                   torch.float32)
            except (RuntimeError, ValueError, IndexError) as exc:  # factor products fail before its own try
                failures.append(f"{type(exc).__name__}: {exc}")
        if failures:
            detail = failures[0].removeprefix(f"ERROR {adapter.name} {key} ")
            raise misfit(node, name, key, tuple(target.shape),
                         f"ComfyUI's {adapter.name} adapter could not apply its weights ({detail})")
    else:
        tagged = len(adapter) == 2 and isinstance(adapter[0], str)
        kind, values = (adapter[0], adapter[1]) if tagged else ("diff", adapter)
        if kind != "diff":
            raise UnsupportedAdapterError(
                f"{node}: LoRA '{name}' uses a '{kind}' patch on '{key}', which the on-the-fly engine cannot "
                "apply. Merge it with Apply LoRA Stack and a stock KSampler instead, or remove it from the stack."
            )
        diff = values[0]
        if diff.numel() != target.numel():
            raise misfit(node, name, key, tuple(target.shape), f"its diff has shape {list(diff.shape)}")
        patched = target + strength * diff.to(torch.float32).reshape(target.shape)
    full = torch.zeros_like(base)
    slot = full.narrow(offset[0], offset[1], offset[2]) if offset is not None else full
    slot.copy_(patched - original)
    return full


def build_layers(base_model, sources: list[LoraSource], node: str) -> dict[str, LayerDeltas]:
    """Routed deltas for every layer any of ``sources`` patches: {module path: LayerDeltas}."""
    lowrank: dict[str, list[LowRankPart]] = {}
    dense: dict[str, list[DensePart]] = {}
    specs: dict[str, LayerSpec] = {}
    skipped: list[str] = []
    for index, source in enumerate(sources):
        patches = unet_patches(base_model, source.tensors, source.name, node)
        for target, adapter in patches.items():
            key, offset = (target[0], target[1]) if isinstance(target, tuple) else (target, None)
            module_path, param = key.rsplit(".", 1)
            module = comfy.utils.get_attr(base_model, module_path)
            spec = layer_spec(module)
            if spec is None or param not in ("weight", "bias"):
                skipped.append(key)
                continue
            specs[module_path] = spec
            weights = getattr(adapter, "weights", None)
            is_plain_lora = (isinstance(adapter, comfy.weight_adapter.LoRAAdapter) and weights[4] is None
                             and weights[5] is None and param == "weight"
                             and (offset is None or offset[0] == 0))
            if is_plain_lora:
                up, down, alpha, mid = weights[0], weights[1], weights[2], weights[3]
                if mid is not None:
                    if mid.dim() != 4 or down.dim() < 2 or mid.shape[1] != down.shape[0]:
                        raise misfit(node, source.name, key, tuple(module.weight.shape), f"its Tucker core of shape "
                                     f"{list(mid.shape)} does not match the down factor of shape {list(down.shape)}")
                    down = tucker_down(down, mid)
                check_factors(up, down, tuple(module.weight.shape), offset, key, source.name, node)
                rank = weights[1].shape[0]
                scale = source.strength * (alpha / rank if alpha is not None else 1.0)
                lowrank.setdefault(module_path, []).append(
                    LowRankPart(index, down.float(), up.float(), float(scale), offset[1] if offset else 0))
                continue
            param_tensor = getattr(module, param)
            delta = _dense_delta(adapter, param_tensor, key, source.strength, offset, source.name, node)
            parts = dense.setdefault(module_path, [])
            existing = next((p for p in parts if p.lora == index), None)
            if existing is None:
                existing = DensePart(index, None, None)
                parts.append(existing)
            if param == "weight":
                existing.weight = delta if existing.weight is None else existing.weight + delta
            else:
                existing.bias = delta if existing.bias is None else existing.bias + delta
    if skipped:
        log.warning("%s: %d patched parameters are on layers the on-the-fly engine cannot route and were "
                    "left out (first: %s)", node, len(skipped), skipped[0])
    paths = set(lowrank) | set(dense)
    return {p: fuse_layer(specs[p], lowrank.get(p, []), dense.get(p, [])) for p in sorted(paths)}
