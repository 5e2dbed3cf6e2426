"""The on-the-fly engine equals ComfyUI's own merged LoRAs, per UNet call, for every format and family.

Reference: ``comfy.sd.load_lora_for_models`` (what core LoraLoader does) merged into the weights.
Tolerance: float32 on the CPU; the merged path rounds W + ΔW once, the on-the-fly path adds
x·A·B after x·W, so results differ by float32 reassociation only (≈1e-6 relative); 1e-4 absolute
on outputs of magnitude ~1 leaves two orders of margin while a missing or mis-scaled LoRA shifts outputs
by > 1e-2 (asserted too, so the test cannot pass with the LoRA silently absent).
"""
import os

import pytest
import torch

import comfy.sd
import folder_paths

from support import lora_files, tiny_models

FORMATS = {
    "sd15": ["kohya", "diffusers", "locon", "loha", "lokr", "dora", "full_diff"],
    "sdxl": ["kohya", "diffusers"],
    "flux": ["diffusers"],
}
CASES = [(kind, fmt) for kind, fmts in FORMATS.items() for fmt in fmts]
STRENGTHS = (0.8, 1.3)
ATOL, RTOL = 1e-4, 1e-4


@pytest.fixture(scope="module")
def models():
    return {kind: tiny_models.build_tiny(kind, seed=0) for kind in FORMATS}


def write_pair(comfy_state, patcher, kind, fmt):
    names = lora_files.write_lora_set(patcher, comfy_state["loras_dir"], f"eq_{kind}_{fmt}", (1, 2), fmt)
    folder_paths.filename_list_cache.clear()
    return names


def merged_forward(patcher, name, strength, x, sigma, cond):
    tensors = comfy.utils.load_torch_file(folder_paths.get_full_path("loras", name), safe_load=True)
    merged, _ = comfy.sd.load_lora_for_models(patcher, None, tensors, strength, 0.0)
    with tiny_models.patched(merged):
        return tiny_models.forward(merged, x, sigma, **cond)


def rows_of(ml, names):
    stack = ml("core.stack")
    return [stack.LoraRow(name=n, strength_model=s) for n, s in zip(names, STRENGTHS)]


@pytest.mark.parametrize("kind,fmt", CASES)
def test_branch_i_equals_only_lora_i_merged(comfy_state, ml, models, kind, fmt):
    patcher = models[kind]
    names = write_pair(comfy_state, patcher, kind, fmt)
    engine = ml("host.engine").build_engine(patcher, rows_of(ml, names), "test")
    x, sigma, cond = tiny_models.make_inputs(kind, batch=2, seed=3)
    base = tiny_models.forward(patcher, x, sigma, **cond)
    for i, name in enumerate(names):
        want = merged_forward(patcher, name, STRENGTHS[i], x, sigma, cond)
        weights = torch.zeros(2, 2)
        weights[:, i] = 1.0
        with engine.attached(patcher.model), engine.routed(weights):
            got = tiny_models.forward(patcher, x, sigma, **cond)
        assert (want - base).abs().max() > 1e-2, "the LoRA does not change the output: the test would be vacuous"
        torch.testing.assert_close(got, want, atol=ATOL, rtol=RTOL)
    after = tiny_models.forward(patcher, x, sigma, **cond)
    torch.testing.assert_close(after, base, atol=0, rtol=0)


@pytest.mark.parametrize("kind", list(FORMATS))
def test_mixed_routing_in_one_batch_through_the_apply_model_wrapper(comfy_state, ml, models, kind):
    """Chunk 0 → LoRA 1, chunk 1 → LoRA 2, chunk 2 → none, in one call == three separate merged calls."""
    patcher = models[kind]
    fmt = FORMATS[kind][0]
    names = write_pair(comfy_state, patcher, kind, fmt)
    engine = ml("host.engine").build_engine(patcher, rows_of(ml, names), "test")
    clone = ml("host.engine").clone_with_engine(patcher, engine)
    routing = ml("core.routing")
    x, sigma, cond = tiny_models.make_inputs(kind, batch=3, seed=4)
    options = {
        "wrappers": clone.wrappers,
        "cond_or_uncond": [2, 0, 1],  # ComfyUI orders chunks freely: route by cond index, not position
        ml("host.onthefly").ROUTING_KEY: routing.ByCondIndex({2: (1.0, 0.0), 0: (0.0, 1.0)}, (0.0, 0.0)),
    }
    with engine.attached(patcher.model), torch.no_grad():
        got = patcher.model.apply_model(x, sigma, transformer_options=options, **cond)
    chunk = lambda t, n: {k: v[n:n + 1] for k, v in t.items()}
    wants = [merged_forward(patcher, names[0], STRENGTHS[0], x[0:1], sigma[0:1], chunk(cond, 0)),
             merged_forward(patcher, names[1], STRENGTHS[1], x[1:2], sigma[1:2], chunk(cond, 1)),
             tiny_models.forward(patcher, x[2:3], sigma[2:3], **chunk(cond, 2))]
    torch.testing.assert_close(got, torch.cat(wants), atol=ATOL, rtol=RTOL)


def test_fused_flux_qkv_slices_are_patched(comfy_state, ml, models):
    patcher = models["flux"]
    names = write_pair(comfy_state, patcher, "flux", "diffusers")
    engine = ml("host.engine").build_engine(patcher, rows_of(ml, names), "test")
    sliced = [d for path, d in engine.layers.items() if path.endswith("img_attn.qkv")]
    assert sliced, "no fused qkv layer was targeted"
    up = sliced[0].up_cat
    hidden = up.shape[0] // 3
    # q, k and v LoRAs land on three distinct row blocks of the fused weight.
    assert all(up[i * hidden:(i + 1) * hidden].abs().sum() > 0 for i in range(3))


def test_second_build_reads_no_file(comfy_state, ml, models):
    patcher = models["sd15"]
    names = write_pair(comfy_state, patcher, "sd15", "kohya")
    files = ml("host.lora_files")
    ml("host.engine").build_engine(patcher, rows_of(ml, names), "test")
    before = files.read_count
    ml("host.engine").build_engine(patcher, rows_of(ml, names), "test")
    assert files.read_count == before
    os.utime(folder_paths.get_full_path("loras", names[0]), ns=(1, 1))  # changed mtime → read again
    ml("host.engine").build_engine(patcher, rows_of(ml, names), "test")
    assert files.read_count == before + 1


def test_lora_for_another_family_is_a_clear_error(comfy_state, ml, models):
    names = write_pair(comfy_state, models["sdxl"], "sdxl", "kohya")
    rows = rows_of(ml, names)
    with pytest.raises(ml("core.errors").LoraFileError, match=r"test: LoRA 'eq_sdxl_kohya_1.safetensors' matched 0 of its \d+ "
                                                                 r"tensors in this Flux model"):
        ml("host.engine").build_engine(models["flux"], rows, "test")
