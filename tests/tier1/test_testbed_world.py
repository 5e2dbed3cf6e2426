"""testbed/world.py v3 (pure torch): class captions, trigger + class captions, and the oracle region masks.

The regional method's oracle row trusts ``world.region_masks`` to say where the scene generator puts each
concept; these checks render many jittered scenes and require every concept pixel to fall inside its region.
"""
from __future__ import annotations

import os
import sys

import pytest
import torch

TESTBED = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "testbed")


@pytest.fixture(scope="module")
def world():
    if TESTBED not in sys.path:
        sys.path.insert(0, TESTBED)
    import world
    return world


def concept_pixels(world, category, count=64, seed=0):
    """Bool [B, H, W]: pixels that change when the scene's ``category`` concept is taken out (same jitter)."""
    gen = torch.Generator().manual_seed(seed)
    scenes = world.random_scenes(count, gen, (category,))
    without = world.SceneBatch(**{f: getattr(scenes, f).clone() for f in world.SceneBatch.__dataclass_fields__})
    if category == "character":
        without.left.zero_()
    elif category == "object":
        without.right.zero_()
    elif category == "clothing":
        without.vest.zero_()
    else:
        without.background.zero_()
    a = world.render(scenes, torch.Generator().manual_seed(seed + 1))
    b = world.render(without, torch.Generator().manual_seed(seed + 1))
    return (a - b).abs().amax(1) > 1e-4


@pytest.mark.parametrize("category", ["character", "object", "clothing"])
def test_every_concept_pixel_lies_in_its_oracle_region(world, category):
    region = world.region_masks([category])[0]
    pixels = concept_pixels(world, category)
    assert pixels.any(dim=(1, 2)).all()
    assert not (pixels & (region[None] < 0.5)).any()
    assert 0.1 < float(region.mean()) < 0.4  # a slot, not the whole image


def test_background_region_avoids_the_other_concepts_slots_and_style_is_everywhere(world):
    masks = world.region_masks(["character", "object", "background", "style"])
    assert masks[3] is None
    assert float((masks[2] * (masks[0] + masks[1])).sum()) == 0.0
    assert float(masks[2].mean()) > 0.3
    character, background = world.region_masks(["character", "background"])  # the right slot holds a plain object
    right_only = world.slot_region("right") * (1 - character)
    assert float((background * character).sum()) == 0.0 and torch.equal(background * right_only, right_only)
    small = world.region_masks(["character", "background"], size=16)
    assert small[0].shape == (16, 16) and float(small[0][:, :8].mean()) > float(small[0][:, 8:].mean())


def test_base_captions_name_classes_and_lora_captions_trigger_plus_class(world):
    gen = torch.Generator().manual_seed(3)
    base = world.random_scenes(400, gen)
    texts = [world.caption(base, i) for i in range(len(base))]
    assert not any(t in text for text in texts for t in world.TRIGGERS.values())
    for word in ("creature", "lamp", "vest", "wall background"):
        assert any(word in text for text in texts), word
    assert not base.has("character").any() and base.has_class("character").any()
    expected = {"character": "a zorb creature", "clothing": "wearing a plaid vest", "object": "a lantern lamp",
                "background": "brick wall background", "style": "duotone style"}
    for category, phrase in expected.items():
        scenes = world.random_scenes(8, gen, (category,))
        assert scenes.has(category).all() and scenes.has_class(category).all()
        assert all(phrase in world.caption(scenes, i) for i in range(8)), category


def test_plain_vests_never_take_the_wearers_colour(world):
    scenes = world.random_scenes(500, torch.Generator().manual_seed(4))
    worn = scenes.vest == 1
    assert worn.any() and not (scenes.vest_colour[worn] == scenes.left_colour[worn]).any()
