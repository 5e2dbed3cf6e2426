"""A small SD1.5 checkpoint in the original single-file format, and demo LoRAs for it.

``write_tiny_sd15_checkpoint`` writes a safetensors file with the key layout of the original SD1.5
checkpoints (``v1-5-pruned-emaonly.safetensors``):

* ``model.diffusion_model.*``: an LDM UNet with the real SD1.5 widths (model_channels 320,
  context_dim 768, 8 heads, 1x1-conv ``proj_in``/``proj_out``, no ADM) but three levels of equal
  width (channel_mult [1, 1, 1]), each with one res block and one transformer block (input, middle
  and output), about 63M parameters. Like SD1.5 it has cross-attention at the latent, latent/2 and
  latent/4 resolutions: CLoRA records its attention maps at latent/4 (a single-level UNet has none
  there, and KSampler (CLoRA) fails on it);
* ``cond_stage_model.transformer.text_model.*``: a full-size CLIP-L text model (HF layout,
  ~123M parameters) plus ``embeddings.position_ids``;
* ``first_stage_model.*``: the full-size SD1.x KL-f8 VAE (~84M parameters);
* the DDPM schedule buffers (``betas``, ``alphas_cumprod``, ...) of the LDM training config.

Tensors are stored in float16 (the schedule in float32, ``position_ids`` in int64), about 540 MB.
ComfyUI's ``comfy.model_detection`` recognises the UNet as SD1.5 (``supported_models.SD15``), so
``CheckpointLoaderSimple`` loads the file with SD1.5's CLIP-L tokenizer/encoder, VAE and latent format.
Weights are random but deterministic in ``seed`` (N(0, 1/fan_in) matrices, small biases, norm scales
near 1): images are noise-like, but every code path is the real one.

ComfyUI must be booted (``support.comfy_boot.boot``) before this module is imported.
"""
from __future__ import annotations

import atexit
import math
import os
from collections.abc import Iterator
from typing import Any, NamedTuple

import safetensors.torch
import torch

import comfy.ldm.models.autoencoder
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.supported_models
import folder_paths

from support import lora_files

TINY_CHECKPOINT_NAME = "tiny-sd15-seed{seed}.safetensors"
"""File name ``ensure_tiny_checkpoint`` gives the checkpoint of each seed."""

SD15_VAE_DDCONFIG: dict[str, Any] = {
    "double_z": True, "z_channels": 4, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
    "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0,
}
"""The SD1.x VAE configuration (the one ``comfy.sd.VAE`` assumes for an LDM-layout VAE)."""

UNET_PREFIX = "model.diffusion_model."
CLIP_PREFIX = "cond_stage_model.transformer.text_model."
VAE_PREFIX = "first_stage_model."


class DemoLora(NamedTuple):
    """One of the demo LoRAs: file name, stack category, concept word(s) of the demo prompt, seed."""

    filename: str
    category: str
    concept: str
    seed: int


DEMO_LORAS: tuple[DemoLora, ...] = (
    DemoLora("demo_character.safetensors", "character", "knight", 101),
    DemoLora("demo_style.safetensors", "style", "oil painting", 102),
    DemoLora("demo_background.safetensors", "background", "forest", 103),
)
"""The LoRAs ``ensure_demo_loras`` writes, in the order the demo workflows list them."""

_written: dict[tuple[str, int], str] = {}
_remove_at_exit: list[str] = []


@atexit.register
def _remove_written_checkpoints() -> None:
    """Delete the ~540 MB checkpoints ``ensure_tiny_checkpoint`` wrote (the test folders are not cleaned)."""
    for path in _remove_at_exit:
        try:
            os.remove(path)
        except OSError:
            pass


def tiny_sd15_unet_config() -> dict[str, Any]:
    """The ``unet_config`` ``comfy.model_detection.detect_unet_config`` returns for the tiny checkpoint."""
    return {
        "use_checkpoint": False, "image_size": 32, "use_spatial_transformer": True, "legacy": False,
        "adm_in_channels": None, "in_channels": 4, "out_channels": 4, "model_channels": 320,
        "num_res_blocks": [1, 1, 1], "transformer_depth": [1, 1, 1], "transformer_depth_output": [1] * 6,
        "channel_mult": [1, 1, 1], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
        "context_dim": 768, "use_temporal_resblock": False, "use_temporal_attention": False,
    }


def _meta_state_dicts() -> dict[str, dict[str, torch.Tensor]]:
    """Meta-device state dicts (names and shapes only) of the UNet, CLIP-L text model and VAE."""
    config = comfy.supported_models.SD15(tiny_sd15_unet_config())
    config.set_inference_dtype(torch.float16, None)
    with torch.device("meta"):
        unet = config.get_model({}, "", device="meta").diffusion_model
        clip = comfy.sd1_clip.SDClipModel(device="meta", dtype=torch.float16)
        vae = comfy.ldm.models.autoencoder.AutoencoderKL(ddconfig=dict(SD15_VAE_DDCONFIG), embed_dim=4)
    clip_sd = {k[len("transformer.text_model."):]: v for k, v in clip.state_dict().items()
               if k.startswith("transformer.text_model.")}
    return {UNET_PREFIX: unet.state_dict(), CLIP_PREFIX: clip_sd, VAE_PREFIX: vae.state_dict()}


def checkpoint_shapes() -> dict[str, tuple[int, ...]]:
    """Every weight key of the tiny checkpoint (schedule buffers and ``position_ids`` excluded) and its shape."""
    return {prefix + key: tuple(t.shape) for prefix, sd in _meta_state_dicts().items() for key, t in sd.items()}


def _random_tensor(key: str, shape: tuple[int, ...], gen: torch.Generator) -> torch.Tensor:
    """Deterministic init: N(0, 1/fan_in) for matrices/kernels, N(0, 0.02²) biases, 1 + N(0, 0.1²) scales."""
    if key.endswith("bias"):
        values = torch.randn(shape, generator=gen) * 0.02
    elif len(shape) >= 2:
        values = torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
    else:
        values = 1.0 + 0.1 * torch.randn(shape, generator=gen)
    return values.to(torch.float16)


def ddpm_schedule_buffers(steps: int = 1000, linear_start: float = 0.00085,
                          linear_end: float = 0.012) -> dict[str, torch.Tensor]:
    """The schedule buffers LDM's ``DDPM.register_schedule`` stores in SD1.x checkpoints (float32)."""
    betas = torch.linspace(linear_start ** 0.5, linear_end ** 0.5, steps, dtype=torch.float64) ** 2
    alphas = 1.0 - betas
    cumprod = torch.cumprod(alphas, dim=0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), cumprod[:-1]])
    posterior_variance = betas * (1.0 - prev) / (1.0 - cumprod)
    buffers = {
        "betas": betas, "alphas_cumprod": cumprod, "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": cumprod.sqrt(), "sqrt_one_minus_alphas_cumprod": (1.0 - cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - cumprod).log(), "sqrt_recip_alphas_cumprod": (1.0 / cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / cumprod - 1.0).sqrt(), "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp_min(1e-20).log(),
        "posterior_mean_coef1": betas * prev.sqrt() / (1.0 - cumprod),
        "posterior_mean_coef2": (1.0 - prev) * alphas.sqrt() / (1.0 - cumprod),
    }
    return {k: v.to(torch.float32) for k, v in buffers.items()}


def _checkpoint_tensors(seed: int) -> Iterator[tuple[str, torch.Tensor]]:
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    for prefix, sd in _meta_state_dicts().items():
        for key, meta in sd.items():
            yield prefix + key, _random_tensor(key, tuple(meta.shape), gen)
    yield CLIP_PREFIX + "embeddings.position_ids", torch.arange(77, dtype=torch.int64).unsqueeze(0)
    yield from ddpm_schedule_buffers().items()


def write_tiny_sd15_checkpoint(path: str | os.PathLike[str], seed: int = 0) -> str:
    """Write the tiny SD1.5 checkpoint (see the module doc) to ``path``; return the path.

    Same ``seed``, same tensors. The file is written next to ``path`` and renamed into place, so a
    reader never sees a partial file.
    """
    path = os.fspath(path)
    tensors = dict(_checkpoint_tensors(seed))
    tmp = f"{path}.partial-{os.getpid()}"
    safetensors.torch.save_file(tensors, tmp, metadata={"format": "pt"})
    os.replace(tmp, path)
    return path


def ensure_tiny_checkpoint(checkpoints_dir: str | os.PathLike[str] | None = None, seed: int = 0) -> str:
    """Write the tiny checkpoint into ``checkpoints_dir`` once per process; return its file name.

    ``checkpoints_dir`` defaults to the first ComfyUI ``checkpoints`` folder (the booted test
    instance's temporary folder). An existing file of the same name is reused; a file written here is
    deleted when the process exits. ComfyUI's file-list cache is cleared so ``CheckpointLoaderSimple``
    sees the file at once.
    """
    directory = os.fspath(checkpoints_dir) if checkpoints_dir is not None else folder_paths.get_folder_paths("checkpoints")[0]
    name = TINY_CHECKPOINT_NAME.format(seed=int(seed))
    memo = (os.path.abspath(directory), int(seed))
    if memo in _written and os.path.exists(os.path.join(directory, name)):
        return name
    os.makedirs(directory, exist_ok=True)
    target = os.path.join(directory, name)
    if not os.path.exists(target):
        write_tiny_sd15_checkpoint(target, seed)
        _remove_at_exit.append(target)
    _written[memo] = name
    folder_paths.filename_list_cache.clear()
    return name


def load_tiny_checkpoint(path: str | os.PathLike[str], output_vae: bool = True
                         ) -> tuple[comfy.model_patcher.ModelPatcher, comfy.sd.CLIP, comfy.sd.VAE | None]:
    """Load a checkpoint file the way ``CheckpointLoaderSimple`` does: ``(model, clip, vae)``."""
    out = comfy.sd.load_checkpoint_guess_config(
        os.fspath(path), output_vae=output_vae, output_clip=True,
        embedding_directory=folder_paths.get_folder_paths("embeddings"))
    return out[0], out[1], out[2]


def ensure_demo_loras(loras_dir: str | os.PathLike[str],
                      checkpoint_path_or_patcher: str | os.PathLike[str] | comfy.model_patcher.ModelPatcher,
                      clip: comfy.sd.CLIP | None = None) -> list[str]:
    """Write the ``DEMO_LORAS`` (kohya, rank 4, UNet attention/FF/proj + CLIP-L layers) into ``loras_dir``.

    ``checkpoint_path_or_patcher`` is the checkpoint file (loaded with ComfyUI's loader to get its
    UNet and CLIP) or an already loaded ModelPatcher; with a patcher, pass ``clip`` to include
    text-encoder keys (``lora_te_text_model_encoder_layers_N_…``), otherwise the files are UNet-only.
    Existing files are kept. Returns the file names in ``DEMO_LORAS`` order; clears ComfyUI's
    file-list cache.
    """
    directory = os.fspath(loras_dir)
    os.makedirs(directory, exist_ok=True)
    missing = [d for d in DEMO_LORAS if not os.path.exists(os.path.join(directory, d.filename))]
    if missing:
        if isinstance(checkpoint_path_or_patcher, comfy.model_patcher.ModelPatcher):
            patcher = checkpoint_path_or_patcher
        else:
            patcher, clip, _ = load_tiny_checkpoint(checkpoint_path_or_patcher, output_vae=False)
        for demo in missing:
            target = os.path.join(directory, demo.filename)
            tmp = f"{target}.partial-{os.getpid()}"
            lora_files.write_lora(patcher, tmp, fmt="kohya", seed=demo.seed, rank=4, alpha=4.0,
                                  targets="attn+ff+proj", clip=clip, dtype=torch.float16)
            os.replace(tmp, target)
    folder_paths.filename_list_cache.clear()
    return [d.filename for d in DEMO_LORAS]
