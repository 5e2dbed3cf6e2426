"""Tier 1: pure engine modules, no ComfyUI."""
import ast
import os

import pytest
import torch

from support.pack_loader import REPO_ROOT, load_pure

stack_mod = load_pure("core.stack")
routing = load_pure("core.routing")
lowrank = load_pure("core.lowrank")
errors = load_pure("core.errors")

HOST_MODULES = ("comfy", "comfy_api", "comfy_extras", "folder_paths", "nodes", "server", "execution",
                "latent_preview", "node_helpers")
PACK = os.path.join(REPO_ROOT, "multilora")
# A layer may import from itself and from the layers before it, never from a later one.
LAYERS = ("core", "host", "methods")
# Pure besides core/: the version shim is plain torch so that tier 1 can test it.
PURE_HOST = ("comfy_compat",)


def pack_files():
    for layer in LAYERS:
        for name in sorted(os.listdir(os.path.join(PACK, layer))):
            if name.endswith(".py"):
                yield layer, name[:-3]


def imports_of(layer: str, module: str):
    """(absolute top-level names, pack-relative targets as 'layer.module') imported anywhere in the file."""
    with open(os.path.join(PACK, layer, f"{module}.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    absolute, relative = set(), set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            absolute |= {a.name.split(".")[0] for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0:
            absolute.add(node.module.split(".")[0])
        elif isinstance(node, ast.ImportFrom):
            parts = [layer] if node.level == 1 else []
            assert node.level <= 2, f"{layer}/{module} reaches outside the engine package"
            parts += (node.module or "").split(".")
            relative.add(".".join(parts[:2]) if len(parts) > 1 else f"{layer}.{parts[0]}")
    return absolute, relative


def pure_closure(layer: str, module: str, seen=None):
    """Every pack module the file imports, following relative imports transitively."""
    seen = set() if seen is None else seen
    for target in imports_of(layer, module)[1] - seen:
        seen.add(target)
        pure_closure(*target.split("."), seen)
    return seen


@pytest.mark.parametrize("layer,module", list(pack_files()))
def test_layers_import_only_earlier_layers(layer, module):
    _, relative = imports_of(layer, module)
    for target in relative:
        target_layer, target_module = target.split(".")
        assert LAYERS.index(target_layer) <= LAYERS.index(layer), f"{layer}/{module} imports {target}"
        assert os.path.isfile(os.path.join(PACK, target_layer, f"{target_module}.py")), target


@pytest.mark.parametrize("layer,module", [(lay, m) for lay, m in pack_files() if lay == "core" or m in PURE_HOST])
def test_pure_modules_import_no_host_even_transitively(layer, module):
    for target in {f"{layer}.{module}"} | pure_closure(layer, module):
        absolute, _ = imports_of(*target.split("."))
        assert not absolute & set(HOST_MODULES), f"{layer}/{module} reaches the host through {target}"


def test_layering_check_catches_a_host_import_through_a_relative_one(tmp_path, monkeypatch):
    for layer in LAYERS:
        (tmp_path / layer).mkdir()
    (tmp_path / "core" / "a.py").write_text("from .b import x\n")
    (tmp_path / "core" / "b.py").write_text("import comfy.utils\nx = 1\n")
    (tmp_path / "core" / "c.py").write_text("from ..host.d import y\n")
    (tmp_path / "host" / "d.py").write_text("y = 2\n")
    monkeypatch.setattr(__import__(__name__), "PACK", str(tmp_path))
    with pytest.raises(AssertionError, match="reaches the host through core.b"):
        test_pure_modules_import_no_host_even_transitively("core", "a")
    with pytest.raises(AssertionError, match="core/c imports host.d"):
        test_layers_import_only_earlier_layers("core", "c")


def test_module_map_names_every_module():
    with open(os.path.join(PACK, "__init__.py"), encoding="utf-8") as f:
        doc = ast.get_docstring(ast.parse(f.read()))
    missing = [f"{lay}/{m}" for lay, m in pack_files() if m != "__init__" and f"``{m}``" not in doc]
    assert not missing, f"multilora/__init__.py's module map leaves out {missing}"


def test_root_init_is_import_light():
    with open(os.path.join(REPO_ROOT, "__init__.py"), encoding="utf-8") as f:
        tree = ast.parse(f.read())
    top_level = [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]
    assert top_level == []
    names = {t.id for n in tree.body if isinstance(n, ast.Assign) for t in n.targets}
    assert "NODE_CLASS_MAPPINGS" not in names and "WEB_DIRECTORY" in names


# --- stack --------------------------------------------------------------------------------------------
def row(name="a.safetensors", **kw):
    args = dict(strength_model=1.0, strength_clip=1.0, enabled=True, concept="", trigger="", category="other",
                available={"a.safetensors", "b.safetensors"})
    args.update(kw)
    return stack_mod.build_row(1, name, **args)


def test_stack_chaining_returns_new_stack_and_keeps_input():
    first = stack_mod.LoraStack((row(),))
    second = stack_mod.LoraStack((row("b.safetensors", enabled=False),))
    chained = first.chained(second)
    assert [r.name for r in chained.rows] == ["a.safetensors", "b.safetensors"]
    assert len(first) == 1 and len(second) == 1
    assert [r.name for r in chained.active()] == ["a.safetensors"]
    changed = chained.with_row(0, strength_model=0.5)
    assert chained.rows[0].strength_model == 1.0 and changed.rows[0].strength_model == 0.5
    with pytest.raises(Exception):
        chained.rows[0].strength_model = 3.0  # frozen


def test_row_errors_name_the_row():
    with pytest.raises(errors.StackError, match=r"LoRA Stack: row 1 has no LoRA file selected"):
        row("None")
    with pytest.raises(errors.StackError, match=r"row 1: LoRA file 'zzz.safetensors' was not found"):
        row("zzz.safetensors")
    with pytest.raises(errors.StackError, match=r"category 'hat' is not one of"):
        row(category="hat")


def test_concept_and_trigger_words_split_on_commas():
    r = row(concept=" cat , kitten,, ", trigger="sks")
    assert r.concept_words() == ("cat", "kitten") and r.trigger_words() == ("sks",)


def test_require_active_messages():
    with pytest.raises(errors.StackError, match="the LoRA stack is empty"):
        stack_mod.require_active(stack_mod.LoraStack(()), "Node")
    off = stack_mod.LoraStack((row(enabled=False),))
    with pytest.raises(errors.StackError, match="every row of the LoRA stack is switched off"):
        stack_mod.require_active(off, "Node")
    with pytest.raises(errors.StackError, match="needs at least 2 enabled LoRAs, the stack has 1"):
        stack_mod.require_active(stack_mod.LoraStack((row(),)), "Node", minimum=2)


# --- routing ------------------------------------------------------------------------------------------
def test_step_index_floor_maps_sigmas():
    sched = [10.0, 5.0, 2.0, 1.0, 0.0]
    assert routing.step_index(10.0, sched) == 0
    assert routing.step_index(7.0, sched) == 0      # between steps 0 and 1 (dpm_2 midpoint)
    assert routing.step_index(5.0, sched) == 1      # heun's correction at σ_1 belongs to step 1
    assert routing.step_index(1.0, sched) == 3
    assert routing.step_index(0.5, sched) == 3      # clipped to the last step
    assert routing.step_index(20.0, sched) == 0


def test_switch_rule_is_floor_i_over_tau_mod_k():
    got = [routing.switch_active_index(i, 5, 3) for i in range(32)]
    assert got == [(i // 5) % 3 for i in range(32)]
    assert got[:6] == [0, 0, 0, 0, 0, 1]  # the paper's rule: first LoRA gets exactly τ steps
    with pytest.raises(ValueError):
        routing.switch_active_index(0, 0, 2)


def test_by_cond_index_routing():
    r = routing.ByCondIndex({0: (1.0, 0.0), 1: (0.0, 1.0)}, (0.0, 0.0))
    assert r.chunk_weights([1, 0, 3], {}) == [(0.0, 1.0), (1.0, 0.0), (0.0, 0.0)]


# --- fused low-rank deltas ----------------------------------------------------------------------------
def merged_linear(x, w, b, parts, lora_weights):
    dw = torch.zeros_like(w)
    for p in parts:
        rows = p.up.shape[0]
        dw[p.out_start:p.out_start + rows] += lora_weights[p.lora] * p.scale * (p.up @ p.down)
    return torch.nn.functional.linear(x, w + dw, b)


def test_fused_linear_equals_per_row_merged_weights():
    g = torch.Generator().manual_seed(0)
    w, b = torch.randn(12, 8, generator=g), torch.randn(12, generator=g)
    parts = [lowrank.LowRankPart(0, torch.randn(3, 8, generator=g), torch.randn(12, 3, generator=g), 0.7),
             lowrank.LowRankPart(1, torch.randn(2, 8, generator=g), torch.randn(4, 2, generator=g), 1.3, out_start=4),
             lowrank.LowRankPart(0, torch.randn(1, 8, generator=g), torch.randn(12, 1, generator=g), 0.2)]
    spec = lowrank.LayerSpec(lowrank.LINEAR, 12, (12, 8))
    deltas = lowrank.fuse_layer(spec, parts, [])
    x = torch.randn(3, 5, 8, generator=g)
    rows = torch.tensor([[1.0, 0.0], [0.0, 1.0], [0.5, 2.0]])
    got = lowrank.apply_layer_deltas(deltas, x, torch.nn.functional.linear(x, w, b), rows)
    for n in range(3):
        want = merged_linear(x[n:n + 1], w, b, parts, rows[n].tolist())
        torch.testing.assert_close(got[n:n + 1], want, rtol=1e-5, atol=1e-5)


def test_fused_conv_with_stride_padding_equals_merged():
    g = torch.Generator().manual_seed(1)
    conv = torch.nn.Conv2d(4, 6, 3, stride=2, padding=1)
    parts = [lowrank.LowRankPart(0, torch.randn(2, 4, 3, 3, generator=g), torch.randn(6, 2, 1, 1, generator=g), 0.5),
             lowrank.LowRankPart(1, torch.randn(3, 4, 3, 3, generator=g), torch.randn(6, 3, 1, 1, generator=g), 1.5)]
    spec = lowrank.LayerSpec(lowrank.CONV, 6, (6, 4, 3, 3), (2, 2), (1, 1), (1, 1), 1)
    deltas = lowrank.fuse_layer(spec, parts, [])
    x = torch.randn(2, 4, 9, 7, generator=g)
    rows = torch.tensor([[0.0, 1.0], [1.0, 1.0]])
    got = lowrank.apply_layer_deltas(deltas, x, conv(x), rows)
    for n in range(2):
        dw = sum(rows[n, p.lora] * p.scale * (p.up.flatten(1) @ p.down.flatten(1)).reshape(6, 4, 3, 3) for p in parts)
        want = torch.nn.functional.conv2d(x[n:n + 1], conv.weight + dw, conv.bias, 2, 1)
        torch.testing.assert_close(got[n:n + 1], want, rtol=1e-4, atol=1e-5)


def test_dense_parts_for_linear_and_layer_norm():
    g = torch.Generator().manual_seed(2)
    norm = torch.nn.LayerNorm(8)
    dw, db = torch.randn(8, generator=g) * 0.1, torch.randn(8, generator=g) * 0.1
    spec = lowrank.LayerSpec(lowrank.LAYER_NORM, 8, (8,), norm_shape=(8,), eps=norm.eps)
    deltas = lowrank.fuse_layer(spec, [], [lowrank.DensePart(0, dw, db)])
    x = torch.randn(2, 3, 8, generator=g)
    rows = torch.tensor([[1.0], [0.0]])
    got = lowrank.apply_layer_deltas(deltas, x, norm(x), rows)
    want0 = torch.nn.functional.layer_norm(x[:1], (8,), norm.weight + dw, norm.bias + db, norm.eps)
    torch.testing.assert_close(got[:1], want0, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1:], norm(x[1:]))


def test_lowrank_part_with_other_kernel_falls_back_to_dense():
    g = torch.Generator().manual_seed(3)
    spec = lowrank.LayerSpec(lowrank.CONV, 6, (6, 4, 1, 1), (1, 1), (0, 0), (1, 1), 1)
    part = lowrank.LowRankPart(0, torch.randn(2, 4, generator=g), torch.randn(6, 2, generator=g), 1.0)
    deltas = lowrank.fuse_layer(spec, [part], [])
    assert deltas.down_cat is not None and deltas.down_cat.shape == (2, 4, 1, 1)


def test_merged_delta_equals_sum_of_weighted_parts():
    g = torch.Generator().manual_seed(4)
    parts = [lowrank.LowRankPart(0, torch.randn(3, 8, generator=g), torch.randn(12, 3, generator=g), 0.7),
             lowrank.LowRankPart(1, torch.randn(2, 8, generator=g), torch.randn(4, 2, generator=g), 1.3, out_start=4)]
    dense = [lowrank.DensePart(1, torch.randn(12, 8, generator=g), torch.randn(12, generator=g))]
    deltas = lowrank.fuse_layer(lowrank.LayerSpec(lowrank.LINEAR, 12, (12, 8)), parts, dense)
    dw, db = lowrank.merged_delta(deltas, [0.5, 2.0])
    want = torch.zeros(12, 8)
    want += 0.5 * 0.7 * parts[0].up @ parts[0].down
    want[4:8] += 2.0 * 1.3 * parts[1].up @ parts[1].down
    want += 2.0 * dense[0].weight
    torch.testing.assert_close(dw, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(db, 2.0 * dense[0].bias)
