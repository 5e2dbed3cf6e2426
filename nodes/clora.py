"""CLoRA sampler and attention-mask preview nodes."""
from __future__ import annotations

import torch

from comfy_api.latest import io, ui

from ..multilora.core.clora_masks import check_threshold, maps_at_step, masks_from_maps, overlay
from ..multilora.core.stack import require_active
from ..multilora.methods.clora import CloraSettings, clora_sample
from ..multilora.methods.clora_settings import (
    ATTENTION_HALVES,
    HALVES_COND,
    MASK_SOURCES,
    MASK_UNION,
    VARIANT_NAMES,
    VARIANT_PACK,
)
from .checks import checked
from .sampling import STACK_TIP, ksampler_inputs
from .types import AttentionMapsType, LoraStackType

NODE = "CLoRA"
VARIANT_TIP = ("Which CLoRA: 'pack' (default) or 'authors' code' (the authors' released SD1.5 pipeline: each "
               "LoRA's mask from its own prompt variant, no second UNet pass after an update, attention maps "
               "averaged over the cond and uncond halves, the extra iterations at 0/10/20 % of the steps instead of "
               "0/20/40 %); 'custom' takes the three inputs below, with the pack's 0/20/40 %.")
CUSTOM = " Used only when variant is 'custom'."


class CloraSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        base = {i.id: i for i in ksampler_inputs()}
        return io.Schema(
            node_id="MultiLoRACLoRASampler", display_name="KSampler (CLoRA)", category="multilora/sampling",
            description="CLoRA (Meral et al. 2024): each LoRA draws its own concept. A contrastive loss on "
                        "cross-attention maps moves the latent early in sampling, then attention masks fuse the "
                        "per-LoRA predictions. Each stack row needs its concept word(s) as they appear in the "
                        "prompt; 'style' rows apply everywhere.",
            inputs=[
                base["model"],
                io.Clip.Input("clip", tooltip="CLIP used to encode every prompt variant (each with only its LoRA)."),
                LoraStackType.Input("lora_stack", tooltip=STACK_TIP + " Rows need concept words (≥ 2 concepts)."),
                io.String.Input("prompt", multiline=True, default="a cat and a dog",
                                tooltip="Base prompt; every concept word of the stack must appear in it."),
                io.String.Input("negative_prompt", multiline=True, default="",
                                tooltip="Negative prompt (encoded per variant)."),
                base["seed"], base["steps"], base["cfg"], base["sampler_name"], base["scheduler"],
                base["latent_image"], base["denoise"],
                io.Float.Input("mask_threshold", default=0.4, min=0.0, max=1.0, step=0.01,
                               tooltip="λ: a pixel belongs to a concept where its attention ≥ λ·max (0 = full masks)."),
                io.Float.Input("temperature", default=0.5, min=0.01, max=10.0, step=0.01,
                               tooltip="τ of the NT-Xent contrastive loss."),
                io.Float.Input("step_size", default=20.0, min=0.0, max=1000.0, step=0.5,
                               tooltip="α of the latent update, in VP-latent units (the paper's 20)."),
                io.Float.Input("opt_until", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="Fraction of the steps with latent updates (0 = masks only)."),
                io.Int.Input("refine_iters", default=20, min=0, max=200,
                             tooltip="Extra update iterations at 0 %, 20 % and 40 % of the steps."),
                io.Boolean.Input("gradient_checkpointing", default=False, optional=True,
                                 tooltip="Recompute UNet activations in the latent update instead of storing "
                                         "them: much less memory (SDXL), about one extra forward pass of time."),
                io.Combo.Input("variant", options=list(VARIANT_NAMES), default=VARIANT_PACK, optional=True,
                               tooltip=VARIANT_TIP),
                io.Combo.Input("mask_source", options=list(MASK_SOURCES), default=MASK_UNION, optional=True,
                               tooltip="Which attention maps make a LoRA's mask: its concept's maps from every "
                                       "prompt variant (pack) or only from that LoRA's own variant (authors)." + CUSTOM),
                io.Boolean.Input("recompute_after_update", default=True, optional=True,
                                 tooltip="After a latent update, predict again at the moved latent (pack) or keep "
                                         "the noise predictions of the update's last pass (authors; one UNet "
                                         "pass fewer per updated step)." + CUSTOM),
                io.Combo.Input("attention_halves", options=list(ATTENTION_HALVES), default=HALVES_COND, optional=True,
                               tooltip="Attention maps from the conditional half (pack) or averaged over the "
                                       "conditional and unconditional halves at the same token positions "
                                       "(authors)." + CUSTOM),
            ],
            outputs=[
                io.Latent.Output(tooltip="The denoised latent."),
                AttentionMapsType.Output(display_name="attention_maps",
                                         tooltip="Per-step concept maps (first image of the batch) for Mask Preview."),
                io.Mask.Output(display_name="masks",
                               tooltip="Final masks of the first image, one per concept LoRA (latent size × 8)."),
            ],
        )

    @classmethod
    @checked
    def execute(cls, model, clip, lora_stack, prompt, negative_prompt, seed, steps, cfg, sampler_name, scheduler,
                latent_image, denoise, mask_threshold=0.4, temperature=0.5, step_size=20.0, opt_until=0.5,
                refine_iters=20, gradient_checkpointing=False, variant=VARIANT_PACK, mask_source=MASK_UNION,
                recompute_after_update=True, attention_halves=HALVES_COND) -> io.NodeOutput:
        rows = require_active(lora_stack, "KSampler (CLoRA)", minimum=2)
        settings = CloraSettings.for_variant(
            variant, "KSampler (CLoRA)", cfg=cfg, mask_threshold=mask_threshold, temperature=temperature,
            step_size=step_size, opt_until=opt_until, refine_iters=refine_iters,
            gradient_checkpointing=gradient_checkpointing, mask_source=mask_source,
            recompute_after_update=recompute_after_update, attention_halves=attention_halves)
        latent, record = clora_sample(model, clip, prompt, negative_prompt, rows, seed, steps, sampler_name,
                                      scheduler, latent_image, denoise, settings)
        masks = record.final_masks.float()
        masks = torch.nn.functional.interpolate(masks[None], scale_factor=8, mode="nearest")[0]
        return io.NodeOutput(latent, record, masks)


class MaskPreview(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MultiLoRAMaskPreview", display_name="CLoRA Mask Preview", category="multilora",
            description="Shows CLoRA's per-LoRA attention masks, one colour per LoRA, at a threshold you can "
                        "move without re-sampling (the maps are stored; only the masks are recomputed).",
            inputs=[
                AttentionMapsType.Input("attention_maps", tooltip="From KSampler (CLoRA), or region_maps "
                                                                  "from KSampler (Regional LoRA)."),
                io.Float.Input("mask_threshold", default=0.4, min=0.0, max=1.0, step=0.01,
                               tooltip="λ used to threshold the stored maps."),
                io.Int.Input("step", default=-1, min=-10000, max=10000,
                             tooltip="Which sampling step to show (−1 = last, negative counts from the end). "
                                     "Maps are those of the first image of the batch."),
                io.Boolean.Input("average_steps", default=False, tooltip="Average the maps over all steps instead."),
                io.Image.Input("image", optional=True, tooltip="Decoded image to draw the masks over (else black)."),
            ],
            outputs=[io.Mask.Output(display_name="masks", tooltip="One mask per concept LoRA."),
                     io.Image.Output(display_name="overlay", tooltip="The masks over the image.")],
            is_output_node=True,
        )

    @classmethod
    @checked
    def execute(cls, attention_maps, mask_threshold, step, average_steps, image=None) -> io.NodeOutput:
        check_threshold(mask_threshold)
        maps = maps_at_step(attention_maps.steps, None if average_steps else step)
        height, width = attention_maps.latent_size
        if image is None:
            image = torch.zeros(1, height * 8, width * 8, 3)
        normalize = getattr(attention_maps, "normalize", True)  # Regional LoRA stores masks, not attention
        masks = masks_from_maps(maps, mask_threshold, tuple(image.shape[1:3]), normalize=normalize).float()
        shown = overlay(image, masks)
        return io.NodeOutput(masks, shown, ui=ui.PreviewImage(shown, cls=cls))


NODES = [CloraSampler, MaskPreview]
