"""The testbed's text-to-image model as real ComfyUI objects (host module: imports comfy).

* UNet (v3): ``comfy.supported_models.SD15`` with a small config — 64×64 model space, 3 levels of 32/96/96
  channels (64², 32², 16²), one res block per level, one transformer block at levels 1 and 2 and in the middle
  (none at 64², as SD1.5 has none at its deepest level — what matters here is that the 16×16 level, latent/4 as
  SD1.5 at 512², has cross-attention), 24-channel heads, context 64, eps prediction, ComfyUI's SD1.5 schedule.
* Text encoder: a real ``comfy.sd.CLIP`` (SD1Tokenizer — the real CLIP BPE vocabulary — and SD1ClipModel)
  with a 2-layer, 64-wide transformer. Its token-embedding table is a fixed random table regenerated from
  ``EMBEDDING_SEED`` (never trained, so trigger words start as arbitrary vectors, as with a real CLIP that
  never saw them); its layers are trained with the UNet and stored.
* Pixels as latents: the model space is RGB in [-1, 1] plus a zero 4th channel (``world.to_latent``).
  ComfyUI's LATENT is model space / 0.18215 (SD1.5's latent scale), so ``decode`` multiplies back.
"""
from __future__ import annotations

import math
import os

import torch

import comfy.model_management
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models
import comfy.supported_models_base
import comfy.utils

CONTEXT_DIM = 64
EMBEDDING_SEED = 1234
WEIGHTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "weights")
UNET_CONFIG = {
    "use_checkpoint": False, "image_size": 64, "out_channels": 4, "use_spatial_transformer": True,
    "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 32,
    "num_res_blocks": [1, 1, 1], "transformer_depth": [0, 1, 1], "channel_mult": [1, 3, 3],
    "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": CONTEXT_DIM,
    "transformer_depth_output": [0, 0, 1, 1, 1, 1], "use_temporal_attention": False,
    "use_temporal_resblock": False,
}
HEAD_CHANNELS = 24  # SD15's unet_extra_config forces 8 heads (12 channels at 96: no fast attention kernel)
CLIP_CONFIG = {
    "hidden_size": CONTEXT_DIM, "intermediate_size": 4 * CONTEXT_DIM, "num_attention_heads": 4,
    "num_hidden_layers": 2, "max_position_embeddings": 77, "vocab_size": 49408, "projection_dim": CONTEXT_DIM,
    "hidden_act": "quick_gelu", "eos_token_id": 49407, "bos_token_id": 0, "pad_token_id": 1,
    "layer_norm_eps": 1e-05,
}
LATENT_SCALE = 0.18215


def _init_(module: torch.nn.Module, seed: int) -> None:
    """Seeded N(0, 1/fan_in) matrices, zero biases, unit norm scales (CPU generator: same on every machine)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                values = torch.zeros(p.shape)
            elif p.ndim >= 2:
                values = torch.randn(p.shape, generator=gen) / math.sqrt(math.prod(p.shape[1:]))
            else:
                values = torch.ones(p.shape)
            p.copy_(values.to(p.dtype))


def build_unet(state: dict | None = None, device=None, dtype=torch.float32) -> comfy.model_patcher.ModelPatcher:
    """The testbed UNet as a ComfyUI ModelPatcher; ``state`` holds ``diffusion_model.*`` weights."""
    config = comfy.supported_models.SD15(dict(UNET_CONFIG))
    config.unet_config["num_heads"], config.unet_config["num_head_channels"] = -1, HEAD_CHANNELS
    config.set_inference_dtype(dtype, None)
    load_device = device or comfy.model_management.get_torch_device()
    offload = comfy.model_management.unet_offload_device()
    model = config.get_model({}, "", device=offload)
    if state is None:
        _init_(model, 0)
    else:
        missing, unexpected = model.load_state_dict({k: v.to(dtype) for k, v in state.items()}, strict=False)
        missing = [k for k in missing if k.startswith("diffusion_model.")]
        if missing or unexpected:
            raise ValueError(f"testbed UNet weights do not match: missing {missing[:3]}, unexpected {unexpected[:3]}")
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload)


def build_clip(state: dict | None = None, device=None) -> comfy.sd.CLIP:
    """The testbed text encoder as a ``comfy.sd.CLIP``; the embedding table comes from EMBEDDING_SEED."""
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    device = device or torch.device("cpu")
    options = {"clip_l_model_config": dict(CLIP_CONFIG), "dtype": torch.float32, "load_device": device,
               "offload_device": torch.device("cpu"), "initial_device": torch.device("cpu")}
    clip = comfy.sd.CLIP(target=target, model_options=options)
    _init_(clip.cond_stage_model, EMBEDDING_SEED)
    if state is not None:
        missing, unexpected = clip.cond_stage_model.load_state_dict(state, strict=False)
        missing = [k for k in missing if "token_embedding" not in k and "logit_scale" not in k
                   and "text_projection" not in k]
        if missing or unexpected:
            raise ValueError(f"testbed CLIP weights do not match: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return clip


def trained_clip_state(clip: comfy.sd.CLIP) -> dict:
    """What is stored of the text encoder: everything but the seeded embedding table."""
    return {k: v.detach().half().contiguous() for k, v in clip.cond_stage_model.state_dict().items()
            if "token_embedding" not in k}


def load_testbed(folder: str = WEIGHTS, device=None):
    """(MODEL, CLIP) of the trained testbed from ``folder`` (unet.safetensors, clip.safetensors)."""
    unet = comfy.utils.load_torch_file(os.path.join(folder, "unet.safetensors"), safe_load=True)
    clip = comfy.utils.load_torch_file(os.path.join(folder, "clip.safetensors"), safe_load=True)
    return build_unet(unet, device=device), build_clip(clip, device=device)


def decode(latent: torch.Tensor) -> torch.Tensor:
    """ComfyUI LATENT samples → RGB [B,3,H,W] in [0, 1] (pixels as latents)."""
    x = latent[:, :3].float() * LATENT_SCALE
    return ((x + 1) / 2).clamp(0, 1)


def token_ids(clip: comfy.sd.CLIP, text: str) -> list[list[int]]:
    """CLIP-L token rows of ``text`` as ComfyUI tokenizes them (ids only; weights are 1 in the testbed)."""
    return [[int(t[0]) for t in row] for row in clip.tokenize(text)["l"]]


def encode_ids(clip: comfy.sd.CLIP, rows: list[list[int]]) -> torch.Tensor:
    """Text encoding with autograd: the same modules and maths as SD1ClipModel's forward ("last" layer,
    causal mask, final layer norm), with out-of-place residual adds (ComfyUI's CLIPLayer adds in place,
    which autograd cannot differentiate). A test checks it equals ``clip.encode_from_tokens``."""
    from comfy.ldm.modules.attention import optimized_attention_for_device
    text = clip.cond_stage_model.clip_l.transformer.text_model
    ids = torch.tensor(rows, device=text.embeddings.token_embedding.weight.device)
    x = text.embeddings(ids, dtype=torch.float32)
    mask = torch.full((x.shape[1], x.shape[1]), -torch.finfo(x.dtype).max, dtype=x.dtype, device=x.device).triu_(1)
    attention = optimized_attention_for_device(x.device, mask=True, small_input=True)
    for layer in text.encoder.layers:
        x = x + layer.self_attn(layer.layer_norm1(x), mask, attention)
        x = x + layer.mlp(layer.layer_norm2(x))
    return text.final_layer_norm(x)


def encode_ids_pooled(clip: comfy.sd.CLIP, rows: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """``encode_ids`` and the pooled output SD1ClipModel gives with it (the final hidden state at the first
    end-of-text token, unprojected) — the DiT's ``y``. A test checks both equal ``clip.encode_from_tokens``."""
    hidden = encode_ids(clip, rows)
    ids = torch.tensor(rows, device=hidden.device)
    eos = (ids == CLIP_CONFIG["eos_token_id"]).int().argmax(dim=-1)
    return hidden, hidden[torch.arange(hidden.shape[0], device=hidden.device), eos]
