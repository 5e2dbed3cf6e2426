"""Hardening, the LoRA stack: empty, all off, one row, 17 rows, duplicated rows, odd strengths and names.

Issue case → test
- stack empty / all off → test_empty_and_all_off_stacks, test_other_nodes_on_empty_stacks
- 1 row for a multi-LoRA method → test_one_row_is_that_lora_alone (Switch/Composite/CMLoRA: documented fallback),
  test_clora_with_one_concept_row (CLoRA needs 2 concepts: StackError)
- 16+ rows → test_seventeen_rows_from_two_chained_stack_nodes_through_the_executor
- strengths 0 / negative / huge → test_strengths_zero_negative_and_huge,
  test_stack_node_strength_beyond_limits_is_rejected_by_validation, test_stack_node_rejects_nan_strength_through_the_executor,
  test_stack_strength_weighting_with_all_zero_strengths_names_the_input
- Unicode and spaces in file names and concept words → test_unicode_and_spaces_in_file_names_and_concept_words
- duplicated LoRA in the stack → test_duplicated_lora_in_the_stack
- bad rows of the stack node itself → test_stack_node_bad_rows
"""
import os
import re

import pytest
import torch

import folder_paths
import nodes

from support import lora_files
from support.executor import CAPTURED, PromptFailed, capture, run_prompt
from support.hardening import (  # noqa: F401
    CFG,
    METHODS,
    NODE_NAMES,
    RUN_TOL,
    UNICODE_NAME,
    base_sample,
    errors,
    fails_before_sampling,
    forget_dead_loaded_models,
    refresh,
    register_inputs,
    run_all,
    sample,
    sampler_node,
    samples_of,
    stack_rows,
    w,
)


@pytest.mark.parametrize("method", METHODS)
def test_empty_and_all_off_stacks(w, ml, errors, method):
    s = ml("core.stack")
    node = re.escape(NODE_NAMES[method])
    fails_before_sampling(w, method, errors.StackError, rf"^{node}: the LoRA stack is empty\. Connect a LoRA Stack",
                          stack=s.LoraStack(()))
    off = s.LoraStack(tuple(s.LoraRow(n, enabled=False) for n in w.good))
    fails_before_sampling(w, method, errors.StackError, rf"^{node}: every row of the LoRA stack is switched off\. "
                          r"Switch at least \d row\(s\) on\.", stack=off)


def test_other_nodes_on_empty_stacks(w, ml, errors):
    s = ml("core.stack")
    empty = s.LoraStack(())
    with pytest.raises(errors.StackError, match=r"^LoRA Switch: the LoRA stack is empty"):
        nodes.NODE_CLASS_MAPPINGS["MultiLoRASwitch"].execute(model=w.model, lora_stack=empty, switch_every=2)
    with pytest.raises(errors.StackError, match=r"^LoRA Composite Guider: the LoRA stack is empty"):
        nodes.NODE_CLASS_MAPPINGS["MultiLoRACompositeGuider"].execute(
            model=w.model, lora_stack=empty, positive=[], negative=[], cfg=CFG)
    with pytest.raises(errors.StackError, match=r"^LoRA Frequency Profile: the LoRA stack is empty"):
        nodes.NODE_CLASS_MAPPINGS["MultiLoRAFrequencyProfile"].execute(lora_stack=empty, images=torch.rand(1, 8, 8, 3))
    # Apply LoRA Stack: an empty stack is documented as a no-op merge (the inputs come back unchanged)
    model, clip = nodes.NODE_CLASS_MAPPINGS["MultiLoRAApplyStack"].execute(lora_stack=empty, model=w.model, clip=w.clip).result
    assert model is w.model and clip is w.clip
    with pytest.raises(errors.StackError, match=r"^Apply LoRA Stack: connect 'model', 'clip' or both\."):
        nodes.NODE_CLASS_MAPPINGS["MultiLoRAApplyStack"].execute(lora_stack=w.stack())
    w.assert_clean()


def test_stack_node_bad_rows(w, ml, errors):
    node = nodes.NODE_CLASS_MAPPINGS["MultiLoRAStack"]
    with pytest.raises(errors.StackError, match=r"^LoRA Stack: row 2 has no LoRA file selected\. Pick a file in "
                                                r"'lora_2', switch the row off, or lower 'rows' to 1\."):
        node.execute(rows=2, lora_1=w.good[0], lora_2="None")
    with pytest.raises(errors.StackError, match=r"^LoRA Stack: row 1: LoRA file 'nope\.safetensors' was not found"):
        node.execute(rows=1, lora_1="nope.safetensors")
    with pytest.raises(errors.InputError, match=r"^LoRA Stack: row 1: 'category_1' is 'hero', which is not an option\. "
                                                r"Pick one of: 'character', 'clothing', 'style', 'background', "
                                                r"'object', 'other'\.$"):
        node.execute(rows=1, lora_1=w.good[0], category_1="hero")
    with pytest.raises(errors.InputError, match=r"^LoRA Stack: 'lora_stack' must come from a LoRA Stack node, got "
                                                r"\['not', 'a', 'stack'\] \(list\)\. Connect a LoRA Stack node to it\.$"):
        node.execute(rows=1, lora_1=w.good[0], lora_stack=["not", "a", "stack"])
    stack = node.execute(rows=2, lora_1=f"  {w.good[0]}  ", lora_2="None", on_2=False).result[0]  # off + empty: skipped
    assert [r.name for r in stack.rows] == [w.good[0]]


def test_stack_node_strength_beyond_limits_is_rejected_by_validation(w):
    prompt = {"s": {"class_type": "MultiLoRAStack", "inputs": {"rows": 1, "lora_1": w.good[0], "strength_model_1": 1e9}},
              "c": capture(["s", 0], "limits")}
    with pytest.raises(PromptFailed, match="strength_model_1"):
        run_prompt(prompt)


@pytest.mark.parametrize("field", ["strength_model_1", "strength_clip_1"])
def test_stack_node_rejects_nan_strength_through_the_executor(w, field):
    """NaN passes ComfyUI's min/max validation (every comparison is False); the stack node must refuse it."""
    prompt = {"s": {"class_type": "MultiLoRAStack", "inputs": {"rows": 1, "lora_1": w.good[0], field: float("nan")}},
              "c": capture(["s", 0], "nan_strength")}
    with pytest.raises(PromptFailed, match=rf"LoRA Stack: row 1: '{field}' is nan, not a number\. Set a value "
                                           r"from -100 to 100\."):
        run_prompt(prompt)


def test_clora_with_one_concept_row(w, ml, errors):
    s = ml("core.stack")
    one = s.LoraStack((s.LoraRow(w.good[0], concept="cat"),))
    fails_before_sampling(w, "clora", errors.StackError, r"^KSampler \(CLoRA\): needs at least 2 enabled LoRAs, the "
                          r"stack has 1\. Add or enable rows\.", stack=one)
    one_plus_style = s.LoraStack((s.LoraRow(w.good[0], concept="cat"), s.LoraRow(w.good[2], category="style")))
    fails_before_sampling(w, "clora", errors.MultiLoRAError, r"^CLoRA: needs at least 2 LoRAs with concept words, the "
                          r"stack has 1\.", stack=one_plus_style)
    no_word = s.LoraStack((s.LoraRow(w.good[0], concept="cat"), s.LoraRow(w.good[1], concept=" , ")))
    fails_before_sampling(w, "clora", errors.MultiLoRAError, rf"^CLoRA: LoRA '{w.good[1]}' has no concept word\.",
                          stack=no_word)


def test_seventeen_rows_from_two_chained_stack_nodes_through_the_executor(w, ml):
    register_inputs(w)
    names = []
    for i in range(17):
        name = f"hard_many_{i:02d}.safetensors"
        if not os.path.exists(w.path(name)):
            lora_files.write_lora(w.model, w.path(name), "kohya", seed=400 + i, rank=2, targets="attn")
        names.append(name)
    refresh()
    prompt = {
        "in": {"class_type": "TestHardeningInputs", "inputs": {"key": "hard"}},
        "s1": {"class_type": "MultiLoRAStack", "inputs": stack_rows(names[:10])},
        "s2": {"class_type": "MultiLoRAStack", "inputs": {**stack_rows(names[10:]), "lora_stack": ["s1", 0]}},
        "comp": sampler_node("MultiLoRACompositeSampler", ["s2", 0], weighting="uniform"),
        "sw": sampler_node("MultiLoRASwitchSampler", ["s2", 0], switch_every=1, steps=3),
        "cml": sampler_node("MultiLoRACMLoRASampler", ["s2", 0], cache="on", stage_switch=0.55,
                             ordering="stack categories"),
        "c0": capture(["s2", 0], "many_stack"), "c1": capture(["comp", 0], "many_comp"),
        "c2": capture(["sw", 0], "many_sw"), "c3": capture(["cml", 0], "many_cml"),
    }
    run_all(prompt)
    stack = CAPTURED["many_stack"]
    assert [r.name for r in stack.rows] == names
    for label in ("many_comp", "many_sw", "many_cml"):
        out = CAPTURED[label]["samples"]
        assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()
    reference = ml("methods.switch_composite").composite_model(w.model, stack.active(), None, "t")
    torch.testing.assert_close(CAPTURED["many_comp"]["samples"], sample(reference, steps=2), atol=RUN_TOL, rtol=RUN_TOL)
    assert len(ml("host.lora_files")._cache) <= ml("host.lora_files").CACHE_ENTRIES
    w.assert_clean()


@pytest.mark.parametrize("method", ["switch", "composite", "cmlora"])
def test_strengths_zero_negative_and_huge(w, ml, method):
    s = ml("core.stack")
    rows = lambda *st: s.LoraStack(tuple(s.LoraRow(n, v, category=c) for n, v, c in
                                         zip(w.good, st, ("character", "background", "style"))))
    no_cache = dict(cache="off") if method == "cmlora" else {}  # the cache's stale deep features are not exact
    zero = samples_of(w, method, stack=rows(0.0, 0.0), **no_cache)
    plain = sample(w.model)
    torch.testing.assert_close(zero, plain, atol=RUN_TOL, rtol=RUN_TOL)  # strength 0 = the LoRA is not there
    negative = samples_of(w, method, stack=rows(-1.0, -0.7))
    assert torch.isfinite(negative).all() and (negative - plain).abs().max() > 1e-2
    huge = samples_of(w, method, stack=rows(100.0, -100.0))  # the stack node's limits: no crash
    assert huge.shape == (1, 4, 8, 8)
    beyond = samples_of(w, method, stack=rows(1e6, 1e6))
    assert beyond.shape == (1, 4, 8, 8)
    w.assert_clean()


def test_stack_strength_weighting_with_all_zero_strengths_names_the_input(w, ml, errors):
    s = ml("core.stack")
    zero = s.LoraStack(tuple(s.LoraRow(n, 0.0) for n in w.good[:2]))
    fails_before_sampling(w, "composite", errors.StackError, r"^KSampler \(LoRA Composite\): weighting 'stack strengths' "
                          r"needs a non-zero model strength on at least one enabled row, but every strength is 0\. Set a "
                          r"strength or use weighting 'uniform'\.", stack=zero, weighting="stack strengths")
    with pytest.raises(errors.StackError, match=r"^LoRA Composite Guider: weighting 'stack strengths' needs"):
        nodes.NODE_CLASS_MAPPINGS["MultiLoRACompositeGuider"].execute(
            model=w.model, lora_stack=zero, positive=[], negative=[], cfg=CFG, weighting="stack strengths")


@pytest.mark.parametrize("method", ["switch", "composite", "cmlora"])
def test_one_row_is_that_lora_alone(w, ml, method):
    """Documented fallback: a one-row stack samples exactly like that LoRA applied alone (CMLoRA: weight 1)."""
    s, engine = ml("core.stack"), ml("host.engine")
    row = s.LoraRow(w.good[1], 0.9, category="background")
    alone = sample(engine.clone_with_engine(w.model, engine.build_engine(w.model, (row,), "t")))
    exact = dict(cache="off") if method == "cmlora" else {}  # the cache reuses stale deep features by design
    torch.testing.assert_close(samples_of(w, method, stack=s.LoraStack((row,)), **exact), alone, atol=RUN_TOL, rtol=RUN_TOL)
    if method == "cmlora":
        assert torch.isfinite(samples_of(w, method, stack=s.LoraStack((row,)), cache="on")).all()
    w.assert_clean()


def test_unicode_and_spaces_in_file_names_and_concept_words(w, ml):
    register_inputs(w)
    assert UNICODE_NAME in folder_paths.get_filename_list("loras")
    prompt = {
        "in": {"class_type": "TestHardeningInputs", "inputs": {"key": "hard"}},
        "s": {"class_type": "MultiLoRAStack", "inputs": {
            "rows": 2, "lora_1": UNICODE_NAME, "concept_1": " café ", "trigger_1": "sks",
            "category_1": "character", "lora_2": w.good[1], "concept_2": "petit chien", "category_2": "object"}},
        "sw": sampler_node("MultiLoRASwitchSampler", ["s", 0], switch_every=1),
        "cl": {"class_type": "MultiLoRACLoRASampler", "inputs": {
            "model": ["in", 0], "clip": ["in", 1], "lora_stack": ["s", 0], "prompt": "un café et un petit  chien, mädchen",
            "negative_prompt": "flou", "seed": 1, "steps": 2, "cfg": CFG, "sampler_name": "euler",
            "scheduler": "normal", "latent_image": ["in", 4], "denoise": 1.0, "mask_threshold": 0.4,
            "temperature": 0.5, "step_size": 20.0, "opt_until": 0.5, "refine_iters": 1}},
        "c0": capture(["s", 0], "uni_stack"), "c1": capture(["sw", 0], "uni_sw"), "c2": capture(["cl", 0], "uni_cl"),
        "c3": capture(["cl", 2], "uni_masks"),
    }
    run_all(prompt)
    assert CAPTURED["uni_stack"].rows[0].name == UNICODE_NAME
    assert [r.concept_words() for r in CAPTURED["uni_stack"].rows] == [("café",), ("petit chien",)]  # a 2-word concept
    assert torch.isfinite(CAPTURED["uni_sw"]["samples"]).all() and torch.isfinite(CAPTURED["uni_cl"]["samples"]).all()
    assert CAPTURED["uni_masks"].shape == (2, 64, 64)
    assert ml("host.lora_files").resolve_lora_path(UNICODE_NAME).endswith(UNICODE_NAME)
    w.assert_clean()


def test_duplicated_lora_in_the_stack(w, ml):
    """Observed and asserted: a row repeated in the stack is kept as two LoRAs. On the fly (all rows at once)
    that is the strength doubled; Switch/Composite/CMLoRA treat the copies as two equal members, so
    [A, A] samples like [A] alone and [A, A, B] gives A twice B's weight."""
    s = ml("core.stack")
    name = w.good[0]
    rows = lambda *strengths: tuple(s.LoraRow(name, st) for st in strengths)
    engine = ml("host.engine")
    twice = engine.clone_with_engine(w.model, engine.build_engine(w.model, rows(0.5, 0.5), "t"))
    double = engine.clone_with_engine(w.model, engine.build_engine(w.model, rows(1.0), "t"))
    torch.testing.assert_close(base_sample(twice), base_sample(double), atol=RUN_TOL, rtol=RUN_TOL)
    assert (base_sample(double) - w.fresh).abs().max() > 1e-2
    for method in ("switch", "composite", "cmlora"):
        exact = dict(cache="off") if method == "cmlora" else {}  # the feature cache's staleness depends on k
        pair = samples_of(w, method, stack=s.LoraStack(rows(0.8, 0.8)), **exact)
        single = samples_of(w, method, stack=s.LoraStack(rows(0.8)), **exact)
        torch.testing.assert_close(pair, single, atol=RUN_TOL, rtol=RUN_TOL)
    a, b = s.LoraRow(name, 0.8), s.LoraRow(w.good[1], 0.8)
    abb = samples_of(w, "composite", stack=s.LoraStack((a, a, b)))
    two_to_one = ml("methods.switch_composite").composite_model(w.model, (a, b), [2.0, 1.0], "t")
    torch.testing.assert_close(abb, sample(two_to_one), atol=RUN_TOL, rtol=RUN_TOL)
    assert (abb - samples_of(w, "composite", stack=s.LoraStack((a, b)))).abs().max() > 1e-3  # 2:1, not 1:1
