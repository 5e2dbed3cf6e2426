"""Let ComfyUI's own text-encoder loader build a tiny T5 from a test file that says its sizes.

DualCLIPLoader (type flux) builds T5 from ComfyUI's bundled ``t5_config_xxl.json`` (d_model 4096, 24 blocks,
d_ff 10240: 4.76 B parameters, a 9.5 GB float16 file) whatever the file holds; its only way to other sizes is
the loader's ``model_options["t5xxl_model_config"]``, which ``comfy.sd1_clip.SDClipModel`` merges into that
config and which the node does not expose. A test T5 file carries its sizes in its safetensors metadata
(``METADATA_KEY``, JSON); ``with_tiny_t5(load_clip)`` wraps ``comfy.sd.load_clip`` so that such a file gets
them as that override. Files without the key load exactly as before.

Used by tier 2 for the span of one test (pytest's monkeypatch, ``support.tiny_flux_files.tiny_t5_sizes``) and by
tier 3's test server through the test-only custom node ``tests/tier3/tiny_t5_node`` (its process only). Imports
nothing of the test tree, so that node can load it by path.
"""
from __future__ import annotations

import functools
import inspect
import json
from collections.abc import Callable

import safetensors

METADATA_KEY = "multilora_test.t5xxl_model_config"


def t5_sizes(path: str) -> dict | None:
    """The T5 config a test file declares in its metadata (None for any other file)."""
    if not str(path).endswith(".safetensors"):
        return None
    try:
        with safetensors.safe_open(path, framework="pt") as f:
            declared = (f.metadata() or {}).get(METADATA_KEY)
    except (OSError, safetensors.SafetensorError):
        return None
    return json.loads(declared) if declared else None


def with_tiny_t5(load_clip: Callable) -> Callable:
    """``comfy.sd.load_clip`` that passes a test T5 file's declared sizes as ``t5xxl_model_config``."""
    signature = inspect.signature(load_clip)

    @functools.wraps(load_clip)
    def load(*args, **kwargs):
        bound = signature.bind(*args, **kwargs)
        declared = [s for s in map(t5_sizes, bound.arguments["ckpt_paths"]) if s]
        if declared:
            bound.arguments["model_options"] = {**bound.arguments.get("model_options", {}),
                                                "t5xxl_model_config": declared[0]}
        return load_clip(*bound.args, **bound.kwargs)

    load.multilora_tiny_t5 = True
    return load
