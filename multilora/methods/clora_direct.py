"""CLoRA's gradient passes as one direct model call.

A latent update evaluates (L, ∇ₓL) many times with the same shapes (20 refinement iterations at one σ, then one
update per early step): only x and σ change, and the eager passes are launch-bound (docs/benchmarking.md). So:

1. The first gradient pass of a run goes through ComfyUI's ``calc_cond_batch`` as before, with a ``CallRecorder``
   on APPLY_MODEL that keeps the pass's model call: its conditioning (moved to the device once) and its
   transformer options, which hold the pass's attention capture.
2. ``RecordedCall.run(x, σ)`` makes that same call directly: x repeated once per cond chunk, σ likewise, as
   ``calc_cond_batch`` builds them for full-area conds. The guider computes the same loss from the capture, so the
   pass equals the recorded one (tested), and the fixed shapes make the pass a candidate for CUDA-graph replay.

A pass is recorded only when it is one plain call: full-area conds without masks, timestep ranges, hooks or
ControlNet, not split by ComfyUI for memory. Anything else keeps the ``calc_cond_batch`` path. Host module.
"""
from __future__ import annotations

from typing import Mapping

import torch

RECORD_KEY = "multilora_clora_record"
_COND_KEYS_REFUSED = ("area", "mask", "timestep_start", "timestep_end", "control", "hooks", "default")


def plain_conds(conds: Mapping[str, list | None]) -> bool:
    """Every cond of the guider covers the whole latent at every step (what ``RecordedCall`` repeats)."""
    for entries in conds.values():
        for entry in entries or ():
            if any(entry.get(key) is not None for key in _COND_KEYS_REFUSED):
                return False
    return True


class CallRecorder:
    """APPLY_MODEL wrapper keeping the arguments of every model call of one pass (the call itself runs on)."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.active = True  # off once the pass is recorded: the recorded options still name this wrapper

    def __call__(self, executor, x, t, c_concat=None, c_crossattn=None, control=None,
                 transformer_options: Mapping = {}, **kwargs):
        if self.active:
            self.calls.append((x.detach(), t.detach(), c_concat, c_crossattn, control, transformer_options, kwargs))
        return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)


def _on_device(value, device: torch.device):
    if isinstance(value, torch.Tensor):
        return value.detach().to(device)
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise TypeError(type(value).__name__)


class RecordedCall:
    """One recorded model call of a gradient pass, made again directly for new (x, σ)."""

    def __init__(self, model, capture, chunks: int, shape: tuple, c_concat, c_crossattn, transformer_options: dict,
                 kwargs: dict):
        self.source: dict | None = None  # the model_options of the recorded pass (set by the guider)
        self.model = model
        self.capture = capture
        self.chunks = chunks
        self.shape = shape
        self.c_concat = c_concat
        self.c_crossattn = c_crossattn
        self.transformer_options = transformer_options
        self.kwargs = kwargs

    @classmethod
    def from_pass(cls, recorder: CallRecorder, model, capture, x: torch.Tensor, sigma: torch.Tensor
                  ) -> RecordedCall | None:
        """The pass's call when it was one call of x repeated per chunk at σ (else None: not repeatable)."""
        recorder.active = False
        if len(recorder.calls) != 1:
            return None
        x_in, t, c_concat, c_crossattn, control, transformer_options, kwargs = recorder.calls[0]
        if control is not None or x_in.shape[0] % x.shape[0] != 0 or x_in.shape[1:] != x.shape[1:]:
            return None
        chunks = x_in.shape[0] // x.shape[0]
        if not (torch.equal(x_in, torch.cat([x.detach()] * chunks)) and t.shape[0] == sigma.shape[0] * chunks
                and torch.equal(t, torch.cat([sigma.detach()] * chunks))):
            return None
        try:
            device = x.device
            kept = {name: _on_device(value, device) for name, value in kwargs.items()}
            c_concat, c_crossattn = _on_device(c_concat, device), _on_device(c_crossattn, device)
        except TypeError:  # a conditioning value that is not a tensor or a plain value
            return None
        return cls(model, capture, chunks, tuple(x.shape), c_concat, c_crossattn, dict(transformer_options), kept)

    def fits(self, x: torch.Tensor, model_options: dict) -> bool:
        """Same latent shape and the same model_options object as the recorded pass (one sampling run)."""
        return tuple(x.shape) == self.shape and model_options is self.source

    def run(self, x: torch.Tensor, sigma: torch.Tensor) -> None:
        """The model call at (x, σ); its maps land in ``self.capture`` (reset first)."""
        self.capture.reset()
        options = dict(self.transformer_options)
        if "sigmas" in options:  # ComfyUI ≥ 0.3.4x puts the call's σ here
            options["sigmas"] = sigma
        self.model.apply_model(torch.cat([x] * self.chunks), torch.cat([sigma] * self.chunks),
                               c_concat=self.c_concat, c_crossattn=self.c_crossattn, control=None,
                               transformer_options=options, **self.kwargs)
