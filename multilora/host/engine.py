"""Building the on-the-fly engine for a stack and installing it on a clone of the user's model.

Host module: reads the stack's files (cached), converts them through ComfyUI's loaders, fuses the
per-layer deltas, and returns a model clone carrying the engine's keyed wrappers.
"""
from __future__ import annotations

from typing import Sequence

from ..core.routing import Routing
from ..core.stack import LoraRow
from ..host.lora_bank import LoraSource, build_layers
from ..host.lora_files import read_lora_file, resolve_lora_path
from ..host.onthefly import OnTheFlyLoras


def build_engine(patcher, rows: Sequence[LoraRow], node: str, default_routing: Routing | None = None) -> OnTheFlyLoras:
    """The fused on-the-fly deltas of ``rows`` (their UNet strengths applied) for ``patcher``'s model."""
    sources = [
        LoraSource(row.name, read_lora_file(resolve_lora_path(row.name, node), node), row.strength_model)
        for row in rows
    ]
    layers = build_layers(patcher.model, sources, node)
    return OnTheFlyLoras(layers, [row.name for row in rows], default_routing)


def with_graph_replay(patcher):
    """A clone of ``patcher`` whose UNet calls replay from CUDA graphs, with no LoRA of the pack's: the fair
    baseline for a model whose LoRAs ComfyUI merged (the stock sampler runs eagerly)."""
    return clone_with_engine(patcher, OnTheFlyLoras({}, ()))


def clone_with_engine(patcher, engine: OnTheFlyLoras):
    """A clone of ``patcher`` whose sampling runs apply ``engine``; the input patcher is untouched."""
    clone = patcher.clone()
    engine.install(clone)
    return clone
