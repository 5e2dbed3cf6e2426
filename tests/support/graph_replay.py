"""A CPU stand-in for ``multilora.cuda_graphs.CudaBackend`` (CI has no GPU).

A CUDA graph replays its recorded kernels on whatever its static input buffers and the model's weights
hold at replay time. The stand-in keeps that contract observable on the CPU: "capture" runs the body once
(so the static output exists) and "replay" runs the same body again, writing into that same output tensor.
If the wrapper forgot to copy a call's inputs into the static buffers, or returned the static output
without cloning it, results would differ from an eager run, which is what the tests compare against.
"""
from __future__ import annotations


class _Rerun:
    def __init__(self, body, output):
        self.body = body
        self.output = output

    def replay(self) -> None:
        fresh = self.body()
        if isinstance(self.output, tuple):
            for static, value in zip(self.output, fresh):
                static.copy_(value)
        else:
            self.output.copy_(fresh)


class ReplayByRerun:
    """Backend double: counts captures; ``fail_with`` makes every capture raise that exception instead."""

    def __init__(self, fail_with: BaseException | None = None):
        self.captures = 0
        self.fail_with = fail_with
        self.resets = 0

    def available(self, x) -> bool:
        return True

    def capture(self, body):
        self.captures += 1
        if self.fail_with is not None:
            raise self.fail_with
        output = body()
        return _Rerun(body, output), output

    def reset(self) -> None:
        self.resets += 1
