"""Tier 1: the batched merge of same-shape low-rank layers (lowrank.merge_groups / merged_group_weights)
equals the per-layer merge W₀ + merged_delta(...) for every layer, with grouping, chunking and the
paths it must leave to the per-layer merge (dense parts)."""
import torch

from support.pack_loader import load_pure

lowrank = load_pure("core.lowrank")


def layer(out_f, in_f, loras_ranks, seed, conv=False, dense=False):
    gen = torch.Generator().manual_seed(seed)
    shape = (out_f, in_f, 1, 1) if conv else (out_f, in_f)
    spec = lowrank.LayerSpec(lowrank.CONV if conv else lowrank.LINEAR, out_f, shape,
                             stride=(1, 1), padding=0, dilation=(1, 1))
    parts = []
    for lora, rank in loras_ranks:
        down = torch.randn((rank, in_f) + ((1, 1) if conv else ()), generator=gen)
        up = torch.randn((out_f, rank) + ((1, 1) if conv else ()), generator=gen)
        parts.append(lowrank.LowRankPart(lora, down, up, scale=0.5 + lora))
    extra = [lowrank.DensePart(2, torch.randn(shape, generator=gen), None)] if dense else []
    return lowrank.fuse_layer(spec, parts, extra)


def test_grouped_merge_equals_per_layer_merge():
    layers = {f"lin{i}": layer(8, 6, [(0, 2), (1, 3)], i) for i in range(5)}
    layers |= {f"conv{i}": layer(8, 6, [(0, 2), (1, 3)], 10 + i, conv=True) for i in range(2)}
    layers["other_shape"] = layer(4, 6, [(0, 2), (1, 3)], 20)
    layers["one_lora"] = layer(8, 6, [(1, 5)], 21)
    layers["with_dense"] = layer(8, 6, [(0, 2)], 22, dense=True)
    # chunks of at most 3 layers of 8×6: the five "lin" layers need two groups
    groups, rest = lowrank.merge_groups(layers, torch.device("cpu"), max_elements=3 * 48)
    assert rest == ["with_dense"]
    assert sorted(p for g in groups for p in g.paths) == sorted(p for p in layers if p != "with_dense")
    assert all(len(g.paths) <= 3 for g in groups) and len([g for g in groups if g.paths[0].startswith("lin")]) == 2
    gen = torch.Generator().manual_seed(99)
    originals = {p: torch.randn(d.spec.weight_shape, generator=gen) for p, d in layers.items()}
    vector = torch.tensor([0.7, -1.3, 0.0])
    for group in groups:
        stacked = torch.stack([originals[p] for p in group.paths])
        merged = lowrank.merged_group_weights(group, stacked, vector).view((len(group.paths),) + group.weight_shape)
        for path, got in zip(group.paths, merged.unbind(0)):
            delta, _ = lowrank.merged_delta(layers[path], vector)
            torch.testing.assert_close(got, originals[path] + delta, atol=1e-5, rtol=1e-5)
            assert (delta.abs().max() > 1e-1)  # the merge changes the weight: equality is not vacuous
