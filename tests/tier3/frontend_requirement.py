"""Print ComfyUI's pinned web frontend requirement (e.g. ``comfyui-frontend-package==1.32.9``).

Read from the requirements.txt of the ComfyUI the tests use (the vendored 0.3.75 tree, or $COMFYUI_PATH), so
the browser tier always serves the frontend that ComfyUI release was made for. Used by the Makefile.
"""
from __future__ import annotations

import os
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # tests/, for support.*

from support.comfy_boot import comfy_root  # noqa: E402


def frontend_requirement(root: str) -> str:
    with open(os.path.join(root, "requirements.txt"), encoding="utf-8") as f:
        for line in f:
            if re.match(r"\s*comfyui-frontend-package\s*[=<>~!]", line):
                return line.split("#")[0].strip()
    raise SystemExit(f"no comfyui-frontend-package line in {root}/requirements.txt")


if __name__ == "__main__":
    print(frontend_requirement(comfy_root()))
