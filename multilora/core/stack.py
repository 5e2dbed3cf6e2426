"""The LoRA stack: an immutable, ordered list of LoRA rows shared by every method of the pack.

A row carries what the methods need: the file, strengths for UNet and text encoder, whether it is on,
the concept word(s) and trigger word(s) CLoRA uses to find its tokens, and a category that CMLoRA uses
to split high- from low-frequency LoRAs (Zou et al. 2025) and CLoRA uses for global style LoRAs.
Pure module: no ComfyUI imports.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

from ..core.errors import StackError

CATEGORIES: tuple[str, ...] = ("character", "clothing", "style", "background", "object", "other")
NO_LORA = "None"
MAX_ROWS = 10


@dataclass(frozen=True)
class LoraRow:
    """One LoRA of a stack. ``name`` is the file name inside ComfyUI's ``loras`` folder."""

    name: str
    strength_model: float = 1.0
    strength_clip: float = 1.0
    enabled: bool = True
    concept: str = ""
    trigger: str = ""
    category: str = "other"
    label: str = ""
    hf_score: float | None = None  # CMLoRA: measured high-frequency share (LoRA Frequency Profile)

    def concept_words(self) -> tuple[str, ...]:
        """Comma-separated concept words, stripped, empties dropped."""
        return tuple(w.strip() for w in self.concept.split(",") if w.strip())

    def trigger_words(self) -> tuple[str, ...]:
        """Comma-separated trigger words, stripped, empties dropped."""
        return tuple(w.strip() for w in self.trigger.split(",") if w.strip())


@dataclass(frozen=True)
class LoraStack:
    """An immutable ordered collection of rows; chaining returns a new stack."""

    rows: tuple[LoraRow, ...] = field(default_factory=tuple)

    def __len__(self) -> int:
        return len(self.rows)

    def chained(self, more: "LoraStack") -> "LoraStack":
        """This stack's rows followed by ``more``'s rows, as a new stack."""
        return LoraStack(self.rows + more.rows)

    def active(self) -> tuple[LoraRow, ...]:
        """Rows that are switched on (all strengths kept, including 0)."""
        return tuple(r for r in self.rows if r.enabled)

    def with_row(self, index: int, **changes: object) -> "LoraStack":
        """A new stack with row ``index`` changed."""
        rows = list(self.rows)
        rows[index] = replace(rows[index], **changes)
        return LoraStack(tuple(rows))


def build_row(
    row_number: int,
    name: str,
    strength_model: float,
    strength_clip: float,
    enabled: bool,
    concept: str,
    trigger: str,
    category: str,
    available: set[str] | None,
    node: str = "LoRA Stack",
) -> LoraRow:
    """Validate one UI row and return it; ``available`` is the set of known LoRA file names (None: skip)."""
    clean = (name or "").strip()
    if not clean or clean == NO_LORA:
        raise StackError(
            f"{node}: row {row_number} has no LoRA file selected. "
            f"Pick a file in 'lora_{row_number}', switch the row off, or lower 'rows' to {row_number - 1}."
        )
    if available is not None and clean not in available:
        raise StackError(
            f"{node}: row {row_number}: LoRA file '{clean}' was not found in the loras folder. "
            "Check the file name or refresh the node list (press R in the UI)."
        )
    if category not in CATEGORIES:
        raise StackError(
            f"{node}: row {row_number}: category '{category}' is not one of {', '.join(CATEGORIES)}."
        )
    for field_name, value in (("strength_model", strength_model), ("strength_clip", strength_clip)):
        if not math.isfinite(float(value)):  # NaN passes ComfyUI's min/max validation
            raise StackError(
                f"{node}: row {row_number}: '{field_name}_{row_number}' is {value}, not a number. "
                "Set a strength between -100 and 100."
            )
    return LoraRow(
        name=clean,
        strength_model=float(strength_model),
        strength_clip=float(strength_clip),
        enabled=bool(enabled),
        concept=concept or "",
        trigger=trigger or "",
        category=category,
    )


def require_active(stack: LoraStack | None, node: str, minimum: int = 1) -> tuple[LoraRow, ...]:
    """The stack's enabled rows, or a StackError when there are fewer than ``minimum``."""
    if stack is None or len(stack) == 0:
        raise StackError(f"{node}: the LoRA stack is empty. Connect a LoRA Stack with at least {minimum} row(s).")
    rows = stack.active()
    if not rows:
        raise StackError(f"{node}: every row of the LoRA stack is switched off. Switch at least {minimum} row(s) on.")
    if len(rows) < minimum:
        raise StackError(
            f"{node}: needs at least {minimum} enabled LoRAs, the stack has {len(rows)}. Add or enable rows."
        )
    return rows
