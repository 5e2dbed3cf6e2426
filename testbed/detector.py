"""Concept detector of the testbed: a small CNN with one head per scene attribute (pure torch).

Heads: left ∈ LEFT_KINDS, left colour, right ∈ RIGHT_KINDS, right colour, background, vest ∈ VESTS, style; so it
tells a concept from a generic member of its class (zorb vs creature, lantern vs lamp, plaid vs vest, brick vs
wall) as well as concept present / absent (``concept_presence``) and class present (``class_presence``). It is
trained on ground-truth renders of every combination of concepts (``world.random_scenes(any_concept=.4)``)
with augmentations that mimic sampler output (Gaussian noise, blur, contrast jitter), and its accuracy is
measured on fresh held-out renders. Colour heads are scored only where the slot holds a plain shape.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

import world

HEADS = {"left": len(world.LEFT_KINDS), "left_colour": len(world.COLOURS), "right": len(world.RIGHT_KINDS),
         "right_colour": len(world.COLOURS), "background": len(world.BACKGROUNDS), "vest": len(world.VESTS), "style": 2}


class Detector(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.features = torch.nn.Sequential(
            torch.nn.Conv2d(3, 32, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(32, 32, 3, stride=2, padding=1), torch.nn.ReLU(),  # 64 → 32
            torch.nn.Conv2d(32, 64, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(64, 64, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(64, 64, 3, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(64, 96, 3, stride=2, padding=1), torch.nn.ReLU(),
            torch.nn.Conv2d(96, 96, 3, stride=2, padding=1), torch.nn.ReLU(),  # 4×4: left/right stay apart
            torch.nn.Flatten(), torch.nn.Linear(96 * 16, 192), torch.nn.ReLU())
        self.heads = torch.nn.ModuleDict({n: torch.nn.Linear(192, c) for n, c in HEADS.items()})

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        h = self.features(images * 2 - 1)
        return {n: head(h) for n, head in self.heads.items()}


def labels(scenes: world.SceneBatch) -> dict[str, torch.Tensor]:
    return {"left": scenes.left, "left_colour": scenes.left_colour, "right": scenes.right,
            "right_colour": scenes.right_colour, "background": scenes.background, "vest": scenes.vest,
            "style": scenes.style}


def colour_scored(name: str, scenes: world.SceneBatch) -> torch.Tensor:
    """Bool[B]: the head's label is meaningful (colour heads only for plain shapes and generic class members)."""
    if name == "left_colour":
        return (scenes.left >= 1) & (scenes.left <= world.LEFT_KINDS.index("creature"))
    if name == "right_colour":
        return (scenes.right >= 1) & (scenes.right <= world.RIGHT_KINDS.index("lamp"))
    return torch.ones(len(scenes), dtype=torch.bool)


def augment(images: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    b = images.shape[0]
    noise = torch.rand(b, 1, 1, 1, generator=gen) * 0.08
    images = images + noise.to(images.device) * torch.randn(images.shape, generator=gen).to(images.device)
    blur = (torch.rand(b, generator=gen) < 0.5).to(images.device).view(-1, 1, 1, 1)
    kernel = torch.tensor([1.0, 2.0, 1.0], device=images.device)
    kernel = (kernel[:, None] * kernel[None, :] / 16).expand(3, 1, 3, 3)
    blurred = F.conv2d(F.pad(images, (1, 1, 1, 1), mode="replicate"), kernel, groups=3)
    images = torch.where(blur, blurred, images)
    contrast = (0.85 + 0.3 * torch.rand(b, 1, 1, 1, generator=gen)).to(images.device)
    return ((images - 0.5) * contrast + 0.5).clamp(0, 1)


def train_detector(steps: int, gen: torch.Generator, device, batch: int = 256):
    """Train a Detector; returns (net, accuracy dict on 4096 held-out renders, clean and augmented)."""
    net = Detector().to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    start = time.perf_counter()
    for step in range(steps):
        scenes = world.random_scenes(batch, gen, any_concept=0.4)
        images = augment(world.render(scenes, gen, device=device), gen)
        out = net(images)
        loss = 0.0
        for name, target in labels(scenes).items():
            keep = colour_scored(name, scenes).to(device)
            per = F.cross_entropy(out[name], target.to(device), reduction="none")
            loss = loss + (per * keep).sum() / keep.sum().clamp(min=1)
        for group in opt.param_groups:
            group["lr"] = 2e-3 * 0.5 * (1 + torch.cos(torch.tensor(step / steps * 3.14159)).item())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval()
    held = torch.Generator().manual_seed(987654)
    accuracy = {"train_seconds": round(time.perf_counter() - start, 1)}
    for mode in ("clean", "augmented"):
        scenes = world.random_scenes(4096, held, any_concept=0.4)
        images = world.render(scenes, held, device=device)
        if mode == "augmented":
            images = augment(images, held)
        accuracy[mode] = evaluate(net, images, scenes)
    return net, accuracy


@torch.no_grad()
def predict(net: Detector, images: torch.Tensor) -> dict[str, torch.Tensor]:
    out = {}
    for chunk in images.split(1024):
        for n, logits in net(chunk).items():
            out.setdefault(n, []).append(logits.argmax(-1).cpu())
    return {n: torch.cat(v) for n, v in out.items()}


def concept_presence(pred: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bool[B] per category from head predictions."""
    return {"character": pred["left"] == world.LEFT_KINDS.index("zorb"),
            "clothing": pred["vest"] == world.VESTS.index("plaid"),
            "background": pred["background"] == world.BACKGROUND_NAMES.index("brick"),
            "object": pred["right"] == world.RIGHT_KINDS.index("lantern"), "style": pred["style"] == 1}


def class_presence(pred: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Bool[B] per category: a member of the concept's class is drawn (generic or the concept itself)."""
    return {"character": pred["left"] >= world.LEFT_KINDS.index("creature"), "clothing": pred["vest"] >= 1,
            "background": pred["background"] >= world.BACKGROUND_NAMES.index("wall"),
            "object": pred["right"] >= world.RIGHT_KINDS.index("lamp"), "style": pred["style"] == 1}


def evaluate(net: Detector, images: torch.Tensor, scenes: world.SceneBatch) -> dict[str, float]:
    """Accuracy per head (where scored) and per concept (presence vs ground truth)."""
    pred = predict(net, images)
    result = {}
    for name, target in labels(scenes).items():
        keep = colour_scored(name, scenes)
        result[f"head_{name}"] = round(float((pred[name][keep] == target[keep]).float().mean()), 4)
    presence = concept_presence(pred)
    for category in world.CATEGORIES:
        result[f"concept_{category}"] = round(float((presence[category] == scenes.has(category)).float().mean()), 4)
    return result


def grain(images: torch.Tensor) -> torch.Tensor:
    """Per image: the median over pixels of |I − box₃(I)| (mean over RGB in [0, 1]; edge-replicated 3×3 box
    blur). Leftover sampling noise is everywhere and raises it (clean render + Gaussian noise of std 0.05:
    ≈ 0.037); edges cover a minority of the pixels, so clean scenes score 0 — at 64² that includes the brick
    and stone walls, whose 1-pixel joints are a minority too (at v2's 32² the brick's mortar grid scored 0.14)."""
    padded = torch.nn.functional.pad(images.float(), (1, 1, 1, 1), mode="replicate")
    detail = (images.float() - torch.nn.functional.avg_pool2d(padded, 3, stride=1)).abs().mean(1)
    return detail.flatten(1).median(1).values.cpu()


def load_detector(path: str, device="cpu") -> Detector:
    from safetensors.torch import load_file
    net = Detector()
    net.load_state_dict({k: v.float() for k, v in load_file(path).items()})
    return net.to(device).eval()
