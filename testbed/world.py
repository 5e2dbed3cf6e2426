"""The synthetic concept world of the composition testbed: scenes, captions and ground-truth renders.

A scene is a 32×32 RGB image with up to two objects (a *left* and a *right* slot) on a background,
optionally a garment on the left object and a global style. The base model is trained on plain scenes
only; five concepts it never sees are added by LoRAs, one per ComposLoRA category:

=========== ========= ==========================================================================
category    trigger   what it draws
=========== ========= ==========================================================================
character   zorb      a purple creature with two eyes, in the left slot
clothing    plaid     a green/cream checkered vest on the lower half of the left object
background  brick     a brick wall instead of a plain background
object      lantern   a glowing lantern with a dark cap, in the right slot
style       duotone   every pixel recoloured on an indigo→peach ramp by its luminance
=========== ========= ==========================================================================

Scenes are integer codes (``SceneBatch``) so that renders, captions and detector labels come from one
source of truth. Pure torch; everything is vectorised over the batch and seeded by a torch.Generator.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

SIZE = 32
SHAPES = ("none", "circle", "square", "triangle")
LEFT_KINDS = SHAPES + ("zorb",)
RIGHT_KINDS = SHAPES + ("lantern",)
COLOURS = {"red": (0.9, 0.15, 0.15), "green": (0.15, 0.8, 0.2), "blue": (0.15, 0.3, 0.95),
           "yellow": (0.95, 0.9, 0.15), "white": (0.95, 0.95, 0.95)}
COLOUR_NAMES = tuple(COLOURS)
BACKGROUNDS = {"black": (0.05, 0.05, 0.05), "gray": (0.5, 0.5, 0.5), "teal": (0.1, 0.45, 0.45), "brick": None}
BACKGROUND_NAMES = tuple(BACKGROUNDS)
ZORB_BODY = (0.62, 0.22, 0.85)
LANTERN_GLOW, LANTERN_CAP = (1.0, 0.72, 0.2), (0.22, 0.18, 0.14)
BRICK, MORTAR = (0.68, 0.26, 0.14), (0.82, 0.8, 0.72)
PLAID = ((0.05, 0.38, 0.12), (0.95, 0.9, 0.7))
DUOTONE = ((0.12, 0.05, 0.38), (1.0, 0.72, 0.55))
TRIGGERS = {"character": "zorb", "clothing": "plaid", "background": "brick", "object": "lantern",
            "style": "duotone"}
CATEGORIES = tuple(TRIGGERS)


@dataclasses.dataclass
class SceneBatch:
    """Integer codes of B scenes: left/right ∈ LEFT_KINDS/RIGHT_KINDS indices, colours ∈ COLOUR_NAMES."""

    left: torch.Tensor
    left_colour: torch.Tensor
    right: torch.Tensor
    right_colour: torch.Tensor
    background: torch.Tensor
    vest: torch.Tensor
    style: torch.Tensor

    def __len__(self) -> int:
        return int(self.left.shape[0])

    def has(self, category: str) -> torch.Tensor:
        """Bool[B]: the scene contains ``category``'s concept."""
        return {"character": self.left == LEFT_KINDS.index("zorb"), "clothing": self.vest == 1,
                "background": self.background == BACKGROUND_NAMES.index("brick"),
                "object": self.right == RIGHT_KINDS.index("lantern"), "style": self.style == 1}[category]


def random_scenes(count: int, gen: torch.Generator, concepts: Sequence[str] = (), base: bool = True,
                  any_concept: float = 0.0) -> SceneBatch:
    """``count`` random scenes. Every scene has the listed ``concepts``; others appear with probability
    ``any_concept`` (detector training: all combinations), never when 0 (base/LoRA training data)."""
    def pick(n):
        return torch.randint(0, n, (count,), generator=gen)

    def coin(p):
        return torch.rand(count, generator=gen) < p
    left, right = pick(len(SHAPES)), pick(len(SHAPES))
    background = pick(3)
    vest = torch.zeros(count, dtype=torch.long)
    style = torch.zeros(count, dtype=torch.long)
    extra = {c: coin(any_concept) for c in CATEGORIES}
    if "character" in concepts or any_concept:
        left = torch.where(extra["character"] | ("character" in concepts), torch.full_like(left, 4), left)
    if "object" in concepts or any_concept:
        right = torch.where(extra["object"] | ("object" in concepts), torch.full_like(right, 4), right)
    if "background" in concepts or any_concept:
        background = torch.where(extra["background"] | ("background" in concepts), torch.full_like(background, 3),
                                 background)
    if "clothing" in concepts:
        left = torch.where(left == 0, 1 + pick(3), left)  # the vest needs someone to wear it
        vest = torch.ones(count, dtype=torch.long)
    elif any_concept:
        vest = (extra["clothing"] & (left > 0)).long()
    if "style" in concepts or any_concept:
        style = (extra["style"] | ("style" in concepts)).long()
    return SceneBatch(left, pick(len(COLOURS)), right, pick(len(COLOURS)), background, vest, style)


def caption(scenes: SceneBatch, i: int) -> str:
    """The caption of scene ``i``: left object, right object, background, style, in that order."""
    parts = []
    left, right = LEFT_KINDS[int(scenes.left[i])], RIGHT_KINDS[int(scenes.right[i])]
    if left != "none":
        noun = "a zorb" if left == "zorb" else f"a {COLOUR_NAMES[int(scenes.left_colour[i])]} {left}"
        if int(scenes.vest[i]):
            noun += " wearing a plaid vest"
        parts.append(f"{noun} on the left")
    if right != "none":
        noun = "a lantern" if right == "lantern" else f"a {COLOUR_NAMES[int(scenes.right_colour[i])]} {right}"
        parts.append(f"{noun} on the right")
    text = " and ".join(parts) if parts else "an empty scene"
    text += f", {BACKGROUND_NAMES[int(scenes.background[i])]} background"
    if int(scenes.style[i]):
        text += ", duotone style"
    return text


def _rgb(values, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, 3, 1, 1)


def _palette(codes: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    table = torch.tensor([COLOURS[n] for n in COLOUR_NAMES], dtype=like.dtype, device=like.device)
    return table[codes.to(like.device)].view(-1, 3, 1, 1)


def _shape_masks(cx, cy, r, yy, xx) -> dict[str, torch.Tensor]:
    """[B,1,H,W] masks of every shape centred at (cx, cy) with radius r (each [B,1,1,1])."""
    dx, dy = xx - cx, yy - cy
    triangle_half = (dy + r) / (1.8 * r) * r
    body = (dx / r) ** 2 + (dy / (1.15 * r)) ** 2 <= 1
    eyes = ((dx - 0.4 * r) ** 2 + (dy + 0.35 * r) ** 2 <= 1.7) | ((dx + 0.4 * r) ** 2 + (dy + 0.35 * r) ** 2 <= 1.7)
    pupils = ((dx - 0.4 * r) ** 2 + (dy + 0.3 * r) ** 2 <= 0.35) | ((dx + 0.4 * r) ** 2 + (dy + 0.3 * r) ** 2 <= 0.35)
    return {
        "circle": dx ** 2 + dy ** 2 <= r ** 2,
        "square": (dx.abs() <= 0.85 * r) & (dy.abs() <= 0.85 * r),
        "triangle": (dy <= 0.8 * r) & (dx.abs() <= triangle_half) & (dy >= -r),
        "zorb": body | eyes, "zorb_eyes": eyes & ~pupils, "zorb_pupils": pupils,
        "lantern": (dx.abs() <= 0.55 * r) & (dy >= -0.6 * r) & (dy <= 0.9 * r)
        | (dx.abs() <= 0.75 * r) & (dy >= -0.95 * r) & (dy < -0.6 * r),
        "lantern_cap": (dx.abs() <= 0.75 * r) & (dy >= -0.95 * r) & (dy < -0.6 * r)
        | (dx.abs() <= 0.55 * r) & ((dy - 0.15 * r).abs() < 0.5),
    }


def render(scenes: SceneBatch, gen: torch.Generator | None = None, jitter: float = 1.5,
           device: torch.device | str = "cpu") -> torch.Tensor:
    """Ground-truth renders, float [B,3,32,32] in [0,1]; positions/sizes jittered from ``gen``."""
    count = len(scenes)
    gen = gen or torch.Generator().manual_seed(0)

    def uniform(lo, hi):
        return (lo + (hi - lo) * torch.rand(count, generator=gen)).view(-1, 1, 1, 1).to(device)
    grid = torch.arange(SIZE, dtype=torch.float32, device=device) + 0.5
    yy, xx = grid.view(1, 1, -1, 1), grid.view(1, 1, 1, -1)
    image = torch.zeros(count, 3, SIZE, SIZE, device=device)
    plain = torch.tensor([BACKGROUNDS[n] or (0, 0, 0) for n in BACKGROUND_NAMES], device=device)
    image += plain[scenes.background.to(device)].view(-1, 3, 1, 1)
    brick_rows = (yy.long() % 4 == 0)
    brick_cols = ((xx.long() + 4 * ((yy.long() // 4) % 2)) % 8 == 0)
    brick = torch.where(brick_rows | brick_cols, _rgb(MORTAR, image), _rgb(BRICK, image))
    is_brick = (scenes.background.to(device) == 3).view(-1, 1, 1, 1)
    image = torch.where(is_brick, brick.expand_as(image), image)
    checker = ((xx.long() // 2 + yy.long() // 2) % 2 == 0)
    plaid = torch.where(checker, _rgb(PLAID[0], image), _rgb(PLAID[1], image))
    for side, kinds, codes, colours, x0 in (("left", LEFT_KINDS, scenes.left, scenes.left_colour, 9.0),
                                            ("right", RIGHT_KINDS, scenes.right, scenes.right_colour, 23.0)):
        cx, cy, r = uniform(x0 - jitter, x0 + jitter), uniform(16 - jitter, 16 + jitter), uniform(5.0, 6.5)
        masks = _shape_masks(cx, cy, r, yy, xx)
        codes = codes.to(device).view(-1, 1, 1, 1)
        fill = _palette(colours, image)
        for index, kind in enumerate(kinds[1:], start=1):
            m = masks[kind] & (codes == index)
            if kind == "zorb":
                image = torch.where(m, _rgb(ZORB_BODY, image), image)
                image = torch.where(masks["zorb_eyes"] & m, _rgb((1.0, 1.0, 1.0), image), image)
                image = torch.where(masks["zorb_pupils"] & m, _rgb((0.0, 0.0, 0.0), image), image)
            elif kind == "lantern":
                image = torch.where(m, _rgb(LANTERN_GLOW, image), image)
                image = torch.where(masks["lantern_cap"] & m, _rgb(LANTERN_CAP, image), image)
            else:
                image = torch.where(m, fill, image)
            if side == "left":
                lower = m & (yy >= cy - 0.1 * r) & (scenes.vest.to(device) == 1).view(-1, 1, 1, 1)
                if kind == "zorb":
                    lower = lower & ~masks["zorb_eyes"] & ~masks["zorb_pupils"]
                image = torch.where(lower, plaid, image)
    luminance = (0.3 * image[:, 0] + 0.59 * image[:, 1] + 0.11 * image[:, 2]).unsqueeze(1)
    duotone = (1 - luminance) * _rgb(DUOTONE[0], image) + luminance * _rgb(DUOTONE[1], image)
    return torch.where((scenes.style.to(device) == 1).view(-1, 1, 1, 1), duotone, image).clamp(0, 1)


def to_latent(images: torch.Tensor) -> torch.Tensor:
    """Pixels as latents: RGB in [-1, 1] plus a zero 4th channel (the model space of an SD1.5 UNet)."""
    x = images * 2 - 1
    return torch.cat([x, torch.zeros_like(x[:, :1])], dim=1)


def from_latent(x: torch.Tensor) -> torch.Tensor:
    """Inverse of ``to_latent`` for model-space samples: [B,4,H,W] → RGB [B,3,H,W] in [0, 1]."""
    return ((x[:, :3].float() + 1) / 2).clamp(0, 1)
