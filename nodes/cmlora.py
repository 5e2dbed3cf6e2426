"""CMLoRA sampler and the LoRA frequency profiling node."""
from __future__ import annotations

from comfy_api.latest import io

from ..multilora.core.errors import StackError
from ..multilora.core.frequency_profile import check_profile_images, high_frequency_score
from ..multilora.core.stack import LoraStack, require_active
from ..multilora.host.ksampler import ksample
from ..multilora.methods.cmlora import CACHE_AUTO, CACHE_CHOICES, cmlora_model
from .checks import checked
from .sampling import stack_sampler_inputs
from .types import LoraStackType

ORDERINGS = ["stack categories", "profiled scores"]


class CmloraSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MultiLoRACMLoRASampler", display_name="KSampler (CMLoRA)", category="multilora/sampling",
            description="CMLoRA (Zou et al. 2025): LoRA Composite where one dominant LoRA weighs more, rotating "
                        "over the high-frequency LoRAs (character, clothing, style, object) early and the "
                        "low-frequency ones (background) from 'stage_switch' on. With the cache on, only the "
                        "dominant LoRA refreshes its deep UNet features at refresh steps; the others reuse theirs.",
            inputs=stack_sampler_inputs(
                io.Combo.Input("cache", options=list(CACHE_CHOICES), default=CACHE_AUTO,
                               tooltip="Feature cache: between refreshes, LoRAs reuse their cached deep UNet "
                                       "feature and run only the first/last level (UNet models). 'auto': on for "
                                       "SDXL (CMLoRA k = 4 in 0.39× Composite's time instead of 1.0×), off for "
                                       "SD1.x/SD2.x and others (a quarter of the time saved there, and the "
                                       "stale features double the fine grain). Off if images look noisy."),
                io.Float.Input("stage_switch", default=0.55, min=0.0, max=1.0, step=0.01,
                               tooltip="g: fraction of the steps after which low-frequency LoRAs lead."),
                io.Combo.Input("ordering", options=ORDERINGS, default=ORDERINGS[0],
                               tooltip="High/low split from the rows' categories, or from scores written by "
                                       "'LoRA Frequency Profile' (above the median = high frequency)."),
            ),
            outputs=[io.Latent.Output(tooltip="The denoised latent.")],
        )

    @classmethod
    @checked
    def execute(cls, model, lora_stack, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                latent_image, denoise, cache=CACHE_AUTO, stage_switch=0.55, ordering=ORDERINGS[0]) -> io.NodeOutput:
        node = "KSampler (CMLoRA)"
        rows = require_active(lora_stack, node)
        patched = cmlora_model(model, rows, stage_switch, ordering == ORDERINGS[1], node, cache=cache)
        return io.NodeOutput(ksample(patched, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                     latent_image, denoise))


class FrequencyProfile(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MultiLoRAFrequencyProfile", display_name="LoRA Frequency Profile", category="multilora",
            description="Scores each enabled LoRA's high-frequency share from an image made with that LoRA alone "
                        "(radial log-amplitude spectrum, mean at radius ≥ 0.2·r_max) and writes the scores into "
                        "a new stack, so CMLoRA can order LoRAs by measurement instead of category.",
            inputs=[LoraStackType.Input("lora_stack", tooltip="The stack to score (returned as a new stack)."),
                    io.Image.Input("images", tooltip="One image per enabled row, in stack order, each made "
                                                     "with only that LoRA (e.g. Apply LoRA Stack per row).")],
            outputs=[LoraStackType.Output(display_name="lora_stack", tooltip="The stack with hf scores."),
                     io.String.Output(display_name="scores", tooltip="The scores, one line per LoRA.")],
        )

    @classmethod
    @checked
    def execute(cls, lora_stack, images) -> io.NodeOutput:
        node = "LoRA Frequency Profile"
        active = require_active(lora_stack, node)
        if images.shape[0] != len(active):
            raise StackError(f"{node}: got {images.shape[0]} images for {len(active)} enabled LoRAs. Give one "
                             "image per enabled row, in stack order.")
        check_profile_images(images, [r.name for r in active], node)
        scores = iter([high_frequency_score(images[i]) for i in range(len(active))])
        rows = tuple(r.__class__(**{**r.__dict__, "hf_score": next(scores)}) if r.enabled else r
                     for r in lora_stack.rows)
        stack = LoraStack(rows)
        text = "\n".join(f"{r.name}: {r.hf_score:.4f}" for r in stack.active())
        return io.NodeOutput(stack, text)


NODES = [CmloraSampler, FrequencyProfile]
