"""Reports of the testbed evaluation: the markdown tables and the example sheets (pure: torch, PIL, stdlib)."""
from __future__ import annotations

import torch

import world


def save_sheet(rows: list[list[torch.Tensor]], labels, path: str) -> None:
    """Rows of RGB images [3,H,W] (one row per method; short rows padded white) → PNG, nearest upscale to
    128-pixel tiles, method names on the left."""
    from PIL import Image, ImageDraw
    m, p = len(rows), max((len(r) for r in rows), default=0)
    scale, pad = max(1, 128 // world.SIZE), 110
    tile = world.SIZE * scale
    sheet = Image.new("RGB", (pad + max(p, 1) * tile, max(m, 1) * tile), "white")
    draw = ImageDraw.Draw(sheet)
    for r, row in enumerate(rows):
        draw.text((4, r * tile + tile // 2 - 6), labels[r], fill="black")
        for c, image in enumerate(row):
            img = (image.permute(1, 2, 0).clamp(0, 1) * 255).byte().cpu().numpy()
            sheet.paste(Image.fromarray(img).resize((tile, tile), Image.NEAREST), (pad + c * tile, r * tile))
    sheet.save(path)


def cell(v, digits: int = 2) -> str:
    """Mean [low, high] of a bootstrap summary."""
    return f"{v[0]:.{digits}f} [{v[1]:.{digits}f}, {v[2]:.{digits}f}]"


def method_row(method: str, e: dict) -> str:
    """One table row; a failed or cut (k, method) says so in its last column."""
    notes = []
    if e.get("stopped_early"):
        notes.append("time budget")
    if e.get("not_applicable"):
        notes.append(f"{e['not_applicable']} prompts n/a (fewer than 2 concept words, or no cross-attention)")
    if e.get("in_progress"):
        notes.append("interrupted")
    if e.get("error"):
        notes.append("error: " + e["error"].replace("|", "/")[:120])
    covered = f"{e.get('prompts_covered', '?')}/{e.get('prompts_total', '?')}"
    if "all" not in e:
        empty = " | ".join(["—"] * 9)
        return f"| {method} | {empty} | {covered} | {e.get('seconds', '—')} | {'; '.join(notes)} |"
    per = [cell(e[f"has_{c}"]) if f"has_{c}" in e else "—" for c in world.CATEGORIES]
    return (f"| {method} | {cell(e['all'])} | {cell(e['min_prob'])} | " + " | ".join(per)
            + f" | {cell(e['classes']) if 'classes' in e else '—'} | {cell(e['sanity'])} | {covered} | {e['seconds']} | "
            f"{'; '.join(notes)} |")


def markdown(results: dict, methods) -> str:
    """Base caption following, then one table per k (k = 1: each LoRA alone, merge, per-category presence)."""
    b = results.get("base_caption_following")
    arch = results.get("meta", {}).get("arch")
    lines = [f"Testbed: {arch}", ""] if arch else []
    if b and "all_attributes" in b:
        lines += [f"Base model caption following (all attributes detected): {cell(b['all_attributes'])}; "
                  f"left {cell(b['left'])}, right {cell(b['right'])}, background {cell(b['background'])}", ""]
    elif b:
        lines += [f"Base model caption following: error: {b.get('error')}", ""]
    for k, data in results["k"].items():
        title = f"### k = {k}" + (" (each LoRA alone, merge; its category column = its concept's presence)"
                                   if k == "1" else "")
        lines += [title, "", "| method | all present | min presence prob. | character | clothing | background | "
                  "object | style | all classes | plain parts (sanity) | prompts | s | note |", "|---" * 13 + "|"]
        order = [m for m in methods if m in data["methods"]] + [m for m in data["methods"] if m not in methods]
        lines += [method_row(m, data["methods"][m]) for m in order]
        lines.append("")
    return "\n".join(lines) + "\n"
