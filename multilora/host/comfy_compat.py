"""What differs between the ComfyUI versions the pack runs on (0.3.64–0.3.75 and 0.33+), in one place.

- Weight residency. 0.3.x keeps a layer's weight on the GPU unless ``--lowvram`` offloads it to the CPU; both
  casts go through ``comfy.ops.cast_bias_weight`` when ``comfy_cast_weights`` is set. 0.33's dynamic VRAM
  (comfy-aimdo's ``ModelPatcherDynamic``, on by default on NVIDIA GPUs) leaves every large weight on the CPU
  and copies it into a GPU buffer that it keeps resident (the layer's ``_v``) or evicts under pressure. Code
  that writes ``module.weight`` in place, or that keeps a cast weight beyond one op (autograd), must know it.
Pure module: it reads the attributes ComfyUI's ops set, and imports no comfy module.
"""
from __future__ import annotations

import torch


def weight_streamed(module: torch.nn.Module, device: torch.device | str | None = None) -> bool:
    """The layer's weight is copied to the compute device per call from elsewhere (lowvram offload, or a
    dynamic-VRAM buffer): ``module.weight`` is not the tensor the op multiplies with."""
    if not getattr(module, "comfy_cast_weights", False):
        return False
    if hasattr(module, "_v"):  # 0.33 dynamic VRAM
        return True
    weight = getattr(module, "weight", None)
    if weight is None:
        return False
    if device is None:
        return weight.device.type == "cpu"
    return weight.device != torch.device(device)
