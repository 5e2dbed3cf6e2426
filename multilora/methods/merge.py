"""The Merge baseline: the stack's LoRAs merged into the weights by ComfyUI's own LoraLoader path.

W' = W + Σ_i s_i·ΔW_i (and the text encoder likewise with the clip strengths), done by
``comfy.sd.load_lora_for_models`` row after row, exactly as a chain of core LoraLoader nodes.
Host module.
"""
from __future__ import annotations

from typing import Sequence

import comfy.sd

from ..host.lora_bank import TEXT_ENCODER_PREFIXES, loader_errors
from ..host.lora_files import read_lora_file, resolve_lora_path
from ..core.stack import LoraRow


def merge_rows(model, clip, rows: Sequence[LoraRow], node: str):
    """(model, clip) with every row merged; either may be None. Inputs are never mutated (core clones)."""
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
        with loader_errors(row.name, node):
            model, clip = comfy.sd.load_lora_for_models(model, clip, tensors, row.strength_model, row.strength_clip)
    return model, clip
