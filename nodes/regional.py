"""Regional LoRA nodes: a model patch for any sampler node and a KSampler-style node."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from ..multilora.core.regions import TEXT_ALL, TEXT_POLICIES
from ..multilora.core.stack import require_active
from ..multilora.host.ksampler import ksample
from ..multilora.methods.regional import check_masks, regional_model
from .checks import checked
from .sampling import STACK_TIP, stack_sampler_inputs
from .types import LoraStackType

MASKS = 4
MASK_TIP = ("Where enabled row {i} of the stack acts (white = full strength). Any size: it is resized to the latent. "
            "Leave it unconnected to apply that row everywhere (a style, a background).")
FEATHER_TIP = ("Softens each mask's edge by a Gaussian blur of this many latent pixels (1 latent pixel = 8 image "
               "pixels on SD/SDXL/Flux) before regions are normalised. 0 = hard edges.")
TEXT_TIP = ("What the LoRAs do to the prompt's tokens (cross-attention keys/values on UNets, the text stream of Flux), "
            "which have no place in the image: 'every LoRA' (default) lets each LoRA read the whole prompt as it "
            "would alone; 'no LoRA' keeps the regional rows off the text (rows without a mask still act there).")
DESCRIPTION = ("Regional LoRA: each LoRA of the stack acts only inside its mask, all in one model call per step "
               "(about the cost of one merged LoRA). Overlapping masks share their pixels; where no mask covers "
               "the image only the rows without a mask act. Works on SD1.x, SDXL and Flux-family models.")
log = logging.getLogger("multilora")


def region_inputs() -> list[io.Input]:
    masks = [io.Mask.Input(f"mask_{i}", optional=True, tooltip=MASK_TIP.format(i=i)) for i in range(1, MASKS + 1)]
    return masks + [
        io.Float.Input("feather", default=0.0, min=0.0, max=64.0, step=0.5, optional=True, tooltip=FEATHER_TIP),
        io.Combo.Input("text_tokens", options=list(TEXT_POLICIES), default=TEXT_ALL, optional=True,
                       tooltip=TEXT_TIP),
    ]


def masks_of(values: dict) -> list:
    """mask_1 … mask_N in row order, trailing unconnected ones dropped."""
    masks = [values.get(f"mask_{i}") for i in range(1, MASKS + 1)]
    while masks and masks[-1] is None:
        masks.pop()
    return masks


class RegionalLoraModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MultiLoRARegional", display_name="Regional LoRA (model patch)", category="multilora/sampling",
            description=DESCRIPTION + " Use with any sampler node.",
            inputs=[io.Model.Input("model", tooltip="The model to patch (a patched copy is returned)."),
                    LoraStackType.Input("lora_stack", tooltip=STACK_TIP), *region_inputs()],
            outputs=[io.Model.Output(tooltip="The model with each LoRA restricted to its region during sampling.")],
        )

    @classmethod
    @checked
    def execute(cls, model, lora_stack, feather: float = 0.0, text_tokens: str = TEXT_ALL, **masks) -> io.NodeOutput:
        node = "Regional LoRA"
        rows = require_active(lora_stack, node)
        return io.NodeOutput(regional_model(model, rows, masks_of(masks), node, feather, text_tokens))


class RegionalLoraSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MultiLoRARegionalSampler", display_name="KSampler (Regional LoRA)",
            category="multilora/sampling", description=DESCRIPTION,
            inputs=stack_sampler_inputs(*region_inputs()),
            outputs=[io.Latent.Output(tooltip="The denoised latent.")],
        )

    @classmethod
    @checked
    def execute(cls, model, lora_stack, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                denoise, feather: float = 0.0, text_tokens: str = TEXT_ALL, **masks) -> io.NodeOutput:
        node = "KSampler (Regional LoRA)"
        rows = require_active(lora_stack, node)
        latent_size = tuple(int(s) for s in latent_image["samples"].shape[-2:])
        for note in check_masks(rows, masks_of(masks), node, latent_size, feather):
            log.warning("%s: %s", node, note)
        patched = regional_model(model, rows, masks_of(masks), node, feather, text_tokens)
        return io.NodeOutput(ksample(patched, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                     latent_image, denoise))


NODES = [RegionalLoraModel, RegionalLoraSampler]
