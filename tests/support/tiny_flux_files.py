"""Tiny Flux.1-dev model files in the layouts users download, for the loaders of the Flux example workflow.

``write_flux_files(models_dir)`` writes, under ComfyUI's folder names and the file names the workflow uses:

* ``diffusion_models/flux1-dev.safetensors``: a Flux-dev DiT in the original key layout (``img_in``, ``txt_in``,
  ``vector_in``, ``guidance_in``, ``double_blocks.N.…``, ``single_blocks.N.…``, ``final_layer``), bfloat16,
  with 1 double and 1 single block. UNETLoader finds the family and the sizes with ComfyUI's own model detection
  (``comfy.model_detection.detect_unet_config``), which reads in/hidden/context/vector widths and the block
  counts from the tensors but takes the head layout from Flux.1: axes_dim [16, 56, 56] (head dim 128) and, on
  0.3.75, always 24 heads, so there the only consistent width is 3072 (~540 M parameters, 1.1 GB); 0.33.0
  derives the heads from the width (hidden / 128), so the file is 256 wide there. ``flux_width`` asks the
  running ComfyUI's detection which it is.
* ``text_encoders/clip_l.safetensors``: a full-size CLIP-L text model (``text_model.…``, ``text_projection``),
  float16 (~123 M parameters): DualCLIPLoader builds CLIP-L from ComfyUI's bundled ``sd1_clip_config.json``.
* ``text_encoders/t5xxl_fp16.safetensors``: a T5 encoder in T5-XXL's key layout (``shared``,
  ``encoder.block.N.layer.{0,1}.…``, ``encoder.final_layer_norm``) but 2 blocks, 64 wide (``T5_CONFIG``).
  DualCLIPLoader (type flux) always builds T5 from ComfyUI's bundled ``t5_config_xxl.json`` (d_model 4096,
  24 blocks, d_ff 10240: 4.76 B parameters, a 9.5 GB float16 file, ~2.4 TFLOP per prompt at its 256-token
  minimum) and never reads the sizes from the file; ComfyUI's only override is the loader's
  ``model_options["t5xxl_model_config"]`` (read by ``comfy.sd1_clip.SDClipModel``), which the node does not
  expose. The file declares its sizes in its metadata and ``tiny_t5_sizes`` passes them there for the
  duration of a ``with`` block (``support.tiny_t5``: a wrapper of ``comfy.sd.load_clip``, set and removed by
  pytest's monkeypatch); everything else — the node, the file detection, FluxClipModel, the Flux tokenizer
  (CLIP-L + T5), the T5 module — is ComfyUI's.
* ``vae/ae.safetensors``: the Flux VAE (LDM layout, 16 latent channels, no quant convs), full size (~84 M).
* ``loras/<FLUX_LORAS>``: diffusers-format LoRAs (rank 4, attention + MLP of every block) for that DiT.

The Flux DiT's context width is the tiny T5's d_model and its vector width CLIP-L's pooled 768, so the
encoders' real outputs drive it. Weights are random but deterministic (N(0, 1/fan_in) matrices, small biases,
norm scales near 1): images are noise, every code path is the real one. Missing files are written, and deleted
at exit unless kept as a cache. ComfyUI must be booted (``support.comfy_boot.boot``) before this module is
imported.
"""
from __future__ import annotations

import atexit
import contextlib
import json
import math
import os
from collections.abc import Iterator

import safetensors.torch
import torch

import comfy.ldm.models.autoencoder
import comfy.model_detection
import comfy.model_patcher
import comfy.ops
import comfy.sd
import comfy.sd1_clip
import comfy.text_encoders.t5
import folder_paths

from support import tiny_models, tiny_t5

UNET_NAME = "flux1-dev.safetensors"
CLIP_L_NAME = "clip_l.safetensors"
T5_NAME = "t5xxl_fp16.safetensors"
VAE_NAME = "ae.safetensors"
FLUX_LORAS = ("demo_flux_knight.safetensors", "demo_flux_dragon.safetensors", "demo_flux_style.safetensors")
"""The Flux workflow's LoRA Stack rows, in order."""
FOLDERS = ("diffusion_models", "text_encoders", "vae")
T5_CONFIG = {"d_model": 64, "d_ff": 128, "d_kv": 16, "num_heads": 4, "num_layers": 2}
"""The tiny T5's sizes (the rest of the config, vocabulary included, is T5-XXL's)."""
CLIP_L_POOLED = 768
VAE_DDCONFIG = {"double_z": True, "z_channels": 16, "resolution": 256, "in_channels": 3, "out_ch": 3, "ch": 128,
                "ch_mult": [1, 2, 4, 4], "num_res_blocks": 2, "attn_resolutions": [], "dropout": 0.0}
"""ComfyUI's LDM-layout VAE configuration, with the 16 latent channels it reads from Flux's ``decoder.conv_in``."""

_remove_at_exit: list[str] = []


@atexit.register
def _remove_written() -> None:
    for path in _remove_at_exit:
        with contextlib.suppress(OSError):
            os.remove(path)


def _random(key: str, shape: tuple[int, ...], gen: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    """N(0, 1/fan_in) matrices and kernels, N(0, 0.02²) biases, 1 + N(0, 0.1²) scales (as tiny_checkpoint)."""
    if key.endswith("bias"):
        values = torch.randn(shape, generator=gen) * 0.02
    elif len(shape) >= 2:
        values = torch.randn(shape, generator=gen) / math.sqrt(math.prod(shape[1:]))
    else:
        values = 1.0 + 0.1 * torch.randn(shape, generator=gen)
    return values.to(dtype)


def _save(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str] | None = None) -> None:
    tmp = f"{path}.partial-{os.getpid()}"
    safetensors.torch.save_file(tensors, tmp, metadata={"format": "pt", **(metadata or {})})
    os.replace(tmp, path)
    _remove_at_exit.append(path)


def detected_config(width: int) -> dict:
    """What ComfyUI's detection makes of a Flux-dev file ``width`` wide (1 double, 1 single block)."""
    shapes = {
        "img_in.weight": (width, 64), "txt_in.weight": (width, T5_CONFIG["d_model"]),
        "vector_in.in_layer.weight": (width, CLIP_L_POOLED), "guidance_in.in_layer.weight": (width, 256),
        "double_blocks.0.img_attn.norm.key_norm.scale": (128,), "single_blocks.0.linear1.weight": (1, width),
    }
    meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
    return comfy.model_detection.detect_unet_config(meta, "")


def flux_width() -> int:
    """The smallest width the running ComfyUI detects with a consistent head layout (heads × 128 = width)."""
    for width in (256, 3072):
        config = detected_config(width)
        if config["num_heads"] * sum(config["axes_dim"]) == width:
            return width
    raise RuntimeError("ComfyUI's Flux detection accepts neither 256 nor 3072 wide models")


def build_flux(seed: int = 0, width: int | None = None) -> comfy.model_patcher.ModelPatcher:
    """The DiT the file holds (``width`` default: ``flux_width()``), built from the configuration ComfyUI detects
    for it (float32, CPU)."""
    config = comfy.model_detection.model_config_from_unet_config(detected_config(width or flux_width()))
    config.set_inference_dtype(torch.float32, None)
    model = config.get_model({}, "", device=torch.device("cpu"))
    tiny_models.init_weights_(model, seed)
    return comfy.model_patcher.ModelPatcher(model.eval(), load_device=torch.device("cpu"),
                                            offload_device=torch.device("cpu"))


def flux_lora_shapes(config: dict) -> dict[str, tuple[int, int]]:
    """(out, in) of every layer a diffusers-format Flux LoRA (what ComfyUI's Flux key map reads) patches here:
    attention projections and MLPs of every double block, q/k/v, MLP-in and out of every single block."""
    width = int(config["hidden_size"])
    mlp = int(width * config["mlp_ratio"])
    shapes: dict[str, tuple[int, int]] = {}
    for i in range(int(config["depth"])):
        block = f"transformer.transformer_blocks.{i}"
        for name in ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj", "to_out.0", "to_add_out"):
            shapes[f"{block}.attn.{name}"] = (width, width)
        for stream in ("ff", "ff_context"):
            shapes[f"{block}.{stream}.net.0.proj"] = (mlp, width)
            shapes[f"{block}.{stream}.net.2"] = (width, mlp)
    for i in range(int(config["depth_single_blocks"])):
        block = f"transformer.single_transformer_blocks.{i}"
        for name in ("attn.to_q", "attn.to_k", "attn.to_v"):
            shapes[f"{block}.{name}"] = (width, width)
        shapes[f"{block}.proj_mlp"] = (mlp, width)
        shapes[f"{block}.proj_out"] = (width, width + mlp)
    return shapes


def _flux_lora(path: str, config: dict, seed: int, rank: int = 4) -> None:
    """A rank-``rank`` LoRA (``lora_A`` N(0, 1/in), ``lora_B`` N(0, (0.1/rank)²)), bfloat16: each layer's output moves
    by about a tenth of its input's scale. Written directly: support.lora_files' writer also records every
    layer's dense expected change, gigabytes at Flux.1's width."""
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    tensors = {}
    for name, (out, inp) in flux_lora_shapes(config).items():
        tensors[f"{name}.lora_A.weight"] = (torch.randn(rank, inp, generator=gen) / math.sqrt(inp)).to(torch.bfloat16)
        tensors[f"{name}.lora_B.weight"] = (torch.randn(out, rank, generator=gen) * 0.1 / rank).to(torch.bfloat16)
    _save(tensors, path)


def _flux_file(path: str, seed: int, width: int) -> None:
    patcher = build_flux(seed, width)
    tensors = {k: v.to(torch.bfloat16) for k, v in patcher.model.diffusion_model.state_dict().items()}
    del patcher
    _save(tensors, path)


def _meta_file(module: torch.nn.Module, path: str, seed: int, dtype: torch.dtype,
               metadata: dict[str, str] | None = None) -> None:
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    _save({k: _random(k, tuple(v.shape), gen, dtype) for k, v in module.state_dict().items()}, path, metadata)


def _clip_l_file(path: str, seed: int) -> None:
    with torch.device("meta"):
        clip = comfy.sd1_clip.SDClipModel(device="meta", dtype=torch.float16)
    _meta_file(clip.transformer, path, seed, torch.float16)


def t5_config() -> dict:
    """T5-XXL's configuration as ComfyUI bundles it, at ``T5_CONFIG``'s sizes."""
    with open(os.path.join(os.path.dirname(comfy.text_encoders.t5.__file__), "t5_config_xxl.json")) as f:
        return {**json.load(f), **T5_CONFIG}


def _t5_file(path: str, seed: int) -> None:
    with torch.device("meta"):
        t5 = comfy.text_encoders.t5.T5(t5_config(), torch.float16, "meta", comfy.ops.manual_cast)
    _meta_file(t5, path, seed, torch.float16, {tiny_t5.METADATA_KEY: json.dumps(T5_CONFIG)})


def _vae_file(path: str, seed: int) -> None:
    with torch.device("meta"):
        vae = comfy.ldm.models.autoencoder.AutoencodingEngine(
            regularizer_config={"target": "comfy.ldm.models.autoencoder.DiagonalGaussianRegularizer"},
            encoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Encoder", "params": VAE_DDCONFIG},
            decoder_config={"target": "comfy.ldm.modules.diffusionmodules.model.Decoder", "params": VAE_DDCONFIG})
    _meta_file(vae, path, seed, torch.float16)


def write_flux_files(models_dir: str | os.PathLike[str], seed: int = 0, width: int | None = None,
                     lora_dir: str | None = None, keep: bool = False) -> list[str]:
    """Write the missing files (module doc) under ``models_dir``/<folder> and the LoRAs into ``lora_dir`` (default
    ComfyUI's first loras folder), register the folders with ComfyUI and clear its file-list cache; returns the
    LoRA names. ``width`` (default ``flux_width()``) 3072 gives a DiT every ComfyUI version detects; files written
    are deleted at exit unless ``keep`` (a cache folder)."""
    root = os.path.abspath(os.fspath(models_dir))
    width = int(width or flux_width())
    loras = lora_dir or folder_paths.get_folder_paths("loras")[0]
    for folder in FOLDERS:
        os.makedirs(os.path.join(root, folder), exist_ok=True)
        if os.path.join(root, folder) not in folder_paths.get_folder_paths(folder):
            folder_paths.add_model_folder_path(folder, os.path.join(root, folder), is_default=True)
    os.makedirs(loras, exist_ok=True)
    before = len(_remove_at_exit)
    jobs = ((_clip_l_file, "text_encoders", CLIP_L_NAME), (_t5_file, "text_encoders", T5_NAME),
            (_vae_file, "vae", VAE_NAME), (lambda path, seed: _flux_file(path, seed, width), "diffusion_models",
                                           UNET_NAME))
    for write, folder, name in jobs:
        target = os.path.join(root, folder, name)
        if not os.path.exists(target):
            write(target, seed)
    config = detected_config(width)
    for i, name in enumerate(FLUX_LORAS):
        target = os.path.join(loras, name)
        if not os.path.exists(target):
            _flux_lora(target, config, seed + 201 + i)
    if keep:
        del _remove_at_exit[before:]
    folder_paths.filename_list_cache.clear()
    return list(FLUX_LORAS)


@contextlib.contextmanager
def tiny_t5_sizes(monkeypatch) -> Iterator[None]:
    """Inside the block, ``comfy.sd.load_clip`` builds the tiny T5 file's T5 at its declared sizes
    (``support.tiny_t5``: ComfyUI's ``t5xxl_model_config`` override, which DualCLIPLoader does not expose)."""
    with monkeypatch.context() as patch:
        patch.setattr(comfy.sd, "load_clip", tiny_t5.with_tiny_t5(comfy.sd.load_clip))
        yield
