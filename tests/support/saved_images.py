"""What a workflow's Save Image writes, for the tests that run every example workflow (tiers 2 and 3)."""
from __future__ import annotations

COMPARE_LABEL_BAND = 24
"""Height of the band of method names above the Compare node's tiles (multilora/methods/compare.py labelled_grid)."""


def compare_methods(inputs: dict) -> list[str]:
    """The ``run_*`` toggles switched on in a Compare node's API inputs, in the node's order."""
    return [name[len("run_"):] for name, value in inputs.items() if name.startswith("run_") and value is True]


def saved_image_size(prompt: dict, save_id: str, tile: int) -> tuple[int, int]:
    """(width, height) of the image SaveImage ``save_id`` of the API ``prompt`` writes when every sampler makes
    ``tile``×``tile`` images: that image, or the Compare node's grid (one tile per selected method under a
    band of labels)."""
    source = prompt[prompt[save_id]["inputs"]["images"][0]]
    if source["class_type"] != "MultiLoRACompare":
        return tile, tile
    return tile * len(compare_methods(source["inputs"])), tile + COMPARE_LABEL_BAND
