"""LoRA Switch and LoRA Composite nodes: KSampler-style samplers, a Switch model patch and a Composite guider."""
from __future__ import annotations

import comfy.samplers
from comfy_api.latest import io

from ..multilora.core.errors import StackError
from ..multilora.core.routing import SWITCH_PAPER, SWITCH_SCHEDULES
from ..multilora.core.stack import require_active
from ..multilora.host.ksampler import ksample
from ..multilora.methods.switch_composite import CompositeGuider, composite_model, switch_model
from .checks import checked
from .types import LoraStackType

STACK_TIP = "The LoRAs to compose (enabled rows, in order), from a LoRA Stack node."
SWITCH_TIP = "τ: the active LoRA changes every τ steps (active = ⌊step/τ⌋ mod k). The paper's default is 5."
SCHEDULE_TIP = ("When the active LoRA changes. '⌊i/τ⌋ mod k' (default, the paper's rule): every LoRA runs τ steps. "
                "'as the authors' code': the released code switches after step i when i > 0 and i mod τ = 0, so "
                "the first LoRA runs τ + 1 steps and the others τ.")
WEIGHTING_TIP = ("How branch predictions are averaged: 'uniform' (the paper) or 'stack strengths' "
                 "(weights ∝ |model strength| of each row; each LoRA still runs at its own strength).")


def ksampler_inputs() -> list[io.Input]:
    """Core KSampler's inputs with its defaults and ranges."""
    return [
        io.Model.Input("model", tooltip="The model used for denoising (not modified; LoRAs are applied on the fly)."),
        io.Int.Input("seed", default=0, min=0, max=0xffffffffffffffff, control_after_generate=True,
                     tooltip="The random seed used for creating the noise."),
        io.Int.Input("steps", default=20, min=1, max=10000, tooltip="The number of denoising steps."),
        io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01,
                       tooltip="Classifier-free guidance scale."),
        io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES, tooltip="The sampling algorithm."),
        io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, tooltip="The noise schedule."),
        io.Conditioning.Input("positive", tooltip="What to include in the image."),
        io.Conditioning.Input("negative", tooltip="What to exclude from the image."),
        io.Latent.Input("latent_image", tooltip="The latent image to denoise."),
        io.Float.Input("denoise", default=1.0, min=0.0, max=1.0, step=0.01,
                       tooltip="How much of the latent is re-noised (1.0 = text-to-image)."),
    ]


def stack_sampler_inputs(*extra: io.Input) -> list[io.Input]:
    """Core KSampler's inputs with the LoRA stack right after the model, then the method's own ``extra``."""
    base = ksampler_inputs()
    return base[:1] + [LoraStackType.Input("lora_stack", tooltip=STACK_TIP)] + base[1:] + list(extra)


def switch_input() -> io.Input:
    return io.Int.Input("switch_every", default=5, min=1, max=10000, tooltip=SWITCH_TIP)


def schedule_input() -> io.Input:
    return io.Combo.Input("schedule", options=list(SWITCH_SCHEDULES), default=SWITCH_PAPER, optional=True,
                          tooltip=SCHEDULE_TIP)


def weighting_input() -> io.Input:
    return io.Combo.Input("weighting", options=["uniform", "stack strengths"], default="uniform", tooltip=WEIGHTING_TIP)


def fusion_weights(rows, weighting: str, node: str):
    """None (uniform) or |model strength| per row; a StackError when 'stack strengths' has nothing to weigh."""
    if weighting == "uniform":
        return None
    weights = [abs(r.strength_model) for r in rows]
    if sum(weights) <= 0:
        raise StackError(f"{node}: weighting 'stack strengths' needs a non-zero model strength on at least one "
                         "enabled row, but every strength is 0. Set a strength or use weighting 'uniform'.")
    return weights


class LoraSwitchModel(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MultiLoRASwitch", display_name="LoRA Switch (model patch)", category="multilora/sampling",
            description="LoRA Switch (Zhong et al. 2024) as a model patch: one LoRA of the stack is active per "
                        "step, cycling every τ steps. Use with any sampler node (KSampler, SamplerCustomAdvanced).",
            inputs=[io.Model.Input("model", tooltip="The model to patch (a patched copy is returned)."),
                    LoraStackType.Input("lora_stack", tooltip=STACK_TIP), switch_input(), schedule_input()],
            outputs=[io.Model.Output(tooltip="The model with LoRA Switch applied during sampling.")],
        )

    @classmethod
    @checked
    def execute(cls, model, lora_stack, switch_every: int, schedule: str = SWITCH_PAPER) -> io.NodeOutput:
        rows = require_active(lora_stack, "LoRA Switch")
        return io.NodeOutput(switch_model(model, rows, switch_every, "LoRA Switch", schedule))


class LoraSwitchSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MultiLoRASwitchSampler", display_name="KSampler (LoRA Switch)", category="multilora/sampling",
            description="KSampler with LoRA Switch (Zhong et al. 2024): one LoRA active per step, cycling every "
                        "τ steps in stack order. Same cost as one LoRA.",
            inputs=stack_sampler_inputs(switch_input(), schedule_input()),
            outputs=[io.Latent.Output(tooltip="The denoised latent.")],
        )

    @classmethod
    @checked
    def execute(cls, model, lora_stack, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                latent_image, denoise, switch_every, schedule=SWITCH_PAPER) -> io.NodeOutput:
        rows = require_active(lora_stack, "KSampler (LoRA Switch)")
        patched = switch_model(model, rows, switch_every, "KSampler (LoRA Switch)", schedule)
        return io.NodeOutput(ksample(patched, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                     latent_image, denoise))


class LoraCompositeSampler(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MultiLoRACompositeSampler", display_name="KSampler (LoRA Composite)",
            category="multilora/sampling",
            description="KSampler with LoRA Composite (Zhong et al. 2024): every step each LoRA alone predicts "
                        "cond and uncond; the predictions are averaged before CFG. All branches are batched.",
            inputs=stack_sampler_inputs(weighting_input()),
            outputs=[io.Latent.Output(tooltip="The denoised latent.")],
        )

    @classmethod
    @checked
    def execute(cls, model, lora_stack, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                latent_image, denoise, weighting="uniform") -> io.NodeOutput:
        node = "KSampler (LoRA Composite)"
        rows = require_active(lora_stack, node)
        patched = composite_model(model, rows, fusion_weights(rows, weighting, node), node)
        return io.NodeOutput(ksample(patched, seed, steps, cfg, sampler_name, scheduler, positive, negative,
                                     latent_image, denoise))


class LoraCompositeGuider(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MultiLoRACompositeGuider", display_name="LoRA Composite Guider", category="multilora/sampling",
            description="A CFG guider over LoRA Composite predictions, for SamplerCustomAdvanced with any "
                        "sampler and sigmas.",
            inputs=[io.Model.Input("model", tooltip="The model (not modified)."),
                    LoraStackType.Input("lora_stack", tooltip=STACK_TIP),
                    io.Conditioning.Input("positive", tooltip="What to include in the image."),
                    io.Conditioning.Input("negative", tooltip="What to exclude from the image."),
                    io.Float.Input("cfg", default=8.0, min=0.0, max=100.0, step=0.1, round=0.01,
                                   tooltip="Classifier-free guidance scale."),
                    weighting_input()],
            outputs=[io.Guider.Output(tooltip="Guider for SamplerCustomAdvanced.")],
        )

    @classmethod
    @checked
    def execute(cls, model, lora_stack, positive, negative, cfg, weighting="uniform") -> io.NodeOutput:
        node = "LoRA Composite Guider"
        rows = require_active(lora_stack, node)
        guider = CompositeGuider(model, rows, fusion_weights(rows, weighting, node), node)
        guider.set_conds(positive, negative)
        guider.set_cfg(cfg)
        return io.NodeOutput(guider)


NODES = [LoraSwitchSampler, LoraCompositeSampler, LoraSwitchModel, LoraCompositeGuider]
