"""Convert UI-format workflows (what the ComfyUI frontend saves) to API-format prompts.

This follows the frontend's ``graphToPrompt`` for plain graphs:

* every node's ``widgets_values`` are matched, by position, to the node's widget inputs in
  ``INPUT_TYPES`` order (required, then optional; inputs of socket types are not widgets);
* INT widgets with ``control_after_generate`` (and, as in the frontend, INT inputs named ``seed`` or
  ``noise_seed``) are followed by the frontend's control widget ("fixed" / "increment" /
  "decrement" / "randomize"), whose value is saved in ``widgets_values`` but never sent to the server;
* linked inputs come from ``links``; a link wins over a widget value of the same name (a widget
  converted to an input);
* muted (mode 2) and bypassed (mode 4) nodes are left out; an input linked to a bypassed node is
  rewired to that node's first input of the same type (as the frontend does), one linked to a muted
  node is dropped; ``Reroute`` nodes are followed, ``PrimitiveNode`` links leave the target's own
  widget value in place and notes are ignored.

Node classes are looked up in ``object_info`` (``nodes.NODE_CLASS_MAPPINGS`` by default).
"""
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

MODE_MUTED = 2
MODE_BYPASSED = 4
CONTROL_AFTER_GENERATE = "control_after_generate"
"""Placeholder name of the frontend's value-control widget in ``widget_names``."""
CONTROL_VALUES = ("fixed", "increment", "decrement", "randomize")
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
FRONTEND_ONLY_NODES = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode"})
"""Node types that exist only in the frontend (never sent to the server)."""
_LEGACY_SEED_NAMES = frozenset({"seed", "noise_seed"})


class WorkflowError(ValueError):
    """The workflow cannot be converted (unknown node type, broken link, wrong widget count)."""


def _default_object_info() -> Mapping[str, Any]:
    import nodes
    return nodes.NODE_CLASS_MAPPINGS


def _is_widget(spec: Any) -> bool:
    """Whether an ``INPUT_TYPES`` entry becomes a widget in the frontend (not a socket)."""
    if not isinstance(spec, (tuple, list)) or not spec:
        return False
    kind, options = spec[0], (spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {})
    if options.get("forceInput"):
        return False
    if isinstance(kind, (list, tuple)):
        return True  # a V1 combo: the list of its options
    return str(kind) in WIDGET_TYPES


def _has_control_widget(name: str, spec: Any) -> bool:
    kind = str(spec[0]) if not isinstance(spec[0], (list, tuple)) else "COMBO"
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if options.get(CONTROL_AFTER_GENERATE):
        return kind in ("INT", "COMBO")
    return kind == "INT" and name in _LEGACY_SEED_NAMES


def _input_specs(node_class: Any) -> list[tuple[str, Any]]:
    types = node_class.INPUT_TYPES()
    return [(name, spec) for section in ("required", "optional") for name, spec in types.get(section, {}).items()]


def widget_names(node_class: Any) -> list[str]:
    """Names of ``node_class``'s widgets in ``widgets_values`` order.

    The frontend's value-control widget after a seed-like INT appears as ``CONTROL_AFTER_GENERATE``.
    """
    names: list[str] = []
    for name, spec in _input_specs(node_class):
        if _is_widget(spec):
            names.append(name)
            if _has_control_widget(name, spec):
                names.append(CONTROL_AFTER_GENERATE)
    return names


def socket_inputs(node_class: Any) -> list[tuple[str, str]]:
    """``(name, type)`` of ``node_class``'s socket (non-widget) inputs, in ``INPUT_TYPES`` order."""
    return [(name, str(spec[0])) for name, spec in _input_specs(node_class) if not _is_widget(spec)]


def unknown_node_types(workflow: dict, object_info: Mapping[str, Any] | None = None) -> list[str]:
    """Node types of ``workflow`` that neither ``object_info`` nor the frontend knows, sorted."""
    info = _default_object_info() if object_info is None else object_info
    return sorted({n["type"] for n in workflow.get("nodes", [])
                   if n["type"] not in info and n["type"] not in FRONTEND_ONLY_NODES})


def _widget_default(spec: Any) -> Any:
    """The value the frontend gives a new widget: its default, else a combo's first option."""
    options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "default" in options:
        return options["default"]
    choices = spec[0] if isinstance(spec[0], (list, tuple)) else options.get("options")
    return choices[0] if choices else None


def _widget_inputs(node: dict, node_class: Any) -> dict[str, Any]:
    """Widget values by input name; widgets missing from the end of ``widgets_values`` (a workflow
    saved before the node gained an input) get their defaults, as when the frontend loads it."""
    values = node.get("widgets_values") or []
    names = widget_names(node_class)
    specs = dict(_input_specs(node_class))
    if isinstance(values, dict):  # some custom nodes save widgets by name
        return {name: values[name] if name in values else _widget_default(specs[name])
                for name in names if name != CONTROL_AFTER_GENERATE}
    if len(values) > len(names):
        raise WorkflowError(f"node {node['id']} ({node['type']}): {len(values)} widget values for "
                            f"{len(names)} widgets {names}")
    out = {name: value for name, value in zip(names, values) if name != CONTROL_AFTER_GENERATE}
    for name in names[len(values):]:
        if name != CONTROL_AFTER_GENERATE:
            out[name] = _widget_default(specs[name])
    return out


class _Graph:
    def __init__(self, workflow: dict) -> None:
        self.nodes = {int(n["id"]): n for n in workflow.get("nodes", [])}
        self.links: dict[int, tuple[int, int, str]] = {}
        for link in workflow.get("links", []):
            if isinstance(link, dict):  # newer frontends may save links as objects
                link_id, origin, slot, kind = link["id"], link["origin_id"], link["origin_slot"], link.get("type")
            else:
                link_id, origin, slot, kind = link[0], link[1], link[2], link[5] if len(link) > 5 else None
            self.links[int(link_id)] = (int(origin), int(slot), str(kind))

    def source(self, link_id: int, seen: frozenset[int] = frozenset()) -> tuple[int, int] | None:
        """The real output ``(node id, slot)`` behind ``link_id``, or None if nothing is sent."""
        if link_id not in self.links:
            raise WorkflowError(f"link {link_id} is not in the workflow's links")
        origin, slot, kind = self.links[link_id]
        if origin in seen:
            raise WorkflowError(f"bypass/reroute cycle through node {origin}")
        node = self.nodes.get(origin)
        if node is None:
            raise WorkflowError(f"link {link_id} starts at missing node {origin}")
        mode = int(node.get("mode", 0))
        if node["type"] == "PrimitiveNode" or mode == MODE_MUTED:
            return None
        if node["type"] == "Reroute" or mode == MODE_BYPASSED:
            for item in node.get("inputs") or []:
                upstream = item.get("link")
                if upstream is None:
                    continue
                if node["type"] == "Reroute" or str(item.get("type")) in (kind, "*"):
                    return self.source(int(upstream), seen | {origin})
            return None
        return origin, slot


def ui_to_api(workflow: dict, object_info: Mapping[str, Any] | None = None) -> dict[str, dict]:
    """The API prompt (``{node id: {"class_type", "inputs", "_meta"}}``) of a UI-format ``workflow``.

    Raises WorkflowError for node types missing from ``object_info`` (``nodes.NODE_CLASS_MAPPINGS`` by
    default), for links to missing nodes and for more widget values than the node has widgets.
    """
    info = _default_object_info() if object_info is None else object_info
    unknown = unknown_node_types(workflow, info)
    if unknown:
        raise WorkflowError(f"unknown node types: {', '.join(unknown)}")
    graph = _Graph(workflow)
    prompt: dict[str, dict] = {}
    for node_id, node in sorted(graph.nodes.items()):
        if node["type"] in FRONTEND_ONLY_NODES or int(node.get("mode", 0)) in (MODE_MUTED, MODE_BYPASSED):
            continue
        inputs = _widget_inputs(node, info[node["type"]])
        for item in node.get("inputs") or []:
            if item.get("link") is None:
                continue
            source = graph.source(int(item["link"]))
            if source is not None:
                inputs[item["name"]] = [str(source[0]), source[1]]
        prompt[str(node_id)] = {"class_type": node["type"], "inputs": inputs,
                                "_meta": {"title": node.get("title") or node["type"]}}
    return prompt
