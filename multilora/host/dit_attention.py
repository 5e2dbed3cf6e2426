"""Concept-token attention of a Flux-family DiT (ComfyUI's ``comfy.ldm.flux``) or a Lumina-family NextDiT
(``comfy.ldm.lumina``: Z-Image, Lumina 2), for automatic regional masks.

A Flux double block attends jointly over [text; image] tokens: q = [q_txt; q_img], k = [k_txt; k_img], each stream
with its own projection and QK RMS-norm (``SelfAttention.norm``, a ``QKNorm``), then RoPE (``math.attention`` →
``apply_rope``, in 0.3.75 and 0.33.0 alike) and one softmax over all L = T + N keys. The part that says where a
text token lands in the image is the image-query × text-key block. Here it is computed for the concept columns
only, never as an N × N (or L × L) map:

    ℓ = R(q_img) · R(k_txt)ᵀ / √d        [N, T] per image and head, R = the block's RoPE rotation
    P = softmax_T(ℓ)                      a softmax over the T text keys only
    A(n, c) = mean_{heads, blocks} P(n, c)   for the concept columns c

The softmax over text keys only is the full joint softmax restricted to the text columns and renormalised per
image query (the image keys' share cancels), so an image token's value is "how much of its attention to the
prompt goes to this concept", comparable across image tokens whatever their self-attention. Recorded on every
double block (image and text streams are separate there; the single blocks fuse them into one projection),
averaged over heads and blocks, for the conditional chunks only. The image queries are the first N of the image
stream (reference-image tokens after them are skipped).

Capture is a context manager around one model call: forward hooks on each double block (for ``pe``), its
``img_attn.norm`` (normed image q) and ``txt_attn.norm`` (normed text k), all removed in ``finally``; the block's
outputs are untouched. Host module.

NextDiT (``NextDiTConceptAttention``): every main layer attends over the joint [caption + pads; image; image pads]
with one fused ``attention.qkv`` for all tokens, then ``q_norm`` / ``k_norm`` (RMSNorm per head) and RoPE. 0.3.75
calls the norms as modules and ``apply_rope``; 0.33 fuses both into one kernel (``rms_rope``), so the norms cannot
be hooked: here q and k are read from the ``qkv`` output (after the engine's LoRA hook) and normed and rotated as
ComfyUI does (RMSNorm with the module's weight and eps, float32 eps when it has none; the block's ``freqs_cis``).
Image queries are the grid tokens after the padded caption; text keys are the caption's own T tokens (its pad
tokens carry no word), each key head shared by its query heads (GQA, as the model repeats them). Recorded on every
main layer, averaged over heads and layers, the same softmax over text keys as above.
"""
from __future__ import annotations

import contextlib
from typing import Iterator, Sequence

import torch

from ..core.regions import RegionError


def rope_rotate(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """RoPE of Flux's ``EmbedND`` rotations: x [B, h, L, d] with freqs [B, 1, L, d/2, 2, 2] → R·x (float32)."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 1, 2)
    out = freqs[..., 0] * pairs[..., 0] + freqs[..., 1] * pairs[..., 1]
    return out.reshape(x.shape)


class DiTConceptAttention:
    """Records A [rows, N, C] for the concept ``columns`` (text token positions) of the conditional chunks."""

    def __init__(self, columns: Sequence[int], node: str = "Regional LoRA"):
        self.columns = [int(c) for c in columns]
        self.node = node
        self.reset()

    def reset(self) -> None:
        self._sum: torch.Tensor | None = None
        self._count = 0
        self.grid: tuple[int, int] | None = None

    @contextlib.contextmanager
    def recording(self, diffusion_model, chunks: Sequence[int], latent: tuple[int, int], cond_index: int = 0,
                  patch: int = 2) -> Iterator[None]:
        """Hooks on every double block for one model call whose batch holds ``chunks`` (cond_or_uncond)."""
        blocks = list(getattr(diffusion_model, "double_blocks", []) or [])
        if not blocks:
            raise RegionError(f"{self.node}: {type(diffusion_model).__name__} has no double blocks, so automatic masks "
                              "cannot read its text-to-image attention; connect masks instead.")
        wanted = [c for c, index in enumerate(chunks) if int(index) == cond_index]
        grid = (-(-latent[0] // patch), -(-latent[1] // patch))
        handles = []
        try:
            if wanted:
                for block in blocks:
                    if getattr(block, "flipped_img_txt", False):
                        raise RegionError(f"{self.node}: {type(diffusion_model).__name__} puts image tokens before text "
                                          "tokens in its joint attention; automatic masks support Flux-family "
                                          "models only. Connect masks instead.")
                    handles += self._hook(block, len(chunks), wanted, grid)
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _hook(self, block, chunk_count: int, wanted: list[int], grid: tuple[int, int]) -> list:
        state: dict = {}

        def on_block(module, args, kwargs):
            state["pe"] = kwargs.get("pe", args[3] if len(args) > 3 else None)
            txt = kwargs.get("txt", args[1] if len(args) > 1 else None)
            state["text"] = int(txt.shape[1])
            state["mask"] = kwargs.get("attn_mask")

        def on_img_norm(module, args, output):
            state["q"] = output[0]

        def on_txt_norm(module, args, output):
            q_img, k_txt = state.pop("q", None), output[1]
            if q_img is not None:
                self._add(q_img, k_txt, state, chunk_count, wanted, grid)

        return [block.register_forward_pre_hook(on_block, with_kwargs=True),
                block.img_attn.norm.register_forward_hook(on_img_norm),
                block.txt_attn.norm.register_forward_hook(on_txt_norm)]

    def _rows(self, tensor: torch.Tensor, chunk_count: int, wanted: list[int]) -> torch.Tensor:
        rows = tensor.shape[0] // chunk_count
        return torch.cat([tensor[c * rows:(c + 1) * rows] for c in wanted])

    def _add(self, q_img, k_txt, state, chunk_count, wanted, grid) -> None:
        text, n = state["text"], grid[0] * grid[1]
        if max(self.columns) >= text:
            raise RegionError(f"{self.node}: concept token {max(self.columns)} is past the prompt's {text} tokens; "
                              "the prompt text does not match the positive conditioning.")
        q = self._rows(q_img, chunk_count, wanted)[:, :, :n]
        k = self._rows(k_txt, chunk_count, wanted)
        pe = state["pe"]
        if pe is not None:
            pe = self._rows(pe, chunk_count, wanted) if pe.shape[0] == q_img.shape[0] else pe
            q, k = rope_rotate(q, pe[:, :, text:text + n]), rope_rotate(k, pe[:, :, :text])
        else:
            q, k = q.float(), k.float()
        bias = self._mask_bias(state.get("mask"), chunk_count, wanted, text, n, q_img.shape[0])
        scale = q.shape[-1] ** -0.5
        columns = torch.tensor(self.columns, device=q.device)
        total = None
        for head in range(q.shape[1]):  # one [rows, N, T] block at a time: memory O(N·T), never O(N²)
            logits = q[:, head] @ k[:, head].transpose(-1, -2) * scale
            if bias is not None:
                logits = logits + bias
            probs = torch.softmax(logits, dim=-1).index_select(-1, columns)
            total = probs if total is None else total + probs
        mean = (total / q.shape[1]).detach()
        mean = mean.reshape(len(wanted), -1, *mean.shape[1:]).mean(0)  # several positive chunks: their mean
        if self._sum is None or self._sum.shape != mean.shape:
            self._sum, self._count = torch.zeros_like(mean), 0
        self._sum += mean
        self._count += 1
        self.grid = grid

    def _mask_bias(self, mask, chunk_count, wanted, text, n, batch) -> torch.Tensor | None:
        """The model's attention mask on the image-query × text-key block, as an additive bias (or None)."""
        if mask is None:
            return None
        if mask.ndim == 4:
            mask = mask[:, 0] if mask.shape[1] == 1 else mask.amax(1) if mask.dtype == torch.bool else mask.mean(1)
        if mask.ndim == 3 and mask.shape[0] == batch:
            mask = self._rows(mask, chunk_count, wanted)
        block = mask[..., text:text + n, :text]
        if block.dtype == torch.bool:
            return torch.zeros(block.shape, device=block.device).masked_fill(~block, float("-inf"))
        return block.float()

    def averaged(self) -> torch.Tensor | None:
        """[rows, C, h, w]: the recorded maps averaged over heads, blocks and calls (None before any)."""
        if self._sum is None or not self._count:
            return None
        mean = self._sum / self._count
        return mean.transpose(1, 2).reshape(mean.shape[0], mean.shape[2], *self.grid)


def rms_normed(x: torch.Tensor, norm: torch.nn.Module) -> torch.Tensor:
    """x (float32) through ``norm`` as ComfyUI's RMSNorm / fused rms_rope compute it (identity when it has no weight)."""
    weight = getattr(norm, "weight", None)
    x = x.float()
    if weight is None:
        return x
    eps = getattr(norm, "eps", None)
    eps = torch.finfo(torch.float32).eps if eps is None else eps
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * weight.to(device=x.device, dtype=torch.float32)


class NextDiTConceptAttention(DiTConceptAttention):
    """Records A [rows, N, C] on a Lumina-family NextDiT (Z-Image, Lumina 2): image queries × caption keys of every
    main layer. ``text_multiple``: the multiple the model pads its caption to."""

    def __init__(self, columns: Sequence[int], text_multiple: int = 1, node: str = "Regional LoRA"):
        super().__init__(columns, node)
        self.text_multiple = max(1, int(text_multiple))

    @contextlib.contextmanager
    def recording(self, diffusion_model, chunks: Sequence[int], latent: tuple[int, int], cond_index: int = 0,
                  patch: int = 2) -> Iterator[None]:
        """Hooks on the caption embedder (for T) and every main layer's attention for one model call."""
        layers = list(getattr(diffusion_model, "layers", []) or [])
        if not layers:
            raise RegionError(f"{self.node}: {type(diffusion_model).__name__} has no joint layers, so automatic masks "
                              "cannot read its text-to-image attention; connect masks instead.")
        wanted = [c for c, index in enumerate(chunks) if int(index) == cond_index]
        grid = (-(-latent[0] // patch), -(-latent[1] // patch))
        state: dict = {}
        handles = []
        try:
            if wanted:
                def on_caption(module, args):
                    state["text"] = int(args[0].shape[1])
                handles.append(diffusion_model.cap_embedder.register_forward_pre_hook(on_caption))
                for layer in layers:
                    handles += self._layer_hooks(layer.attention, state, len(chunks), wanted, grid)
            yield
        finally:
            for handle in handles:
                handle.remove()

    def _layer_hooks(self, attention, state: dict, chunk_count: int, wanted: list[int], grid: tuple[int, int]) -> list:
        def on_attention(module, args, kwargs):
            state["pe"] = kwargs.get("freqs_cis", args[2] if len(args) > 2 else None)

        def on_qkv(module, args, output):
            self._add_layer(attention, output, state, chunk_count, wanted, grid)

        return [attention.register_forward_pre_hook(on_attention, with_kwargs=True),
                attention.qkv.register_forward_hook(on_qkv)]

    def _add_layer(self, attention, qkv: torch.Tensor, state: dict, chunk_count: int, wanted: list[int],
                   grid: tuple[int, int]) -> None:
        heads, kv_heads, dim = attention.n_local_heads, attention.n_local_kv_heads, attention.head_dim
        text, n = state["text"], grid[0] * grid[1]
        start = text + (-text) % self.text_multiple
        rows = self._rows(qkv, chunk_count, wanted)
        q = rows[:, start:start + n, :heads * dim].unflatten(-1, (heads, dim))
        k = rows[:, :text, heads * dim:(heads + kv_heads) * dim].unflatten(-1, (kv_heads, dim))
        q, k = rms_normed(q, attention.q_norm), rms_normed(k, attention.k_norm)
        pe = state.get("pe")
        if pe is not None:  # [B or 1, L, 1, d/2, 2, 2]
            pe = self._rows(pe, chunk_count, wanted) if pe.shape[0] == qkv.shape[0] else pe
            q, k = rope_rotate(q, pe[:, start:start + n]), rope_rotate(k, pe[:, :text])
        k = k.repeat_interleave(heads // kv_heads, dim=2)
        chunks = list(range(len(wanted)))  # rows already picked: _add averages the positive chunks
        self._add(q.transpose(1, 2), k.transpose(1, 2), {"text": text, "pe": None, "mask": None}, len(chunks), chunks,
                  grid)
