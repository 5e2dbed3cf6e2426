"""Hardening, faults: Cancel at every phase, an exception inside the UNet, a simulated CUDA OOM.

After each fault the user's MODEL carries nothing of the run (``World.assert_clean``), samples bit-identically
to a freshly built copy of it, and the next run of the same node gives exactly a fresh copy's result.

Issue case → test (test_fault_leaves_nothing_and_the_next_run_matches_a_fresh_copy[<method>-<mode>-<phase>])
- Cancel at every phase → modes cancel (InterruptProcessingException from the UNet wrapper) and cancel_flag
  (ComfyUI's interrupt flag, raised by its own per-op check) at phases first / middle / last UNet call, and
  cancel_flag-before (flag already set when the node starts: CLoRA stops while encoding its prompt variants,
  the others in their first UNet op). CLoRA's first calls are its latent update, its last the masked fusion.
- exception inside the UNet → [*-unet_error-middle] (raised in an attn1 patch, after LoRA-hooked layers ran)
- CUDA OOM simulated → [*-oom-first] (before the UNet) and [*-oom_unet-last] (inside it)
- Cancel through ComfyUI's real executor, mid-queue → test_hardening_soak.py
"""
import pytest
import torch

import comfy.model_management

from support import tiny_models
from support.hardening import APPLY_MODEL, METHODS, Fault, counted, forget_dead_loaded_models, samples_of, w  # noqa: F401

ERRORS = {"cancel": comfy.model_management.InterruptProcessingException,
          "cancel_flag": comfy.model_management.InterruptProcessingException,
          "unet_error": RuntimeError, "oom": torch.OutOfMemoryError, "oom_unet": torch.OutOfMemoryError}
FAULT_CASES = [("cancel_flag", "before")] + [(m, p) for m in ("cancel", "cancel_flag") for p in ("first", "middle", "last")] \
    + [("unet_error", "middle"), ("oom", "first"), ("oom_unet", "last")]
FAULT_RUN = dict(steps=4)


@pytest.fixture(scope="module")
def normal_runs(w):
    """Per method: (UNet calls of a normal run, its output on a freshly built copy of the model): the reference."""
    fresh = tiny_models.build_tiny("sd15", seed=0)
    assert all(torch.equal(a, b) for a, b in zip(fresh.model.state_dict().values(), w.model.model.state_dict().values()))
    out = {}
    for method in METHODS:
        clone, counter = counted(fresh)
        samples = samples_of(w, method, model=clone, **FAULT_RUN)
        out[method] = (counter.calls, samples)
    return out


@pytest.mark.parametrize("mode,phase", FAULT_CASES, ids=[f"{m}-{p}" for m, p in FAULT_CASES])
@pytest.mark.parametrize("method", METHODS)
def test_fault_leaves_nothing_and_the_next_run_matches_a_fresh_copy(w, normal_runs, method, mode, phase):
    total, reference = normal_runs[method]
    at = {"before": 0, "first": 1, "middle": max(2, total // 2), "last": total}[phase]
    fault = Fault(mode, at)
    faulty = fault.install(w.model)
    try:
        if phase == "before":  # the user pressed Cancel while an earlier node ran
            comfy.model_management.interrupt_current_processing(True)
        with pytest.raises(ERRORS[mode]):
            samples_of(w, method, model=faulty, **FAULT_RUN)
    finally:
        comfy.model_management.interrupt_current_processing(False)
    if phase == "before":  # stopped in CLoRA's prompt encoding (0 UNet calls) or in the first UNet op
        assert fault.calls == (0 if method == "clora" else 1)
    else:
        assert fault.fired and fault.calls == at
    assert set(faulty.wrappers[APPLY_MODEL]) == {"test.fault"} and len(faulty.wrappers) == 1  # the input clone too
    w.assert_clean()
    again = samples_of(w, method, **FAULT_RUN)
    torch.testing.assert_close(again, reference, atol=0, rtol=0)
    w.assert_clean()
