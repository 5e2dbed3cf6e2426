"""Write the model files the example workflows name, for the tiny real-format SD1.5 checkpoint and Flux.1-dev.

Usage: ``python tests/tier3/make_models.py MODELS_DIR``. Writes ``MODELS_DIR/checkpoints/<the workflows'
checkpoint name>`` (the tiny checkpoint of ``support.tiny_checkpoint``, ~540 MB) and the demo LoRAs in
``MODELS_DIR/loras/``, and the Flux workflow's files (``support.tiny_flux_files``, the DiT 3072 wide so that
0.3.75 and 0.33.0 both detect it, ~1.5 GB) in ``diffusion_models/``, ``text_encoders/``, ``vae/`` and
``loras/``. Existing files are kept, so a cache folder is filled once. Runs in its own process: it boots
ComfyUI headless, which the browser tier's pytest process does not need.
"""
from __future__ import annotations

import glob
import json
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/, for support.*

from support.comfy_boot import boot  # noqa: E402
from support.pack_loader import REPO_ROOT  # noqa: E402

CHECKPOINT_NAME = "v1-5-pruned-emaonly.safetensors"
"""The checkpoint every workflow in example_workflows/ loads (see example_workflows/README.md)."""
MODELS_CACHE = os.path.join(REPO_ROOT, ".cache", "tier3-models")
"""Where the browser tier keeps these files (git-ignored); written once, ~1 min and ~2 GB."""
MODEL_FILES = (f"checkpoints/{CHECKPOINT_NAME}", "loras/demo_character.safetensors",
               "loras/demo_style.safetensors", "loras/demo_background.safetensors",
               "diffusion_models/flux1-dev.safetensors", "text_encoders/clip_l.safetensors",
               "text_encoders/t5xxl_fp16.safetensors", "vae/ae.safetensors", "loras/demo_flux_knight.safetensors",
               "loras/demo_flux_dragon.safetensors", "loras/demo_flux_style.safetensors")
FLUX_WIDTH = 3072
"""The tiny Flux DiT's width here: the one both ComfyUI versions detect (the cache serves both)."""


def workflow_checkpoints() -> list[str]:
    """Every checkpoint name an example workflow loads (the SDXL one of the Regional workflow included)."""
    names = set()
    for path in glob.glob(os.path.join(REPO_ROOT, "example_workflows", "*.json")):
        with open(path, encoding="utf-8") as f:
            for node in json.load(f)["nodes"]:
                if node["type"] == "CheckpointLoaderSimple":
                    names.add(node["widgets_values"][0])
    return sorted(names)


def ensure_models(models_dir: str = MODELS_CACHE) -> str:
    """``models_dir`` with every file of MODEL_FILES, written by this script in a child process if missing,
    and the tiny checkpoint under every other checkpoint name a workflow uses (a link: the CPU runs them
    all on the tiny SD1.5 model, as tier 2 does)."""
    if not all(os.path.exists(os.path.join(models_dir, f)) for f in MODEL_FILES):
        subprocess.run([sys.executable, os.path.abspath(__file__), models_dir], check=True, timeout=900,
                       stdout=subprocess.DEVNULL)
    for name in workflow_checkpoints():
        alias = os.path.join(models_dir, "checkpoints", name)
        if not os.path.lexists(alias):
            os.symlink(CHECKPOINT_NAME, alias)
    return models_dir


def main(models_dir: str) -> int:
    boot()
    from support.tiny_checkpoint import ensure_demo_loras, write_tiny_sd15_checkpoint
    from support.tiny_flux_files import write_flux_files

    checkpoints = os.path.join(models_dir, "checkpoints")
    loras = os.path.join(models_dir, "loras")
    os.makedirs(checkpoints, exist_ok=True)
    checkpoint = os.path.join(checkpoints, CHECKPOINT_NAME)
    if not os.path.exists(checkpoint):
        write_tiny_sd15_checkpoint(checkpoint, seed=0)
    ensure_demo_loras(loras, checkpoint)
    write_flux_files(models_dir, width=FLUX_WIDTH, lora_dir=loras, keep=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main(os.path.abspath(sys.argv[1])))
