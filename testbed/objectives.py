"""What differs between the two testbed architectures in training: model I/O, loss, LoRA layers, file layout.

UNet (``comfy_model``): DDPM ε-prediction in ComfyUI's EPS parameterisation — t ~ U{0..999}, σ = sigmas[t],
x_t = x₀ + σ·ε, the UNet sees x_t/√(σ²+1) and timestep t and predicts ε; loss ‖ε̂ − ε‖² (Ho et al. 2020).

DiT (``dit_model``): rectified flow in ComfyUI's FLOW/CONST parameterisation — σ = sigmoid(n), n ~ N(0, 1)
(logit-normal, Esser et al. 2024), x_σ = (1 − σ)·x₀ + σ·ε, the DiT sees x_σ and timestep σ and predicts
v = ε − x₀; loss ‖v̂ − v‖².

LoRA files are kohya LoRAs (``lora_unet_<module path with underscores>``; the UNet's use diffusers block names,
as kohya's SD1.5 LoRAs do, the DiT's the Flux module path, as kohya's Flux LoRAs do); ComfyUI's own key map
places both (tier-2 tests check every key lands).
"""
from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from safetensors.torch import save_file

import comfy.utils

import comfy_model
import dit_model
import world

UNET_LORA_TARGETS = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_k",
                     "attn2.to_v", "attn2.to_out.0", "ff.net.0.proj", "ff.net.2", "proj_in", "proj_out")
DIT_LORA_TARGETS = ("img_attn.qkv", "img_attn.proj", "img_mlp.0", "img_mlp.2", "txt_attn.qkv", "txt_attn.proj",
                    "txt_mlp.0", "txt_mlp.2", "linear1", "linear2")
ARCHS = ("unet", "dit")


def folder(arch: str, root: str) -> str:
    """Where an architecture's files live under a weights folder (the UNet at the top, as in v1/v2)."""
    return root if arch == "unet" else os.path.join(root, dit_model.DIT_DIR)


def lora_file(arch: str, category: str) -> str:
    """LoRA file name of ``category`` (distinct per arch, so both folders can be registered in one ComfyUI)."""
    return f"testbed_{category}.safetensors" if arch == "unet" else f"testbed_dit_{category}.safetensors"


def build(arch: str, device):
    """A freshly initialised (MODEL, CLIP) of ``arch``."""
    clip = comfy_model.build_clip(device=device)
    return (comfy_model.build_unet(device=device) if arch == "unet" else dit_model.build_dit(device=device)), clip


def load(arch: str, root: str, device):
    """(MODEL, CLIP) of ``arch`` from the weights folder ``root``."""
    return comfy_model.load_testbed(root, device) if arch == "unet" else dit_model.load_dit_testbed(root, device)


def model_state(arch: str, patcher) -> dict:
    """The model's weights as stored (fp16, ``diffusion_model.`` prefix)."""
    if arch == "dit":
        return dit_model.checkpoint_state(patcher)
    return {f"diffusion_model.{k}": v.detach().half().cpu().contiguous()
            for k, v in patcher.model.diffusion_model.state_dict().items()}


def save_base(arch: str, patcher, clip, root: str) -> dict:
    """Write the model and CLIP layers of ``arch`` under ``root``; returns the stored model state."""
    out = folder(arch, root)
    os.makedirs(os.path.join(out, "loras"), exist_ok=True)
    state = model_state(arch, patcher)
    save_file(state, os.path.join(out, "unet.safetensors" if arch == "unet" else "dit.safetensors"))
    save_file(comfy_model.trained_clip_state(clip), os.path.join(out, "clip.safetensors"))
    return state


def model_forward(arch: str, patcher, compile: bool = False):
    """``f(x, t, context, pooled) → prediction`` of ``arch``'s diffusion model with autograd; ``compile``
    wraps it in ``torch.compile`` (compiled once per shape, on the first call)."""
    dm = patcher.model.diffusion_model
    if arch == "unet":
        def forward(x, t, context, pooled):
            return dm(x, timesteps=t, context=context)
    else:
        def forward(x, t, context, pooled):
            return dit_model.dit_forward(dm, x, t, context, pooled)
    return torch.compile(forward) if compile else forward


def denoise_loss(arch: str, patcher, x0: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor,
                 gen: torch.Generator, device, forward=None) -> torch.Tensor:
    """The training loss of one batch in model space ``x0`` ([B,C,H,W]) — see the module docstring;
    ``forward`` is ``model_forward``'s callable (default: eager)."""
    forward = forward or model_forward(arch, patcher)
    noise = torch.randn(x0.shape, generator=gen).to(device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")
    if arch == "unet":
        sigmas = patcher.model.model_sampling.sigmas.to(device)
        t = torch.randint(0, len(sigmas), (x0.shape[0],), generator=gen).to(device)
        sigma = sigmas[t].view(-1, 1, 1, 1)
        with autocast:
            pred = forward((x0 + sigma * noise) / torch.sqrt(sigma ** 2 + 1), t.float(), context, pooled)
        return F.mse_loss(pred.float(), noise)
    sigma = torch.sigmoid(torch.randn(x0.shape[0], generator=gen)).to(device)
    s = sigma.view(-1, 1, 1, 1)
    with autocast:
        pred = forward((1 - s) * x0 + s * noise, sigma, context, pooled)
    return F.mse_loss(pred.float(), noise - x0)


def channels(arch: str) -> int:
    return 4 if arch == "unet" else dit_model.LATENT_CHANNELS


def to_model_space(arch: str, images: torch.Tensor) -> torch.Tensor:
    return world.to_model_space(images, channels(arch))


def lora_targets(arch: str, dm: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """The layers a LoRA of ``arch`` adapts (module path → module)."""
    names = UNET_LORA_TARGETS if arch == "unet" else DIT_LORA_TARGETS
    return {name: m for name, m in dm.named_modules() if hasattr(m, "weight") and any(name.endswith(t) for t in names)}


def kohya_prefixes(arch: str, patcher, module_names) -> dict[str, str]:
    """``lora_unet_…`` key stem of each adapted layer."""
    if arch == "dit":
        return {n: "lora_unet_" + n.replace(".", "_") for n in module_names}
    config = patcher.model.model_config.unet_config
    ldm_to_diffusers = {v: k for k, v in comfy.utils.unet_to_diffusers(config).items()}
    return {n: "lora_unet_" + ldm_to_diffusers[f"{n}.weight"][:-len(".weight")].replace(".", "_") for n in module_names}
