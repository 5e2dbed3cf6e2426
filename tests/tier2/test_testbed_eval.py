"""The testbed evaluation harness (testbed/eval_core.py) on both v3 testbeds, with LoRA files in train.py's layout.

Plumbing, not numbers (1–2 sampling steps, one seed): the k = 1 reference rows (base and merge, every category),
a method's time budget and its error recording, CLoRA counted as not applicable on the DiT, the regional rows'
oracle masks (one per row, at latent resolution) reaching the regional method's entry point.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

from support.pack_loader import REPO_ROOT

TESTBED = os.path.join(REPO_ROOT, "testbed")
WEIGHTS = os.path.join(TESTBED, "weights")
CATEGORIES = ("character", "clothing", "background", "object", "style")


@pytest.fixture(scope="module")
def core():
    if TESTBED not in sys.path:
        sys.path.insert(0, TESTBED)  # the testbed folder only: the repo root must stay off sys.path
    import eval_core
    return eval_core


@pytest.fixture(scope="module", params=["unet", "dit"])
def ctx(request, ml, core, tmp_path_factory):
    from safetensors.torch import save_file

    import folder_paths

    import detector
    import objectives
    import train
    arch = request.param
    model, clip = objectives.load(arch, WEIGHTS, torch.device("cpu"))
    loras = tmp_path_factory.mktemp(f"loras_{arch}")
    gen = torch.Generator().manual_seed(0)
    for c in CATEGORIES:
        layers = {n: train.LoraLayer(m, 2, gen) for n, m in objectives.lora_targets(arch, model.model.diffusion_model).items()}
        save_file(train.kohya_state(arch, model, layers, 2), str(loras / objectives.lora_file(arch, c)))
    folder_paths.add_model_folder_path("loras", str(loras))
    net = detector.load_detector(os.path.join(WEIGHTS, "detector.safetensors"))
    return {"ml": ml, "model": model, "clip": clip, "net": net, "arch": arch}


def test_k1_reference_rows_cover_every_category(core, ctx):
    import eval_report
    assert core.methods_for(1, ["clora", "switch"]) == ["merge"]
    assert core.methods_for(1, ["base", "merge", "clora"]) == ["base", "merge"]
    assert core.methods_for(2, ["base", "clora", "switch"]) == ["clora", "switch"]
    prompts = core.composition_prompts(1, 5)
    assert [cats for cats, _, _ in prompts] == [(c,) for c in CATEGORIES]
    for cats, prompt, expected in prompts:
        assert core.world.TRIGGERS[cats[0]] in prompt and expected
    entry, images = core.run_method("merge", 1, prompts, ctx, seeds=1, steps=1)
    assert "error" not in entry and entry["prompts_covered"] == 5 and len(images) == 5
    assert images[0].shape == (3, 64, 64)
    for c in CATEGORIES:
        mean, low, high = entry[f"has_{c}"]
        assert 0.0 <= low <= mean <= high <= 1.0
    report = eval_report.markdown({"meta": {"arch": ctx["arch"]}, "k": {"1": {"prompts": [p for _, p, _ in prompts],
                                                                               "methods": {"merge": entry}}}}, ["merge"])
    row = next(line for line in report.splitlines() if line.startswith("| merge |"))
    assert f"Testbed: {ctx['arch']}" in report and "—" not in row and "| 5/5 |" in row


def test_budgets_errors_and_clora_applicability(core, ctx, capsys):
    prompts = core.composition_prompts(2, 3)
    entry, _ = core.run_method("merge", 2, prompts, ctx, budget=1e-6, seeds=1, steps=1)
    assert entry["stopped_early"] and entry["prompts_covered"] == 1 and "all" in entry
    entry, _ = core.run_method("no-such-method", 2, prompts, ctx, seeds=1, steps=1)
    assert entry["error"].startswith("ValueError: testbed: unknown method") and "Traceback" in capsys.readouterr().err
    style_set = core.composition_prompts(2, 4)[3:]  # {character, style}: one concept word, outside CLoRA
    assert style_set[0][0] == ("character", "style")
    entry, _ = core.run_method("clora", 2, style_set, ctx, seeds=1, steps=1)
    assert entry["not_applicable"] == 1 and "error" not in entry
    if ctx["arch"] == "dit":  # no cross-attention: every CLoRA prompt is outside it, none is sampled
        entry, _ = core.run_method("clora", 2, prompts, ctx, seeds=1, steps=1)
        assert entry["not_applicable"] == 3 and "all" not in entry and "error" not in entry


def test_regional_rows_get_one_oracle_mask_per_row(core, ctx, monkeypatch):
    """The oracle row hands ``regional_model`` the scene's regions (latent resolution, None = everywhere) in row
    order; with the pack's regional method present it samples, otherwise the harness reports it absent."""
    seen = {}
    if not core.regional_available(ctx["ml"]):
        pytest.skip("the pack has no methods/regional.py yet: evaluate.py skips the regional rows with a note")
    regional = ctx["ml"]("methods.regional")
    real = regional.regional_model

    def spy(model, rows, masks, node, **kwargs):
        seen["rows"], seen["masks"], seen["text"] = [r.category for r in rows], masks, kwargs.get("text_tokens")
        return real(model, rows, masks, node, **kwargs)
    monkeypatch.setattr(regional, "regional_model", spy)
    prompts = core.composition_prompts(4, 1)  # character + clothing + background + object
    entry, images = core.run_method("regional_oracle", 4, prompts, ctx, seeds=1, steps=1)
    assert "error" not in entry, entry.get("error")
    assert seen["rows"] == list(prompts[0][0])
    assert [m is None for m in seen["masks"]] == [False] * 4
    assert all(m.shape == (64, 64) for m in seen["masks"])
    regions = ctx["ml"]("core.regions")
    assert seen["text"] == regions.TEXT_ALL
    entry, _ = core.run_method("regional_oracle_no_text", 4, prompts, ctx, seeds=1, steps=1)
    assert "error" not in entry, entry.get("error")
    assert seen["text"] == regions.TEXT_NONE
    # automatic masks on either testbed (the DiT's text encoder is CLIP-L only): recorded, set, sampled
    entry, _ = core.run_method("regional_auto", 2, core.composition_prompts(2, 1), ctx, seeds=1, steps=4)
    assert "error" not in entry, entry.get("error")
    assert entry["prompts_covered"] == 1
