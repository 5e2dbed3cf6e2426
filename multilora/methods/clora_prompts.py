"""CLoRA's prompt variants (Meral et al. 2024, arXiv 2403.19776, §3.1) and their LoRA routing.

Variant 0 is the base prompt with no concept LoRA; variant i (1 ≤ i ≤ K) is the prompt with concept i's
words decorated by its trigger (inserted before the concept word), encoded with LoRA i on CLIP; style rows
are global (on every variant's CLIP and UNet branch, never masked). Concept g's group in variant v is the
token positions of its concept words, plus its trigger words in its own variant v = g + 1. In the guider's
cond list, variant v is cond index 2v (positive) and 2v + 1 (negative). Host module.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

from ..core.errors import MultiLoRAError
from ..core.prompt_tokens import concept_positions, decorate_prompt
from ..core.routing import ByCondIndex
from ..core.stack import LoraRow
from ..methods.merge import merge_rows

NODE = "CLoRA"


@dataclass
class Variant:
    """One prompt variant: its conds, the token positions of each concept group inside its prompt."""

    prompt: str
    positive: list
    negative: list
    groups: dict[int, list[int]]  # concept index → token positions in this variant's prompt


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
