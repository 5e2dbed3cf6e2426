"""CPU stand-ins for ``multilora.host.cuda_graphs.CudaBackend`` (CI has no GPU).

A CUDA graph records the kernels of one call and replays them on whatever its static input buffers and the
model's weights hold at replay time, while the Python that chose those kernels (branches, loops, which hooks
act, tensors built from Python numbers) is frozen at capture. ``ReplayByTrace`` keeps both halves of that
contract on the CPU: capture traces the body into an aten graph (``make_fx``), which reads the same tensor
objects (static inputs, weights, staged routing rows) and bakes every Python decision and every tensor made
from Python values as a constant; replay runs that graph. So a wrapper that replays a graph whose captured
control flow no longer fits the call (a stale signature) gives a wrong result on the CPU too, and the tests
comparing graphed runs with eager ones fail. ``ReplayByRerun`` runs the body again on replay instead: it
checks only the buffer plumbing (inputs copied in, outputs cloned), and is kept for failure-injection tests.
"""
from __future__ import annotations

from torch.fx.experimental.proxy_tensor import make_fx


class _Replay:
    def __init__(self, run, output):
        self.run = run
        self.output = output

    def replay(self) -> None:
        fresh = self.run()
        if isinstance(self.output, tuple):
            for static, value in zip(self.output, fresh):
                static.copy_(value)
        else:
            self.output.copy_(fresh)


class ReplayByRerun:
    """Backend double that re-runs the body on replay; counts captures; ``fail_with`` makes every capture raise."""

    def __init__(self, fail_with: BaseException | None = None):
        self.captures = 0
        self.fail_with = fail_with
        self.resets = 0

    def available(self, x) -> bool:
        return True

    def _record(self, body):
        return body

    def capture(self, body):
        self.captures += 1
        if self.fail_with is not None:
            raise self.fail_with
        run = self._record(body)
        output = run()
        return _Replay(run, output), output

    def reset(self) -> None:
        self.resets += 1


class ReplayByTrace(ReplayByRerun):
    """Backend double with CUDA-graph semantics: Python control flow frozen at capture (see the module doc)."""

    def _record(self, body):
        traced = make_fx(lambda: body())()
        return lambda: traced()
