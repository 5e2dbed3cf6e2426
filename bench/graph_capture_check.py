"""Do the regional sampler's CUDA graphs capture and replay in every sampling run? (SDXL 1024², k = 2, GPU)

    python bench/graph_capture_check.py

For user masks and automatic masks, each with text_tokens "every LoRA" and "each LoRA on its words": two sampling
runs of 10 steps with one patched model (as a user queueing a workflow twice), printing per run the wrapper's
captures, replays and refused signatures and each step's ms. A failed capture (e.g. a host-to-device copy inside it)
is logged by the pack and leaves the run eager: its steps then cost ~3× a replayed one. Same model, LoRAs, masks
and conds as ``regional_bench.py``.
"""
from __future__ import annotations

import logging
import os
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(os.path.dirname(HERE), "testbed"))

from bench_models import build_unet, write_loras  # noqa: E402
from boot import boot_comfy  # noqa: E402
from regional_bench import CONCEPTS, PROMPT, region_masks, tokenizer_clip  # noqa: E402
from step_times import timed_runs  # noqa: E402


def main():
    logging.basicConfig(level=logging.WARNING)
    ml = boot_comfy()
    import comfy.patcher_extension
    import folder_paths
    patcher = build_unet("sdxl")
    folder = tempfile.mkdtemp()
    names, _ = write_loras(patcher, 2, folder)
    folder_paths.add_model_folder_path("loras", folder, is_default=True)
    rows = [ml("core.stack").LoraRow(n, 0.8, concept=c) for n, c in zip(names, CONCEPTS)]
    regional, auto, words = ml("methods.regional"), ml("methods.regional_auto"), ml("core.regions").TEXT_CONCEPT
    clip, masks = tokenizer_clip("sdxl"), region_masks(2, 128)
    positions = auto.text_concept_tokens(patcher, rows, masks, clip, PROMPT, "check", words)

    def automatic(text):
        return auto.auto_regional_model(patcher, rows, [None, None], "check", clip, PROMPT,
                                        ml("core.auto_masks").AutoMaskPhases(), text_tokens=text)[0]
    methods = (("user masks", lambda: regional.regional_model(patcher, rows, masks, "check")),
               ("user masks, words", lambda: regional.regional_model(patcher, rows, masks, "check", text_tokens=words,
                                                                     concept_tokens=positions)),
               ("auto masks", lambda: automatic("every LoRA")), ("auto masks, words", lambda: automatic(words)))
    for label, make in methods:
        model = make()
        wrapper = model.wrappers[comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL]["multilora.onthefly"][0]
        for run in range(2):
            steps = timed_runs(model, 10, 1, 128)[0]
            print(f"{label}, run {run + 1}: captures {wrapper.captures}, replays {wrapper.replays}, refused "
                  f"{len(wrapper.refused)}, step ms {[round(ms) for ms in steps]}", flush=True)


if __name__ == "__main__":
    main()
