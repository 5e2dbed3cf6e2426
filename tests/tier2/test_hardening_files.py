"""Hardening, LoRA files: missing, damaged, pickled, non-finite, malformed and foreign files.

Every case ends in the pack's exception type with a message naming the node, the LoRA and the fix, raised
before the first UNet call (``fails_before_sampling``), or in a documented fallback, and leaves nothing on the
user's MODEL (``World.assert_clean``: hooks, wrappers, patches, weights, requires_grad, bit-identical samples).

Issue case → test
- missing file → test_missing_file_through_the_engine_and_a_sampler_node
- zero bytes, truncated safetensors → test_damaged_safetensors_is_a_clear_error[zero_bytes|truncated|header_only|garbage]
- non-safetensors (pickle refused, never unpickled) → test_pickled_lora_is_refused_and_never_unpickled
- NaN/Inf weights → test_malformed_file_is_a_clear_error_before_sampling[nan|inf]
- rank-0 / shape-mismatched tensors → test_malformed_file_is_a_clear_error_before_sampling[rank_zero|scalar_factor|
  down_width|up_rows|rank_mismatch] (+ up without down, vector alpha, unsupported 'set' patch); dense adapters
  (LoHa) whose factors do not fit → test_dense_adapter_that_does_not_fit_is_an_error_not_a_silent_zero
- keys for another model family → test_lora_for_another_family_is_an_error_naming_the_family
- partial key overlap (warn with counts) → test_partial_key_overlap_warns_with_counts
- alpha without rank → test_alpha_without_factors, test_no_alpha_means_alpha_equals_rank_like_core
- duplicated LoRA in the stack → test_hardening_stack.py::test_duplicated_lora_in_the_stack
"""
import logging
import os
import re

import pytest
import torch

import folder_paths
import nodes

from support import lora_files, tiny_models
from support.hardening import (  # noqa: F401
    NODE_NAMES,
    RUN_TOL,
    base_sample,
    errors,
    fails_before_sampling,
    forget_dead_loaded_models,
    refresh,
    samples_of,
    w,
)


def test_missing_file_through_the_engine_and_a_sampler_node(w, ml, errors):
    lf = ml("host.lora_files")
    with pytest.raises(errors.LoraFileError, match=r"^My Node: LoRA file 'gone\.safetensors' was not found in the loras "
                                                   r"folder\. Check the name or refresh"):
        lf.resolve_lora_path("gone.safetensors", "My Node")
    os.makedirs(w.path(w.scratch("a_folder.safetensors")), exist_ok=True)  # a directory is not a file
    with pytest.raises(errors.LoraFileError, match="'a_folder.safetensors' was not found"):
        lf.resolve_lora_path("a_folder.safetensors", "My Node")
    with pytest.raises(errors.LoraFileError, match=r"My Node: cannot open LoRA file '.*nowhere\.safetensors'"):
        lf.read_lora_file(w.path("nowhere.safetensors"), "My Node")
    # deleted after the stack was built (the stack node saw it): the sampler names node and file
    name = w.put("hard_deleted.safetensors", w.spec.state_dict)
    stack = w.stack([name])
    os.remove(w.path(name))
    refresh()
    for method in ("switch", "composite", "cmlora"):
        fails_before_sampling(w, method, errors.LoraFileError,
                              rf"^{re.escape(NODE_NAMES[method])}: LoRA file 'hard_deleted\.safetensors' was not found",
                              stack=stack)


@pytest.mark.parametrize("damage", ["zero_bytes", "truncated", "header_only", "garbage"])
def test_damaged_safetensors_is_a_clear_error(w, ml, errors, damage):
    raw = open(w.path(w.good[0]), "rb").read()
    data = {"zero_bytes": b"", "truncated": raw[:len(raw) // 2], "header_only": raw[:8],
            "garbage": b"\x00\xff not a safetensors file at all" * 10}[damage]
    name = w.scratch(f"hard_{damage}.safetensors")
    with open(w.path(name), "wb") as f:
        f.write(data)
    with pytest.raises(errors.LoraFileError, match=rf"^X: LoRA file '{name}' could not be read \(.*\)\. The file is "
                                                   "damaged or incomplete; download it again"):
        ml("host.lora_files").read_lora_file(w.path(name), "X")
    fails_before_sampling(w, "composite", errors.LoraFileError,
                          rf"KSampler \(LoRA Composite\): LoRA file '{name}' could not be read", stack=w.stack([name]))


class _Booby:
    """Unpickling this writes a marker file: proof that a pickle was (or was not) executed."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


@pytest.mark.parametrize("ext", [".ckpt", ".pt", ".bin", ".pth", ".pt-renamed.safetensors"])
def test_pickled_lora_is_refused_and_never_unpickled(w, ml, errors, tmp_path, ext):
    marker = str(tmp_path / f"unpickled{ext}")
    name = w.scratch(f"hard_pickle{ext}")
    torch.save({"lora_unet_x.lora_down.weight": torch.zeros(1, 1), "payload": _Booby(marker)}, w.path(name))
    if ext.endswith(".safetensors"):  # renamed: rejected as unreadable by the safetensors parser
        expected = rf"LoRA file '{re.escape(name)}' could not be read"
    else:
        expected = (rf"'{re.escape(name)}' is not a \.safetensors file\. Pickled LoRA files are refused because "
                    r"loading them can run code; use the \.safetensors version of this LoRA\.")
    with pytest.raises(errors.LoraFileError, match=expected):
        ml("host.lora_files").read_lora_file(w.path(name), "X")
    if ext in (".ckpt", ".pt"):  # listed by ComfyUI, so reachable from the stack node
        assert name in folder_paths.get_filename_list("loras")
    for method in ("switch", "cmlora", "clora"):
        fails_before_sampling(w, method, errors.LoraFileError, expected, stack=w.stack([name, w.good[1]]))
    apply = nodes.NODE_CLASS_MAPPINGS["MultiLoRAApplyStack"]
    with pytest.raises(errors.LoraFileError, match=r"^Apply LoRA Stack: .*" + expected):
        apply.execute(lora_stack=w.stack([name]), model=w.model, clip=w.clip)
    assert not os.path.exists(marker)
    w.assert_clean()


# --- doctored files: the UNet-only test LoRA with one layer (attn1.to_q, 32 → 32, rank 4) changed ---------------
def _doctored(w, change):
    """The UNet-only test LoRA with one layer's tensors changed by ``change(sd, down_key, up_key)``."""
    sd = dict(w.spec.state_dict)
    down = next(k for k in sorted(sd) if k.endswith("attn1_to_q.lora_down.weight"))
    change(sd, down, down.replace("lora_down", "lora_up"))
    return sd


def _poison(value):
    def change(sd, down, up):
        sd[up] = sd[up].clone()
        sd[up][0, 0] = value
    return change


def _set(key, make):
    """Replace tensor ``key`` ('down' or 'up') by ``make(old tensor)``."""
    def change(sd, down, up):
        name = down if key == "down" else up
        sd[name] = make(sd[name])
    return change


def _drop_down(sd, down, up):
    del sd[down]


def _vector_alpha(sd, down, up):
    sd[down.replace("lora_down.weight", "alpha")] = torch.tensor([2.0, 3.0])


def _set_weight(sd, down, up):
    layer = down[: -len(".lora_down.weight")]
    out_dim, in_dim = sd[up].shape[0], sd[down].shape[1]
    for key in [k for k in sd if k.startswith(layer + ".")]:
        del sd[key]
    sd[layer + ".set_weight"] = torch.zeros(out_dim, in_dim)


def _rank_zero(sd, down, up):
    sd[down], sd[up] = torch.zeros(0, sd[down].shape[1]), torch.zeros(sd[up].shape[0], 0)


FILE_LEVEL = r"^{node}: LoRA file '{name}' "  # problems of the file itself: found when it is read
LAYER_LEVEL = r"^{node}: LoRA '{name}' does not fit layer '[\w.]+attn1\.to_q\.weight' \(weight shape \[32, 32\]\): "
MALFORMED = {  # case: (change, error type, message after the prefix, Apply LoRA Stack (core merge) refuses it too)
    "nan": (_poison(float("nan")), "LoraFileError", FILE_LEVEL + r"contains NaN/Inf \(non-finite\) values in "
            r"'[\w.]+attn1_to_q\.lora_up\.weight'; every image made with it would be NaN\. .*use another version", True),
    "inf": (_poison(float("inf")), "LoraFileError", FILE_LEVEL + r"contains NaN/Inf", True),
    "alpha_vector": (_vector_alpha, "LoraFileError", FILE_LEVEL + r"has an alpha with 2 values in '[\w.]+\.alpha'; "
                     r"alpha must be a single number\.", True),
    "no_down": (_drop_down, "LoraFileError", r"^{node}: LoRA '{name}' is missing tensor '[\w.]+attn1_to_q\.lora_down"
                r"\.weight' that another tensor of the same layer needs\. The file is incomplete", True),
    "down_width": (_set("down", lambda t: torch.randn(4, 33)), "LoraFileError",
                   LAYER_LEVEL + r"the down factor of shape \[4, 33\] takes 33 inputs, the layer has 32\. The file is "
                   r"damaged or made for another model", True),
    "up_rows": (_set("up", lambda t: torch.randn(35, 4)), "LoraFileError",
                LAYER_LEVEL + r"the up factor of shape \[35, 4\] gives 35 outputs, the layer has 32", True),
    "rank_mismatch": (_set("down", lambda t: torch.randn(5, 32)), "LoraFileError",
                      LAYER_LEVEL + r"the up factor has rank 4 but the down factor rank 5", True),
    "rank_zero": (_rank_zero, "LoraFileError", LAYER_LEVEL + r"its factors have rank 0", True),
    "scalar_factor": (_set("down", lambda t: torch.tensor(0.5)), "LoraFileError",
                      LAYER_LEVEL + r"its up/down factors must be matrices", True),
    "set_patch": (_set_weight, "UnsupportedAdapterError", r"^{node}: LoRA '{name}' uses a 'set' patch on "
                  r"'[\w.]+attn1\.to_q\.weight', which the on-the-fly engine cannot apply\. Merge it with Apply LoRA "
                  r"Stack", False),
}


@pytest.mark.parametrize("case", MALFORMED)
def test_malformed_file_is_a_clear_error_before_sampling(w, errors, case):
    """Next to a good LoRA, in every sampler node: the error names node and file, 0 UNet calls, nothing left."""
    change, error, message, merge_refuses = MALFORMED[case]
    name = w.put(f"hard_malformed_{case}.safetensors", _doctored(w, change))
    for method, node in NODE_NAMES.items():
        node = "CLoRA" if method == "clora" else node  # KSampler (CLoRA)'s engine messages say "CLoRA: …"
        fails_before_sampling(w, method, getattr(errors, error),
                              message.format(node=re.escape(node), name=re.escape(name)), stack=w.stack([w.good[0], name]))
    if merge_refuses:  # Apply LoRA Stack checks the file as the engine does ('set' patches core can merge)
        with pytest.raises(errors.LoraFileError, match=message.format(node="Apply LoRA Stack", name=re.escape(name))):
            nodes.NODE_CLASS_MAPPINGS["MultiLoRAApplyStack"].execute(lora_stack=w.stack([name]), model=w.model)
    assert torch.isfinite(samples_of(w, "composite", steps=2)).all()  # and the next good run works
    w.assert_clean()


def test_lora_for_another_family_is_an_error_naming_the_family(w, ml, errors):
    name = w.scratch("hard_flux.safetensors")
    lora_files.write_lora(tiny_models.build_tiny("flux"), w.path(name), "kohya", seed=7)
    refresh()
    count = len(ml("host.lora_files").read_lora_file(w.path(name)))
    for method in ("switch", "composite", "cmlora"):
        fails_before_sampling(w, method, errors.LoraFileError,
                              rf"^{re.escape(NODE_NAMES[method])}: LoRA 'hard_flux\.safetensors' matched 0 of its {count} "
                              r"tensors in this SD1\.5 model\. It was probably trained for another model family\. Use a "
                              r"LoRA made for this checkpoint's family\.",
                              stack=w.stack([name]))
    te_only = w.scratch("hard_te_only.safetensors")
    lora_files.write_te_lora(w.clip, w.path(te_only), seed=8)
    refresh()
    fails_before_sampling(w, "composite", errors.LoraFileError, r"matched 0 of its \d+ tensors .* It only has "
                          r"text-encoder weights\.", stack=w.stack([te_only]))


def test_partial_key_overlap_warns_with_counts(w, ml, caplog):
    sd = w.spec.state_dict
    layers = sorted({k.rsplit(".", 2)[0] if k.endswith(".weight") else k.rsplit(".", 1)[0] for k in sd})
    kept = {k: v for k, v in sd.items() if any(k.startswith(layer + ".") for layer in layers[: len(layers) // 2])}
    foreign = {f"lora_unet_input_blocks_9_{i}_proj_in.lora_down.weight": torch.randn(2, 4) for i in range(5)}
    foreign.update({f"lora_unet_input_blocks_9_{i}_proj_in.lora_up.weight": torch.randn(4, 2) for i in range(5)})
    name = w.put("hard_partial.safetensors", {**kept, **foreign})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="multilora"):
        out = samples_of(w, "composite", stack=w.stack([name, w.good[1]]), steps=2)
    assert torch.isfinite(out).all()
    messages = [r.getMessage() for r in caplog.records if name in r.getMessage()]
    assert len(messages) == 1, [r.getMessage() for r in caplog.records]
    assert (f"KSampler (LoRA Composite): LoRA '{name}' matched {len(kept)} of its {len(kept) + len(foreign)} "
            "diffusion-model tensors in this SD1.5 model") in messages[0]
    assert not any(w.good[1] in r.getMessage() for r in caplog.records)  # the full-match LoRA is silent
    w.assert_clean()


def test_alpha_without_factors(w, errors, caplog):
    """Only .alpha keys: nothing to apply → the 0-match error; one stray alpha next to a good LoRA → warning."""
    sd = w.spec.state_dict
    alphas = w.put("hard_alpha_only.safetensors", {k: v for k, v in sd.items() if k.endswith(".alpha")})
    fails_before_sampling(w, "composite", errors.LoraFileError, rf"LoRA '{alphas}' matched 0 of its \d+ tensors",
                          stack=w.stack([alphas]))
    stray = w.put("hard_alpha_stray.safetensors", {**sd, "lora_unet_input_blocks_9_0_proj_in.alpha": torch.tensor(4.0)})
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="multilora"):
        out = samples_of(w, "switch", stack=w.stack([stray]), steps=2)
    assert torch.isfinite(out).all()
    assert any(f"matched {len(sd)} of its {len(sd) + 1}" in r.getMessage() for r in caplog.records)
    w.assert_clean()


def test_no_alpha_means_alpha_equals_rank_like_core(w, ml):
    """Factors without .alpha (a common export): scale 1, exactly as ComfyUI's own LoraLoader merges them. On a
    model of its own: core's merge leaves its parameters with requires_grad=False, which World.assert_clean flags."""
    s, engine = ml("core.stack"), ml("host.engine")
    model = tiny_models.build_tiny("sd15", seed=0)
    no_alpha = w.put("hard_no_alpha.safetensors", {k: v for k, v in w.spec.state_dict.items() if not k.endswith(".alpha")})
    with_alpha = w.put("hard_with_alpha.safetensors", w.spec.state_dict)  # alpha 2, rank 4: scale 0.5
    merged = nodes.NODE_CLASS_MAPPINGS["MultiLoRAApplyStack"].execute(
        lora_stack=s.LoraStack((s.LoraRow(no_alpha, 0.7),)), model=model).result[0]
    reference = base_sample(merged)
    on_the_fly = {name: base_sample(engine.clone_with_engine(model, engine.build_engine(model, (s.LoraRow(name, 0.7),), "t")))
                  for name in (no_alpha, with_alpha)}
    torch.testing.assert_close(on_the_fly[no_alpha], reference, atol=RUN_TOL, rtol=RUN_TOL)
    assert (on_the_fly[with_alpha] - reference).abs().max() > 1e-3


# --- dense adapters (LoHa here) whose factors do not fit: ComfyUI logs and leaves W unchanged; the pack refuses ---
def _loha_doctored(w, tensor, make):
    """The UNet-only test LoHa with ``tensor`` of its attn1.to_q layer replaced by ``make(old tensor)``."""
    sd = dict(lora_files.build_lora(w.model, "loha", seed=305).state_dict)
    key = next(k for k in sorted(sd) if k.endswith(f"attn1_to_q.{tensor}"))
    sd[key] = make(sd[key])
    return sd


LOHA_MISFIT = {  # case: (tensor, new value, the problem after LAYER_LEVEL)
    # the Hadamard product of a 32×32 and a 32×33 factor: ComfyUI's own try/except logs it, W stays unchanged
    "loha_width": ("hada_w2_b", lambda t: torch.randn(t.shape[0], 33),
                   r"ComfyUI's loha adapter could not apply its weights \(The size of tensor a \(32\) must match"),
    # w1a @ w1b with ranks 4 and 5: raised by ComfyUI before its try/except
    "loha_rank": ("hada_w1_b", lambda t: torch.randn(t.shape[0] + 1, t.shape[1]),
                  r"ComfyUI's loha adapter could not apply its weights \(RuntimeError: "),
}


@pytest.mark.parametrize("case", LOHA_MISFIT)
def test_dense_adapter_that_does_not_fit_is_an_error_not_a_silent_zero(w, errors, case):
    """Before: that layer's ΔW was silently 0 (ComfyUI only logs "ERROR loha …"). Now every sampler node and
    Apply LoRA Stack fail before sampling with the layer named, and the next good run works."""
    tensor, make, problem = LOHA_MISFIT[case]
    name = w.put(f"hard_loha_{case}.safetensors", _loha_doctored(w, tensor, make))
    for method, node in NODE_NAMES.items():
        node = "CLoRA" if method == "clora" else node
        fails_before_sampling(w, method, errors.LoraFileError,
                              LAYER_LEVEL.format(node=re.escape(node), name=re.escape(name)) + problem,
                              stack=w.stack([w.good[0], name]))
    with pytest.raises(errors.LoraFileError, match=LAYER_LEVEL.format(node="Apply LoRA Stack", name=re.escape(name)) + problem):
        nodes.NODE_CLASS_MAPPINGS["MultiLoRAApplyStack"].execute(lora_stack=w.stack([name]), model=w.model)
    assert torch.isfinite(samples_of(w, "composite", steps=2)).all()
    w.assert_clean()
