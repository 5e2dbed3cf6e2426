"""Tiny but real ComfyUI models (SD1.5, SDXL, Flux, Z-Image, Lumina 2 UNets/DiTs and an SD1.5 CLIP) for CPU tests.

ComfyUI must already be booted headless (``--cpu``) before this module is imported, because it
imports ``comfy`` at module level.

Every builder returns a stock ComfyUI object (``comfy.model_patcher.ModelPatcher`` around a
``comfy.model_base`` model, or a ``comfy.sd.CLIP``) whose architecture is a shrunken version of the
real family, in float32 on the CPU, with every parameter initialised deterministically from ``seed``.
Their ``unet_config`` mirrors what ``comfy.model_detection`` produces for the real checkpoints, so
``comfy.utils.unet_to_diffusers`` / ``flux_to_diffusers`` and ``comfy.lora.model_lora_keys_unet``
work on them exactly as on full-size models.

Direct forward pass (``patcher.model.apply_model``; the model returns the denoised x0):

* sd15: ``apply_model(x[B,4,H,W], sigma[B], c_crossattn=ctx[B,77,SD15_CONTEXT_DIM])``
* sdxl: ``apply_model(x[B,4,H,W], sigma[B], c_crossattn=ctx[B,77,SDXL_CONTEXT_DIM],
  y=adm[B,SDXL_ADM_IN_CHANNELS])``
* flux: ``apply_model(x[B,16,H,W], sigma[B], c_crossattn=ctx[B,T,FLUX_CONTEXT_DIM],
  y=vec[B,FLUX_VEC_IN_DIM], guidance=g[B])`` with H and W even (patch size 2), sigma in (0, 1].
* zimage: ``apply_model(x[B,16,H,W], sigma[B], c_crossattn=cap[B,T,ZIMAGE_CAP_DIM], num_tokens=T)`` (ComfyUI's
  ``Lumina2`` model class around a ``NextDiT`` with Z-Image's modulation and its caption / image pad tokens);
  lumina2: the same call on Lumina Image 2.0's layout (grouped-query attention, no pad tokens).

``make_inputs(kind)`` builds exactly these arguments and ``forward`` runs them.  The weights are only
patched (LoRA merged) while the patcher is loaded: use ``patched(patcher)`` or
``comfy.model_management.load_models_gpu([patcher])`` around ``forward``.

For sampling through ComfyUI (KSampler and friends) use ``make_conditioning`` and ``make_latent``:
SDXL needs ``pooled_output`` of size ``SDXL_POOLED_DIM`` in the cond dict (``SDXL.encode_adm`` appends
six 256-wide size embeddings), Flux needs ``pooled_output`` of size ``FLUX_VEC_IN_DIM`` (guidance
defaults to 3.5). Z-Image takes the caption features alone (``num_tokens`` comes from their length).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
from collections.abc import Iterator
from typing import Any, Literal

import torch

import comfy.ldm.flux.model
import comfy.model_base
import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models
import comfy.supported_models_base

ModelKind = Literal["sd15", "sdxl", "flux", "zimage", "lumina2"]
MODEL_KINDS: tuple[ModelKind, ...] = ("sd15", "sdxl", "flux", "zimage", "lumina2")

SD15_CONTEXT_DIM = 64
"""Cross-attention width of the tiny SD1.5 UNet (equals the tiny CLIP's hidden size)."""
SDXL_CONTEXT_DIM = 64
SDXL_POOLED_DIM = 32
"""Size of ``pooled_output`` for the tiny SDXL (the real model uses 1280)."""
SDXL_ADM_IN_CHANNELS = SDXL_POOLED_DIM + 6 * 256
"""``y`` width: pooled output + 6 Timestep(256) embeddings, as built by ``SDXL.encode_adm``."""
FLUX_CONTEXT_DIM = 32
FLUX_VEC_IN_DIM = 16
FLUX_HIDDEN_SIZE = 64
FLUX_TEXT_TOKENS = 16
ZIMAGE_DIM = 256
"""Width of the tiny Z-Image: its modulation reads a 256-wide timestep embedding (``min(dim, 256)``), so no less."""
ZIMAGE_CAP_DIM = 32
"""Caption feature width of the tiny Z-Image (the real model reads Qwen3-4B's 2560)."""
ZIMAGE_TEXT_TOKENS = 20
"""Caption length of ``make_inputs`` / ``make_conditioning``: padded to 32 by the model (12 pad tokens)."""
ZIMAGE_PAD_MULTIPLE = 32
CLIP_HIDDEN_SIZE = SD15_CONTEXT_DIM
TEXT_TOKENS = 77
LATENT_SIZE = 8
LATENT_CHANNELS: dict[str, int] = {"sd15": 4, "sdxl": 4, "flux": 16, "zimage": 16, "lumina2": 16}


def flux_version_params() -> dict[str, Any]:
    """Flux config keys that only some ComfyUI versions have: 0.33's ``FluxParams`` requires ``txt_ids_dims``
    (model_detection gives Flux.1 ``[]``); 0.3.75 has no such field."""
    fields = {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}
    return {"txt_ids_dims": []} if "txt_ids_dims" in fields else {}


def tiny_unet_config(kind: ModelKind) -> dict[str, Any]:
    """Return the ``unet_config`` of the tiny model of ``kind`` (same keys as model detection)."""
    if kind == "sd15":
        return {
            "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
            "legacy": False, "adm_in_channels": None, "dtype": torch.float32, "in_channels": 4,
            "model_channels": 32, "num_res_blocks": [1, 1], "transformer_depth": [1, 1],
            "channel_mult": [1, 2], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
            "context_dim": SD15_CONTEXT_DIM, "num_heads": 2, "transformer_depth_output": [1, 1, 1, 1],
            "use_temporal_attention": False, "use_temporal_resblock": False,
        }
    if kind == "sdxl":
        return {
            "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
            "legacy": False, "num_classes": "sequential", "adm_in_channels": SDXL_ADM_IN_CHANNELS,
            "dtype": torch.float32, "in_channels": 4, "model_channels": 32, "num_res_blocks": [1, 1],
            "transformer_depth": [0, 2], "channel_mult": [1, 2], "transformer_depth_middle": 1,
            "use_linear_in_transformer": True, "context_dim": SDXL_CONTEXT_DIM, "num_head_channels": 16,
            "transformer_depth_output": [0, 0, 2, 2], "use_temporal_attention": False,
            "use_temporal_resblock": False,
        }
    if kind == "flux":
        return {
            "image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": FLUX_VEC_IN_DIM,
            "context_in_dim": FLUX_CONTEXT_DIM, "hidden_size": FLUX_HIDDEN_SIZE, "mlp_ratio": 4.0,
            "num_heads": 2, "depth": 1, "depth_single_blocks": 2, "axes_dim": [8, 12, 12],
            "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True,
            **flux_version_params(),
        }
    if kind == "zimage":
        # What model_detection gives a Z-Image checkpoint (dim 3840 branch), shrunk: 2 heads of 128 channels
        # (Z-Image's own RoPE axes 32/48/48), 2 joint layers, 1 noise and 1 context refiner, pad tokens to 32.
        return {
            "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": ZIMAGE_DIM,
            "cap_feat_dim": ZIMAGE_CAP_DIM, "n_layers": 2, "n_refiner_layers": 1, "qk_norm": True, "n_heads": 2,
            "n_kv_heads": 2, "multiple_of": 32, "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512],
            "rope_theta": 256.0, "ffn_dim_multiplier": 8.0 / 3.0, "z_image_modulation": True, "time_scale": 1000.0,
            "pad_tokens_multiple": ZIMAGE_PAD_MULTIPLE,
        }
    if kind == "lumina2":
        # The dim 2304 branch (Lumina Image 2.0), shrunk: grouped-query attention (4 query heads, 2 key/value
        # heads), no pad tokens, Lumina's modulation (timestep embedding as wide as the model).
        return {
            "image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 64, "cap_feat_dim": ZIMAGE_CAP_DIM,
            "n_layers": 2, "n_refiner_layers": 1, "qk_norm": True, "n_heads": 4, "n_kv_heads": 2, "multiple_of": 32,
            "axes_dims": [4, 6, 6], "axes_lens": [300, 512, 512], "rope_theta": 10000.0, "ffn_dim_multiplier": 4.0,
        }
    raise ValueError(f"unknown model kind {kind!r}")


def init_weights_(module: torch.nn.Module, seed: int) -> None:
    """Deterministically fill every parameter of ``module`` from ``seed`` (in place).

    Matrices and conv kernels get N(0, 1/fan_in) (keeps activations O(1) and makes no layer zero,
    including the UNet's normally zero-initialised output convs), biases N(0, 0.02^2) and 1-D
    scales (norm weights, RMSNorm ``scale``) 1 + N(0, 0.1^2).
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    with torch.no_grad():
        for name, param in module.named_parameters():
            shape = tuple(param.shape)
            if name.endswith("bias"):
                values = torch.randn(shape, generator=gen) * 0.02
            elif len(shape) >= 2:
                fan_in = math.prod(shape[1:])
                values = torch.randn(shape, generator=gen) / math.sqrt(fan_in)
            else:
                values = 1.0 + 0.1 * torch.randn(shape, generator=gen)
            param.copy_(values.to(dtype=param.dtype, device=param.device))


def _patcher_for(model_config: comfy.supported_models_base.BASE, seed: int) -> comfy.model_patcher.ModelPatcher:
    """Instantiate ``model_config`` in float32 on the CPU, initialise it and wrap it in a ModelPatcher."""
    model_config.set_inference_dtype(torch.float32, None)
    load_device = comfy.model_management.get_torch_device()
    offload_device = comfy.model_management.unet_offload_device()
    model = model_config.get_model({}, "", device=offload_device)
    init_weights_(model, seed)
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload_device)


def build_tiny_sd15(seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """Tiny SD1.5 UNet (``comfy.supported_models.SD15``): 2 levels, cross-attention at every level.

    model_channels 32, channel_mult [1, 2], 1 res block per level, 1 transformer block everywhere,
    2 heads, context_dim 64, 1x1-conv proj_in/proj_out (``use_linear_in_transformer`` False).
    """
    config = comfy.supported_models.SD15(tiny_unet_config("sd15"))
    config.unet_config["num_heads"] = 2  # SD15.unet_extra_config forces 8 heads
    config.unet_config["num_head_channels"] = -1
    return _patcher_for(config, seed)


def build_tiny_sdxl(seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """Tiny SDXL UNet (``comfy.supported_models.SDXL``): no attention at level 0, 2 blocks at level 1.

    Linear proj_in/proj_out, context_dim 64, 16-channel heads, ``label_emb`` fed by
    ``y`` of width ``SDXL_ADM_IN_CHANNELS`` (= ``SDXL_POOLED_DIM`` + 1536).
    """
    config = comfy.supported_models.SDXL(tiny_unet_config("sdxl"))
    config.unet_config["num_heads"] = -1  # BASE.unet_extra_config forces 64-channel heads
    config.unet_config["num_head_channels"] = 16
    return _patcher_for(config, seed)


def build_tiny_flux(seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """Tiny Flux-dev DiT (``comfy.supported_models.Flux``): hidden 64, 2 heads, 1 double + 2 single blocks.

    16 latent channels, patch 2, ``vec_in_dim`` 16, ``context_in_dim`` 32, guidance embedding on,
    fused ``img_attn.qkv`` / ``txt_attn.qkv`` / ``linear1`` weights like the real model.
    """
    config = comfy.supported_models.Flux(tiny_unet_config("flux"))
    return _patcher_for(config, seed)


def build_tiny_zimage(seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """Tiny Z-Image DiT (``comfy.supported_models.ZImage`` → ``model_base.Lumina2`` → ``NextDiT``): width 256,
    2 heads, 2 joint layers, 1 noise / 1 context refiner, patch 2, caption and image padded to multiples of 32
    with the learned pad tokens, fused ``attention.qkv`` like the real model."""
    config = comfy.supported_models.ZImage(tiny_unet_config("zimage"))
    return _patcher_for(config, seed)


def build_tiny_lumina2(seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """Tiny Lumina Image 2.0 DiT (``comfy.supported_models.Lumina2``, the same ``NextDiT``): width 64, 4 query and
    2 key/value heads, 2 joint layers, 1 noise / 1 context refiner, no pad tokens."""
    return _patcher_for(comfy.supported_models.Lumina2(tiny_unet_config("lumina2")), seed)


def build_tiny(kind: ModelKind, seed: int = 0) -> comfy.model_patcher.ModelPatcher:
    """Build the tiny model of ``kind`` ("sd15", "sdxl", "flux", "zimage" or "lumina2")."""
    builders = {"sd15": build_tiny_sd15, "sdxl": build_tiny_sdxl, "flux": build_tiny_flux,
                "zimage": build_tiny_zimage, "lumina2": build_tiny_lumina2}
    if kind not in builders:
        raise ValueError(f"unknown model kind {kind!r}")
    return builders[kind](seed)


def model_kind(patcher: comfy.model_patcher.ModelPatcher) -> ModelKind:
    """Tell which tiny family a patcher holds, from its ComfyUI model class."""
    model = patcher.model
    if isinstance(model, comfy.model_base.Flux):
        return "flux"
    if isinstance(model, comfy.model_base.Lumina2):
        return "zimage" if model.model_config.unet_config.get("z_image_modulation") else "lumina2"
    if isinstance(model, comfy.model_base.SDXL):
        return "sdxl"
    return "sd15"


def make_inputs(kind: ModelKind, batch: int = 1, seed: int = 0,
                size: int = LATENT_SIZE) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """Deterministic ``(x, sigma, cond_kwargs)`` for ``forward`` / ``model.apply_model``.

    sd15: ``{"c_crossattn": [B,77,64]}``; sdxl: adds ``"y": [B,1568]``; flux: ``{"c_crossattn":
    [B,16,32], "y": [B,16], "guidance": [B]}``.  ``sigma`` is 1.0 for the UNets (eps models) and 0.5
    for Flux (flow model).  ``size`` must be even for Flux.
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    x = torch.randn((batch, LATENT_CHANNELS[kind], size, size), generator=gen)
    if kind == "sd15":
        ctx = torch.randn((batch, TEXT_TOKENS, SD15_CONTEXT_DIM), generator=gen)
        return x, torch.full((batch,), 1.0), {"c_crossattn": ctx}
    if kind == "sdxl":
        ctx = torch.randn((batch, TEXT_TOKENS, SDXL_CONTEXT_DIM), generator=gen)
        y = torch.randn((batch, SDXL_ADM_IN_CHANNELS), generator=gen)
        return x, torch.full((batch,), 1.0), {"c_crossattn": ctx, "y": y}
    if kind == "flux":
        if size % 2:
            raise ValueError("flux latents need an even size (patch size 2)")
        ctx = torch.randn((batch, FLUX_TEXT_TOKENS, FLUX_CONTEXT_DIM), generator=gen)
        y = torch.randn((batch, FLUX_VEC_IN_DIM), generator=gen)
        return x, torch.full((batch,), 0.5), {"c_crossattn": ctx, "y": y, "guidance": torch.full((batch,), 3.5)}
    if kind in ("zimage", "lumina2"):
        if size % 2:
            raise ValueError(f"{kind} latents need an even size (patch size 2)")
        ctx = torch.randn((batch, ZIMAGE_TEXT_TOKENS, ZIMAGE_CAP_DIM), generator=gen)
        return x, torch.full((batch,), 0.5), {"c_crossattn": ctx, "num_tokens": ZIMAGE_TEXT_TOKENS}
    raise ValueError(f"unknown model kind {kind!r}")


def forward(patcher: comfy.model_patcher.ModelPatcher, x: torch.Tensor, sigma: torch.Tensor,
            **cond: Any) -> torch.Tensor:
    """Run ``patcher.model.apply_model(x, sigma, **cond)`` without grad; returns the denoised x0.

    Uses whatever weights the model holds right now: wrap in ``patched(patcher)`` (or load the
    patcher with ``comfy.model_management.load_models_gpu``) to see its LoRA patches.
    """
    with torch.no_grad():
        return patcher.model.apply_model(x, sigma, **cond)


@contextlib.contextmanager
def patched(patcher: comfy.model_patcher.ModelPatcher) -> Iterator[comfy.model_patcher.ModelPatcher]:
    """Merge ``patcher``'s weight patches into its model for the ``with`` body, then restore them."""
    patcher.patch_model(device_to=patcher.load_device)
    try:
        yield patcher
    finally:
        patcher.unpatch_model(device_to=patcher.offload_device)


def make_conditioning(kind: ModelKind, batch: int = 1, seed: int = 0) -> list[list[Any]]:
    """A ComfyUI CONDITIONING (``[[cross_attn, extras]]``) usable with samplers for the tiny ``kind``."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    if kind == "sd15":
        return [[torch.randn((batch, TEXT_TOKENS, SD15_CONTEXT_DIM), generator=gen), {}]]
    if kind == "sdxl":
        cross = torch.randn((batch, TEXT_TOKENS, SDXL_CONTEXT_DIM), generator=gen)
        pooled = torch.randn((batch, SDXL_POOLED_DIM), generator=gen)
        return [[cross, {"pooled_output": pooled, "width": 64, "height": 64}]]
    if kind == "flux":
        cross = torch.randn((batch, FLUX_TEXT_TOKENS, FLUX_CONTEXT_DIM), generator=gen)
        pooled = torch.randn((batch, FLUX_VEC_IN_DIM), generator=gen)
        return [[cross, {"pooled_output": pooled, "guidance": 3.5}]]
    if kind in ("zimage", "lumina2"):
        return [[torch.randn((batch, ZIMAGE_TEXT_TOKENS, ZIMAGE_CAP_DIM), generator=gen), {}]]
    raise ValueError(f"unknown model kind {kind!r}")


def make_latent(kind: ModelKind, batch: int = 1, size: int = LATENT_SIZE) -> dict[str, torch.Tensor]:
    """An empty ComfyUI LATENT (``{"samples": zeros}``) with the channel count of ``kind``."""
    return {"samples": torch.zeros((batch, LATENT_CHANNELS[kind], size, size))}


def tiny_clip_config() -> dict[str, Any]:
    """HF-style text config of the tiny SD1.5 CLIP-L stand-in (real vocab and 77 positions)."""
    return {
        "hidden_size": CLIP_HIDDEN_SIZE, "intermediate_size": 2 * CLIP_HIDDEN_SIZE,
        "num_attention_heads": 2, "num_hidden_layers": 2, "max_position_embeddings": 77,
        "vocab_size": 49408, "projection_dim": CLIP_HIDDEN_SIZE, "hidden_act": "quick_gelu",
        "eos_token_id": 49407, "bos_token_id": 0, "pad_token_id": 1, "layer_norm_eps": 1e-05,
    }


def build_tiny_clip(seed: int = 0) -> comfy.sd.CLIP:
    """A real ``comfy.sd.CLIP`` for SD1.5 (SD1Tokenizer + SD1ClipModel) with a 2-layer, 64-wide text model.

    ``clip.tokenize`` / ``clip.encode_from_tokens`` work as usual and produce ``[B,77,64]`` (matching
    ``SD15_CONTEXT_DIM``); its state-dict keys are ``clip_l.transformer.text_model...`` so
    ``comfy.lora.model_lora_keys_clip`` yields the kohya ``lora_te_text_model_encoder_layers_N_*`` keys.
    """
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    cpu = torch.device("cpu")
    options = {
        "clip_l_model_config": tiny_clip_config(),
        "dtype": torch.float32,
        "load_device": cpu,
        "offload_device": cpu,
        "initial_device": cpu,
    }
    clip = comfy.sd.CLIP(target=target, model_options=options)
    init_weights_(clip.cond_stage_model, seed)
    return clip
