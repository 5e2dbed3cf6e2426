"""UI layer: thin V3 node classes that validate inputs and delegate to the ``multilora`` engine."""
from __future__ import annotations

from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .clora import NODES as CLORA_NODES
from .cmlora import NODES as CMLORA_NODES
from .compare import NODES as COMPARE_NODES
from .sampling import NODES as SAMPLING_NODES
from .stack import ApplyLoraStack, LoraStackNode


class MultiLoRAExtension(ComfyExtension):
    """The pack's node list."""

    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return [LoraStackNode, ApplyLoraStack, *SAMPLING_NODES, *CLORA_NODES, *CMLORA_NODES, *COMPARE_NODES]
