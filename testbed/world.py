"""The synthetic concept world of the composition testbed (v3): scenes, captions, renders, region masks.

A scene is a 64×64 RGB image with up to two objects (a *left* and a *right* slot) on a background, optionally
a vest on the left object and a global style. The base model learns the *classes* — "a creature", "a lamp",
"a vest", "a wall" — from generic members; each of the five concepts is a specific member that only its LoRA
learns, captioned as real LoRAs are, trigger + class ("a zorb creature"):

=========== ============================ ==========================================================================
category    caption (LoRA / base class)  what it draws
=========== ============================ ==========================================================================
character   a zorb creature / creature   purple creature with two eyes and two antennae (class: body and eyes in a
                                         palette colour, no antennae), left slot
clothing    plaid vest / vest            green/cream checkered vest on the lower half of the left object (class:
                                         a vest in a palette colour)
background  brick wall / wall            red bricks, cream mortar, 16×8 courses (class: gray 16×16 stone blocks)
object      a lantern lamp / lamp        glowing lantern: dark cap, handle and frame bars (class: a lamp body in a
                                         palette colour under a dark cap), right slot
style       duotone style / —            every pixel recoloured on an indigo→peach ramp by its luminance (the base
                                         has no style class, as in v2)
=========== ============================ ==========================================================================

``region_masks`` gives the ground truth of *where* each concept goes (the slot regions the scene generator
places it in), for the regional method's oracle row. Scenes are integer codes (``SceneBatch``) so that renders,
captions and detector labels come from one source of truth. Pure torch; vectorised; seeded by torch.Generator.
"""
from __future__ import annotations

import dataclasses
from typing import Sequence

import torch

SIZE = 64
SHAPES = ("none", "circle", "square", "triangle")
LEFT_KINDS = SHAPES + ("creature", "zorb")
RIGHT_KINDS = SHAPES + ("lamp", "lantern")
VESTS = ("none", "vest", "plaid")
COLOURS = {"red": (0.9, 0.15, 0.15), "green": (0.15, 0.8, 0.2), "blue": (0.15, 0.3, 0.95),
           "yellow": (0.95, 0.9, 0.15), "white": (0.95, 0.95, 0.95)}
COLOUR_NAMES = tuple(COLOURS)
BACKGROUNDS = {"black": (0.05, 0.05, 0.05), "gray": (0.5, 0.5, 0.5), "teal": (0.1, 0.45, 0.45), "wall": None,
               "brick": None}
BACKGROUND_NAMES = tuple(BACKGROUNDS)
PLAIN_BACKGROUNDS = 4  # black, gray, teal, wall: what the base sees
ZORB_BODY = (0.62, 0.22, 0.85)
LANTERN_GLOW, LANTERN_CAP = (1.0, 0.72, 0.2), (0.22, 0.18, 0.14)
BRICK, MORTAR = (0.68, 0.26, 0.14), (0.82, 0.8, 0.72)
STONE, STONE_JOINT = (0.6, 0.6, 0.56), (0.36, 0.36, 0.34)
PLAID = ((0.05, 0.38, 0.12), (0.95, 0.9, 0.7))
DUOTONE = ((0.12, 0.05, 0.38), (1.0, 0.72, 0.55))
TRIGGERS = {"character": "zorb", "clothing": "plaid", "background": "brick", "object": "lantern",
            "style": "duotone"}
CLASS_WORDS = {"character": "creature", "clothing": "vest", "background": "wall", "object": "lamp", "style": "style"}
CATEGORIES = tuple(TRIGGERS)
SLOT_X = {"left": 18.0, "right": 46.0}
SLOT_Y, JITTER, RADIUS = 32.0, 3.0, (10.0, 13.0)
VEST_PROBABILITY = 0.3  # plain vests on left objects in the base distribution


@dataclasses.dataclass
class SceneBatch:
    """Integer codes of B scenes: left/right ∈ LEFT_KINDS/RIGHT_KINDS, colours ∈ COLOUR_NAMES, background ∈
    BACKGROUND_NAMES, vest ∈ VESTS (with its colour), style ∈ {0, 1}."""

    left: torch.Tensor
    left_colour: torch.Tensor
    right: torch.Tensor
    right_colour: torch.Tensor
    background: torch.Tensor
    vest: torch.Tensor
    vest_colour: torch.Tensor
    style: torch.Tensor

    def __len__(self) -> int:
        return int(self.left.shape[0])

    def has(self, category: str) -> torch.Tensor:
        """Bool[B]: the scene contains ``category``'s concept."""
        return {"character": self.left == LEFT_KINDS.index("zorb"), "clothing": self.vest == VESTS.index("plaid"),
                "background": self.background == BACKGROUND_NAMES.index("brick"),
                "object": self.right == RIGHT_KINDS.index("lantern"), "style": self.style == 1}[category]

    def has_class(self, category: str) -> torch.Tensor:
        """Bool[B]: the scene contains a member of ``category``'s class (generic or the concept itself)."""
        return {"character": self.left >= LEFT_KINDS.index("creature"), "clothing": self.vest >= 1,
                "background": self.background >= BACKGROUND_NAMES.index("wall"),
                "object": self.right >= RIGHT_KINDS.index("lamp"), "style": self.style == 1}[category]


def random_scenes(count: int, gen: torch.Generator, concepts: Sequence[str] = (), any_concept: float = 0.0
                  ) -> SceneBatch:
    """``count`` scenes of the base distribution (plain shapes, generic creatures/lamps/vests/walls). Every scene
    has the listed ``concepts``; other concepts appear with probability ``any_concept`` (detector training: all
    combinations), never when 0 (base and LoRA training data)."""
    def pick(n):
        return torch.randint(0, n, (count,), generator=gen)

    def coin(p):
        return torch.rand(count, generator=gen) < p
    left, right, background = pick(5), pick(5), pick(PLAIN_BACKGROUNDS)
    left_colour, right_colour = pick(len(COLOURS)), pick(len(COLOURS))
    vest = (coin(VEST_PROBABILITY) & (left > 0)).long()
    vest_colour = (left_colour + 1 + pick(len(COLOURS) - 1)) % len(COLOURS)  # never the wearer's colour
    style = torch.zeros(count, dtype=torch.long)
    extra = {c: coin(any_concept) | (c in concepts) for c in CATEGORIES}
    left = torch.where(extra["character"], torch.full_like(left, LEFT_KINDS.index("zorb")), left)
    right = torch.where(extra["object"], torch.full_like(right, RIGHT_KINDS.index("lantern")), right)
    background = torch.where(extra["background"], torch.full_like(background, BACKGROUND_NAMES.index("brick")),
                             background)
    if "clothing" in concepts:
        left = torch.where(left == 0, 1 + pick(4), left)  # the vest needs someone to wear it
    vest = torch.where(extra["clothing"] & (left > 0), torch.full_like(vest, VESTS.index("plaid")), vest)
    style = extra["style"].long()
    return SceneBatch(left, left_colour, right, right_colour, background, vest, vest_colour, style)


def left_phrase(scenes: SceneBatch, i: int) -> str:
    """Caption of the left slot ("" when empty)."""
    kind = LEFT_KINDS[int(scenes.left[i])]
    if kind == "none":
        return ""
    noun = "a zorb creature" if kind == "zorb" else f"a {COLOUR_NAMES[int(scenes.left_colour[i])]} {kind}"
    vest = VESTS[int(scenes.vest[i])]
    if vest == "plaid":
        noun += " wearing a plaid vest"
    elif vest == "vest":
        noun += f" wearing a {COLOUR_NAMES[int(scenes.vest_colour[i])]} vest"
    return f"{noun} on the left"


def caption(scenes: SceneBatch, i: int) -> str:
    """The caption of scene ``i``: left object, right object, background, style, in that order."""
    parts = [p for p in (left_phrase(scenes, i), _right_phrase(scenes, i)) if p]
    text = " and ".join(parts) if parts else "an empty scene"
    background = BACKGROUND_NAMES[int(scenes.background[i])]
    text += {"wall": ", wall background", "brick": ", brick wall background"}.get(background,
                                                                                 f", {background} background")
    if int(scenes.style[i]):
        text += ", duotone style"
    return text


def _right_phrase(scenes: SceneBatch, i: int) -> str:
    kind = RIGHT_KINDS[int(scenes.right[i])]
    if kind == "none":
        return ""
    noun = "a lantern lamp" if kind == "lantern" else f"a {COLOUR_NAMES[int(scenes.right_colour[i])]} {kind}"
    return f"{noun} on the right"


def _rgb(values, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(values, dtype=like.dtype, device=like.device).view(-1, 3, 1, 1)


def _palette(codes: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    table = torch.tensor([COLOURS[n] for n in COLOUR_NAMES], dtype=like.dtype, device=like.device)
    return table[codes.to(like.device)].view(-1, 3, 1, 1)


def _shape_masks(cx, cy, r, yy, xx) -> dict[str, torch.Tensor]:
    """[B,1,H,W] masks of every shape part centred at (cx, cy) with radius r (each [B,1,1,1])."""
    dx, dy = xx - cx, yy - cy
    triangle_half = (dy + r) / (1.8 * r) * r
    body = (dx / r) ** 2 + (dy / (1.15 * r)) ** 2 <= 1
    eye_r2, pupil_r2 = (0.2 * r) ** 2, (0.1 * r) ** 2
    eyes = ((dx - 0.4 * r) ** 2 + (dy + 0.35 * r) ** 2 <= eye_r2) | ((dx + 0.4 * r) ** 2 + (dy + 0.35 * r) ** 2 <= eye_r2)
    pupils = ((dx - 0.4 * r) ** 2 + (dy + 0.3 * r) ** 2 <= pupil_r2) | ((dx + 0.4 * r) ** 2 + (dy + 0.3 * r) ** 2 <= pupil_r2)
    stalks = ((dx.abs() - 0.45 * r).abs() <= 0.07 * r + 0.5) & (dy <= -0.9 * r) & (dy >= -1.45 * r)
    knobs = ((dx.abs() - 0.45 * r) ** 2 + (dy + 1.5 * r) ** 2) <= (0.16 * r) ** 2
    lamp_body = (dx.abs() <= 0.55 * r) & (dy >= -0.6 * r) & (dy <= 0.9 * r)
    cap = (dx.abs() <= 0.75 * r) & (dy >= -0.95 * r) & (dy < -0.6 * r)
    handle = ((dx ** 2 + (dy + 0.95 * r) ** 2).sqrt() - 0.35 * r).abs() <= 0.06 * r + 0.5
    bars = lamp_body & (((dx.abs() - 0.27 * r).abs() <= 0.05 * r + 0.4) | ((dy - 0.15 * r).abs() <= 0.05 * r + 0.4))
    return {
        "circle": dx ** 2 + dy ** 2 <= r ** 2,
        "square": (dx.abs() <= 0.85 * r) & (dy.abs() <= 0.85 * r),
        "triangle": (dy <= 0.8 * r) & (dx.abs() <= triangle_half) & (dy >= -r),
        "creature": body | eyes, "eyes": eyes & ~pupils, "pupils": pupils,
        "zorb": body | eyes | ((stalks | knobs) & (dy < 0)), "antennae": (stalks | knobs) & ~body,
        "lamp": lamp_body | cap, "lantern": lamp_body | cap | (handle & (dy < -0.95 * r)),
        "cap": cap, "handle": handle & (dy < -0.95 * r), "bars": bars,
    }


def _backgrounds(image: torch.Tensor, codes: torch.Tensor, yy, xx) -> torch.Tensor:
    plain = torch.tensor([BACKGROUNDS[n] or (0, 0, 0) for n in BACKGROUND_NAMES], device=image.device)
    image = image + plain[codes].view(-1, 3, 1, 1)
    y, x = yy.long(), xx.long()
    brick_joint = (y % 8 == 0) | ((x + 8 * ((y // 8) % 2)) % 16 == 0)
    stone_joint = (y % 16 == 0) | ((x + 8 * ((y // 16) % 2)) % 16 == 0)
    brick = torch.where(brick_joint, _rgb(MORTAR, image), _rgb(BRICK, image))
    stone = torch.where(stone_joint, _rgb(STONE_JOINT, image), _rgb(STONE, image))
    image = torch.where((codes == BACKGROUND_NAMES.index("wall")).view(-1, 1, 1, 1), stone.expand_as(image), image)
    return torch.where((codes == BACKGROUND_NAMES.index("brick")).view(-1, 1, 1, 1), brick.expand_as(image), image)


def render(scenes: SceneBatch, gen: torch.Generator | None = None, jitter: float = JITTER,
           device: torch.device | str = "cpu") -> torch.Tensor:
    """Ground-truth renders, float [B,3,SIZE,SIZE] in [0,1]; positions/sizes jittered from ``gen``."""
    count = len(scenes)
    gen = gen or torch.Generator().manual_seed(0)

    def uniform(lo, hi):
        return (lo + (hi - lo) * torch.rand(count, generator=gen)).view(-1, 1, 1, 1).to(device)
    grid = torch.arange(SIZE, dtype=torch.float32, device=device) + 0.5
    yy, xx = grid.view(1, 1, -1, 1), grid.view(1, 1, 1, -1)
    image = _backgrounds(torch.zeros(count, 3, SIZE, SIZE, device=device), scenes.background.to(device), yy, xx)
    checker = ((xx.long() // 4 + yy.long() // 4) % 2 == 0)
    plaid = torch.where(checker, _rgb(PLAID[0], image), _rgb(PLAID[1], image))
    dark, white, black = _rgb(LANTERN_CAP, image), _rgb((1.0, 1.0, 1.0), image), _rgb((0.0, 0.0, 0.0), image)
    for side, kinds, codes, colours in (("left", LEFT_KINDS, scenes.left, scenes.left_colour),
                                        ("right", RIGHT_KINDS, scenes.right, scenes.right_colour)):
        x0 = SLOT_X[side]
        cx, cy, r = uniform(x0 - jitter, x0 + jitter), uniform(SLOT_Y - jitter, SLOT_Y + jitter), uniform(*RADIUS)
        masks = _shape_masks(cx, cy, r, yy, xx)
        codes = codes.to(device).view(-1, 1, 1, 1)
        fill = _palette(colours, image)
        for index, kind in enumerate(kinds[1:], start=1):
            m = masks[kind] & (codes == index)
            if kind in ("creature", "zorb"):
                image = torch.where(m, _rgb(ZORB_BODY, image) if kind == "zorb" else fill, image)
                if kind == "zorb":
                    image = torch.where(masks["antennae"] & m, dark, image)
                image = torch.where(masks["eyes"] & m, white, image)
                image = torch.where(masks["pupils"] & m, black, image)
            elif kind in ("lamp", "lantern"):
                image = torch.where(m, _rgb(LANTERN_GLOW, image) if kind == "lantern" else fill, image)
                image = torch.where((masks["cap"] | masks["handle"] | (masks["bars"] & (kind == "lantern"))) & m,
                                    dark, image)
            else:
                image = torch.where(m, fill, image)
            if side == "left":
                lower = m & (yy >= cy - 0.1 * r) & ~masks["eyes"] & ~masks["pupils"]
                vest = scenes.vest.to(device).view(-1, 1, 1, 1)
                image = torch.where(lower & (vest == 2), plaid, image)
                image = torch.where(lower & (vest == 1), _palette(scenes.vest_colour, image), image)
    luminance = (0.3 * image[:, 0] + 0.59 * image[:, 1] + 0.11 * image[:, 2]).unsqueeze(1)
    duotone = (1 - luminance) * _rgb(DUOTONE[0], image) + luminance * _rgb(DUOTONE[1], image)
    return torch.where((scenes.style.to(device) == 1).view(-1, 1, 1, 1), duotone, image).clamp(0, 1)


def slot_region(side: str, size: int = SIZE) -> torch.Tensor:
    """Float [size, size]: where the scene generator can put the ``side`` object — its slot centre ± jitter plus
    the largest radius (1.6 r upwards for the zorb's antennae and the lantern's handle), scaled to ``size``."""
    grid = (torch.arange(size, dtype=torch.float32) + 0.5) * (SIZE / size)
    yy, xx = grid.view(-1, 1), grid.view(1, -1)
    reach = JITTER + RADIUS[1]
    inside = ((xx - SLOT_X[side]).abs() <= reach) & (yy >= SLOT_Y - JITTER - 1.6 * RADIUS[1]) \
        & (yy <= SLOT_Y + reach * 1.15)
    return inside.float()


def region_masks(categories: Sequence[str], size: int = SIZE) -> list[torch.Tensor | None]:
    """Ground-truth region of each category's concept, one [size, size] float mask per category (None: the
    whole image): character → the left slot, clothing → the left slot's lower half, object → the right slot,
    background → outside the regions of the set's other concepts (a slot that holds a plain object belongs to the
    background LoRA's region: the background is drawn around it), style → None. The oracle masks of the regional
    method (testbed/README.md, "Regional variants": this rule against the background outside both slots)."""
    left, right = slot_region("left", size), slot_region("right", size)
    grid = (torch.arange(size, dtype=torch.float32) + 0.5) * (SIZE / size)
    lower = (grid.view(-1, 1) >= SLOT_Y - 0.1 * RADIUS[0] - JITTER).float().expand(size, size)
    regions = {"character": left, "clothing": left * lower, "object": right, "style": None}
    taken = [regions[c] for c in categories if c != "background" and regions[c] is not None]
    regions["background"] = 1 - torch.stack(taken).amax(0) if taken else None
    return [regions[c] for c in categories]


def to_latent(images: torch.Tensor) -> torch.Tensor:
    """Pixels as latents: RGB in [-1, 1] plus a zero 4th channel (the model space of an SD1.5 UNet)."""
    x = images * 2 - 1
    return torch.cat([x, torch.zeros_like(x[:, :1])], dim=1)


def to_model_space(images: torch.Tensor, channels: int) -> torch.Tensor:
    """RGB [B,3,H,W] in [0, 1] → model space of ``channels`` channels: RGB in [-1, 1], the rest zero."""
    x = images * 2 - 1
    return torch.cat([x, x.new_zeros(x.shape[0], channels - 3, *x.shape[2:])], dim=1)


def from_latent(x: torch.Tensor) -> torch.Tensor:
    """Inverse of ``to_latent`` / ``to_model_space``: model-space samples → RGB [B,3,H,W] in [0, 1]."""
    return ((x[:, :3].float() + 1) / 2).clamp(0, 1)
