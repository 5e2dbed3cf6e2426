"""Checks of node input values against the node's declared inputs, before a node does any work.

ComfyUI's own prompt validation differs by version and leaves gaps: NaN passes every min/max test, a
BOOLEAN is converted with Python's ``bool()`` (so the string "false" is True), and on ComfyUI 0.3.x the
options of a node's dropdowns are never checked, so a LoRA name ``5`` reaches the node. Every node of the
pack runs ``check_inputs`` on what it received, with one ``InputSpec`` per declared input, and gets the
values back normalised (int for INT, float for FLOAT, bool for BOOLEAN) or an ``InputError`` naming the
node, the input and the fix.

Booleans: JSON ``true``/``false``, the integers 0 and 1, and the strings "true"/"false" in any case are
accepted; anything else is refused. ``RefusedValue`` carries a refusal through ComfyUI's own validation:
its conversion to bool/int/float raises the InputError. Pure module: no ComfyUI imports.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .errors import InputError
from .stack import LoraStack

WHOLE_NUMBER, NUMBER, BOOLEAN, TEXT, CHOICE = "INT", "FLOAT", "BOOLEAN", "STRING", "COMBO"
BOOLEAN_WORDS = {"true": True, "false": False}
SHOWN_OPTIONS = 12


@dataclass(frozen=True)
class InputSpec:
    """One declared input: its name, ComfyUI type, whether it may be absent, its range or options.

    ``options`` None on a CHOICE: any text (e.g. file names, which the node checks against the folder itself).
    ``label`` is how messages name the input (default: the quoted name)."""

    name: str
    kind: str
    optional: bool = False
    minimum: float | None = None
    maximum: float | None = None
    options: tuple[str, ...] | None = None
    label: str = ""

    def named(self) -> str:
        return self.label or f"'{self.name}'"


def _is_model(v: Any) -> bool:
    return hasattr(v, "clone") and hasattr(v, "model")


def _is_clip(v: Any) -> bool:
    return hasattr(v, "tokenize") and hasattr(v, "encode_from_tokens")


def _is_latent(v: Any) -> bool:
    return isinstance(v, Mapping) and isinstance(v.get("samples"), torch.Tensor)


def _is_conditioning(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(c, (list, tuple)) and len(c) == 2 for c in v)


SOCKETS: dict[str, Callable[[Any], bool]] = {
    "MODEL": _is_model,
    "CLIP": _is_clip,
    "VAE": lambda v: hasattr(v, "decode") and hasattr(v, "encode"),
    "CONDITIONING": _is_conditioning,
    "LATENT": _is_latent,
    "IMAGE": lambda v: isinstance(v, torch.Tensor) and v.dim() == 4,
    "MASK": lambda v: isinstance(v, torch.Tensor) and v.dim() in (2, 3),
    "MULTILORA_STACK": lambda v: isinstance(v, LoraStack),
    "MULTILORA_ATTENTION": lambda v: hasattr(v, "steps") and hasattr(v, "latent_size"),
}
"""What a value arriving on a socket of each type must look like (literal API values reach nodes unchecked)."""
SOURCES = {"MULTILORA_STACK": "a LoRA Stack node", "MULTILORA_ATTENTION": "the attention_maps output of KSampler (CLoRA)"}


def shown(value: Any) -> str:
    """A value as messages show it: its repr (shortened) and its type; a tensor by its shape."""
    if isinstance(value, torch.Tensor):
        return f"a tensor of shape {list(value.shape)}"
    text = repr(value)
    if len(text) > 60:
        text = text[:57] + "..."
    return f"{text} ({type(value).__name__})"


def _range(spec: InputSpec) -> str:
    low = "-∞" if spec.minimum is None else _number(spec.minimum)
    high = "∞" if spec.maximum is None else _number(spec.maximum)
    return f"from {low} to {high}"


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e16 else str(value)


def _check_range(spec: InputSpec, value: float, node: str) -> None:
    if (spec.minimum is not None and value < spec.minimum) or (spec.maximum is not None and value > spec.maximum):
        raise InputError(f"{node}: {spec.named()} is {_number(value)}, out of range. Set a value {_range(spec)}.")


def check_whole_number(spec: InputSpec, value: Any, node: str) -> int:
    """An INT input: an int (not a bool, not a float with a fraction) within its range."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise InputError(f"{node}: {spec.named()} must be a whole number, got {shown(value)}. "
                         f"Set a whole number {_range(spec)}.")
    _check_range(spec, value, node)
    return value


def check_number(spec: InputSpec, value: Any, node: str) -> float:
    """A FLOAT input: a finite int or float (not a bool) within its range."""
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InputError(f"{node}: {spec.named()} must be a number, got {shown(value)}. Set a number {_range(spec)}.")
    if not math.isfinite(value):
        raise InputError(f"{node}: {spec.named()} is {value}, not a number. Set a value {_range(spec)}.")
    _check_range(spec, value, node)
    return float(value)


def parse_boolean(spec: InputSpec, value: Any, node: str) -> bool:
    """A BOOLEAN input: True/False, 0/1, or "true"/"false" in any case (surrounding spaces ignored)."""
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in BOOLEAN_WORDS:
        return BOOLEAN_WORDS[value.strip().lower()]
    raise InputError(f"{node}: {spec.named()} must be true or false, got {shown(value)}. "
                     "Send a JSON boolean, or the text \"true\" or \"false\".")


def check_text(spec: InputSpec, value: Any, node: str) -> str:
    """A STRING input: text."""
    if not isinstance(value, str):
        raise InputError(f"{node}: {spec.named()} must be text, got {shown(value)}. Send a string.")
    return value


def check_choice(spec: InputSpec, value: Any, node: str) -> str:
    """A COMBO input: text, and one of its options when it has a fixed list."""
    if not isinstance(value, str):
        hint = f"one of: {_options(spec.options)}" if spec.options is not None else "a name from its list"
        raise InputError(f"{node}: {spec.named()} must be text, got {shown(value)}. Send {hint}.")
    if spec.options is not None and value not in spec.options:
        raise InputError(f"{node}: {spec.named()} is {value!r}, which is not an option. Pick one of: "
                         f"{_options(spec.options)}.")
    return value


def _options(options: Sequence[str] | None) -> str:
    listed = ", ".join(repr(o) for o in (options or ())[:SHOWN_OPTIONS])
    more = len(options or ()) - SHOWN_OPTIONS
    return listed + (f" (and {more} more)" if more > 0 else "")


def check_socket(spec: InputSpec, value: Any, node: str) -> Any:
    """A socket input: a value of the socket's type (None only where the input is optional)."""
    if value is None and spec.optional:
        return value
    test = SOCKETS.get(spec.kind)
    if test is not None and not test(value):
        article = "an" if spec.kind[:1] in "AEIOU" else "a"
        source = SOURCES.get(spec.kind, f"{article} {spec.kind} output")
        raise InputError(f"{node}: {spec.named()} must come from {source}, got {shown(value)}. Connect {source} to it.")
    return value


CHECKS: dict[str, Callable[[InputSpec, Any, str], Any]] = {
    WHOLE_NUMBER: check_whole_number, NUMBER: check_number, BOOLEAN: parse_boolean, TEXT: check_text,
    CHOICE: check_choice,
}


class RefusedValue(str):
    """A refused value put back into a prompt in place of the original: converting it to bool, int or float
    (what ComfyUI's validation does to BOOLEAN, INT and FLOAT inputs) raises ``error``, so validation reports it
    under the input's name; checked by ``check_value`` it raises too. A str, so ComfyUI's replies stay JSON."""

    error: InputError

    def __new__(cls, value: Any, error: InputError) -> RefusedValue:
        made = super().__new__(cls, repr(value) if not isinstance(value, str) else value)
        made.error = error
        return made

    def refuse(self, *_: Any) -> Any:
        raise self.error

    __bool__ = __int__ = __float__ = __index__ = refuse


def check_value(spec: InputSpec, value: Any, node: str) -> Any:
    """``value`` checked and normalised for ``spec``; InputError naming node, input and fix otherwise."""
    if isinstance(value, RefusedValue):
        raise value.error
    return CHECKS.get(spec.kind, check_socket)(spec, value, node)


def check_inputs(specs: Sequence[InputSpec], values: Mapping[str, Any], node: str) -> dict[str, Any]:
    """A new dict of ``values`` with every declared input checked; undeclared ones are passed on unchanged.

    A declared input that is absent is left to the node's default (required ones: ComfyUI refuses the
    prompt before this)."""
    out = dict(values)
    for spec in specs:
        if spec.name in values:
            out[spec.name] = check_value(spec, values[spec.name], node)
    return out
