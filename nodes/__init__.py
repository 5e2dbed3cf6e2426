"""UI layer: thin V3 node classes that validate inputs and delegate to the ``multilora`` engine."""
from __future__ import annotations

from typing_extensions import override

from comfy_api.latest import ComfyExtension, io

from .checks import install_prompt_handler
from .clora import NODES as CLORA_NODES
from .cmlora import NODES as CMLORA_NODES
from .compare import NODES as COMPARE_NODES
from .regional import NODES as REGIONAL_NODES
from .sampling import NODES as SAMPLING_NODES
from .stack import ApplyLoraStack, LoraStackNode


class MultiLoRAExtension(ComfyExtension):
    """The pack's node list."""

    @override
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        node_list = [LoraStackNode, ApplyLoraStack, *SAMPLING_NODES, *CLORA_NODES, *CMLORA_NODES, *COMPARE_NODES,
                     *REGIONAL_NODES]
        install_prompt_handler(node_list)
        return node_list
