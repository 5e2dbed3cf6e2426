"""CUDA-graph replay of the UNet forward (multilora/host/cuda_graphs.py) equals the eager path.

CI has no GPU, so the graph backend is the CPU stand-in of ``support.graph_replay``: capture traces the
body into an aten graph whose Python control flow is frozen, replay runs it on the same static buffers and
weights, as a CUDA graph does (so a replay of a stale capture gives a wrong result, tested below). What is
checked here is everything around the graph — inputs copied into the static buffers on every call, a clone returned,
one capture per call
signature, routing and in-place merged weights (LoRA Switch) picked up by later replays, calls that must
stay eager (patches, other wrappers, autograd, a failing capture), Cancel during capture, and nothing left
behind after the run. Results must be bit-identical to the same method with graphs off (same ops on the
same values). The real CUDA graphs are compared against eager on the GPU by ``bench/run_bench.py``
(column "max abs diff, graphs vs eager").
"""

import logging

import pytest
import torch

import comfy.model_management
import comfy.patcher_extension
import comfy.sample

from support import lora_files, tiny_models
from support.graph_replay import ReplayByRerun, ReplayByTrace

STEPS = 6


@pytest.fixture(scope="module")
def world(comfy_state):
    out = {}
    for kind in ("sd15", "sdxl"):
        model = tiny_models.build_tiny(kind, seed=0)
        out[kind] = (model, lora_files.write_lora_set(model, comfy_state["loras_dir"], f"cg_{kind}", (41, 42, 43)))
    import folder_paths
    folder_paths.filename_list_cache.clear()
    return out


def rows(ml, names, strengths=(0.9, 1.1, 0.7)):
    stack = ml("core.stack")
    return tuple(stack.LoraRow(n, s) for n, s in zip(names, strengths))


def graph_wrapper(model):
    wrappers = model.wrappers[comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL]["multilora.onthefly"]
    assert len(wrappers) == 1
    return wrappers[0]


def with_backend(model, backend, enabled=True):
    wrapper = graph_wrapper(model)
    wrapper.backend = backend
    wrapper.enabled = enabled
    return wrapper


def run(model, kind, positive=None, negative=None, batch=1):
    positive = positive or tiny_models.make_conditioning(kind, seed=1)
    negative = negative or tiny_models.make_conditioning(kind, seed=2)
    latent = torch.zeros((batch, 4, 8, 8))
    noise = comfy.sample.prepare_noise(latent, 5)
    return comfy.sample.sample(model, noise, STEPS, 5.0, "euler", "normal", positive, negative, latent,
                               disable_pbar=True, seed=5)


def graphed_and_eager(make, kind, **kwargs):
    graphed_model, eager_model = make(), make()
    backend = ReplayByTrace()
    wrapper = with_backend(graphed_model, backend)
    with_backend(eager_model, ReplayByRerun(), enabled=False)
    return run(graphed_model, kind, **kwargs), run(eager_model, kind, **kwargs), wrapper, backend


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
@pytest.mark.parametrize("k", [1, 3])
def test_composite_replayed_equals_eager_bit_for_bit(ml, world, kind, k):
    model, names = world[kind]
    make = lambda: ml("methods.switch_composite").composite_model(model, rows(ml, names[:k]), None, "test")  # noqa: E731
    graphed, eager, wrapper, backend = graphed_and_eager(make, kind)
    assert torch.equal(graphed, eager)
    # cond + uncond share one batched call per step: one signature, eager first call, then capture + replays.
    # k = 1: the first call runs on the hooks, later ones on the merged weights (a second signature).
    assert backend.captures == 1 and wrapper.replays == (STEPS - 2 if k == 1 else STEPS - 1)
    assert (eager - run(model, kind)).abs().max() > 1e-2  # the LoRAs act: equality above is not vacuous


def test_switch_replays_pick_up_weights_merged_in_place(ml, world):
    model, names = world["sd15"]
    make = lambda: ml("methods.switch_composite").switch_model(model, rows(ml, names[:2]), 2, "test")  # noqa: E731
    graphed, eager, wrapper, backend = graphed_and_eager(make, "sd15")
    assert torch.equal(graphed, eager)
    assert backend.captures == 1 and wrapper.replays == STEPS - 1


def test_inputs_of_every_call_reach_the_replay(ml, world):
    """Batch 2, conds of 77 and 80 tokens: ComfyUI cannot batch them, so each is its own call signature."""
    model, names = world["sd15"]
    long_positive = tiny_models.make_conditioning("sd15", seed=1)
    long_positive[0][0] = torch.cat([long_positive[0][0], long_positive[0][0][:, :3] * 0.5], dim=1)
    make = lambda: ml("methods.switch_composite").composite_model(model, rows(ml, names[:2]), None, "test")  # noqa: E731
    graphed, eager, wrapper, backend = graphed_and_eager(make, "sd15", positive=long_positive, batch=2)
    assert torch.equal(graphed, eager)
    assert backend.captures == 2 and wrapper.replays == 2 * (STEPS - 1)


def test_calls_with_transformer_patches_stay_eager(ml, world):
    model, names = world["sd15"]

    def make():
        clone = ml("methods.switch_composite").composite_model(model, rows(ml, names[:2]), None, "test")
        clone.set_model_attn2_patch(lambda q, k, v, extra_options: (q, k, v))
        return clone
    graphed, eager, wrapper, backend = graphed_and_eager(make, "sd15")
    assert torch.equal(graphed, eager)
    assert backend.captures == 0 and wrapper.replays == 0


def test_calls_under_a_foreign_diffusion_model_wrapper_stay_eager(ml, world):
    """Another pack's DIFFUSION_MODEL wrapper may steer the forward from Python: never graphed."""
    model, names = world["sd15"]
    seen = []

    def foreign(executor, *args, **kwargs):
        seen.append(1)
        return executor(*args, **kwargs)

    def make():
        clone = ml("methods.switch_composite").composite_model(model, rows(ml, names[:2]), None, "test")
        clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, "other.pack", foreign)
        return clone
    graphed, eager, wrapper, backend = graphed_and_eager(make, "sd15")
    assert torch.equal(graphed, eager)
    assert backend.captures == 0 and wrapper.replays == 0 and len(seen) == 2 * STEPS


@pytest.mark.parametrize("cache", [True, False])
def test_cmlora_replays_and_equals_eager(ml, world, cache):
    """Without the cache the routing weights change every step (dominant LoRA) and reach the replay through
    the staged rows; with it the split forward is graphed per deep-row count (all at step 0, the dominant's,
    none), which rows run deep being data."""
    model, names = world["sd15"]
    stack = ml("core.stack")
    cm_rows = tuple(stack.LoraRow(n, 1.0, category=c) for n, c in zip(names[:3], ("character", "style", "object")))
    make = lambda: ml("methods.cmlora").cmlora_model(model, cm_rows, 0.5, False, "test", cache=cache)  # noqa: E731
    graphed, eager, wrapper, backend = graphed_and_eager(make, "sd15")
    assert torch.equal(graphed, eager)
    if cache:
        assert 1 <= backend.captures <= 3 and wrapper.replays >= 2
    else:
        assert backend.captures == 1 and wrapper.replays == STEPS - 1


def test_a_failing_capture_falls_back_to_eager_once(ml, world, caplog):
    model, names = world["sd15"]
    clone = ml("methods.switch_composite").composite_model(model, rows(ml, names[:2]), None, "test")
    backend = ReplayByRerun(fail_with=RuntimeError("operation not permitted when stream is capturing"))
    wrapper = with_backend(clone, backend)
    eager_clone = ml("methods.switch_composite").composite_model(model, rows(ml, names[:2]), None, "test")
    with_backend(eager_clone, ReplayByRerun(), enabled=False)
    with caplog.at_level(logging.WARNING, logger="multilora"):
        assert torch.equal(run(clone, "sd15"), run(eager_clone, "sd15"))
    assert backend.captures == 1 and wrapper.replays == 0  # the refused signature is not tried again
    assert "CUDA graph capture failed (RuntimeError: operation not permitted" in caplog.text


def test_cancel_during_capture_propagates_and_leaves_nothing(ml, world):
    model, names = world["sd15"]
    clone = ml("methods.switch_composite").composite_model(model, rows(ml, names[:2]), None, "test")
    wrapper = with_backend(clone, ReplayByRerun(fail_with=comfy.model_management.InterruptProcessingException()))
    before = {k: v.clone() for k, v in model.model.state_dict().items()}
    with pytest.raises(comfy.model_management.InterruptProcessingException):
        run(clone, "sd15")
    assert wrapper.entries == {} and wrapper.stage_rows.__self__._staged == {}
    for name, module in model.model.named_modules():
        assert not module._forward_hooks, name
    assert all(torch.equal(before[k], v) for k, v in model.model.state_dict().items())


def test_graphs_and_buffers_are_dropped_when_the_run_ends(ml, world):
    model, names = world["sd15"]
    clone = ml("methods.switch_composite").composite_model(model, rows(ml, names[:2]), None, "test")
    backend = ReplayByRerun()
    wrapper = with_backend(clone, backend)
    run(clone, "sd15")
    assert wrapper.entries == {} and wrapper.stage_rows.__self__._staged == {} and backend.resets >= 1
    replays = wrapper.replays
    run(clone, "sd15")  # a second run captures afresh, on its first call: the signature is warm
    assert backend.captures == 2 and wrapper.replays - replays == STEPS


def test_environment_switch_turns_graphs_off(ml, world, monkeypatch):
    model, names = world["sd15"]
    monkeypatch.setenv("MULTILORA_CUDA_GRAPHS", "0")
    composite = ml("methods.switch_composite").composite_model(model, rows(ml, names[:2]), None, "test")
    assert graph_wrapper(composite).enabled is False
    monkeypatch.setenv("MULTILORA_CUDA_GRAPHS", "1")
    assert graph_wrapper(ml("methods.switch_composite").composite_model(model, rows(ml, names[:2]), None, "test")).enabled is True


def test_cpu_tensors_are_never_graphed(ml, world):
    """The real backend declines CPU inputs: on a CPU-only install everything runs eagerly."""
    model, names = world["sd15"]
    clone = ml("methods.switch_composite").composite_model(model, rows(ml, names[:2]), None, "test")
    wrapper = graph_wrapper(clone)
    assert wrapper.backend.available(torch.zeros(1)) is False
    run(clone, "sd15")
    assert wrapper.captures == 0 and wrapper.replays == 0


class AlternatingLoras:
    """Routing: LoRA 0 alone on even steps, LoRA 1 alone on odd steps (never merged: the vector changes)."""

    def __init__(self, routing):
        self.routing = routing

    def chunk_weights(self, cond_or_uncond, transformer_options):
        sigma = float(transformer_options["sigmas"][0])
        step = self.routing.step_index(sigma, [float(s) for s in transformer_options["sample_sigmas"]])
        return [(1.0, 0.0) if step % 2 == 0 else (0.0, 1.0)] * len(cond_or_uncond)


@pytest.mark.parametrize("stale", [False, True])
def test_a_stale_capture_is_caught_by_the_trace_backend(comfy_state, ml, monkeypatch, stale):
    """LoRA 0 patches only attention layers, LoRA 1 only feed-forward ones, and the routing alternates them: which
    layers' hooks act is Python control flow, so it belongs in the graph signature. With the signature's routing
    part removed (``stale``), one graph captured for LoRA 0's layers is replayed for LoRA 1: wrong, and the
    trace backend shows it; the re-running backend would not."""
    model = tiny_models.build_tiny("sd15", seed=0)
    names = [f"cg_stale_{t}.safetensors" for t in ("attn", "ff")]
    for name, targets, seed in zip(names, ("attn", "ff"), (51, 52)):
        lora_files.write_lora(model, f"{comfy_state['loras_dir']}/{name}", "kohya", seed=seed, targets=targets)
    import folder_paths
    folder_paths.filename_list_cache.clear()
    engine_mod, routing = ml("host.engine"), AlternatingLoras(ml("core.routing"))
    if stale:
        monkeypatch.setattr(ml("host.onthefly").OnTheFlyLoras, "graph_routing_key", lambda self, subset=None: ("x",))

    def make():
        return engine_mod.clone_with_engine(model, engine_mod.build_engine(model, rows(ml, names), "test", routing))
    graphed, eager, wrapper, backend = graphed_and_eager(make, "sd15")
    assert wrapper.replays >= STEPS - 2
    if stale:
        assert backend.captures == 1 and (graphed - eager).abs().max() > 1e-3
        rerun_model = make()
        with_backend(rerun_model, ReplayByRerun())
        assert torch.equal(run(rerun_model, "sd15"), eager)  # why the trace backend is the one used above
    else:
        assert backend.captures == 2 and torch.equal(graphed, eager)
