"""Engine of the multi-LoRA composition pack, in three layers; each imports only from the layers above it.

``core/`` — pure maths (torch + stdlib, never ComfyUI):
    ``errors`` (the pack's error types), ``stack`` (rows and their validation), ``input_checks`` (every
    node input's type, range and options, checked before a node runs), ``routing`` (which LoRA
    weights each batch chunk gets, step indices, the Switch schedule), ``lowrank`` (fused low-rank deltas
    y += B_cat·(w ⊙ A_cat·x)), ``fusion`` (Composite's weighted mean of predictions), ``prompt_tokens``
    (concept words → token positions), ``contrastive`` (CLoRA's NT-Xent loss on attention maps),
    ``clora_masks`` (masks from attention maps, masked fusion), ``cmlora_schedule`` (CMLoRA's dominant-LoRA
    plan), ``frequency_profile`` (high-frequency score of an image), ``regions`` (region masks → per-token
    LoRA weights on every layer's grid), ``auto_masks`` (regional masks from concept attention, their phases).
``host/`` — the ComfyUI bridge (the only code importing ``comfy``):
    ``comfy_compat`` (what differs between ComfyUI versions), ``lora_files`` (reading LoRA files),
    ``lora_bank`` (a file's keys → low-rank factors per layer), ``onthefly`` (the engine: LoRAs applied on
    the fly per chunk), ``engine`` (building it from stack rows), ``cuda_graphs`` (graph replay),
    ``attention_capture`` (cross-attention maps of concept tokens), ``feature_cache`` (CMLoRA's cached
    UNet features), ``ksampler`` (a KSampler call with a given guider/model), ``token_routing`` (which
    tokens of each layer are image, text or both, for regional LoRA), ``dit_attention`` (a Flux or
    Z-Image DiT's text-to-image attention of concept tokens).
``methods/`` — the composition methods, built on the two layers above:
    ``merge`` (ComfyUI's own merged LoRAs, the baseline), ``switch_composite`` (LoRA Switch and LoRA
    Composite), ``cmlora`` (CMLoRA), ``clora`` (CLoRA's guider and entry point), ``clora_settings`` (its
    settings, variants and record), ``clora_prompts`` (prompt variants), ``clora_sampler`` (the latent
    update's sampler), ``clora_gradient`` (autograd under inference mode), ``clora_direct`` (its gradient passes as one
    recorded direct model call), ``compare`` (every method on one seed),
    ``regional`` (regional LoRA: each LoRA inside its region, one pass), ``regional_auto`` (its automatic masks).
Node classes live in the pack's top-level ``nodes/`` package and only delegate to this package.
"""
