"""Test-only custom node for tier 3's ComfyUI server: lets DualCLIPLoader build the tiny test T5 at its sizes.

The server loads it (``tier3.server``, custom_nodes/``TINY_T5_NODE``) beside the pack; it defines no node. In
that server process only, ``comfy.sd.load_clip`` is wrapped by ``support.tiny_t5.with_tiny_t5`` (loaded by path:
the server has no tests/ on sys.path): a T5 file whose metadata declares its sizes is built at them through
ComfyUI's ``t5xxl_model_config`` override; every other file loads as before. Not part of the pack.
"""
import importlib.util
import os

import comfy.sd

_PATH = os.path.join(os.path.dirname(os.path.realpath(__file__)), os.pardir, "..", "support", "tiny_t5.py")
_spec = importlib.util.spec_from_file_location("multilora_test_tiny_t5", os.path.normpath(_PATH))
_tiny_t5 = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_tiny_t5)
if not getattr(comfy.sd.load_clip, "multilora_tiny_t5", False):
    comfy.sd.load_clip = _tiny_t5.with_tiny_t5(comfy.sd.load_clip)

NODE_CLASS_MAPPINGS: dict = {}
