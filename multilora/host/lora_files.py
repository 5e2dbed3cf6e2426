"""Reading LoRA files once: a bounded cache keyed by (path, mtime, size).

Host module. Only safetensors files are accepted: pickled .ckpt/.pt/.bin files can run code when
loaded, and every LoRA in circulation exists as safetensors. A file is checked once, when it is read:
every floating tensor must be finite (a NaN/Inf weight turns every sampled image into NaN) and every
``.alpha`` must be a single number (ComfyUI's loader calls ``.item()`` on it). Only files that pass
are cached.
"""
from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict

import torch

import comfy.utils
import folder_paths

from ..core.errors import LoraFileError

log = logging.getLogger("multilora")

CACHE_ENTRIES = 32
CACHE_BYTES = 4 * 2**30  # parsed files kept in RAM at most (LRU); real LoRAs are 10–800 MB each
_cache: "OrderedDict[tuple[str, int, int], dict[str, torch.Tensor]]" = OrderedDict()
_lock = threading.Lock()
read_count = 0  # files actually read from disk (tests assert the cache works)


def resolve_lora_path(name: str, node: str = "LoRA Stack") -> str:
    """Full path of a file in ComfyUI's loras folder, or a LoraFileError naming it."""
    path = folder_paths.get_full_path("loras", name)
    if path is None or not os.path.isfile(path):
        raise LoraFileError(
            f"{node}: LoRA file '{name}' was not found in the loras folder. "
            "Check the name or refresh the node list (press R)."
        )
    return path


def read_lora_file(path: str, node: str = "LoRA Stack") -> dict[str, torch.Tensor]:
    """The file's tensors; read from disk only when (path, mtime, size) is not cached. Do not mutate."""
    global read_count
    if not path.lower().endswith((".safetensors", ".sft")):
        raise LoraFileError(
            f"{node}: '{os.path.basename(path)}' is not a .safetensors file. Pickled LoRA files are "
            "refused because loading them can run code; use the .safetensors version of this LoRA."
        )
    try:
        stat = os.stat(path)
    except OSError as exc:
        raise LoraFileError(f"{node}: cannot open LoRA file '{path}': {exc}") from exc
    key = (os.path.realpath(path), stat.st_mtime_ns, stat.st_size)
    with _lock:
        cached = _cache.get(key)
        if cached is not None:
            _cache.move_to_end(key)
            return cached
    try:
        tensors = comfy.utils.load_torch_file(path, safe_load=True)
    except Exception as exc:  # safetensors raises several unrelated types for damaged files
        raise LoraFileError(
            f"{node}: LoRA file '{os.path.basename(path)}' could not be read ({exc}). "
            "The file is damaged or incomplete; download it again."
        ) from exc
    check_lora_tensors(tensors, os.path.basename(path), node)
    with _lock:
        read_count += 1
        _cache[key] = tensors
        while len(_cache) > 1 and (len(_cache) > CACHE_ENTRIES or _cached_bytes() > CACHE_BYTES):
            _cache.popitem(last=False)
    log.debug("read LoRA file %s (%d tensors)", path, len(tensors))
    return tensors


def _non_finite(tensor: torch.Tensor) -> bool:
    if not tensor.is_floating_point():
        return False
    if tensor.element_size() == 1:  # fp8: isfinite is not implemented for it on every backend
        tensor = tensor.to(torch.float16)
    return not bool(torch.isfinite(tensor).all())


def check_lora_tensors(tensors: dict[str, torch.Tensor], name: str, node: str = "LoRA Stack") -> None:
    """LoraFileError unless every floating tensor is finite and every ``.alpha`` is a single number."""
    bad_alpha = next((k for k, t in tensors.items() if k.endswith(".alpha") and t.numel() != 1), None)
    if bad_alpha is not None:
        raise LoraFileError(
            f"{node}: LoRA file '{name}' has an alpha with {tensors[bad_alpha].numel()} values in '{bad_alpha}'; "
            "alpha must be a single number. The file is damaged or was written by a broken converter; "
            "download or convert it again."
        )
    bad = [k for k, t in tensors.items() if _non_finite(t)]
    if bad:
        more = f" and {len(bad) - 1} more" if len(bad) > 1 else ""
        raise LoraFileError(
            f"{node}: LoRA file '{name}' contains NaN/Inf (non-finite) values in '{bad[0]}'{more}; every image "
            "made with it would be NaN. The file is broken (e.g. a diverged training run or a bad fp16 "
            "conversion); use another version of this LoRA."
        )


def _cached_bytes() -> int:
    return sum(t.numel() * t.element_size() for sd in _cache.values() for t in sd.values())


def clear_cache() -> None:
    """Forget every cached file."""
    with _lock:
        _cache.clear()
