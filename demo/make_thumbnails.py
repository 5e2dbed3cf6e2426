"""Write example_workflows/<name>.jpg: the cards ComfyUI's template browser shows for the pack's example workflows.

Usage: ``.venv/bin/python demo/make_thumbnails.py`` (no ComfyUI needed). ComfyUI (0.3.75 and 0.33.0) lists
every ``custom_nodes/<pack>/example_workflows/*.json`` under *Templates → Extensions → <pack>*, and frontend
1.32 asks for ``/api/workflow_templates/<pack>/<name>.jpg`` as its thumbnail (``mediaSubtype`` 'jpg' for
custom-node templates), shown in a square card. Each card names the method and draws what it does with the
workflow's own LoRA Stack over its 20 steps, computed with the pack's own schedule code
(routing.switch_active_index, cmlora_schedule.cmlora_plan): one row per LoRA, one column per step, the
colour's strength = the LoRA's weight at that step. The Compare workflow's card has one small such grid per
method the node runs. The images of the tiny test models are noise, so they are not used. Deterministic:
Pillow's bundled font only; each file stays well under 50 KB.
"""
from __future__ import annotations

import glob
import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
sys.path.insert(0, os.path.join(REPO, "tests"))  # support.pack_loader: the pure modules without ComfyUI

from PIL import Image, ImageDraw, ImageFont  # noqa: E402

from support.pack_loader import load_pure  # noqa: E402

SIZE = 384
STEPS = 20
ROW_FIELDS = 7
BACKGROUND = (30, 30, 34)
TEXT = (236, 236, 236)
MUTED = (150, 150, 158)
EMPTY = (52, 52, 58)
CATEGORY_COLOURS = {"character": (230, 96, 84), "clothing": (214, 110, 200), "style": (92, 148, 240),
                    "background": (96, 196, 120), "object": (232, 184, 72), "other": (170, 170, 170)}

CARDS = {
    "multilora_merge": ("Merge", "baseline: all LoRAs merged into W", "merge"),
    "multilora_switch": ("LoRA Switch", "one LoRA per step, switch every 5", "switch"),
    "multilora_composite": ("LoRA Composite", "mean of each LoRA's prediction", "composite"),
    "multilora_cmlora": ("CMLoRA", "dominant LoRA rotates; cached steps", "cmlora"),
    "multilora_clora_two_subjects": ("CLoRA", "contrastive attention masks", "clora"),
    "multilora_clora_subject_style": ("CLoRA + style", "masked subjects, style everywhere", "clora"),
    "multilora_compare": ("Compare methods", "one stack and seed, a tile per method", "compare"),
    "multilora_regional_sdxl": ("Regional LoRA", "each subject LoRA in its mask, one pass", "regional"),
    "multilora_regional_flux": ("Regional LoRA: Flux", "two characters in their masks, one pass", "regional"),
}
COMPARE_METHODS = (("Merge", "merge"), ("LoRA Switch", "switch"), ("LoRA Composite", "composite"),
                   ("CLoRA", "clora"), ("CMLoRA", "cmlora"))
"""The Compare node's methods in its order (multilora/methods/compare.py METHODS): its last widgets are their
run_* toggles, after switch_every."""


def font(size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.load_default(size=size)


def stack_rows(workflow: dict) -> list[dict]:
    """The used rows of the workflow's LoRA Stack: category and concept."""
    stack = next(n for n in workflow["nodes"] if n["type"] == "MultiLoRAStack")
    values = stack["widgets_values"]
    rows = []
    for n in range(values[0]):
        lora, _on, _sm, _sc, category, concept, _trigger = values[1 + n * ROW_FIELDS:1 + (n + 1) * ROW_FIELDS]
        rows.append({"category": category, "concept": concept})
    return rows


def compare_settings(workflow: dict) -> tuple[list[tuple[str, str]], int]:
    """The (name, kind) of each method the Compare node runs, and its switch_every."""
    values = next(n for n in workflow["nodes"] if n["type"] == "MultiLoRACompare")["widgets_values"]
    toggles = values[-len(COMPARE_METHODS):]
    return [m for m, on in zip(COMPARE_METHODS, toggles) if on], values[-len(COMPARE_METHODS) - 1]


def weights(kind: str, rows: list[dict], switch_every: int = 5) -> tuple[list[list[float]], set[int]]:
    """weights[step][lora] in 0..1 for drawing, and the steps to mark (CMLoRA cache refreshes)."""
    k = len(rows)
    if kind == "merge":
        return [[1.0] * k for _ in range(STEPS)], set()
    if kind == "switch":
        routing = load_pure("core.routing")
        return [[1.0 if routing.switch_active_index(i, switch_every, k) == j else 0.0 for j in range(k)]
                for i in range(STEPS)], set()
    if kind == "composite":
        return [[1.0 / k] * k for _ in range(STEPS)], set()
    if kind == "regional":
        return [[1.0] * k for _ in range(STEPS)], set()
    if kind == "cmlora":
        plan = load_pure("core.cmlora_schedule").cmlora_plan(STEPS, [r["category"] for r in rows])
        top = max(max(p.weights) for p in plan)
        return [[w / top for w in p.weights] for p in plan], {p.step for p in plan if p.refresh}
    # CLoRA: every LoRA on every step, each only inside its concept's mask; the first half updates the latent.
    return [[1.0] * k for _ in range(STEPS)], set(range(STEPS // 2))


def blend(colour: tuple[int, int, int], amount: float) -> tuple[int, int, int]:
    amount = 0.15 + 0.85 * amount if amount > 0 else 0.0
    return tuple(round(e + (c - e) * amount) for c, e in zip(colour, EMPTY))


def draw_masks(draw: ImageDraw.ImageDraw, rows: list[dict], box: tuple[int, int, int, int]) -> None:
    """CLoRA's idea in one picture: each subject LoRA acts inside its own mask, style rows everywhere."""
    x0, y0, x1, y1 = box
    subjects = [i for i, r in enumerate(rows) if r["category"] != "style"]
    styled = [i for i, r in enumerate(rows) if r["category"] == "style"]
    draw.rectangle(box, fill=EMPTY)
    for i in styled:
        colour = CATEGORY_COLOURS[rows[i]["category"]]
        for x in range(x0 - (y1 - y0), x1, 16):
            draw.line((max(x, x0), y1 - max(0, x0 - x), min(x + (y1 - y0), x1), y0 + max(0, x + (y1 - y0) - x1)),
                      fill=colour, width=2)
    width = (x1 - x0) // max(1, len(subjects))
    for n, i in enumerate(subjects):
        cx, cy = x0 + width * n + width // 2, (y0 + y1) // 2
        r = min(width, y1 - y0) // 2 - 8
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=CATEGORY_COLOURS[rows[i]["category"]])
        draw.text((cx, cy), rows[i]["concept"], font=font(16), fill=BACKGROUND, anchor="mm")


def draw_compare(draw: ImageDraw.ImageDraw, workflow: dict, rows: list[dict], box: tuple[int, int, int, int]) -> None:
    """The Compare node's grid: one tile per method it runs, each the method's LoRA weights per step (as the
    method's own card draws them; Compare runs CMLoRA without its cache, so no refresh marks)."""
    methods, switch_every = compare_settings(workflow)
    x0, y0, x1, y1 = box
    columns, gap = 2, 10
    lines = -(-len(methods) // columns)
    width, height = (x1 - x0 - gap * (columns - 1)) // columns, (y1 - y0 - gap * (lines - 1)) // lines
    cell = (width - 16) // STEPS
    row_height = min(20, (height - 36) // len(rows) - 3)
    for n, (label, kind) in enumerate(methods):
        left, top = x0 + (n % columns) * (width + gap), y0 + (n // columns) * (height + gap)
        draw.rectangle((left, top, left + width, top + height), fill=(40, 40, 46))
        draw.text((left + 8, top + 8), label, font=font(15), fill=TEXT)
        per_step, _ = weights(kind, rows, switch_every)
        for j, row in enumerate(rows):
            y = top + 32 + j * (row_height + 3)
            for i in range(STEPS):
                x = left + 8 + i * cell
                draw.rectangle((x, y, x + cell - 2, y + row_height),
                               fill=blend(CATEGORY_COLOURS[row["category"]], per_step[i][j]))


def card(name: str, workflow: dict) -> Image.Image:
    title, subtitle, kind = CARDS[name]
    rows = stack_rows(workflow)
    image = Image.new("RGB", (SIZE, SIZE), BACKGROUND)
    draw = ImageDraw.Draw(image)
    draw.text((20, 18), title, font=font(34), fill=TEXT)
    draw.text((20, 62), subtitle, font=font(16), fill=MUTED)

    if kind == "compare":
        draw_compare(draw, workflow, rows, (20, 96, SIZE - 20, SIZE - 56))
        legend = 20
        for row in rows:
            draw.rectangle((legend, SIZE - 46, legend + 8, SIZE - 38), fill=CATEGORY_COLOURS[row["category"]])
            draw.text((legend + 12, SIZE - 42), row["category"], font=font(13), fill=MUTED, anchor="lm")
            legend += 24 + round(draw.textlength(row["category"], font=font(13)))
        draw.text((SIZE - 20, SIZE - 42), f"steps 1-{STEPS}", font=font(13), fill=MUTED, anchor="rm")
        draw.text((20, SIZE - 30), "multilora-composition", font=font(14), fill=MUTED)
        return image
    top = 100 if kind in ("clora", "regional") else 124
    if kind in ("clora", "regional"):
        draw_masks(draw, rows, (20, top, SIZE - 20, top + 110))
        top += 126
    grid_x, cell_gap = 112, 2
    cell = (SIZE - 20 - grid_x) // STEPS
    per_step, marked = weights(kind, rows)
    row_height = 40 if kind not in ("clora", "regional") else 24
    for j, row in enumerate(rows):
        y = top + 16 + j * (row_height + 6)
        colour = CATEGORY_COLOURS[row["category"]]
        draw.text((20, y + row_height // 2), row["category"], font=font(15), fill=TEXT, anchor="lm")
        for i in range(STEPS):
            x = grid_x + i * cell
            draw.rectangle((x, y, x + cell - cell_gap, y + row_height), fill=blend(colour, per_step[i][j]))
    for i in marked:
        x = grid_x + i * cell
        draw.rectangle((x, top + 6, x + cell - cell_gap, top + 10), fill=TEXT)
    bottom = top + 16 + len(rows) * (row_height + 6)
    label = {"cmlora": "cache refresh", "clora": "latent update"}.get(kind)
    draw.text((grid_x, bottom + 4), f"steps 1-{STEPS}", font=font(13), fill=MUTED)
    if label:
        right = SIZE - 20
        draw.text((right, bottom + 4), label, font=font(13), fill=MUTED, anchor="ra")
        left = right - round(draw.textlength(label, font=font(13))) - 8
        draw.rectangle((left - cell + cell_gap, bottom + 9, left, bottom + 13), fill=TEXT)
    draw.text((20, SIZE - 30), "multilora-composition", font=font(14), fill=MUTED)
    return image


def main() -> int:
    for path in sorted(glob.glob(os.path.join(REPO, "example_workflows", "*.json"))):
        name = os.path.splitext(os.path.basename(path))[0]
        if name not in CARDS:
            raise SystemExit(f"{path}: no card for it; add one to CARDS in {os.path.relpath(__file__, REPO)}")
        with open(path, encoding="utf-8") as f:
            workflow = json.load(f)
        target = os.path.join(REPO, "example_workflows", f"{name}.jpg")
        card(name, workflow).save(target, "JPEG", quality=85, optimize=True)
        print(f"{os.path.relpath(target, REPO)}: {os.path.getsize(target)} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
