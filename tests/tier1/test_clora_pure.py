"""Tier 1: CLoRA's pure modules (token positions, contrastive loss, masks), no ComfyUI."""
import math
import os
import re

import pytest
import torch

from support.comfy_boot import comfy_root
from support.pack_loader import load_pure

tokens_mod = load_pure("core.prompt_tokens")
contrastive = load_pure("core.contrastive")
masks_mod = load_pure("core.clora_masks")
errors = load_pure("core.errors")

BOS, EOS = 49406, 49407


# --- fake tokenizer: one id per whitespace word, ComfyUI's row layout -------------------------------------
class FakeTokenizer:
    """Word-level ids, rows of 77 (BOS, ≤ 75 ids, EOS, padding), the way ComfyUI lays them out."""

    def __init__(self, pad=EOS, word_ids=False, key="l"):
        self.vocab = {}
        self.pad, self.word_ids, self.key = pad, word_ids, key

    def ids(self, text):
        out = []
        for word in text.lower().split():
            for piece in word.split("+"):  # "hip+po" is one word of two tokens
                out.append(self.vocab.setdefault(piece, 1000 + len(self.vocab)))
        return out

    def __call__(self, text):
        ids = self.ids(text)
        rows = []
        for start in range(0, max(len(ids), 1), 75):
            chunk = ids[start:start + 75]
            row = [BOS] + chunk + [EOS] + [self.pad] * (75 - len(chunk))
            rows.append([(t, 1.0, 1) if self.word_ids else (t, 1.0) for t in row])
        return {self.key: rows}


def test_positions_from_fake_tokenizer_rows():
    tok = FakeTokenizer()
    rows = tok("a cat and a dog and a cat")["l"]
    assert tokens_mod.find_positions(rows, tok.ids("cat")) == [2, 8]
    assert tokens_mod.find_positions(rows, tok.ids("dog")) == [5]
    assert tokens_mod.find_positions(rows, tok.ids("a cat")) == [1, 2, 7, 8]
    assert tokens_mod.find_occurrences(rows, tok.ids("a cat")) == [[1, 2], [7, 8]]
    assert tokens_mod.find_positions(rows, tok.ids("bird")) == []
    assert tokens_mod.find_positions(rows, []) == []


def test_word_ids_strip_bos_eos_and_padding():
    for tok in (FakeTokenizer(), FakeTokenizer(pad=0, word_ids=True)):
        assert tokens_mod.word_token_ids(tok, "hip+po") == tok.ids("hip+po")
        assert len(tokens_mod.word_token_ids(tok, "hip+po")) == 2


def test_second_row_positions_are_global():
    tok = FakeTokenizer()
    prompt = " ".join(f"w{i}" for i in range(80)) + " cat"
    rows = tok(prompt)["l"]
    assert len(rows) == 2 and all(len(r) == 77 for r in rows)
    # 80 fillers: 75 in row 0, 5 in row 1 (positions 1..5), cat at position 6 of row 1.
    assert tokens_mod.find_positions(rows, tok.ids("cat")) == [77 + 6]
    assert tokens_mod.concept_positions(tok, prompt, ["cat", "w0", "w79"]) == {
        "cat": [83], "w0": [1], "w79": [77 + 5]}


def test_padding_and_special_ids_never_match():
    tok = FakeTokenizer(pad=0)  # CLIP-G pads with id 0 ("!")
    rows = tok("a cat")["l"]
    assert tokens_mod.find_positions(rows, [0]) == []
    assert tokens_mod.find_positions(rows, [EOS]) == []
    assert tokens_mod.find_positions(rows, [BOS]) == []


def test_match_across_a_row_boundary():
    # ComfyUI cuts a weighted segment of >= 8 tokens anywhere, so a word can straddle two rows.
    tok = FakeTokenizer()
    prompt = " ".join(f"w{i}" for i in range(74)) + " hip+po+pot"
    assert tokens_mod.concept_positions(tok, prompt, ["hip+po+pot"])["hip+po+pot"] == [75, 78, 79]


def test_embedding_vectors_break_contiguity():
    rows = [[(BOS, 1.0), (5, 1.0), (torch.ones(4), 1.0), (6, 1.0), (5, 1.0), (6, 1.0), (EOS, 1.0)]]
    assert tokens_mod.find_positions(rows, [5, 6]) == [4, 5]
    assert tokens_mod.find_positions(rows, [6]) == [3, 5]


def test_token_rows_prefers_l_and_accepts_plain_rows():
    rows = [[(BOS, 1.0), (7, 1.0), (EOS, 1.0)]]
    assert tokens_mod.token_rows({"g": "G", "l": rows}) is rows
    assert tokens_mod.token_rows({"g": rows}) is rows
    assert tokens_mod.token_rows(rows) is rows
    with pytest.raises(ValueError):
        tokens_mod.token_rows({"a": rows, "b": rows})


def test_missing_concept_error_message():
    tok = FakeTokenizer()
    with pytest.raises(errors.ConceptNotFoundError) as info:
        tokens_mod.concept_positions(tok, "a cat and a puppy", ["cat", "dog"])
    assert str(info.value) == ("CLoRA: concept word 'dog' is not in the prompt 'a cat and a puppy'. "
                               "Use a word that appears in the prompt.")
    assert isinstance(info.value, errors.MultiLoRAError) and isinstance(info.value, ValueError)


# --- decorate_prompt -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("prompt, concept, trigger, want", [
    ("a cat and a dog", "cat", "sks", "a sks cat and a dog"),
    ("a (cat:1.2) and a dog", "cat", "sks", "a (sks cat:1.2) and a dog"),
    ("((cat)), dog", "cat", "sks", "((sks cat)), dog"),
    ("A Cat and a CAT", "cat", "sks", "A sks Cat and a sks CAT"),
    ("a cat, a dog. a cat.", "cat", "sks", "a sks cat, a dog. a sks cat."),
    ("a category of cats and a cat", "cat", "sks", "a category of cats and a sks cat"),
    ("a category of cats", "cats", "sks", "a category of sks cats"),
    ("a cat_dog hybrid", "dog", "sks", "a cat_sks dog hybrid"),
    ("a red  car", "red car", "zwx", "a zwx red  car"),
    ("a cat", "cat", ["sks", "ohwx"], "a sks ohwx cat"),
    ("a sks cat and a cat", "cat", "sks", "a sks cat and a sks cat"),
    ("embedding:cat a cat", "cat", "sks", "embedding:cat a sks cat"),
    ("a cat\nand a dog", "dog", "sks", "a cat\nand a sks dog"),
    ("a zorb on the left", "zorb", "zorb", "a zorb on the left"),
    ("A Zorb and a zorb", "zorb", "ZORB", "A Zorb and a zorb"),
    ("a zorb creature and a creature", "creature", "zorb creature", "a zorb creature and a zorb creature creature"),
])
def test_decorate_prompt(prompt, concept, trigger, want):
    assert tokens_mod.decorate_prompt(prompt, concept, trigger) == want


def test_decorate_prompt_is_idempotent_and_empty_trigger_is_identity():
    once = tokens_mod.decorate_prompt("(cat:1.2) and a cat", "cat", "sks")
    assert tokens_mod.decorate_prompt(once, "cat", "sks") == once
    for prompt, concept, trigger in (("a zorb on the left", "zorb", "zorb"), ("a cat", "cat", "zorb cat"),
                                     ("a tabby cat", "cat", "tabby")):
        once = tokens_mod.decorate_prompt(prompt, concept, trigger)
        assert tokens_mod.decorate_prompt(once, concept, trigger) == once, (prompt, once)
    assert tokens_mod.decorate_prompt("a dog", "cat", "") == "a dog"
    assert tokens_mod.decorate_prompt("a dog", "cat", "  ") == "a dog"


def test_decorate_prompt_errors():
    message = ("CLoRA: concept word 'dog' is not in the prompt 'a cat and a puppy'. "
               "Use a word that appears in the prompt.")
    with pytest.raises(errors.ConceptNotFoundError, match=re.escape(message)):
        tokens_mod.decorate_prompt("a cat and a puppy", "dog", "sks")
    with pytest.raises(errors.ConceptNotFoundError):
        tokens_mod.decorate_prompt("a category", "cat", "sks")
    with pytest.raises(errors.MultiLoRAError, match="needs a concept word"):
        tokens_mod.decorate_prompt("a cat", " ", "sks")


# --- the real CLIP tokenizer (vocab files shipped with ComfyUI; no ComfyUI import) -----------------------------
@pytest.fixture(scope="module")
def clip_tok():
    """The CLIP tokenizer of the ComfyUI the tests use ($COMFYUI_PATH or the vendored tree): never skipped."""
    import transformers
    path = os.path.join(comfy_root(), "comfy", "sd1_tokenizer")
    assert os.path.isfile(os.path.join(path, "vocab.json")), f"ComfyUI's sd1_tokenizer is missing under {path}"
    return transformers.CLIPTokenizer.from_pretrained(path)


_WEIGHTED = re.compile(r"\(([^()]*?)(?::([0-9.]+))?\)")


def comfy_like(tok, text, pad=EOS, word_ids=False):
    """Test-only stand-in for clip.tokenize: one level of (text:w) weights, 75 content tokens per row."""
    tokens, last = [], 0
    segments = []
    for m in _WEIGHTED.finditer(text):
        segments.append((text[last:m.start()], 1.0))
        segments.append((m.group(1), float(m.group(2)) if m.group(2) else 1.1))
        last = m.end()
    segments.append((text[last:], 1.0))
    for n, (segment, weight) in enumerate(segments):
        if segment.strip():
            tokens += [(t, weight, n + 1) for t in tok(segment)["input_ids"][1:-1]]
    rows = []
    for start in range(0, max(len(tokens), 1), 75):
        chunk = tokens[start:start + 75]
        row = [(BOS, 1.0, 0)] + chunk + [(EOS, 1.0, 0)] + [(pad, 1.0, 0)] * (75 - len(chunk))
        rows.append(row if word_ids else [r[:2] for r in row])
    return rows


def test_real_clip_simple_and_repeated(clip_tok):
    fn = lambda text: {"l": comfy_like(clip_tok, text)}  # noqa: E731
    cat = tokens_mod.word_token_ids(fn, "cat")
    assert cat == clip_tok("cat")["input_ids"][1:-1] and len(cat) == 1
    got = tokens_mod.concept_positions(fn, "a cat and a dog", ["cat", "dog"])
    assert got == {"cat": [2], "dog": [5]}
    got = tokens_mod.concept_positions(fn, "a cat, a dog. Another Cat.", ["cat", "dog"])
    assert got == {"cat": [2, 8], "dog": [5]}  # a cat , a dog . another cat .


def test_real_clip_whole_tokens_only(clip_tok):
    fn = lambda text: {"l": comfy_like(clip_tok, text)}  # noqa: E731
    with pytest.raises(errors.ConceptNotFoundError):
        tokens_mod.concept_positions(fn, "a category of cats", ["cat"])
    assert tokens_mod.concept_positions(fn, "a category of cats", ["cats"]) == {"cats": [4]}


def test_real_clip_multi_token_word_and_trigger(clip_tok):
    fn = lambda text: {"l": comfy_like(clip_tok, text, word_ids=True)}  # noqa: E731
    hippo = tokens_mod.word_token_ids(fn, "hippopotamus")
    assert len(hippo) == 3  # hippo potam us</w>
    assert tokens_mod.concept_positions(fn, "a hippopotamus and a cat", ["hippopotamus"]) == {
        "hippopotamus": [2, 3, 4]}
    variant = tokens_mod.decorate_prompt("a cat and a dog", "cat", "sks")
    got = tokens_mod.concept_positions(fn, variant, ["sks", "cat", "dog"])
    assert got == {"sks": [2], "cat": [3], "dog": [6]}


def test_real_clip_weight_syntax(clip_tok):
    fn = lambda text: {"l": comfy_like(clip_tok, text)}  # noqa: E731
    variant = tokens_mod.decorate_prompt("a (cat:1.2) and a dog", "cat", "sks")
    rows = fn(variant)["l"]
    got = tokens_mod.concept_positions(fn, variant, ["sks", "cat", "dog"])
    assert got == {"sks": [2], "cat": [3], "dog": [6]}
    assert rows[0][3] == (clip_tok("cat")["input_ids"][1], 1.2)


def test_real_clip_long_prompt_second_row(clip_tok):
    fn = lambda text: {"l": comfy_like(clip_tok, text)}  # noqa: E731
    prompt = "a " * 80 + "cat and a dog"
    rows = fn(prompt)["l"]
    assert len(rows) == 2
    got = tokens_mod.concept_positions(fn, prompt, ["cat", "dog"])
    assert got == {"cat": [77 + 6], "dog": [77 + 9]}
    assert rows[1][6][0] == tokens_mod.word_token_ids(fn, "cat")[0]


def test_real_clip_word_split_over_rows(clip_tok):
    fn = lambda text: {"l": comfy_like(clip_tok, text)}  # noqa: E731
    prompt = "a " * 74 + "hippopotamus"
    assert tokens_mod.concept_positions(fn, prompt, ["hippopotamus"]) == {"hippopotamus": [75, 78, 79]}


def test_real_clip_sdxl_g_and_l_share_positions(clip_tok):
    def sdxl(text):
        return {"g": comfy_like(clip_tok, text, pad=0), "l": comfy_like(clip_tok, text)}
    prompt = "a (dog:0.8) and a cat!"
    both = tokens_mod.concept_positions(sdxl, prompt, ["cat", "dog", "!"])
    only_g = tokens_mod.concept_positions(lambda t: {"g": sdxl(t)["g"]}, prompt, ["cat", "dog", "!"])
    assert both == only_g == {"cat": [5], "dog": [2], "!": [6]}


# --- contrastive loss -----------------------------------------------------------------------------------
def loop_nt_xent(maps, groups, tau):
    """Independent reference: plain Python loops over the SimCLR formula."""
    vecs = maps.tolist()
    n = len(vecs)

    def cos(a, b):
        dot = sum(x * y for x, y in zip(vecs[a], vecs[b]))
        na = math.sqrt(sum(x * x for x in vecs[a]))
        nb = math.sqrt(sum(x * x for x in vecs[b]))
        return dot / (na * nb)

    terms = []
    for a in range(n):
        for b in range(n):
            if a != b and groups[a] == groups[b]:
                den = sum(math.exp(cos(a, c) / tau) for c in range(n) if c != a)
                terms.append(-math.log(math.exp(cos(a, b) / tau) / den))
    return sum(terms) / len(terms) if terms else 0.0


@pytest.mark.parametrize("groups, tau", [
    ([0, 0, 1, 1, 1, 2], 0.5),
    (["cat", "dog", "cat", "dog"], 0.1),
    ([0, 0, 0, 0, 0], 1.0),
    ([3, 1, 3, 2, 1, 1, 2], 0.5),
])
def test_nt_xent_matches_loop_reference(groups, tau):
    g = torch.Generator().manual_seed(len(groups))
    maps = contrastive.normalize_maps(torch.rand(len(groups), 4, 5, generator=g, dtype=torch.float64)).flatten(1)
    got = contrastive.nt_xent_loss(maps, groups, temperature=tau)
    assert got.ndim == 0
    assert got.item() == pytest.approx(loop_nt_xent(maps, groups, tau), rel=1e-10, abs=1e-12)


def test_nt_xent_gradcheck():
    g = torch.Generator().manual_seed(5)
    maps = torch.rand(5, 6, generator=g, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda m: contrastive.nt_xent_loss(m, [0, 1, 0, 1, 1]), (maps,))
    raw = torch.rand(4, 3, 3, generator=g, dtype=torch.float64, requires_grad=True)
    loss = lambda m: contrastive.concept_contrastive_loss([m[:2], m[2:]])  # noqa: E731
    assert torch.autograd.gradcheck(loss, (raw,))


def test_nt_xent_no_positive_pairs_is_zero_with_grad():
    maps = torch.rand(3, 8, requires_grad=True)
    loss = contrastive.nt_xent_loss(maps, [0, 1, 2])
    assert loss.item() == 0.0 and loss.requires_grad
    loss.backward()
    assert torch.equal(maps.grad, torch.zeros_like(maps))


def test_nt_xent_prefers_aligned_groups():
    g = torch.Generator().manual_seed(7)
    groups = [0, 0, 1, 1, 2, 2]
    ideal = torch.zeros(6, 12)
    for i, grp in enumerate(groups):
        ideal[i, grp * 4:(grp + 1) * 4] = 1.0  # equal within a group, orthogonal across groups
    random_loss = contrastive.nt_xent_loss(torch.rand(6, 12, generator=g), groups)
    assert contrastive.nt_xent_loss(ideal, groups) < random_loss
    # Gradient descent on the maps lowers the loss.
    maps = torch.rand(6, 12, generator=g, requires_grad=True)
    first = contrastive.nt_xent_loss(maps, groups)
    for _ in range(20):
        loss = contrastive.nt_xent_loss(maps, groups)
        (grad,) = torch.autograd.grad(loss, maps)
        maps = (maps - 0.5 * grad).detach().requires_grad_(True)
    assert contrastive.nt_xent_loss(maps, groups) < first


def test_nt_xent_validation():
    with pytest.raises(ValueError, match="temperature"):
        contrastive.nt_xent_loss(torch.rand(2, 3), [0, 0], temperature=0.0)
    with pytest.raises(ValueError, match="group ids"):
        contrastive.nt_xent_loss(torch.rand(2, 3), [0])


def test_normalize_maps():
    g = torch.Generator().manual_seed(3)
    maps = torch.rand(3, 4, 6, generator=g) * 5 + 2
    out = contrastive.normalize_maps(maps)
    assert out.shape == maps.shape
    torch.testing.assert_close(out.flatten(1).amin(1), torch.zeros(3))
    torch.testing.assert_close(out.flatten(1).amax(1), torch.ones(3))
    torch.testing.assert_close(contrastive.normalize_maps(maps.flatten(1)), out.flatten(1))
    assert torch.equal(contrastive.normalize_maps(torch.full((1, 4), 3.0)), torch.zeros(1, 4))
    assert torch.equal(maps, maps.clone())  # input untouched


def test_concept_contrastive_loss_groups_tokens_by_concept():
    g = torch.Generator().manual_seed(9)
    cat, dog = torch.rand(3, 4, 4, generator=g), torch.rand(2, 4, 4, generator=g)
    want = contrastive.nt_xent_loss(contrastive.normalize_maps(torch.cat([cat, dog]).flatten(1)),
                                    [0, 0, 0, 1, 1], temperature=0.3)
    torch.testing.assert_close(contrastive.concept_contrastive_loss([cat, dog], temperature=0.3), want)


# --- masks ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("bad", [-0.1, 1.5])
def test_threshold_validation(bad):
    with pytest.raises(ValueError, match=re.escape(f"CLoRA: mask_threshold must be in [0, 1], got {bad}.")):
        masks_mod.threshold_masks([torch.rand(1, 2, 2)], bad)


def test_threshold_zero_gives_full_masks():
    maps = [torch.zeros(2, 3, 5), torch.rand(1, 3, 5)]
    out = masks_mod.threshold_masks(maps, 0.0)
    assert out.shape == (2, 3, 5) and out.dtype == torch.bool and bool(out.all())


def test_threshold_union_uses_each_maps_own_max():
    strong = torch.zeros(4, 4)
    strong[0, 0] = 1.0
    strong[3, 3] = 0.3
    weak = torch.zeros(4, 4)
    weak[2, 1] = 0.01  # small absolute value, but this map's own peak
    out = masks_mod.threshold_masks([torch.stack([strong, weak]), torch.zeros(1, 4, 4)], 0.4)
    assert out[0].nonzero().tolist() == [[0, 0], [2, 1]]
    assert not bool(out[1].any())  # an all-zero map covers nothing for λ > 0
    top = masks_mod.threshold_masks([strong[None]], 1.0)
    assert top[0].nonzero().tolist() == [[0, 0]]  # λ = 1 keeps the arg-max


def test_threshold_batched_maps():
    maps = torch.zeros(2, 3, 4, 4)
    maps[0, 1, 1, 2] = 1.0
    maps[1, 0, 3, 0] = 1.0
    out = masks_mod.threshold_masks([maps, maps[:, :1]], 0.5)
    assert out.shape == (2, 2, 4, 4)
    assert out[0, 0].nonzero().tolist() == [[1, 2]] and out[1, 0].nonzero().tolist() == [[3, 0]]
    assert not bool(out[0, 1].any()) and out[1, 1].nonzero().tolist() == [[3, 0]]


def test_reshape_tokens_to_map_row_major():
    attn = torch.arange(2 * 96 * 3, dtype=torch.float32).reshape(2, 96, 3)
    maps = masks_mod.reshape_tokens_to_map(attn, 8, 12)
    assert maps.shape == (2, 3, 8, 12)
    assert maps[1, 2, 5, 7] == attn[1, 5 * 12 + 7, 2]
    with pytest.raises(ValueError):
        masks_mod.reshape_tokens_to_map(attn, 12, 12)


def test_infer_layer_size():
    assert masks_mod.infer_layer_size((64, 96), 16 * 24) == (16, 24)
    assert masks_mod.infer_layer_size((64, 96), 8 * 12) == (8, 12)
    assert masks_mod.infer_layer_size((65, 97), 9 * 13) == (9, 13)  # UNet levels round up
    with pytest.raises(ValueError):
        masks_mod.infer_layer_size((64, 96), 7)


def test_resize_masks_nearest_non_square():
    m = torch.zeros(1, 2, 3, dtype=torch.bool)
    m[0, 1, 2] = True
    out = masks_mod.resize_masks(m, (4, 9))
    want = torch.zeros(1, 4, 9, dtype=torch.bool)
    want[0, 2:, 6:] = True
    assert out.dtype == torch.bool and torch.equal(out, want)
    soft = torch.tensor([[[0.25, 0.75]]])
    torch.testing.assert_close(masks_mod.resize_masks(soft, (2, 4)),
                               torch.tensor([[[0.25, 0.25, 0.75, 0.75]] * 2]))
    assert masks_mod.resize_masks(torch.zeros(2, 1, 5, 5), (10, 10)).shape == (2, 1, 10, 10)


def test_non_square_blob_lands_in_place_and_uncovered_takes_base():
    h, w, tokens = 8, 12, 3  # a 512x768 image at latent/8 → 64x96 latent, attention level 8x12
    attn = torch.full((1, h * w, tokens), 0.01)
    attn[0, 2 * w + 9, 1] = 0.9      # concept A's token (index 1) peaks at row 2, col 9
    attn[0, 6 * w + 1, 2] = 0.8      # concept B's token (index 2) peaks at row 6, col 1
    maps = masks_mod.reshape_tokens_to_map(attn, h, w)[0]
    masks = masks_mod.masks_from_maps([maps[1:2], maps[2:3]], 0.5, (64, 96))
    assert masks.shape == (2, 64, 96)
    want_a = torch.zeros(64, 96, dtype=torch.bool)
    want_a[16:24, 72:80] = True
    want_b = torch.zeros(64, 96, dtype=torch.bool)
    want_b[48:56, 8:16] = True
    assert torch.equal(masks[0], want_a) and torch.equal(masks[1], want_b)

    g = torch.Generator().manual_seed(0)
    base, pa, pb = (torch.randn(2, 4, 64, 96, generator=g) for _ in range(3))
    fused = masks_mod.fuse_with_masks(base, [pa, pb], masks)
    torch.testing.assert_close(fused[..., 16:24, 72:80], pa[..., 16:24, 72:80])
    torch.testing.assert_close(fused[..., 48:56, 8:16], pb[..., 48:56, 8:16])
    uncovered = ~(want_a | want_b)
    torch.testing.assert_close(fused[..., uncovered], base[..., uncovered])


def test_fuse_averages_overlaps():
    base = torch.zeros(1, 1, 1, 3)
    pa, pb = torch.full((1, 1, 1, 3), 2.0), torch.full((1, 1, 1, 3), 4.0)
    masks = torch.tensor([[[True, True, False]], [[False, True, False]]])
    got = masks_mod.fuse_with_masks(base, [pa, pb], masks)
    assert got.flatten().tolist() == [2.0, 3.0, 0.0]


def test_fuse_per_sample_masks_and_soft_masks():
    base = torch.zeros(2, 1, 1, 2)
    pa, pb = torch.ones(2, 1, 1, 2), torch.full((2, 1, 1, 2), 3.0)
    masks = torch.tensor([[[[1.0, 0.0]], [[0.0, 0.0]]], [[[0.25, 0.0]], [[0.75, 0.0]]]])
    got = masks_mod.fuse_with_masks(base, [pa, pb], masks)
    assert got[0].flatten().tolist() == [1.0, 0.0] and got[1].flatten().tolist() == [2.5, 0.0]


def test_full_masks_equal_composite_mean():
    """docs/algorithms.md §6: λ = 0 masks with the base among the fused predictions == Composite's mean."""
    g = torch.Generator().manual_seed(1)
    base, pa, pb = (torch.randn(2, 4, 6, 10, generator=g) for _ in range(3))
    maps = [torch.rand(2, 3, 5, generator=g) for _ in range(3)]
    full = masks_mod.masks_from_maps(maps, 0.0, (6, 10))
    got = masks_mod.fuse_with_masks(base, [base, pa, pb], full)
    torch.testing.assert_close(got, (base + pa + pb) / 3)
    got = masks_mod.fuse_with_masks(base, [pa, pb], full[1:])
    torch.testing.assert_close(got, (pa + pb) / 2)


def test_fuse_shape_errors():
    base = torch.zeros(1, 4, 8, 8)
    with pytest.raises(ValueError, match="K = 2"):
        masks_mod.fuse_with_masks(base, [base, base], torch.ones(3, 8, 8))
    with pytest.raises(ValueError, match="resize them first"):
        masks_mod.fuse_with_masks(base, [base], torch.ones(1, 4, 4))
    with pytest.raises(ValueError, match="masks for 3 samples"):
        masks_mod.fuse_with_masks(base, [base], torch.ones(3, 1, 8, 8))


def test_maps_at_step():
    per_step = [[torch.full((1, 2, 2), float(s)), torch.full((2, 2, 2), 10.0 * s)] for s in range(3)]
    assert masks_mod.maps_at_step(per_step, 1)[0][0, 0, 0] == 1.0
    assert masks_mod.maps_at_step(per_step, -1)[1][0, 0, 0] == 20.0
    avg = masks_mod.maps_at_step(per_step, None)
    assert avg[0][0, 0, 0] == 1.0 and avg[1].shape == (2, 2, 2) and avg[1][1, 1, 1] == 10.0
    with pytest.raises(ValueError, match="step 3 is out of range"):
        masks_mod.maps_at_step(per_step, 3)


def test_default_colors_are_distinct_rgb():
    colors = masks_mod.default_colors(14)
    assert len(colors) == 14 and len(set(colors)) == 14
    assert all(len(c) == 3 and all(0.0 <= v <= 1.0 for v in c) for c in colors)
    assert masks_mod.default_colors(0) == []


def test_overlay_blends_one_colour_per_mask():
    image = torch.full((4, 6, 3), 0.5)
    masks = torch.zeros(2, 2, 3, dtype=torch.bool)
    masks[0, 0, 0] = True
    masks[1, 0, 0] = True
    masks[1, 1, 2] = True
    red, blue = (1.0, 0.0, 0.0), (0.0, 0.0, 1.0)
    out = masks_mod.overlay(image, masks, [red, blue], alpha=0.5)
    assert out.shape == image.shape and torch.equal(image, torch.full((4, 6, 3), 0.5))
    torch.testing.assert_close(out[0, 0], torch.tensor([0.5, 0.25, 0.5]))   # red and blue mixed
    torch.testing.assert_close(out[3, 5], torch.tensor([0.25, 0.25, 0.75]))  # blue only
    torch.testing.assert_close(out[3, 0], image[3, 0])                      # no mask
    batch = masks_mod.overlay(image.expand(2, 4, 6, 3), masks)
    assert batch.shape == (2, 4, 6, 3) and float(batch.min()) >= 0 and float(batch.max()) <= 1
    with pytest.raises(ValueError):
        masks_mod.overlay(image, masks, [red])
