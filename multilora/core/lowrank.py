"""Routed low-rank deltas for one layer: all LoRAs of a stack in one fused matmul pair.

For a layer y = W x + b targeted by LoRAs i = 1..k with factors A_i (r_i × in), B_i (out × r_i), scale
c_i = s_i·α_i/r_i (Hu et al. 2021, "LoRA"), and a batch whose row n has routing weights w_{n,i}:

    y_n = W x_n + b + B_cat · (m_n ⊙ (A_cat x_n)),   A_cat = [A_1; …; A_k],  B_cat = [c_1 B_1, …, c_k B_k],
    m_n[col] = w_{n, lora(col)}

which equals y_n with W + Σ_i w_{n,i} c_i B_i A_i merged, for every row at once (three kernels per layer,
whatever k is). Convolutions use A as a conv kernel with the layer's stride/padding/dilation and B as a
1×1 conv (LoCon). Fused weights (Flux qkv) place B_i's rows at the slice of the output it patches.
Adapters that are not low-rank (LoHa, LoKr, DoRA, full diffs) are dense ΔW_i applied as
y_n += w_{n,i}·(ΔW_i x_n + Δb_i); norms use the linearity of LayerNorm/GroupNorm in (weight, bias).
Pure module: torch only.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

LINEAR, CONV, LAYER_NORM, GROUP_NORM = "linear", "conv", "layer_norm", "group_norm"


@dataclass
class LowRankPart:
    """One LoRA's factors on one layer: ΔW[out_start:out_start+B.rows] = scale · B @ A."""

    lora: int
    down: torch.Tensor
    up: torch.Tensor
    scale: float
    out_start: int = 0


@dataclass
class DensePart:
    """One adapter's dense deltas (strength applied) on one layer."""

    lora: int
    weight: torch.Tensor | None
    bias: torch.Tensor | None


@dataclass
class LayerSpec:
    """What the hook needs to know about the target layer."""

    kind: str
    out_features: int
    weight_shape: tuple[int, ...]
    stride: tuple[int, ...] = ()
    padding: object = 0
    dilation: tuple[int, ...] = ()
    groups: int = 1
    norm_shape: tuple[int, ...] = ()
    num_groups: int = 1
    eps: float = 1e-5


@dataclass
class LayerDeltas:
    """All deltas on one layer, fused: A_cat, B_cat (scales folded in), the LoRA of every rank column."""

    spec: LayerSpec
    down_cat: torch.Tensor | None
    up_cat: torch.Tensor | None
    column_lora: torch.Tensor | None
    dense: list[DensePart]
    loras: frozenset[int]
    column_key: tuple[int, ...] = ()
    _cast: dict = field(default_factory=dict, repr=False)

    def cast(self, device: torch.device, dtype: torch.dtype) -> tuple:
        """Factors on the compute device/dtype, converted once per (device, dtype).

        Under autograd outside inference mode (CLoRA's latent gradient) the factors are separate copies:
        tensors made inside ComfyUI's inference mode cannot be saved for backward."""
        grad = torch.is_grad_enabled() and not torch.is_inference_mode_enabled()
        key = (device, dtype, grad)
        cached = self._cast.get(key)
        if cached is None:
            def to(t):
                if t is None:
                    return None
                moved = t.to(device=device, dtype=dtype)
                return moved.clone() if grad and moved.is_inference() else moved

            def to_index(t):
                moved = t.to(device)
                return moved.clone() if grad and moved.is_inference() else moved
            cached = (
                to(self.down_cat),
                to(self.up_cat),
                None if self.column_lora is None else to_index(self.column_lora),
                [DensePart(p.lora, to(p.weight), to(p.bias)) for p in self.dense],
            )
            self._cast[key] = cached
        return cached


def dense_from_lowrank(part: LowRankPart, spec: LayerSpec) -> DensePart:
    """ΔW = scale·B@A placed at its output slice, for parts that cannot join the fused group."""
    delta = torch.zeros(spec.weight_shape, dtype=torch.float32)
    product = part.scale * (part.up.float().flatten(1) @ part.down.float().flatten(1))
    rows = product.shape[0]
    delta[part.out_start:part.out_start + rows] = product.reshape((rows,) + tuple(spec.weight_shape[1:]))
    return DensePart(part.lora, delta, None)


def fuse_layer(spec: LayerSpec, lowrank: list[LowRankPart], dense: list[DensePart]) -> LayerDeltas:
    """Concatenate the low-rank parts of a layer into one A_cat/B_cat pair (see module docstring)."""
    dense = list(dense)
    fusable: list[LowRankPart] = []
    if spec.kind in (LINEAR, CONV) and spec.groups == 1:
        in_shape = tuple(spec.weight_shape[1:])
        for part in lowrank:
            if part.down.flatten(1).shape[1] == int(torch.Size(in_shape).numel()):
                fusable.append(part)
            else:
                dense.append(dense_from_lowrank(part, spec))
    else:
        dense.extend(dense_from_lowrank(p, spec) for p in lowrank)

    down_cat = up_cat = column_lora = None
    if fusable:
        in_shape = tuple(spec.weight_shape[1:])
        downs = [p.down.float().reshape((p.down.shape[0],) + in_shape) for p in fusable]
        down_cat = torch.cat(downs, dim=0)
        total_rank = down_cat.shape[0]
        up_cat = torch.zeros(spec.out_features, total_rank, dtype=torch.float32)
        columns = []
        col = 0
        for part in fusable:
            up = part.up.float().flatten(1)
            rank = up.shape[1]
            up_cat[part.out_start:part.out_start + up.shape[0], col:col + rank] = part.scale * up
            columns += [part.lora] * rank
            col += rank
        column_lora = torch.tensor(columns, dtype=torch.long)
        if spec.kind == LINEAR:
            down_cat = down_cat.reshape(total_rank, -1)
    loras = frozenset([p.lora for p in fusable] + [p.lora for p in dense])
    column_key = tuple(column_lora.tolist()) if column_lora is not None else ()
    return LayerDeltas(spec, down_cat, up_cat, column_lora, dense, loras, column_key)


def merged_delta(deltas: LayerDeltas, weights: "list[float] | torch.Tensor", device: torch.device | str = "cpu"
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """(ΔW, Δb) in float32 on ``device`` for one LoRA weight vector w: B_cat·diag(w_col)·A_cat + Σ w_i ΔW_i.

    ``weights`` may be a float32 tensor already on ``device`` (no host round trip per layer)."""
    spec = deltas.spec
    delta_w = delta_b = None
    down, up, column_lora, dense = deltas.cast(torch.device(device), torch.float32)
    if down is not None:
        if isinstance(weights, torch.Tensor):
            column_weights = weights.index_select(0, column_lora)
        else:
            column_weights = torch.tensor([weights[i] for i in deltas.column_key], dtype=torch.float32,
                                          device=up.device)
        product = (up * column_weights) @ down.flatten(1)
        delta_w = product.reshape(spec.weight_shape)
    for part in dense:
        w = float(weights[part.lora])
        if w == 0:
            continue
        if part.weight is not None:
            delta_w = w * part.weight if delta_w is None else delta_w + w * part.weight
        if part.bias is not None:
            delta_b = w * part.bias if delta_b is None else delta_b + w * part.bias
    return delta_w, delta_b


def _conv(spec: LayerSpec, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
          plain: bool = False) -> torch.Tensor:
    dims = weight.ndim - 2
    fn = (F.conv1d, F.conv2d, F.conv3d)[dims - 1]
    if plain:
        return fn(x, weight, bias)
    return fn(x, weight, bias, spec.stride, spec.padding, spec.dilation, spec.groups)


def _row_view(weights: torch.Tensor, ndim: int, per_token: bool) -> torch.Tensor:
    """Weights of one LoRA shaped to broadcast against an output of ``ndim`` dims: per row [B], per token
    [B, N] (token layers) or per pixel [B, h, w] (conv layers)."""
    if per_token:
        return weights.unsqueeze(-1)
    if weights.ndim == 1:
        return weights.view((-1,) + (1,) * (ndim - 1))
    return weights.unsqueeze(1)


def _may_write_in_place(out: torch.Tensor, update: torch.Tensor) -> bool:
    """Whether a layer's output may take its delta in place: a contiguous tensor outside autograd (a gradient
    pass, e.g. CLoRA's latent update, keeps the out-of-place form)."""
    return out.is_contiguous() and not (torch.is_grad_enabled() and (out.requires_grad or update.requires_grad))


def apply_layer_deltas(deltas: LayerDeltas, x: torch.Tensor, out: torch.Tensor,
                       row_weights: torch.Tensor, mask_cache: dict | None = None) -> torch.Tensor:
    """y + routed deltas. ``row_weights`` is [B, k] (one weight per batch row), or per token: [B, N, k] for a
    token layer (x [B, N, C]) or [B, k, h, w] for a conv layer (h × w = the output's size), on x's device and
    dtype (see ``regions`` for how they are made).

    ``mask_cache`` (one dict per model call) shares the column mask between layers whose rank columns belong
    to the same LoRAs in the same order (most layers of a stack) and whose weights are the same tensor."""
    spec = deltas.spec
    down, up, column_lora, dense = deltas.cast(out.device, out.dtype)
    if x.dtype != out.dtype:
        x = x.to(out.dtype)
    per_token = row_weights.ndim == 3
    lora_dim = -1 if per_token else 1
    if down is not None:
        key = (deltas.column_key, out.dtype, out.device, id(row_weights) if row_weights.ndim > 2 else None)
        mask = None if mask_cache is None else mask_cache.get(key)
        if mask is None:
            mask = row_weights.index_select(lora_dim, column_lora)
            if mask_cache is not None:
                mask_cache[key] = mask
        if spec.kind == LINEAR:
            h = F.linear(x, down)
            if per_token:
                h = h * mask
            else:
                h = h * mask.view((mask.shape[0],) + (1,) * (h.ndim - 2) + (mask.shape[1],))
            flat = h.reshape(-1, h.shape[-1])
            if _may_write_in_place(out, flat):  # no copy of the output first (addmm's out-of-place form makes one)
                out.view(-1, out.shape[-1]).addmm_(flat, up.t())
            else:
                out = torch.addmm(out.reshape(-1, out.shape[-1]), flat, up.t()).view(out.shape)
        else:
            h = _conv(spec, x, down)
            h = h * (mask if mask.ndim == h.ndim else mask.view(mask.shape + (1,) * (h.ndim - 2)))
            up_kernel = up.view(up.shape + (1,) * (h.ndim - 2))
            out = out + _conv(spec, h, up_kernel, plain=True)
    for part in dense:
        w = row_weights[..., part.lora] if per_token else row_weights[:, part.lora]
        if spec.kind == LINEAR:
            delta = F.linear(x, part.weight) if part.weight is not None else None
            if part.bias is not None:
                delta = part.bias if delta is None else delta + part.bias
        elif spec.kind == CONV:
            delta = _conv(spec, x, part.weight, part.bias) if part.weight is not None else None
            if delta is None and part.bias is not None:
                delta = part.bias.view((1, -1) + (1,) * (out.ndim - 2))
        elif spec.kind == LAYER_NORM:
            if part.weight is not None:
                delta = F.layer_norm(x, spec.norm_shape, part.weight, part.bias, spec.eps)
            else:
                delta = part.bias
        else:
            if part.weight is not None:
                delta = F.group_norm(x, spec.num_groups, part.weight, part.bias, spec.eps)
            else:
                delta = part.bias.view((1, -1) + (1,) * (out.ndim - 2))
        out = out + _row_view(w, out.ndim, per_token) * delta
    return out


@dataclass
class MergeGroup:
    """Layers whose low-rank deltas have the same shapes, merged by one batched matmul:
    W_g ← W₀_g + (B_g · diag(w[col_g])) A_g for every layer g of the group at once."""

    paths: list[str]
    weight_shape: tuple[int, ...]
    up: torch.Tensor
    down: torch.Tensor
    columns: torch.Tensor


def merge_groups(layers: "dict[str, LayerDeltas]", device: torch.device, max_elements: int = 1 << 25
                 ) -> tuple[list[MergeGroup], list[str]]:
    """Group the purely low-rank layers by shape (each group's float32 [G, out, in] ≤ ``max_elements``);
    the other paths (dense parts, no low-rank part) are returned for the per-layer merge."""
    by_shape: dict[tuple, list[str]] = {}
    rest: list[str] = []
    for path, deltas in layers.items():
        if deltas.dense or deltas.down_cat is None:
            rest.append(path)
            continue
        key = (tuple(deltas.spec.weight_shape), tuple(deltas.up_cat.shape), tuple(deltas.down_cat.flatten(1).shape))
        by_shape.setdefault(key, []).append(path)
    groups = []
    for (weight_shape, up_shape, _), paths in by_shape.items():
        size = max(1, max_elements // (up_shape[0] * int(torch.Size(weight_shape[1:]).numel())))
        for start in range(0, len(paths), size):
            chunk = paths[start:start + size]
            groups.append(MergeGroup(
                chunk, weight_shape,
                torch.stack([layers[p].up_cat for p in chunk]).to(device),
                torch.stack([layers[p].down_cat.flatten(1) for p in chunk]).to(device),
                torch.stack([layers[p].column_lora for p in chunk]).to(device)))
    return groups, rest


def merged_group_weights(group: MergeGroup, originals: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """[G, out, in] float32: W₀ + B·diag(w_col)·A per layer (``originals`` [G, out, ...], ``weights`` [k])."""
    scaled_up = group.up * weights[group.columns].unsqueeze(1)
    return torch.baddbmm(originals.flatten(2).float(), scaled_up, group.down)
