"""Import the pack the way ComfyUI does: by path, never with the repo root on sys.path."""
from __future__ import annotations

import importlib
import importlib.util
import os
import sys
from types import ModuleType

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
PURE_PACKAGE = "multilora_pack_pure"


def load_pure(module: str) -> ModuleType:
    """Import ``multilora.<module>`` of the pack without ComfyUI (root __init__ is import-light)."""
    if PURE_PACKAGE not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            PURE_PACKAGE, os.path.join(REPO_ROOT, "__init__.py"), submodule_search_locations=[REPO_ROOT])
        package = importlib.util.module_from_spec(spec)
        sys.modules[PURE_PACKAGE] = package
        spec.loader.exec_module(package)
    return importlib.import_module(f"{PURE_PACKAGE}.multilora.{module}")
