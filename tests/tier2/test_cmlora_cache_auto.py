"""CMLoRA's feature cache default per model family: 'auto' is off on SD1.x, on on SDXL (docs/benchmarking.md)."""

import pytest

import comfy.patcher_extension
import folder_paths
import nodes

from support import lora_files, tiny_models

CATEGORIES = ("character", "background")


@pytest.fixture(scope="module")
def stacks(comfy_state, ml):
    out = {}
    for kind in ("sd15", "sdxl"):
        model = tiny_models.build_tiny(kind, seed=0)
        names = lora_files.write_lora_set(model, comfy_state["loras_dir"], f"cml_auto_{kind}", (91, 92))
        s = ml("core.stack")
        out[kind] = (model, tuple(s.LoraRow(n, 0.9, category=c) for n, c in zip(names, CATEGORIES)))
    folder_paths.filename_list_cache.clear()
    return out


def has_cache(clone, ml) -> bool:
    key = ml("methods.cmlora").CACHE_KEY
    return key in clone.wrappers.get(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, {})


@pytest.mark.parametrize("kind, expected", [("sd15", False), ("sdxl", True)])
def test_auto_follows_the_model_family(ml, stacks, kind, expected):
    cmlora = ml("methods.cmlora")
    model, rows = stacks[kind]
    assert cmlora.cache_by_family(model) is expected
    for auto in (None, "auto"):
        assert has_cache(cmlora.cmlora_model(model, rows, 0.55, False, "t", cache=auto), ml) is expected
    assert has_cache(cmlora.cmlora_model(model, rows, 0.55, False, "t", cache="on"), ml)
    assert not has_cache(cmlora.cmlora_model(model, rows, 0.55, False, "t", cache="off"), ml)
    assert has_cache(cmlora.cmlora_model(model, rows, 0.55, False, "t", cache=True), ml)
    assert model.wrappers == {}


def test_node_offers_auto_by_default():
    declared = nodes.NODE_CLASS_MAPPINGS["MultiLoRACMLoRASampler"].INPUT_TYPES()["required"]["cache"]
    options = declared[0] if isinstance(declared[0], (list, tuple)) else declared[1]["options"]
    assert list(options) == ["auto", "on", "off"] and declared[1]["default"] == "auto"
