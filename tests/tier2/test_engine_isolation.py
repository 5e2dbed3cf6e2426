"""The engine during real sampling: equal to merged LoRAs, and nothing left behind on the user's model
after a normal run, a Cancel, or an exception inside the UNet."""

import pytest
import torch

import comfy.model_management
import comfy.patcher_extension
import comfy.sd
import folder_paths
import nodes

from support import lora_files, tiny_models

STEPS = 6


@pytest.fixture(scope="module")
def setup(comfy_state, ml):
    patcher = tiny_models.build_tiny("sd15", seed=0)
    names = lora_files.write_lora_set(patcher, comfy_state["loras_dir"], "iso", (11, 12))
    folder_paths.filename_list_cache.clear()
    rows = [ml("core.stack").LoraRow(name=n, strength_model=s) for n, s in zip(names, (0.7, 0.9))]
    return patcher, names, rows


def sample(model, seed=5):
    positive = tiny_models.make_conditioning("sd15", seed=1)
    negative = tiny_models.make_conditioning("sd15", seed=2)
    latent = tiny_models.make_latent("sd15")
    return nodes.common_ksampler(model, seed, STEPS, 5.0, "euler", "normal", positive, negative, latent)[0]["samples"]


def hooks_left(patcher):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in patcher.model.modules())


def test_sampling_with_engine_equals_merged_loras_and_leaves_model_clean(ml, setup):
    patcher, names, rows = setup
    fresh = sample(patcher)
    engine = ml("host.engine").build_engine(patcher, rows, "test")
    on_the_fly = sample(ml("host.engine").clone_with_engine(patcher, engine))
    merged = patcher
    for row in rows:
        tensors = comfy.utils.load_torch_file(folder_paths.get_full_path("loras", row.name), safe_load=True)
        merged, _ = comfy.sd.load_lora_for_models(merged, None, tensors, row.strength_model, 0.0)
    reference = sample(merged)
    assert (reference - fresh).abs().max() > 1e-2
    torch.testing.assert_close(on_the_fly, reference, atol=1e-3, rtol=1e-3)
    assert engine.calls >= STEPS
    assert hooks_left(patcher) == 0 and patcher.wrappers == {}
    torch.testing.assert_close(sample(patcher), fresh, atol=0, rtol=0)


class Fault:
    """Test-only APPLY_MODEL wrapper raising ``error`` at the n-th model call."""

    def __init__(self, error, at_call):
        self.error, self.at_call, self.calls, self.hooks_seen = error, at_call, 0, 0

    def __call__(self, executor, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at_call:
            self.hooks_seen = hooks_left(executor.class_obj.model_patcher) if hasattr(executor.class_obj, "model_patcher") else -1
            raise self.error
        return executor(*args, **kwargs)


@pytest.mark.parametrize("error", [comfy.model_management.InterruptProcessingException(), RuntimeError("boom in the UNet")],
                         ids=["cancel", "exception"])
def test_cancel_or_exception_mid_run_leaves_nothing_patched(ml, setup, error):
    patcher, names, rows = setup
    fresh = sample(patcher)
    engine = ml("host.engine").build_engine(patcher, rows, "test")
    clone = ml("host.engine").clone_with_engine(patcher, engine)
    fault = Fault(error, at_call=3)
    clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test.fault", fault)
    with pytest.raises(type(error)):
        sample(clone)
    comfy.model_management.interrupt_current_processing(False)
    assert fault.calls == 3 and engine.calls >= 2
    assert hooks_left(patcher) == 0 and patcher.wrappers == {}
    torch.testing.assert_close(sample(patcher), fresh, atol=0, rtol=0)
    # and the next run with the engine works again
    again = sample(ml("host.engine").clone_with_engine(patcher, engine))
    assert (again - fresh).abs().max() > 1e-2


def test_merged_fast_path_equals_hook_path_and_restores_weights(ml, setup):
    patcher, names, rows = setup
    before = {k: v.clone() for k, v in patcher.model.state_dict().items()}
    engine = ml("host.engine").build_engine(patcher, rows, "test")
    fast = sample(ml("host.engine").clone_with_engine(patcher, engine))
    assert engine.merges >= 1
    slow_engine = ml("host.engine").build_engine(patcher, rows, "test")
    slow_engine.merge_uniform = False
    slow = sample(ml("host.engine").clone_with_engine(patcher, slow_engine))
    assert slow_engine.merges == 0
    torch.testing.assert_close(fast, slow, atol=1e-3, rtol=1e-3)
    after = patcher.model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)
