"""Engine of the multi-LoRA composition pack.

Pure modules (torch + stdlib only, no ComfyUI imports): ``stack``, ``routing``, ``lowrank``, ``fusion``,
``prompt_tokens``, ``contrastive``, ``clora_masks``, ``errors``.
Host modules (the only ones importing ``comfy``): ``lora_files``, ``lora_bank``, ``onthefly``, ``engine``,
``merge``, ``methods``, ``ksampler``, ``attention_capture``, ``clora``.
Node classes live in the pack's top-level ``nodes/`` package and only delegate to this package.
"""
