"""testbed/regional_variants.py: the variant grammar, the background rules of the oracle masks and the paired
differences to Merge (the sampling itself is the evaluation's, tested in test_testbed_eval)."""
from __future__ import annotations

import os
import sys

import pytest
import torch

from support.pack_loader import REPO_ROOT

TESTBED = os.path.join(REPO_ROOT, "testbed")


@pytest.fixture(scope="module")
def variants(comfy_state):
    if TESTBED not in sys.path:
        sys.path.insert(0, TESTBED)  # the testbed folder only: the repo root must stay off sys.path
    import regional_variants
    return regional_variants


def test_every_default_variant_parses_and_bad_ones_are_refused(variants):
    assert [variants.parse(v)[0] for v in variants.DEFAULT_VARIANTS].count("auto") == 4
    for bad in ("oracle:all", "oracle:all:attention", "auto:all:slots", "oracle:some:rest"):
        with pytest.raises(SystemExit, match="bad variant"):
            variants.parse(bad)


def test_background_rules(variants):
    import world
    cats = ("character", "background")
    rest = variants.oracle_masks(cats, "rest")[1]
    slots = variants.oracle_masks(cats, "slots")[1]
    left, right = world.slot_region("left"), world.slot_region("right")
    assert torch.equal(rest, 1 - left) and torch.equal(slots, 1 - torch.maximum(left, right))
    assert variants.oracle_masks(cats, "everywhere")[1] is None
    assert torch.equal(variants.oracle_masks(("character", "object"), "slots")[1], right)  # no background row


def test_paired_differences_to_merge_on_the_same_prompts(variants):
    entries = {"merge": {"per_prompt_all": [0.0, 0.5, 1.0, 0.25]},
               "oracle:all:rest": {"per_prompt_all": [0.25, 0.5, 1.0, 0.5]},
               "oracle:all:slots": {"per_prompt_all": [0.0, 0.5]}}  # fewer prompts: no pairing
    out = variants.with_pairs(entries)
    mean, low, high = out["oracle:all:rest"]["vs_merge"]
    assert mean == pytest.approx(0.125) and 0.0 <= low <= mean <= high <= 0.25
    assert "vs_merge" not in out["oracle:all:slots"] and "vs_merge" not in out["merge"]
