"""Regional LoRA with automatic masks: a row without a drawn mask but with a concept word gets the region where
its concept tokens attend (phases, formula and mask rule in ``core.auto_masks``).

Attention of the concept tokens to the image tokens, conditional chunks only:
- UNets (SD1.x, SDXL): CLoRA's cross-attention capture (``host.attention_capture``): softmax(q·kᵀ/√d) over the
  prompt's tokens at the latent/4 level (else the deepest with cross-attention), averaged over heads and layers;
- Flux-family DiTs: the image-query × text-key block of every double block's joint attention with a softmax over
  the text keys only (``host.dit_attention``), averaged over heads and blocks;
- Z-Image (Lumina-family NextDiT): the same block of every main layer's joint attention (image queries × the
  caption's own tokens, ``host.dit_attention.NextDiTConceptAttention``).
Token positions come from the tokenizer (``core.prompt_tokens``): CLIP's stream on UNets, T5's on Flux (its text
stream is the T5 encoding), Qwen3's on Z-Image (its caption is the chat-templated prompt, token for token;
byte-level BPE, so each word is matched with and without its leading space). The capture runs only in the model calls
of the recording steps (it forces those calls eager); the masks reach the engine through ``TokenRouter.set_maps``
(in place, graph-safe). Drawn masks stay in force in every step; rows of category ``style`` and rows without a
concept word act everywhere. A drawn user patch on the same attention sites (attn2 replace) is bypassed in
recording calls. Nothing depends on a sampler node of the pack: the step comes from each call's σ in the run's own
schedule (``sample_sigmas``), and every sampling run starts over (the plain stack, then masks of its own), so the
patched MODEL of ``Regional LoRA (model patch)`` works under any sampler node and gives the same image on every
run.
"""
from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field
from typing import Sequence

import torch

import comfy.patcher_extension

from ..core.auto_masks import AutoMaskPhases, concept_masks
from ..core.prompt_tokens import bpe_concept_positions, concept_positions, token_rows
from ..core.regions import TEXT_ALL, TEXT_CONCEPT, RegionError, normalize_regions
from ..core.routing import sample_sigmas_of_call, sigma_of_call, step_index
from ..core.stack import LoraRow
from ..host.attention_capture import ConceptAttention, capture_level, capture_size, cross_attention_levels, install_capture
from ..host.dit_attention import DiTConceptAttention, NextDiTConceptAttention
from ..host.token_routing import caption_multiple, model_family
from .regional import regional_clone, regional_engine

MASKS_DRAWN = "connected masks"
MASKS_ATTENTION = "concept attention"
MASK_SOURCES = (MASKS_DRAWN, MASKS_ATTENTION)
WRAPPER_KEY = "multilora.regional_auto"
T5_EOS = 1
log = logging.getLogger("multilora")


@dataclass
class RegionalRecord:
    """The regions in use per step for Mask Preview (its ATTENTION_MAPS form): ``steps[s][j]`` is shown row j's
    map [1, H, W] at step s (first image). ``normalize`` False: the maps are masks, thresholded as they are."""

    latent_size: tuple[int, int]
    names: tuple[str, ...]
    steps: list[list[torch.Tensor]] = field(default_factory=list)
    normalize: bool = False


def auto_rows(rows: Sequence[LoraRow], masks: Sequence[torch.Tensor | None]) -> list[int]:
    """Rows that get an automatic mask: no drawn mask, a concept word, not a style."""
    return [i for i, row in enumerate(rows)
            if (i >= len(masks) or masks[i] is None) and row.concept_words() and row.category != "style"]


def _tokenizer_stream(clip, family: str, node: str):
    """(tokenize_fn, bos, eos) of the text encoder whose tokens the model's context holds: CLIP on UNets; on Flux the
    T5 stream, or the CLIP-L stream when that is the clip's only one (its context is then CLIP-L's tokens)."""
    if family == "unet":
        return (lambda text: token_rows(clip.tokenize(text))), 49406, 49407
    probe = clip.tokenize("")
    if isinstance(probe, dict) and "t5xxl" not in probe and sorted(probe) == ["l"]:
        # A CLIP-L-only text encoder: its hidden states are the context (a Flux-architecture model trained on them).
        return (lambda text: token_rows(clip.tokenize(text))), 49406, 49407

    def t5(text):
        tokens = clip.tokenize(text)
        if not isinstance(tokens, dict) or "t5xxl" not in tokens:
            raise RegionError(f"{node}: automatic masks on Flux need the T5 tokens of the prompt; this clip gives "
                              f"{sorted(tokens) if isinstance(tokens, dict) else type(tokens).__name__}. Connect "
                              "the Flux text encoder (DualCLIPLoader, type flux).")
        return tokens["t5xxl"]
    end = getattr(getattr(getattr(clip, "tokenizer", None), "t5xxl", None), "end_token", T5_EOS)
    return t5, -1, int(end if end is not None else T5_EOS)


def _qwen_finder(clip, prompt: str, node: str):
    """Word positions in Z-Image's caption: the prompt in Qwen3's chat template, as its text encoder sees it."""
    def qwen(text, **kwargs):
        tokens = clip.tokenize(text, **kwargs)
        if not isinstance(tokens, dict) or "qwen3_4b" not in tokens:
            raise RegionError(f"{node}: automatic masks on Z-Image / Lumina 2 read the prompt's Qwen3 tokens (Z-Image's "
                              "text encoder); this clip gives "
                              f"{sorted(tokens) if isinstance(tokens, dict) else type(tokens).__name__}. Connect the "
                              "Z-Image text encoder (qwen_3_4b), or connect masks (Lumina 2's Gemma tokens are not read).")
        return tokens["qwen3_4b"]
    rows = qwen(prompt)
    return lambda words: bpe_concept_positions(rows, lambda text: qwen(text, llama_template="{}"), prompt, words, node)


def concept_columns(clip, prompt: str, rows: Sequence[LoraRow], chosen: Sequence[int], family: str, node: str
                    ) -> tuple[list[int], list[list[int]]]:
    """Token positions of the chosen rows' concept words in ``prompt`` (all of them, in order) and, per row, its
    columns in that list. A word absent from the prompt raises ConceptNotFoundError naming ``node``."""
    if family == "lumina":
        find = _qwen_finder(clip, prompt, node)
    else:
        tokenize, bos, eos = _tokenizer_stream(clip, family, node)

        def find(words):
            return concept_positions(tokenize, prompt, words, bos, eos, node)
    positions, groups = [], []
    for i in chosen:
        found = find(rows[i].concept_words())
        mine = sorted({p for ps in found.values() for p in ps})
        groups.append(list(range(len(positions), len(positions) + len(mine))))
        positions += mine
    return positions, groups


def text_concept_tokens(model, rows: Sequence[LoraRow], masks: Sequence[torch.Tensor | None], clip, prompt: str,
                        node: str, text_tokens: str, auto: Sequence[int] = ()) -> dict[int, list[int]] | None:
    """For ``text_tokens`` = ``TEXT_CONCEPT``: the token positions of the concept words of every regional row (a
    connected mask, or an automatic one: ``auto``) in ``prompt``, {row: positions}; None for the other policies.
    A word absent from the prompt raises ConceptNotFoundError naming ``node``, as in CLoRA."""
    if text_tokens != TEXT_CONCEPT:
        return None
    if clip is None or not str(prompt or "").strip():
        raise RegionError(f"{node}: text_tokens '{TEXT_CONCEPT}' needs 'clip' connected and the positive prompt's text "
                          "in 'prompt', to find each row's concept words; or choose another text_tokens.")
    family = model_family(model.model.diffusion_model)
    chosen = [i for i, row in enumerate(rows) if ((i < len(masks) and masks[i] is not None) or i in auto)
              and row.concept_words()]
    positions, groups = concept_columns(clip, prompt, rows, chosen, family, node)
    return {i: [positions[g] for g in group] for i, group in zip(chosen, groups)}


def check_family(diffusion_model, node: str) -> str:
    """"unet" or "flux" when automatic masks can read this model's concept attention, else RegionError."""
    family = model_family(diffusion_model)
    if family == "unet" and cross_attention_levels(diffusion_model):
        return family
    if family == "flux" and getattr(diffusion_model, "double_blocks", None):
        return family
    if family == "lumina" and getattr(diffusion_model, "layers", None) and getattr(diffusion_model, "cap_embedder", None):
        return family
    raise RegionError(f"{node}: automatic masks need a text-to-image attention this pack reads (UNet cross-attention "
                      f"of SD1.x/SDXL, the double blocks of Flux, the joint layers of Z-Image); "
                      f"{type(diffusion_model).__name__} models have none. Connect masks instead, or set mask_from to "
                      "'connected masks'.")


class AutoRegions:
    """Keyed wrappers that record concept attention in the recording steps and set the automatic masks."""

    def __init__(self, router, diffusion_model, family: str, masks, chosen: list[int], positions: list[int],
                 groups: list[list[int]], phases: AutoMaskPhases, threshold: float, feather: float, names, node: str):
        self.router, self.model, self.family = router, diffusion_model, family
        self.masks = list(masks) + [None] * (len(names) - len(masks))
        self.chosen, self.positions, self.groups = chosen, positions, groups
        self.phases, self.threshold, self.feather, self.names, self.node = phases, threshold, feather, names, node
        self.shown = [i for i in range(len(names)) if self.masks[i] is not None or i in chosen]
        self.record = RegionalRecord((0, 0), tuple(names[i] for i in self.shown))
        if family == "unet":
            self._levels = cross_attention_levels(diffusion_model)
            self._level = capture_level(diffusion_model, self._levels)
        self.reset()

    def reset(self) -> None:
        self.router.reset_maps()
        self.record.steps = []
        self._applied, self._step = None, None
        self._unet = None
        self._dit = self._new_dit()
        self.updates = 0

    def _new_dit(self) -> DiTConceptAttention:
        if self.family == "lumina":
            return NextDiTConceptAttention(self.positions, caption_multiple(self.model), self.node)
        return DiTConceptAttention(self.positions, self.node)

    def install(self, patcher) -> None:
        patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, WRAPPER_KEY, self._outer)
        patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, WRAPPER_KEY, self._apply)

    def _outer(self, executor, *args, **kwargs):
        # A patched MODEL (the model-patch node) is sampled by any node, and as often as the user likes: each run
        # starts over (the same masks for the same run), and its positive conds are checked here, before the first
        # step, since they only meet the patch in the sampler.
        check_context(guider_positive(getattr(executor, "class_obj", None)), self.positions, self.node)
        self.reset()
        return executor(*args, **kwargs)

    def _apply(self, executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        sigma, schedule = sigma_of_call(transformer_options), sample_sigmas_of_call(transformer_options)
        step = 0 if sigma is None or schedule is None else step_index(sigma, schedule)
        latent = (int(x.shape[-2]), int(x.shape[-1]))
        self._update(step, latent)
        if step != self._step:
            self._step = step
            self._note(latent)
        chunks = [int(c) for c in (transformer_options.get("cond_or_uncond") or [0])]
        if not self.phases.records(step) or 0 not in chunks:
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        with self._recording(transformer_options, chunks, latent) as options:
            return executor(x, t, c_concat, c_crossattn, control, options, **kwargs)

    @contextlib.contextmanager
    def _recording(self, transformer_options, chunks, latent):
        if self.family in ("flux", "lumina"):
            with self._dit.recording(self.model, chunks, latent):
                yield transformer_options
            return
        size = capture_size(latent[0], latent[1], self._level)
        if self._unet is None or tuple(self._unet.size) != size:
            self._unet = ConceptAttention(size, {0: self.positions})
        options = dict(transformer_options)
        install_capture({"transformer_options": options}, self.model, self._unet, list(self._levels))
        yield options

    def _maps(self) -> torch.Tensor | None:
        if self.family in ("flux", "lumina"):
            return self._dit.averaged()
        return None if self._unet is None else self._unet.averaged(0)

    def _update(self, step: int, latent: tuple[int, int]) -> None:
        point = self.phases.update_point(step)
        if point is None or point == self._applied:
            return
        self._applied = point
        maps = self._maps()
        self._unet, self._dit = None, self._new_dit()
        if maps is None:
            return  # nothing recorded (no conditional call): the previous masks stay
        found = concept_masks(maps, self.groups, self.threshold, latent)
        masks = list(self.masks)
        for j, i in enumerate(self.chosen):
            if float(found[:, j].amax()) > 0:
                masks[i] = found[:, j]
            else:
                log.warning("%s: the attention of %s's concept gave an empty mask; it acts everywhere.",
                            self.node, self.names[i])
        plan = normalize_regions(masks, latent, self.node, self.feather, self.names)
        self.router.set_maps(plan.maps, plan.regional, latent)
        self.updates += 1

    def _note(self, latent: tuple[int, int]) -> None:
        maps = self.router.plan_for(latent).maps
        self.record.latent_size = latent
        self.record.steps.append([maps[0, i:i + 1].clone() for i in self.shown])


def guider_positive(guider) -> list:
    """The positive conds of a guider that is starting to sample, in CONDITIONING's [tensor, extras] form ([] when
    it has none by that name)."""
    conds = getattr(guider, "conds", None)
    entries = conds.get("positive") if isinstance(conds, dict) else None
    return [[c["cross_attn"], c] for c in entries or [] if isinstance(c, dict) and "cross_attn" in c]


def check_context(positive, positions: Sequence[int], node: str) -> None:
    """Every positive cond must hold the concept tokens (the prompt text matches what was encoded)."""
    for entry in positive or []:
        tokens = int(entry[0].shape[1]) if isinstance(entry[0], torch.Tensor) and entry[0].ndim == 3 else None
        if tokens is not None and positions and max(positions) >= tokens:
            raise RegionError(f"{node}: the concept words sit at token {max(positions)} of 'prompt' but the positive "
                              f"conditioning has {tokens} tokens; type in 'prompt' the text that was encoded.")


def auto_regional_model(model, rows: Sequence[LoraRow], masks: Sequence[torch.Tensor | None], node: str, clip,
                        prompt: str, phases: AutoMaskPhases, threshold: float = 0.4, feather: float = 0.0,
                        text_tokens: str = TEXT_ALL, positive=None):
    """(clone, AutoRegions): ``regional_model`` whose concept rows without a mask get automatic masks."""
    diffusion_model = model.model.diffusion_model
    family = check_family(diffusion_model, node)
    chosen = auto_rows(rows, masks)
    if not chosen:
        raise RegionError(f"{node}: mask_from is '{MASKS_ATTENTION}' but no row without a mask has a concept word. "
                          "Fill in the row's concept (a word of the prompt), or set mask_from to 'connected masks'.")
    if clip is None or not str(prompt or "").strip():
        raise RegionError(f"{node}: mask_from '{MASKS_ATTENTION}' needs 'clip' connected and the positive prompt's "
                          "text in 'prompt', to find the concept words' tokens.")
    positions, groups = concept_columns(clip, prompt, rows, chosen, family, node)
    check_context(positive, positions, node)
    words = text_concept_tokens(model, rows, masks, clip, prompt, node, text_tokens, chosen)
    engine = regional_engine(model, rows, masks, node, feather, text_tokens, words)
    auto = AutoRegions(engine.token_router, diffusion_model, family, masks, chosen, positions, groups, phases,
                       threshold, feather, [r.name for r in rows], node)
    clone = regional_clone(model, engine, node)
    auto.install(clone)
    return clone, auto


def drawn_record(rows: Sequence[LoraRow], masks: Sequence[torch.Tensor | None], latent_size: tuple[int, int],
                 node: str, feather: float = 0.0) -> RegionalRecord:
    """The record of a run with drawn masks only: one step, the regions of the rows with a mask."""
    masks = list(masks) + [None] * (len(rows) - len(masks))
    shown = [i for i, m in enumerate(masks) if m is not None]
    record = RegionalRecord(tuple(latent_size), tuple(rows[i].name for i in shown))
    if shown:
        maps = normalize_regions(masks, latent_size, node, feather, [r.name for r in rows]).maps
        record.steps.append([maps[0, i:i + 1].clone() for i in shown])
    return record
