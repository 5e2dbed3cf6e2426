"""Input checks for every node of the pack, derived from each node's own declared inputs.

``checked`` wraps a node's ``execute``: before it runs, every received value is checked against the node's
declared inputs (type, range, finiteness, options; ``multilora.core.input_checks``), so a bad value is an
``InputError`` naming node, input and fix before any model work.

``read_prompt_values`` is an on-prompt handler for ComfyUI's server: its validation turns every BOOLEAN value
into ``bool(value)`` (the string "false" would be True) and an INT/FLOAT into ``int()``/``float()`` before a
node can see it, so the pack first reads its own nodes' raw widget values in the submitted prompt with the
same rules. Refused values become ``RefusedValue``s, which ComfyUI's validation then reports by input name.
Text values of number and dropdown inputs are left to ComfyUI's own conversion and checks.
"""
from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Mapping
from typing import Any

from ..multilora.core.errors import InputError
from ..multilora.core.input_checks import (
    BOOLEAN,
    CHOICE,
    NUMBER,
    WHOLE_NUMBER,
    InputSpec,
    RefusedValue,
    check_inputs,
    check_value,
)

WIDGETS_READ = (WHOLE_NUMBER, NUMBER, BOOLEAN, CHOICE)
_INSTALLED: set[int] = set()


def specs_of(node_class) -> tuple[InputSpec, ...]:
    """The node's declared inputs as InputSpecs, read from ComfyUI's view of them (``INPUT_TYPES``).

    Optional class attributes: ``INPUT_FREE`` (dropdowns whose options are not enforced here: file lists the
    node checks itself, with a better hint) and ``INPUT_LABELS`` (how messages name an input)."""
    declared = node_class.INPUT_TYPES()
    free = getattr(node_class, "INPUT_FREE", ())
    labels = getattr(node_class, "INPUT_LABELS", {})
    specs = []
    for section in ("required", "optional"):
        for name, entry in declared.get(section, {}).items():
            kind, extra = entry[0], (entry[1] if len(entry) > 1 else None) or {}
            options = extra.get("options")
            if isinstance(kind, (list, tuple)):
                kind, options = CHOICE, kind
            specs.append(InputSpec(
                name=name, kind=str(kind), optional=section == "optional",
                minimum=extra.get("min"), maximum=extra.get("max"),
                options=None if name in free or options is None else tuple(options),
                label=labels.get(name, ""),
            ))
    return tuple(specs)


def display_name(node_class) -> str:
    return node_class.define_schema().display_name


def checked(execute: Callable) -> Callable:
    """Decorator for a node's ``execute`` (under ``@classmethod``): its keyword inputs are checked first."""
    cache: list = []

    @functools.wraps(execute)
    def run(cls, *args: Any, **values: Any):
        if not cache:
            cache.append((specs_of(cls), display_name(cls)))
        specs, node = cache[0]
        return execute(cls, *args, **check_inputs(specs, values, node))
    return run


def _is_link(value: Any, prompt: Mapping) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and value[0] in prompt


def read_prompt_values(json_data: dict, node_classes: Mapping[str, type]) -> dict:
    """On-prompt handler: the pack's widget values in ``json_data['prompt']`` checked before ComfyUI converts
    them. On/off values become real booleans; refused values become RefusedValues. Links, sockets, other
    nodes and text sent to number or dropdown inputs are left alone."""
    prompt = json_data.get("prompt") if isinstance(json_data, dict) else None
    if not isinstance(prompt, dict):
        return json_data
    for node in prompt.values():
        cls = node_classes.get(node.get("class_type")) if isinstance(node, dict) else None
        inputs = node.get("inputs") if cls is not None else None
        if not isinstance(inputs, dict):
            continue
        for spec in specs_of(cls):
            if spec.name not in inputs or spec.kind not in WIDGETS_READ:
                continue
            value = inputs[spec.name]
            if _is_link(value, prompt) or isinstance(value, RefusedValue) or \
                    (isinstance(value, str) and spec.kind != BOOLEAN):
                continue
            try:
                inputs[spec.name] = check_value(spec, value, display_name(cls))
            except InputError as error:
                inputs[spec.name] = RefusedValue(value, error)
    return json_data


def install_prompt_handler(node_classes: list[type]) -> bool:
    """Register ``read_prompt_values`` with ComfyUI's running server, once. ComfyUI's main.py imports and starts
    its server before loading custom nodes; headless use (no ``server`` module loaded) has no prompt handlers."""
    server = sys.modules.get("server")
    instance = getattr(getattr(server, "PromptServer", None), "instance", None)
    if instance is None or not hasattr(instance, "add_on_prompt_handler") or id(instance) in _INSTALLED:
        return False
    _INSTALLED.add(id(instance))
    by_id = {cls.define_schema().node_id: cls for cls in node_classes}
    instance.add_on_prompt_handler(functools.partial(read_prompt_values, node_classes=by_id))
    return True
