"""Engine of the multi-LoRA composition pack.

Pure modules (torch + stdlib only, no ComfyUI imports): ``stack``, ``routing``, ``lowrank``.
Host modules (the only ones importing ``comfy``): ``lora_files``, ``lora_bank``, ``onthefly``, ``merge``.
Node classes live in the pack's top-level ``nodes/`` package and only delegate to this package.
"""
