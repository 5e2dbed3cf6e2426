"""Multi-LoRA composition for ComfyUI: LoRA Switch, LoRA Composite, CLoRA and CMLoRA samplers.

Import-light on purpose: ComfyUI calls ``comfy_entrypoint`` after its own modules are ready, and tests
import this file without ComfyUI. Node modules are imported lazily inside the entrypoint.
"""

WEB_DIRECTORY = "./js"


async def comfy_entrypoint():
    """V3 entrypoint: the pack's ComfyExtension."""
    from .nodes import MultiLoRAExtension

    return MultiLoRAExtension()
