"""The Merge baseline: the stack's LoRAs merged into the weights by ComfyUI's own LoraLoader path.

W' = W + Σ_i s_i·ΔW_i (and the text encoder likewise with the clip strengths), done by
``comfy.sd.load_lora_for_models`` row after row, exactly as a chain of core LoraLoader nodes.
Core only logs "lora key not loaded" for keys it cannot place and skips layers whose shapes do not match;
with ``check_fit`` a LoRA's diffusion-model part is first checked as the on-the-fly methods check it
(``host.lora_bank``: nothing matches this model, or a tensor does not fit its layer), with their messages.
Host module.
"""
from __future__ import annotations

from typing import Sequence

import torch

import comfy.sd
import comfy.utils
import comfy.weight_adapter

from ..core.stack import LoraRow
from ..host.lora_bank import TEXT_ENCODER_PREFIXES, check_factors, loader_errors, logged_errors, misfit, unet_patches
from ..host.lora_files import read_lora_file, resolve_lora_path


def check_lora_fits(model, tensors: dict, name: str, node: str) -> None:
    """LoraFileError unless the diffusion-model tensors of a LoRA file fit ``model`` (a ModelPatcher)."""
    base = model.model
    for target, adapter in unet_patches(base, tensors, name, node).items():
        key, offset = (target[0], target[1]) if isinstance(target, tuple) else (target, None)
        weight = comfy.utils.get_attr(base, key)
        shape = tuple(weight.shape)
        if isinstance(adapter, comfy.weight_adapter.LoRAAdapter) and adapter.weights[3] is None \
                and weight.dim() >= 2:
            check_factors(adapter.weights[0], adapter.weights[1], shape, offset, key, name, node)
        elif isinstance(adapter, comfy.weight_adapter.WeightAdapterBase):
            # dense adapters (LoHa, LoKr, DoRA, Tucker LoCon): core logs their failures and leaves W unchanged
            target_weight = weight.detach().to(torch.float32)
            if offset is not None:
                target_weight = target_weight.narrow(offset[0], offset[1], offset[2])
            with logged_errors() as failures:
                try:
                    adapter.calculate_weight(target_weight.clone(), key, 1.0, 1.0, offset, lambda a: a, torch.float32)
                except (RuntimeError, ValueError, IndexError) as exc:
                    failures.append(f"{type(exc).__name__}: {exc}")
            if failures:
                detail = failures[0].removeprefix(f"ERROR {adapter.name} {key} ")
                raise misfit(node, name, key, tuple(target_weight.shape),
                             f"ComfyUI's {adapter.name} adapter could not apply its weights ({detail})")
        elif isinstance(adapter, tuple) and len(adapter) == 2 and isinstance(adapter[0], str):
            values = adapter[1]
            patch = values[0] if isinstance(values, tuple) else values
            if isinstance(patch, torch.Tensor) and patch.numel() != weight.numel():
                raise misfit(node, name, key, shape, f"its '{adapter[0]}' patch has shape {list(patch.shape)}")


def merge_rows(model, clip, rows: Sequence[LoraRow], node: str, check_fit: bool = True):
    """(model, clip) with every row merged; either may be None. Inputs are never mutated (core clones).
    ``check_fit``: refuse a LoRA whose diffusion-model part does not fit the model (else core logs and skips)."""
    for row in rows:
        if row.strength_model == 0 and row.strength_clip == 0:
            continue  # what core LoraLoader does
        tensors = read_lora_file(resolve_lora_path(row.name, node), node)
        if model is None or clip is None:
            # Only the connected side's tensors: core would log one "not loaded" line per other-side key.
            keep_text = model is None
            tensors = {k: v for k, v in tensors.items() if k.startswith(TEXT_ENCODER_PREFIXES) == keep_text}
            if not tensors:
                continue
        if check_fit and model is not None and any(not k.startswith(TEXT_ENCODER_PREFIXES) for k in tensors):
            check_lora_fits(model, tensors, row.name, node)
        with loader_errors(row.name, node):
            model, clip = comfy.sd.load_lora_for_models(model, clip, tensors, row.strength_model, row.strength_clip)
    return model, clip
