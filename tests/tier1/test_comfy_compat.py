"""Tier 1: which layers hold a weight the op does not multiply with (lowvram offload, 0.33's dynamic VRAM).

The on-the-fly engine merges LoRAs into ``module.weight`` in place only where ``weight_streamed`` is False, and
CLoRA's gradient pass clones the cast weight where it is True; the GPU runtime matrix (bench/runtime_matrix.py)
measures both on the real runtimes. These cases pin the rule on the attributes ComfyUI's ops set."""
import torch

from support.pack_loader import load_pure

compat = load_pure("host.comfy_compat")


def layer(cast: bool, **attributes) -> torch.nn.Linear:
    module = torch.nn.Linear(4, 3)
    module.comfy_cast_weights = cast
    for name, value in attributes.items():
        setattr(module, name, value)
    return module


def test_a_layer_that_does_not_cast_is_never_streamed():
    assert not compat.weight_streamed(torch.nn.Linear(4, 3))
    assert not compat.weight_streamed(layer(False, _v=object()), "cuda")


def test_dynamic_vram_buffer_means_streamed_wherever_the_weight_is():
    assert compat.weight_streamed(layer(True, _v=object()))
    assert compat.weight_streamed(layer(True, _v=object()), "cpu")


def test_a_cast_of_a_weight_on_the_compute_device_is_not_streamed():
    # manual_cast ops (e.g. fp8 or bf16 weights resident on the GPU) read module.weight at every call
    assert not compat.weight_streamed(layer(True), "cpu")
    assert not compat.weight_streamed(layer(True), torch.device("cpu"))


def test_a_cast_from_another_device_is_streamed():
    assert compat.weight_streamed(layer(True), "meta")  # lowvram: weight offloaded, op computes elsewhere
    assert compat.weight_streamed(layer(True))  # no device given: a CPU weight that is cast counts as offloaded
