"""Regional LoRA nodes: a model patch for any sampler node and a KSampler-style node."""
from __future__ import annotations

import logging

from comfy_api.latest import io

from ..multilora.core.auto_masks import AutoMaskPhases
from ..multilora.core.regions import TEXT_ALL, TEXT_POLICIES
from ..multilora.core.stack import require_active
from ..multilora.host.ksampler import ksample
from ..multilora.host.token_routing import refuse_reference_latents
from ..multilora.methods.regional import check_masks, regional_model
from ..multilora.methods.regional_auto import (
    MASK_SOURCES,
    MASKS_DRAWN,
    auto_regional_model,
    drawn_record,
    text_concept_tokens,
)
from .checks import checked
from .sampling import STACK_TIP, stack_sampler_inputs
from .types import AttentionMapsType, LoraStackType

MASKS = 4
MASK_TIP = ("Where enabled row {i} of the stack acts (white = full strength). Any size: it is resized to the latent. "
            "Leave it unconnected to apply that row everywhere (a style, a background).")
FEATHER_TIP = ("Softens each mask's edge by a Gaussian blur of this many latent pixels (1 latent pixel = 8 image "
               "pixels on SD/SDXL/Flux/Z-Image) before regions are normalised. 0 = hard edges.")
TEXT_TIP = ("What the LoRAs do to the prompt's tokens (cross-attention keys/values on UNets, the text stream of Flux, "
            "the caption of Z-Image), "
            "which have no place in the image: 'every LoRA' (default) lets each LoRA read the whole prompt as it "
            "would alone; 'no LoRA' keeps the regional rows off the text (rows without a mask still act there); "
            "'each LoRA on its words' keeps every other regional row off a row's concept words in the positive "
            "prompt (needs clip and prompt).")
MASK_FROM_TIP = ("Where rows without a mask act: 'connected masks' (default) = everywhere; 'concept attention' = a "
                 "mask found from the attention of the row's concept word(s) to the image (rows of category style "
                 "and rows without a concept word still act everywhere; connected masks still apply). Needs clip "
                 "and prompt.")
CLIP_TIP = ("The text encoder of the positive prompt; with mask_from 'concept attention' or text_tokens 'each LoRA on "
            "its words' it finds the concept words' "
            "tokens in 'prompt' (CLIP tokens on SD1.x/SDXL, T5 tokens on Flux, Qwen3 tokens on Z-Image). Nothing is "
            "encoded.")
PROMPT_TIP = ("The positive prompt's text, exactly as encoded into 'positive'; every concept word of an automatic row "
              "must appear in it.")
AUTO_STEPS_TIP = ("Steps at the start during which the automatic rows act everywhere (the plain stack) while their "
                  "concept attention is averaged; from step auto_steps on they act inside the masks found.")
REFRESH_TIP = ("0 = the masks found after auto_steps stay frozen; M ≥ 1 = found again every M steps from the "
               "attention of the step before.")
THRESHOLD_TIP = ("λ: a pixel joins a concept's mask where its attention (min-max normalised per concept) is ≥ λ and "
                 "higher than every other concept's; below λ for all concepts only the rows without a mask act there. "
                 "0 = the concepts split the whole image.")
PATCH_MASK_FROM_TIP = (MASK_FROM_TIP + " Here the masks are found anew in every sampling run, from the run's own "
                      "steps; to see them (region_maps), use KSampler (Regional LoRA), whose output they are: a "
                      "MODEL cannot carry them out.")
DESCRIPTION = ("Regional LoRA: each LoRA of the stack acts only inside its mask, all in one model call per step "
               "(about the cost of one merged LoRA). Overlapping masks share their pixels; where no mask covers "
               "the image only the rows without a mask act. Works on SD1.x, SDXL, Flux-family and Z-Image / Lumina 2 "
               "models.")
log = logging.getLogger("multilora")


def region_inputs() -> list[io.Input]:
    masks = [io.Mask.Input(f"mask_{i}", optional=True, tooltip=MASK_TIP.format(i=i)) for i in range(1, MASKS + 1)]
    return masks + [
        io.Float.Input("feather", default=0.0, min=0.0, max=64.0, step=0.5, optional=True, tooltip=FEATHER_TIP),
        io.Combo.Input("text_tokens", options=list(TEXT_POLICIES), default=TEXT_ALL, optional=True,
                       tooltip=TEXT_TIP),
    ]


def auto_inputs(mask_from_tip: str = MASK_FROM_TIP) -> list[io.Input]:
    return [
        io.Combo.Input("mask_from", options=list(MASK_SOURCES), default=MASKS_DRAWN, optional=True,
                       tooltip=mask_from_tip),
        io.Clip.Input("clip", optional=True, tooltip=CLIP_TIP),
        io.String.Input("prompt", multiline=True, default="", optional=True, tooltip=PROMPT_TIP),
        io.Int.Input("auto_steps", default=3, min=1, max=10000, optional=True, tooltip=AUTO_STEPS_TIP),
        io.Int.Input("refresh_every", default=0, min=0, max=10000, optional=True, tooltip=REFRESH_TIP),
        io.Float.Input("mask_threshold", default=0.4, min=0.0, max=1.0, step=0.01, optional=True,
                       tooltip=THRESHOLD_TIP),
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
            description=DESCRIPTION + " Use with any sampler node. Rows without a mask can get one from the attention "
                                      "of their concept word (mask_from 'concept attention').",
            inputs=[io.Model.Input("model", tooltip="The model to patch (a patched copy is returned)."),
                    LoraStackType.Input("lora_stack", tooltip=STACK_TIP), *region_inputs(),
                    *auto_inputs(PATCH_MASK_FROM_TIP)],
            outputs=[io.Model.Output(tooltip="The model with each LoRA restricted to its region during sampling.")],
        )

    @classmethod
    @checked
    def execute(cls, model, lora_stack, feather: float = 0.0, text_tokens: str = TEXT_ALL, clip=None, prompt: str = "",
                mask_from: str = MASKS_DRAWN, auto_steps: int = 3, refresh_every: int = 0, mask_threshold: float = 0.4,
                **masks) -> io.NodeOutput:
        node = "Regional LoRA"
        rows = require_active(lora_stack, node)
        if mask_from == MASKS_DRAWN:
            words = text_concept_tokens(model, rows, masks_of(masks), clip, prompt, node, text_tokens)
            return io.NodeOutput(regional_model(model, rows, masks_of(masks), node, feather, text_tokens, words))
        # The positive conds meet the patch only in the sampler: the wrappers check them when sampling starts.
        patched, _ = auto_regional_model(model, rows, masks_of(masks), node, clip, prompt,
                                         AutoMaskPhases(auto_steps, refresh_every), mask_threshold, feather,
                                         text_tokens)
        return io.NodeOutput(patched)


class RegionalLoraSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MultiLoRARegionalSampler", display_name="KSampler (Regional LoRA)",
            category="multilora/sampling",
            description=DESCRIPTION + " Rows without a mask can get one from the attention of their concept word "
                                      "(mask_from 'concept attention').",
            inputs=stack_sampler_inputs(*region_inputs(), *auto_inputs()),
            outputs=[io.Latent.Output(tooltip="The denoised latent."),
                     AttentionMapsType.Output(display_name="region_maps",
                                              tooltip="The regions in use at each step (first image) for CLoRA Mask "
                                                      "Preview: automatic masks as they were found, or the connected "
                                                      "masks.")],
        )

    @classmethod
    @checked
    def execute(cls, model, lora_stack, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image,
                denoise, feather: float = 0.0, text_tokens: str = TEXT_ALL, clip=None, prompt: str = "",
                mask_from: str = MASKS_DRAWN, auto_steps: int = 3, refresh_every: int = 0,
                mask_threshold: float = 0.4, **masks) -> io.NodeOutput:
        node = "KSampler (Regional LoRA)"
        rows = require_active(lora_stack, node)
        latent_size = tuple(int(s) for s in latent_image["samples"].shape[-2:])
        refuse_reference_latents(model.model.diffusion_model, (positive, negative), node)
        for note in check_masks(rows, masks_of(masks), node, latent_size, feather):
            log.warning("%s: %s", node, note)
        if mask_from == MASKS_DRAWN:
            words = text_concept_tokens(model, rows, masks_of(masks), clip, prompt, node, text_tokens)
            patched = regional_model(model, rows, masks_of(masks), node, feather, text_tokens, words)
            record = drawn_record(rows, masks_of(masks), latent_size, node, feather)
        else:
            patched, auto = auto_regional_model(model, rows, masks_of(masks), node, clip, prompt,
                                                AutoMaskPhases(auto_steps, refresh_every), mask_threshold, feather,
                                                text_tokens, positive)
            record = auto.record
        latent = ksample(patched, seed, steps, cfg, sampler_name, scheduler, positive, negative, latent_image, denoise)
        return io.NodeOutput(latent, record)


NODES = [RegionalLoraModel, RegionalLoraSampler]
