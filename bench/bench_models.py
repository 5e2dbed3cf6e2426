"""Full-size random-weight UNets and realistic random LoRAs for the GPU benchmark (docs/benchmarking.md protocol).

SD1.5 and SDXL UNets are built inside ComfyUI from their real configs with N(0, 1/fan_in) fp16 weights
(timing does not depend on weight values); LoRAs are kohya rank-16 files on attention q/k/v/out,
feed-forward and proj_in/out of every transformer block, as kohya trains them. Flux.1-dev and Z-Image-Turbo
transformers are built the same way in bf16 (their LoRAs: every block's attention and feed-forward linears).
"""
from __future__ import annotations

import math
import os

SD15 = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
        "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "channel_mult": [1, 2, 4, 4],
        "transformer_depth_middle": 1, "use_linear_in_transformer": False, "context_dim": 768, "num_heads": 8,
        "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0], "use_temporal_attention": False,
        "use_temporal_resblock": False}
SDXL = {"use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "num_classes": "sequential", "adm_in_channels": 2816, "in_channels": 4,
        "model_channels": 320, "num_res_blocks": [2, 2, 2], "transformer_depth": [0, 0, 2, 2, 10, 10],
        "channel_mult": [1, 2, 4], "transformer_depth_middle": 10, "use_linear_in_transformer": True,
        "context_dim": 2048, "num_head_channels": 64, "transformer_depth_output": [0, 0, 0, 2, 2, 2, 10, 10, 10],
        "use_temporal_attention": False, "use_temporal_resblock": False}
LORA_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2")


def fill_random_(model, gen) -> None:
    """Random weights that keep activations O(1): N(0, 1/fan_in) matrices, N(0, 0.02²) biases, unit scales."""
    import torch
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0, 1 / math.sqrt(p[0].numel()), generator=gen)
            elif name.endswith("bias"):
                p.normal_(0, 0.02, generator=gen)
            else:
                p.fill_(1.0)


def build_unet(kind: str):
    import torch

    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    config = comfy.supported_models.SD15(dict(SD15)) if kind == "sd15" else comfy.supported_models.SDXL(dict(SDXL))
    config.set_inference_dtype(torch.float16, None)
    device = comfy.model_management.get_torch_device()
    model = config.get_model({}, "", device=device)
    fill_random_(model, torch.Generator(device=device).manual_seed(0))
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def write_loras(patcher, count: int, folder: str, rank: int = 16) -> list[str]:
    import torch
    from safetensors.torch import save_file
    state = patcher.model.state_dict()
    if hasattr(patcher.model.diffusion_model, "double_blocks"):
        keys = flux_lora_keys(state)
    elif hasattr(patcher.model.diffusion_model, "cap_embedder"):
        keys = zimage_lora_keys(state)
    else:
        keys = [k for k in state if k.endswith(".weight") and (
            any(f".{t}.weight" in k for t in LORA_TARGETS) and "transformer_blocks" in k
            or k.endswith(("proj_in.weight", "proj_out.weight")))]
    names = []
    for i in range(count):
        gen = torch.Generator().manual_seed(100 + i)
        tensors = {}
        for key in keys:
            w = state[key]
            out_f, in_f = w.shape[0], w.shape[1]
            base = "lora_unet_" + key[len("diffusion_model."):-len(".weight")].replace(".", "_")
            extra = (1, 1) if w.ndim == 4 else ()
            tensors[f"{base}.lora_down.weight"] = (torch.randn((rank, in_f) + extra, generator=gen) / math.sqrt(in_f)).half()
            up = torch.randn((out_f, rank) + extra, generator=gen) * 0.05 / math.sqrt(rank)
            tensors[f"{base}.lora_up.weight"] = up.half()
            tensors[f"{base}.alpha"] = torch.tensor(float(rank))
        name = f"bench_{i}.safetensors"
        save_file(tensors, os.path.join(folder, name))
        names.append(name)
    return names, len(keys)


def conds(kind: str):
    import torch
    gen = torch.Generator().manual_seed(1)
    if kind == "sd15":
        return ([[torch.randn(1, 77, 768, generator=gen), {}]], [[torch.randn(1, 77, 768, generator=gen), {}]])
    extra = lambda: {"pooled_output": torch.randn(1, 1280, generator=gen), "width": 1024, "height": 1024}
    return ([[torch.randn(1, 77, 2048, generator=gen), extra()]], [[torch.randn(1, 77, 2048, generator=gen), extra()]])


# Flux.1-dev's transformer (ComfyUI detects it from a checkpoint as this unet config).
FLUX = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768, "context_in_dim": 4096,
        "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 19, "depth_single_blocks": 38,
        "axes_dim": [16, 56, 56], "theta": 10000, "patch_size": 2, "qkv_bias": True, "guidance_embed": True}
FLUX_TINY = dict(FLUX, hidden_size=64, num_heads=4, depth=2, depth_single_blocks=2, axes_dim=[4, 6, 6],
                 context_in_dim=32, vec_in_dim=16)
FLUX_LORA_TARGETS = ("img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_attn.proj", "img_mlp.0", "img_mlp.2",
                     "txt_mlp.0", "txt_mlp.2", "linear1", "linear2")


def build_flux(tiny: bool = False):
    """Flux.1-dev-sized (or ``tiny``) random bf16 transformer through ComfyUI's own Flux model class."""
    import dataclasses

    import torch

    import comfy.ldm.flux.model
    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    config = dict(FLUX_TINY if tiny else FLUX)
    if "txt_ids_dims" in {f.name for f in dataclasses.fields(comfy.ldm.flux.model.FluxParams)}:
        config["txt_ids_dims"] = []
    spec = comfy.supported_models.Flux(config)
    dtype = torch.float32 if tiny else torch.bfloat16
    spec.set_inference_dtype(dtype, None)
    device = comfy.model_management.get_torch_device()
    model = spec.get_model({}, "", device=device)
    fill_random_(model, torch.Generator(device=device).manual_seed(0))
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def flux_lora_keys(state) -> list[str]:
    return [k for k in state if k.endswith(".weight") and state[k].ndim == 2
            and ("double_blocks." in k or "single_blocks." in k) and any(f".{t}.weight" in k for t in FLUX_LORA_TARGETS)]


# Z-Image-Turbo's transformer (6.15 B parameters; what model_detection gives its checkpoint, pad tokens included).
ZIMAGE = {"image_model": "lumina2", "patch_size": 2, "in_channels": 16, "dim": 3840, "cap_feat_dim": 2560,
          "n_layers": 30, "n_refiner_layers": 2, "qk_norm": True, "n_heads": 30, "n_kv_heads": 30,
          "axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512], "rope_theta": 256.0,
          "ffn_dim_multiplier": 8.0 / 3.0, "z_image_modulation": True, "time_scale": 1000.0, "pad_tokens_multiple": 32}
ZIMAGE_TINY = dict(ZIMAGE, dim=256, n_heads=2, n_kv_heads=2, n_layers=2, n_refiner_layers=1, cap_feat_dim=32,
                   multiple_of=32)
ZIMAGE_LORA_TARGETS = ("attention.qkv", "attention.out", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3")
ZIMAGE_CAPTION_TOKENS = 100
"""A prompt of ~90 words in Qwen3's chat template; the model pads it to 128 with its caption pad token."""


def build_zimage(tiny: bool = False):
    """Z-Image-Turbo-sized (or ``tiny``) random bf16 transformer through ComfyUI's own ZImage / Lumina2 classes."""
    import torch

    import comfy.model_management
    import comfy.model_patcher
    import comfy.supported_models
    spec = comfy.supported_models.ZImage(dict(ZIMAGE_TINY if tiny else ZIMAGE))
    spec.set_inference_dtype(torch.float32 if tiny else torch.bfloat16, None)
    device = comfy.model_management.get_torch_device()
    model = spec.get_model({}, "", device=device)
    fill_random_(model, torch.Generator(device=device).manual_seed(0))
    model.eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=device, offload_device=device)


def zimage_lora_keys(state) -> list[str]:
    """Attention and feed-forward linears of every block (main layers and both refiners), as Z-Image LoRAs train."""
    return [k for k in state if k.endswith(".weight") and state[k].ndim == 2
            and k.startswith(("diffusion_model.layers.", "diffusion_model.noise_refiner.",
                              "diffusion_model.context_refiner."))
            and any(f".{t}.weight" in k for t in ZIMAGE_LORA_TARGETS)]


def zimage_conds(tiny: bool = False):
    """Random caption features (Qwen3-4B's 2560 wide; Z-Image-Turbo samples without CFG, the negative is unused)."""
    import torch
    gen = torch.Generator().manual_seed(1)
    width, tokens = (32, 20) if tiny else (2560, ZIMAGE_CAPTION_TOKENS)
    make = lambda: [[torch.randn(1, tokens, width, generator=gen), {}]]
    return make(), make()


def flux_conds(tiny: bool = False):
    import torch
    gen = torch.Generator().manual_seed(1)
    width, pooled, tokens = (32, 16, 16) if tiny else (4096, 768, 256)
    make = lambda: [[torch.randn(1, tokens, width, generator=gen),
                     {"pooled_output": torch.randn(1, pooled, generator=gen), "guidance": 3.5}]]
    return make(), make()
