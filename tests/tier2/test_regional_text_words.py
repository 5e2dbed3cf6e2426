"""text_tokens "each LoRA on its words": on the positive prompt, a regional row's concept-word tokens get no other
regional LoRA; every other text token, and the negative prompt, gets every LoRA. Checked layer by layer against
ComfyUI's merged LoRAs (as test_regional does), on Flux's text stream and single blocks and on a UNet's
cross-attention keys/values. And the region maps reach every layer from the buffer staged before a CUDA-graph
capture, never by a copy from the host."""
import pytest
import torch
from test_regional import ATOL, RTOL, STRENGTHS, halves, loras, rows_of

from support import lora_files, tiny_models
from support.layer_records import layer_outputs, run_wrapped

WORDS = {0: [2, 3], 1: [5]}  # row a's concept tokens, row b's
POLICY = "each LoRA on its words"


@pytest.fixture(scope="module")
def models():
    return {kind: tiny_models.build_tiny(kind, seed=0) for kind in ("sd15", "flux")}


@pytest.mark.parametrize("kind", ("sd15", "flux"))
def test_concept_words_get_only_their_rows_lora_on_the_positive_rows(comfy_state, ml, models, kind):
    patcher = models[kind]
    names = loras(comfy_state, patcher, kind)
    rows = rows_of(ml, names)
    clone = ml("methods.regional").regional_model(patcher, rows, list(halves()), "test", text_tokens=POLICY,
                                                  concept_tokens=WORDS)
    engine = lora_files.engine_of(clone, ml)
    x, sigma, cond = tiny_models.make_inputs(kind, batch=2, seed=8, size=16)
    record = {}
    roles = engine.token_router.roles
    paths = [p for p in engine.layers if roles[p] in ("text", "joint")]
    run_wrapped(clone, engine, patcher, x, sigma, cond, record, paths, cond_or_uncond=[0, 1])
    ref = {n: layer_outputs(patcher, lora_files.merged_by_comfy(patcher, names[i], STRENGTHS[i]), record)
           for n, i in (("a", slice(0, 1)), ("b", slice(1, 2)), ("ab", slice(0, 2)))}
    text = cond["c_crossattn"].shape[1]
    others = [t for t in range(text) if t not in WORDS[0] + WORDS[1]]
    seen = set()
    for p in paths:
        got = record[p][1]
        if got.ndim != 3:
            continue
        seen.add(roles[p])
        a, b, ab = (ref[n][p] for n in ("a", "b", "ab"))
        for want, tokens in ((a, WORDS[0]), (b, WORDS[1]), (ab, others)):  # batch row 0: the positive chunk
            torch.testing.assert_close(got[0, tokens], want[0, tokens], atol=ATOL, rtol=RTOL, msg=p)
        torch.testing.assert_close(got[1, :text], ab[1, :text], atol=ATOL, rtol=RTOL, msg=p)  # the negative
        assert (a[0, WORDS[0]] - ab[0, WORDS[0]]).abs().max() > 1e-3, p
    assert seen == ({"text"} if kind == "sd15" else {"text", "joint"}), seen


def test_concept_words_policy_finds_the_words_or_names_the_error(comfy_state, ml, models):
    patcher = models["sd15"]
    clip = tiny_models.build_tiny_clip(seed=0)
    names = loras(comfy_state, patcher, "sd15")
    row = ml("core.stack").LoraRow
    rows = [row(name=names[0], concept="cat"), row(name=names[1], concept="dog"), row(name=names[1], concept="red")]
    auto = ml("methods.regional_auto")
    masks = [*halves(), None]
    words = auto.text_concept_tokens(patcher, rows, masks, clip, "a cat and a dog", "test", POLICY)
    tokens = clip.tokenize("a cat and a dog")["l"][0]
    cat, dog = clip.tokenize("cat")["l"][0][1][0], clip.tokenize("dog")["l"][0][1][0]
    assert words == {0: [i for i, t in enumerate(tokens) if t[0] == cat], 1: [i for i, t in enumerate(tokens)
                                                                            if t[0] == dog]}  # row 3: no mask
    assert auto.text_concept_tokens(patcher, rows, masks, clip, "a cat", "test", "every LoRA") is None
    with pytest.raises(ml("core.errors").ConceptNotFoundError, match=r"^test: concept word 'dog' is not in the prompt"):
        auto.text_concept_tokens(patcher, rows, masks, clip, "a cat", "test", POLICY)
    with pytest.raises(ml("core.regions").RegionError,
                       match=r"^test: text_tokens 'each LoRA on its words' needs 'clip' connected and the positive "):
        auto.text_concept_tokens(patcher, rows, masks, None, "a cat and a dog", "test", POLICY)
    with pytest.raises(ml("core.regions").RegionError, match=r"needs the concept words' token positions"):
        ml("methods.regional").regional_model(patcher, rows[:2], list(halves()), "test", text_tokens=POLICY)


class NoHostCopy(torch.Tensor):
    """Region maps that fail when copied: what a host-to-device copy inside a CUDA-graph capture does on the GPU."""

    def to(self, *args, **kwargs):
        raise AssertionError("the region maps were copied from the host plan during a call")


def test_staged_region_maps_serve_every_layer_without_a_host_copy(comfy_state, ml, models):
    """The graph wrapper stages the maps before a capture (engine.stage_rows → router.stage); a capture must then
    find every grid's maps, in every dtype, on the device (a second run of automatic masks re-captures at once)."""
    patcher = models["sd15"]
    names = loras(comfy_state, patcher, "sd15")
    clone = ml("methods.regional").regional_model(patcher, rows_of(ml, names), list(halves()), "test")
    engine = lora_files.engine_of(clone, ml)
    router = engine.token_router
    x = torch.zeros(2, 4, 16, 16)
    router.begin_call(x, torch.zeros(2, 77, 8), cond_or_uncond=[0, 1])
    engine.stage_rows(x.device, torch.float32)
    plan = router.plan
    router.plan = type(plan)(plan.maps.as_subclass(NoHostCopy), plan.regional)
    rows = torch.ones(2, 2)
    path = next(iter(engine.layers))
    for dtype in (torch.float32, torch.float64):
        conv = router.weights(path, torch.zeros(2, 8, 8, 8, dtype=dtype), torch.zeros(2, 8, 8, 8, dtype=dtype),
                              rows.to(dtype))
        tokens = router.weights("diffusion_model.x", torch.zeros(2, 64, 8, dtype=dtype),
                                torch.zeros(2, 64, 8, dtype=dtype), rows.to(dtype))
        torch.testing.assert_close(conv[:, 0, :, :4], torch.ones(2, 8, 4, dtype=dtype))
        assert tokens.shape == (2, 64, 2) and float(tokens[:, :, 1].sum()) == 2 * 32


def test_concept_word_weights_are_made_when_staged_not_inside_the_call(comfy_state, ml, models, monkeypatch):
    """Under ``TEXT_CONCEPT`` the 0/1 token table and the positive rows are built from host data: the stage before a
    capture makes them; the layers of the captured call only read them."""
    patcher = models["sd15"]
    names = loras(comfy_state, patcher, "sd15")
    clone = ml("methods.regional").regional_model(patcher, rows_of(ml, names), list(halves()), "test",
                                                  text_tokens=POLICY, concept_tokens=WORDS)
    engine = lora_files.engine_of(clone, ml)
    router = engine.token_router
    router.begin_call(torch.zeros(2, 4, 16, 16), torch.zeros(2, 77, 8), cond_or_uncond=[1, 0])
    engine.stage_rows(torch.device("cpu"), torch.float32)
    routing = ml("host.token_routing")
    monkeypatch.setattr(routing, "concept_keep", lambda *a: (_ for _ in ()).throw(AssertionError("built in a call")))
    path = next(p for p in engine.layers if p.endswith("attn2.to_k"))
    got = router.weights(path, torch.zeros(2, 77, 8), torch.zeros(2, 77, 8), torch.ones(2, 2))
    assert got.shape == (2, 77, 2)
    assert got[0].eq(1).all() and got[1, WORDS[0], 1].eq(0).all() and got[1, WORDS[1], 0].eq(0).all()
    assert float(got[1].sum()) == 2 * 77 - 3  # row 1 is the positive chunk: three concept tokens lose one LoRA
