"""LoRA Stack and Apply LoRA Stack nodes."""
from __future__ import annotations

import folder_paths
from comfy_api.latest import io

from ..multilora.core.errors import StackError
from ..multilora.core.stack import CATEGORIES, MAX_ROWS, NO_LORA, LoraStack, build_row
from ..multilora.methods.merge import merge_rows
from .checks import checked
from .types import LoraStackType

ROW_FIELDS = ("lora", "on", "strength_model", "strength_clip", "category", "concept", "trigger")


def row_inputs(n: int, lora_names: list[str]) -> list[io.Input]:
    """The widgets of row ``n`` (1-based). Optional, so API prompts and JS-less UIs may omit unused rows.
    Each tooltip says which methods use the field."""
    return [
        io.Combo.Input(f"lora_{n}", options=[NO_LORA] + lora_names, default=NO_LORA, optional=True,
                       tooltip=f"Row {n}: LoRA file from the loras folder. Used by every method."),
        io.Boolean.Input(f"on_{n}", default=True, optional=True,
                         tooltip=f"Row {n}: include this LoRA (off rows are kept but every method ignores them). "
                                 "In API prompts: true/false, 0/1 or the text \"true\"/\"false\" (any case); "
                                 "other values are refused."),
        io.Float.Input(f"strength_model_{n}", default=1.0, min=-100.0, max=100.0, step=0.01, optional=True,
                       tooltip=f"Row {n}: strength on the diffusion model (UNet/DiT). Used by every method: Merge "
                               "(Apply LoRA Stack), Switch, Composite, CLoRA and CMLoRA; Composite's 'stack "
                               "strengths' weighting also weighs the LoRAs by it."),
        io.Float.Input(f"strength_clip_{n}", default=1.0, min=-100.0, max=100.0, step=0.01, optional=True,
                       tooltip=f"Row {n}: strength on the text encoder. Used where the stack's CLIP parts are "
                               "applied: Apply LoRA Stack (the prompts of Merge, Switch, Composite and CMLoRA "
                               "workflows go through it), CLoRA (each prompt variant) and Compare."),
        io.Combo.Input(f"category_{n}", options=list(CATEGORIES), default="other", optional=True,
                       tooltip=f"Row {n}: what the LoRA adds. Used by CMLoRA (its schedule splits high-frequency "
                               "from background LoRAs by it, with ordering 'stack categories'), CLoRA and Regional "
                               "LoRA's automatic masks ('style' rows apply everywhere and need no concept). Merge, Switch "
                               "and Composite ignore it."),
        io.String.Input(f"concept_{n}", default="", optional=True,
                        tooltip=f"Row {n}: concept word(s) of this LoRA as they appear in the prompt, "
                                "comma-separated (e.g. 'cat'). Used by CLoRA (also inside Compare) and by Regional "
                                "LoRA's automatic masks; the other methods ignore it."),
        io.String.Input(f"trigger_{n}", default="", optional=True,
                        tooltip=f"Row {n}: trigger word(s) of the LoRA, comma-separated. Used only by CLoRA, which "
                                "inserts them before the concept word in this LoRA's prompt variant; the other "
                                "methods ignore it, so write trigger words into their prompt yourself."),
    ]


ROW_LABELS = {f"{field}_{n}": f"row {n}: '{field}_{n}'" for n in range(1, MAX_ROWS + 1) for field in ROW_FIELDS}
FILE_INPUTS = frozenset(f"lora_{n}" for n in range(1, MAX_ROWS + 1))
"""Row dropdowns listing files: build_row checks the name against the loras folder, with a refresh hint."""
UNFIT_OPTIONS = ("error", "ignore like ComfyUI")


class LoraStackNode(io.ComfyNode):
    """A typed list of LoRAs; chain stacks through the optional input."""

    INPUT_FREE = FILE_INPUTS
    INPUT_LABELS = ROW_LABELS

    @classmethod
    def define_schema(cls) -> io.Schema:
        lora_names = folder_paths.get_filename_list("loras")
        inputs: list[io.Input] = [
            LoraStackType.Input("lora_stack", optional=True,
                                tooltip="Optional stack to extend; its rows come first. It is not modified."),
            io.Int.Input("rows", default=1, min=1, max=MAX_ROWS,
                         tooltip=f"How many rows below are used (1–{MAX_ROWS}). The + / − buttons set it."),
        ]
        for n in range(1, MAX_ROWS + 1):
            inputs += row_inputs(n, lora_names)
        return io.Schema(
            node_id="MultiLoRAStack",
            display_name="LoRA Stack",
            category="multilora",
            description="A list of LoRAs with per-row strengths, on/off, category and CLoRA concept/trigger "
                        "words. Feeds every multi-LoRA sampler of this pack and Apply LoRA Stack.",
            inputs=inputs,
            outputs=[LoraStackType.Output(display_name="lora_stack", tooltip="The combined stack.")],
        )

    @classmethod
    @checked
    def execute(cls, rows: int, lora_stack: LoraStack | None = None, **widgets) -> io.NodeOutput:
        available = set(folder_paths.get_filename_list("loras"))
        built = []
        for n in range(1, rows + 1):
            name = widgets.get(f"lora_{n}", NO_LORA)
            enabled = widgets.get(f"on_{n}", True)
            if not enabled and (not name or name == NO_LORA):
                continue
            built.append(build_row(
                n, name,
                widgets.get(f"strength_model_{n}", 1.0), widgets.get(f"strength_clip_{n}", 1.0), enabled,
                widgets.get(f"concept_{n}", ""), widgets.get(f"trigger_{n}", ""),
                widgets.get(f"category_{n}", "other"), available,
            ))
        stack = LoraStack(tuple(built))
        if lora_stack is not None:
            stack = lora_stack.chained(stack)
        return io.NodeOutput(stack)


class ApplyLoraStack(io.ComfyNode):
    """Merge the stack into MODEL and/or CLIP, as chained core LoraLoaders would (the Merge baseline)."""

    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="MultiLoRAApplyStack",
            display_name="Apply LoRA Stack",
            category="multilora",
            description="Merges every enabled LoRA of the stack into the model and/or CLIP with its strengths, "
                        "exactly like a chain of core Load LoRA nodes. With the stock KSampler this is the "
                        "'Merge' baseline; with only CLIP connected it applies the stack's text-encoder parts "
                        "for the multi-LoRA samplers.",
            inputs=[
                LoraStackType.Input("lora_stack", tooltip="The LoRAs to merge, in order."),
                io.Model.Input("model", optional=True, tooltip="Model to merge the LoRAs into (a patched copy is returned)."),
                io.Clip.Input("clip", optional=True, tooltip="CLIP to merge the LoRAs' text-encoder parts into."),
                io.Combo.Input("unfit_lora", options=list(UNFIT_OPTIONS), default=UNFIT_OPTIONS[0], optional=True,
                               tooltip="A LoRA that does not fit the model (made for another model family, or a "
                                       "layer of the wrong shape): 'error' stops before sampling, with the message "
                                       "the other methods give; 'ignore like ComfyUI' merges what fits and only "
                                       "logs the rest, as core Load LoRA does."),
            ],
            outputs=[
                io.Model.Output(tooltip="The model with the LoRAs merged (None if no model was connected)."),
                io.Clip.Output(tooltip="The CLIP with the LoRAs merged (None if no CLIP was connected)."),
            ],
        )

    @classmethod
    @checked
    def execute(cls, lora_stack: LoraStack, model=None, clip=None, unfit_lora: str = UNFIT_OPTIONS[0]) -> io.NodeOutput:
        if model is None and clip is None:
            raise StackError("Apply LoRA Stack: connect 'model', 'clip' or both.")
        model, clip = merge_rows(model, clip, lora_stack.active(), "Apply LoRA Stack",
                                 check_fit=unfit_lora == UNFIT_OPTIONS[0])
        return io.NodeOutput(model, clip)
