"""Boot ComfyUI for one memory configuration of the runtime matrix, as its ``main.py`` would start it.

The pack's tests and benchmarks import ComfyUI without running ``main.py``; but dynamic VRAM (ComfyUI ≥ 0.33,
comfy-aimdo) is switched on by ``main.py`` itself: it calls ``comfy_aimdo.control.init`` before torch touches the
GPU, then ``init_devices`` and makes ``ModelPatcherDynamic`` the ``CoreModelPatcher`` every loader uses. This
module does the same few steps for the benchmark process, so a model loaded through ``comfy.sd`` gets exactly
the patcher a user's ComfyUI gives it. Configurations:

    dynamic          ComfyUI's default on an NVIDIA GPU (dynamic VRAM on)
    static           --disable-dynamic-vram (the legacy ModelPatcher)
    lowvram          --lowvram --reserve-vram R (dynamic VRAM on), R leaves about half the UNet room
    lowvram-static   the same with --disable-dynamic-vram: ComfyUI's partial load, weights cast per op
    fp8              dynamic VRAM on, UNet weights loaded as float8_e4m3fn (UNETLoader's weight_dtype)
    fp8-static       fp8 weights with --disable-dynamic-vram
"""
from __future__ import annotations

import os
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = ("dynamic", "static", "lowvram", "lowvram-static", "fp8", "fp8-static")


def comfy_args(config: str, reserve_gb: float | None) -> list[str]:
    """ComfyUI command-line flags of ``config``."""
    args = []
    if config.endswith("static"):
        args.append("--disable-dynamic-vram")
    if config.startswith("lowvram"):
        args += ["--lowvram"] + ([] if reserve_gb is None else ["--reserve-vram", f"{reserve_gb:.2f}"])
    return args


def boot(config: str, reserve_gb: float | None = None):
    """Import ComfyUI from $COMFYUI_PATH with ``config``'s flags (dynamic VRAM as main.py enables it) and
    return ``ml(name)`` → the pack's multilora.<name>, loaded by path (never with the repo root on sys.path)."""
    root = os.environ["COMFYUI_PATH"]
    sys.path[:] = [p for p in sys.path if p not in ("", ".") and os.path.abspath(p) != REPO]
    sys.path.insert(0, root)
    argv = sys.argv
    sys.argv = [argv[0]] + comfy_args(config, reserve_gb)
    try:
        import comfy.options
        comfy.options.enable_args_parsing()
        from comfy.cli_args import args, enables_dynamic_vram
        dynamic = enables_dynamic_vram()
        if dynamic:  # before torch initialises CUDA, as main.py does
            import comfy_aimdo.control
            headroom = None if args.reserve_vram is None else int(args.reserve_vram * 1024 ** 3)
            comfy_aimdo.control.init(simple_vram_headroom=headroom, nvml_pressure=not args.disable_nvml_pressure)
        import comfy.memory_management
        import comfy.model_management
        import comfy.model_patcher
        if dynamic:
            import comfy_aimdo.control
            devices = comfy.model_management.get_all_torch_devices()
            if not comfy_aimdo.control.init_devices((d.index, int(args.vram_headroom * 1024 ** 3)) for d in devices):
                raise RuntimeError("comfy-aimdo did not initialise: dynamic VRAM is unavailable here")
            comfy.model_patcher.CoreModelPatcher = comfy.model_patcher.ModelPatcherDynamic
            comfy.memory_management.aimdo_enabled = True
    finally:
        sys.argv = argv
    sys.path.insert(1, os.path.join(REPO, "testbed"))
    from boot import boot_comfy  # ComfyUI is imported already: this only loads the pack, by path
    return boot_comfy()
