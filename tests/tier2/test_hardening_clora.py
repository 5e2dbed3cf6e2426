"""Hardening, CLoRA prompts and settings.

Issue case → test
- concept word missing → test_clora_concept_word_missing_is_an_error_before_sampling
- concept word repeated / inside weights syntax → test_clora_odd_prompts[repeated|weighted]
- prompt > 150 tokens (and a trigger pushing the prompt into a 2nd CLIP chunk) → test_clora_odd_prompts[long|
  trigger_crosses_chunk]
- λ 0 and 1 → test_clora_mask_threshold_ends[0.0|1.0]
- opt_until 0 → test_clora_opt_until_zero_runs_no_update
- denoise 0 (no step runs) → test_clora_denoise_zero_gives_empty_masks
- out-of-range settings → test_clora_out_of_range_settings
"""
import pytest
import torch

import nodes

from support.hardening import errors, fails_before_sampling, forget_dead_loaded_models, run_node, w  # noqa: F401


def test_clora_concept_word_missing_is_an_error_before_sampling(w, errors):
    fails_before_sampling(w, "clora", errors.ConceptNotFoundError,
                          r"^CLoRA: concept word 'dog' is not in the prompt 'a cat and a puppy'\. Use a word that "
                          r"appears in the prompt\.", prompt="a cat and a puppy")
    fails_before_sampling(w, "clora", errors.ConceptNotFoundError, r"concept word 'cat' is not in the prompt",
                          prompt="a category of dogs and a dog")  # whole words only


def _long_prompt(clip, target_tokens):
    words = "a cat and a dog"
    filler = ["highly", "detailed", "painting", "sunny", "meadow"]
    i = 0
    while len(content_tokens(clip, words)) < target_tokens:
        words += " " + filler[i % len(filler)]
        i += 1
    return words


def content_tokens(clip, text):
    """The prompt's CLIP token ids without BOS/EOS/padding."""
    rows = clip.tokenize(text)["l"]
    return [t[0] for row in rows for t in row[1:] if t[0] not in (49406, 49407)]


@pytest.mark.parametrize("prompt", ["repeated", "weighted", "long", "trigger_crosses_chunk"])
def test_clora_odd_prompts(w, prompt):
    text = {"repeated": "a cat and a dog, the cat sleeps, cat cat",
            "weighted": "a (cat:1.2) and a ((dog)), (blurry:0.5)",
            "long": _long_prompt(w.clip, 160),
            "trigger_crosses_chunk": _long_prompt(w.clip, 75)}[prompt]
    if prompt == "trigger_crosses_chunk":  # 75 content tokens: the variant with trigger 'sks' needs a 2nd chunk
        assert len(content_tokens(w.clip, text)) == 75
    if prompt == "long":
        assert len(content_tokens(w.clip, text)) > 150
    latent, record, masks = run_node(w, "clora", prompt=text, steps=3)
    assert torch.isfinite(latent["samples"]).all() and masks.shape == (2, 64, 64)
    assert record.losses and all(torch.isfinite(torch.tensor(record.losses)))
    assert all(m.sum() > 0 for m in record.final_masks)
    w.assert_clean()


@pytest.mark.parametrize("threshold", [0.0, 1.0])
def test_clora_mask_threshold_ends(w, threshold):
    latent, record, masks = run_node(w, "clora", mask_threshold=threshold, steps=3)
    assert torch.isfinite(latent["samples"]).all()
    if threshold == 0.0:
        assert bool(record.final_masks.all())  # full masks: a Composite over the variants
    else:
        assert all(0 < m.sum() < m.numel() for m in record.final_masks)  # each map's arg-max only
    w.assert_clean()


def test_clora_opt_until_zero_runs_no_update(w):
    latent, record, _ = run_node(w, "clora", opt_until=0.0, refine_iters=5, steps=3)
    assert record.losses == [] and torch.isfinite(latent["samples"]).all() and len(record.steps) == 3
    w.assert_clean()


def test_clora_out_of_range_settings(w, errors):
    fails_before_sampling(w, "clora", ValueError,
                          r"^KSampler \(CLoRA\): 'mask_threshold' is -0\.1, out of range\. Set a value from 0 to 1\.",
                          mask_threshold=-0.1)
    fails_before_sampling(w, "clora", errors.MultiLoRAError,
                          r"^KSampler \(CLoRA\): 'opt_until' is 1\.5, out of range\. Set a value from 0 to 1\.",
                          opt_until=1.5)


def test_clora_denoise_zero_gives_empty_masks(w):
    """No step runs: the latent comes back unchanged (as core KSampler), the masks are empty and Mask Preview
    says that the run stored no maps."""
    latent = {"samples": torch.randn(1, 4, 8, 8)}
    out, record, masks = run_node(w, "clora", latent=latent, denoise=0.0)
    assert torch.equal(out["samples"], latent["samples"]) and masks.shape == (2, 64, 64) and not masks.any()
    with pytest.raises(ValueError, match=r"^CLoRA Mask Preview: the run stored no attention maps \(no sampling step ran, "
                                         r"e\.g\. denoise 0\)\. Sample with denoise > 0\.$"):
        nodes.NODE_CLASS_MAPPINGS["MultiLoRAMaskPreview"].execute(attention_maps=record, mask_threshold=0.4, step=-1,
                                                                  average_steps=False)
    w.assert_clean()
