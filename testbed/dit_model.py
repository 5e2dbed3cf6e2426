"""The DiT testbed: a tiny model of ComfyUI's Flux architecture as real ComfyUI objects (host module).

* Model: ``comfy.supported_models.FluxSchnell`` → ``comfy.model_base.Flux`` around ``comfy.ldm.flux.model.Flux``
  with a small config (``DIT_CONFIG``): hidden 128, 4 heads of 32 (RoPE axes 8/12/12), 2 double-stream and
  4 single-stream blocks, MLP ratio 4, patch 2, no guidance embedding (real classifier-free guidance, trained
  with caption dropout). ComfyUI's FLOW sampling (rectified flow, shift 1): x_σ = (1 − σ)·x₀ + σ·ε, the model
  predicts v = ε − x₀ and ComfyUI's CONST parameterisation returns x₀ = x_σ − σ·v.
* Latents: the model space is the world's 64×64 RGB in [-1, 1] in channels 0–2 and zeros in channels 3–15
  (``world.to_model_space``); ComfyUI's LATENT is mapped to it by the Flux latent format (``process_latent_in``:
  (latent − 0.1159)·0.3611), so ``decode`` goes through the model's own latent format. 32×32 image tokens.
* Text: the same kind of ``comfy.sd.CLIP`` as the UNet testbed (real CLIP vocabulary, seeded embedding table,
  2 layers of width 64), its own trained layers; ``c_crossattn`` = the 77 hidden states (context_in_dim 64),
  ``y`` = the pooled output (vec_in_dim 64) — what ComfyUI's Flux conditioning carries (T5 states, CLIP pooled).
* Weights are stored as a real Flux checkpoint (``diffusion_model.*`` keys, ``*_norm.scale`` for the QK norms)
  and loaded with ``BaseModel.load_model_weights``, which renames what a ComfyUI version needs (0.33: ``.weight``).

``dit_forward`` is the training forward: the same modules and maths as ``Flux.forward`` (patchify, RoPE, joint
attention, modulation, final layer) with out-of-place residual adds and a differentiable RoPE — ComfyUI's blocks
add residuals in place (0.3.75) and 0.33 applies RoPE with a kernel that has no backward. A tier-2 test checks it
equals ``diffusion_model(...)`` on both versions.
"""
from __future__ import annotations

import dataclasses
import os

import torch
import torch.nn.functional as F

import comfy.ldm.flux.layers
import comfy.ldm.flux.model
import comfy.model_management
import comfy.model_patcher
import comfy.supported_models
import comfy.utils

import comfy_model

DIT_DIR = "dit"
LATENT_CHANNELS = 16
DIT_CONFIG = {
    "image_model": "flux", "in_channels": LATENT_CHANNELS, "out_channels": LATENT_CHANNELS,
    "vec_in_dim": comfy_model.CONTEXT_DIM, "context_in_dim": comfy_model.CONTEXT_DIM, "hidden_size": 128,
    "mlp_ratio": 4.0, "num_heads": 4, "depth": 2, "depth_single_blocks": 4, "axes_dim": [8, 12, 12],
    "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": False,
}


def dit_config() -> dict:
    """DIT_CONFIG plus the keys only some ComfyUI versions have (0.33's FluxParams needs ``txt_ids_dims``)."""
    fields = {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}
    return dict(DIT_CONFIG, **({"txt_ids_dims": []} if "txt_ids_dims" in fields else {}))


def _adaln_zero_(dm: torch.nn.Module) -> None:
    """DiT's adaLN-zero start: every modulation and the final projection output zero, so each block begins as
    the identity (Peebles & Xie 2023)."""
    with torch.no_grad():
        for name, module in dm.named_modules():
            if name.endswith("_mod.lin") or name.endswith("modulation.lin") or name in ("final_layer.linear",
                                                                                       "final_layer.adaLN_modulation.1"):
                module.weight.zero_()
                if module.bias is not None:
                    module.bias.zero_()


def build_dit(state: dict | None = None, device=None, dtype=torch.float32) -> comfy.model_patcher.ModelPatcher:
    """The DiT testbed as a ComfyUI ModelPatcher; ``state`` holds ``diffusion_model.*`` weights (Flux layout)."""
    config = comfy.supported_models.FluxSchnell(dit_config())
    config.set_inference_dtype(dtype, None)
    load_device = device or comfy.model_management.get_torch_device()
    offload = comfy.model_management.unet_offload_device()
    model = config.get_model({}, "", device=offload)
    if state is None:
        comfy_model._init_(model, 1)
        _adaln_zero_(model.diffusion_model)
    else:
        expected = set(model.diffusion_model.state_dict())
        converted = model.model_config.process_unet_state_dict(
            {k[len("diffusion_model."):]: v for k, v in state.items() if k.startswith("diffusion_model.")})
        if set(converted) != expected:
            raise ValueError(f"testbed DiT weights do not match: missing {sorted(expected - set(converted))[:3]}, "
                             f"unexpected {sorted(set(converted) - expected)[:3]}")
        model.load_model_weights({k: v.to(dtype) for k, v in state.items()}, "diffusion_model.")
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=load_device, offload_device=offload)


def checkpoint_state(patcher) -> dict:
    """The DiT's weights as a Flux checkpoint: fp16, ``diffusion_model.`` prefix, QK norms named ``.scale``."""
    out = {}
    for k, v in patcher.model.diffusion_model.state_dict().items():
        if k.endswith("_norm.weight"):
            k = k[:-len(".weight")] + ".scale"
        out[f"diffusion_model.{k}"] = v.detach().half().cpu().contiguous()
    return out


def load_dit_testbed(folder: str = comfy_model.WEIGHTS, device=None):
    """(MODEL, CLIP) of the trained DiT testbed from ``folder``/dit (dit.safetensors, clip.safetensors)."""
    base = os.path.join(folder, DIT_DIR)
    dit = comfy.utils.load_torch_file(os.path.join(base, "dit.safetensors"), safe_load=True)
    clip = comfy.utils.load_torch_file(os.path.join(base, "clip.safetensors"), safe_load=True)
    return build_dit(dit, device=device), comfy_model.build_clip(clip, device=device)


def _rms_norm(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    scale = norm.scale if hasattr(norm, "scale") else norm.weight  # 0.3.75 names it scale, 0.33 weight
    return x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-6).to(x.dtype) * scale.to(x.dtype)


def _rope(x: torch.Tensor, pe: torch.Tensor) -> torch.Tensor:
    """Flux's rotary embedding (pairs of channels rotated by the angles in ``pe``), differentiable."""
    x_ = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    return (pe[..., 0] * x_[..., 0] + pe[..., 1] * x_[..., 1]).reshape(*x.shape).type_as(x)


def _heads(qkv: torch.Tensor, heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return qkv.view(qkv.shape[0], qkv.shape[1], 3, heads, -1).permute(2, 0, 3, 1, 4)


def _attend(q, k, v, pe) -> torch.Tensor:
    out = F.scaled_dot_product_attention(_rope(q, pe), _rope(k, pe), v)
    return out.transpose(1, 2).reshape(q.shape[0], q.shape[2], -1)


def _modulate(x, mod, hidden: int):
    return F.layer_norm(x, (hidden,), eps=1e-6) * (1 + mod.scale) + mod.shift


def dit_forward(dm, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``Flux.forward(x, timesteps, context, y)`` with autograd (see the module docstring): x [B,16,H,W] in model
    space, timesteps = σ [B], context [B,T,64], y [B,64] → v [B,16,H,W]."""
    h_orig, w_orig = x.shape[-2:]
    img, img_ids = dm.process_img(x)
    hidden, heads, tokens = dm.hidden_size, dm.num_heads, context.shape[1]
    txt_ids = torch.zeros((x.shape[0], tokens, img_ids.shape[-1]), device=x.device, dtype=torch.float32)
    with torch.no_grad():
        pe = dm.pe_embedder(torch.cat((txt_ids, img_ids), dim=1))
    img = dm.img_in(img)
    vec = dm.time_in(comfy.ldm.flux.layers.timestep_embedding(timesteps, 256).to(img.dtype))
    vec = vec + dm.vector_in(y[:, :dm.params.vec_in_dim])
    txt = dm.txt_in(context)
    for block in dm.double_blocks:
        img_mod1, img_mod2 = block.img_mod(vec)
        txt_mod1, txt_mod2 = block.txt_mod(vec)
        iq, ik, iv = _heads(block.img_attn.qkv(_modulate(img, img_mod1, hidden)), heads)
        tq, tk, tv = _heads(block.txt_attn.qkv(_modulate(txt, txt_mod1, hidden)), heads)
        iq, ik = _rms_norm(iq, block.img_attn.norm.query_norm), _rms_norm(ik, block.img_attn.norm.key_norm)
        tq, tk = _rms_norm(tq, block.txt_attn.norm.query_norm), _rms_norm(tk, block.txt_attn.norm.key_norm)
        attn = _attend(torch.cat((tq, iq), 2), torch.cat((tk, ik), 2), torch.cat((tv, iv), 2).to(iq.dtype), pe)
        txt_attn, img_attn = attn[:, :tokens], attn[:, tokens:]
        img = img + img_mod1.gate * block.img_attn.proj(img_attn)
        img = img + img_mod2.gate * block.img_mlp(_modulate(img, img_mod2, hidden))
        txt = txt + txt_mod1.gate * block.txt_attn.proj(txt_attn)
        txt = txt + txt_mod2.gate * block.txt_mlp(_modulate(txt, txt_mod2, hidden))
    img = torch.cat((txt, img), 1)
    for block in dm.single_blocks:
        mod, _ = block.modulation(vec)
        qkv, mlp = torch.split(block.linear1(_modulate(img, mod, hidden)), [3 * hidden, block.mlp_hidden_dim_first], -1)
        q, k, v = _heads(qkv, heads)
        q, k = _rms_norm(q, block.norm.query_norm), _rms_norm(k, block.norm.key_norm)
        attn = _attend(q, k, v.to(q.dtype), pe)
        img = img + mod.gate * block.linear2(torch.cat((attn, block.mlp_act(mlp)), 2))
    out = dm.final_layer(img[:, tokens:], vec)
    p = dm.patch_size
    h, w = (h_orig + p // 2) // p, (w_orig + p // 2) // p
    out = out.view(out.shape[0], h, w, -1, p, p).permute(0, 3, 1, 4, 2, 5)
    return out.reshape(out.shape[0], -1, h * p, w * p)[:, :, :h_orig, :w_orig]
