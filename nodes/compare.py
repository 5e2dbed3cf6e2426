"""Compare node: every composition method from one stack, seed and settings, side by side."""
from __future__ import annotations

from comfy_api.latest import io

from ..multilora.core.errors import MultiLoRAError
from ..multilora.core.stack import require_active
from ..multilora.methods.compare import METHODS, labelled_grid, results_table, run_methods
from .checks import checked
from .sampling import STACK_TIP, ksampler_inputs, switch_input
from .types import LoraStackType

NODE = "Compare Multi-LoRA Methods"


class CompareMethods(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        base = {i.id: i for i in ksampler_inputs()}
        toggles = [io.Boolean.Input(f"run_{m.lower().replace(' ', '_')}", default=True,
                                    tooltip=f"Include {m} in the comparison.") for m in METHODS]
        return io.Schema(
            node_id="MultiLoRACompare", display_name="Compare Multi-LoRA Methods", category="multilora",
            description="Runs Merge, LoRA Switch, LoRA Composite, CLoRA and CMLoRA (as selected) from the same "
                        "stack, seed and settings; returns a labelled image grid and a table of time and peak "
                        "GPU memory per method. CLoRA needs concept words on at least two rows (otherwise it "
                        "is skipped and the table says why).",
            inputs=[base["model"],
                    io.Clip.Input("clip", tooltip="CLIP for the prompts (each method applies the stack's CLIP parts)."),
                    io.Vae.Input("vae", tooltip="VAE to decode each method's image."),
                    LoraStackType.Input("lora_stack", tooltip=STACK_TIP),
                    io.String.Input("prompt", multiline=True, default="", tooltip="Prompt shared by every method."),
                    io.String.Input("negative_prompt", multiline=True, default="", tooltip="Negative prompt."),
                    base["seed"], base["steps"], base["cfg"], base["sampler_name"], base["scheduler"],
                    base["latent_image"], switch_input(), *toggles],
            outputs=[io.Image.Output(display_name="grid", tooltip="One labelled tile per method."),
                     io.String.Output(display_name="table", tooltip="Seconds and peak GPU GB per method (Markdown).")],
        )

    @classmethod
    @checked
    def execute(cls, model, clip, vae, lora_stack, prompt, negative_prompt, seed, steps, cfg, sampler_name,
                scheduler, latent_image, switch_every, **toggles) -> io.NodeOutput:
        rows = require_active(lora_stack, NODE)
        chosen = [m for m in METHODS if toggles.get(f"run_{m.lower().replace(' ', '_')}", True)]
        if not chosen:
            raise MultiLoRAError(f"{NODE}: every method is switched off. Switch at least one on.")
        results = run_methods(model, clip, vae, rows, prompt, negative_prompt, seed, steps, cfg, sampler_name,
                              scheduler, latent_image, switch_every, chosen, NODE)
        return io.NodeOutput(labelled_grid(results), results_table(results))


NODES = [CompareMethods]
