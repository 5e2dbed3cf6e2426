"""Hardening, many runs in one process: 50 queued prompts through ComfyUI's real executor.

One ``PromptExecutor`` runs the whole queue, as ComfyUI's server keeps one (CLASSIC cache: the loader and stack
nodes of a prompt are reused when unchanged, samplers re-run because consecutive prompts differ). The prompts
alternate Merge (Apply LoRA Stack + core KSampler), Switch, Composite, CMLoRA and CLoRA over three stacks of six
LoRA files with the LoRA file cache bounded to 4 entries (so files are evicted and read again) and two seeds; one
prompt is cancelled mid-sampling and one fails inside the UNet, as a user's Cancel and a crashing custom node do.

Issue case → test
- 50 queued prompts alternating methods: memory flat, cache within its bound, reproducible per seed →
  test_fifty_queued_prompts_alternating_methods_are_reproducible_and_flat
- Cancel / an exception through the real executor, the next queued prompt unaffected → the same test
- a LoRA file replaced on disk is read again (the cache key is path + mtime + size) → test_file_replaced_on_disk_is_read_again
"""
import asyncio
import gc
import uuid

import psutil
import torch

import comfy.model_management
import execution
import nodes

from support import lora_files, tiny_models
from support.executor import CACHE_ARGS, CAPTURED, ServerStub
from support.hardening import (  # noqa: F401
    CFG,
    INPUTS,
    PROMPT,
    Fault,
    forget_dead_loaded_models,
    leak_state,
    refresh,
    register_inputs,
    sampler_node,
    samples_of,
    w,
)

PROMPTS = 50
CACHE_BOUND = 4
SOAK_METHODS = ("merge", "switch", "composite", "cmlora", "clora")
WARM = range(15, 20)
"""Prompts (one per method) whose live-tensor count and RSS are compared with those of prompt i + 30 (same
method, stack and seed: the sequence repeats every 30 prompts). Prompts 0–4 run each method for the first time
(one-time allocations); each count is a full gc pass (~0.5 s), so only these ten are taken."""
RSS_SLACK = 24 * 2**20
"""RSS growth allowed from prompt i to i + 30 (observed: +4.4 MB, allocator pools). Leaking one copy of the tiny
UNet's weights (4.1 MB) per run would add > 80 MB; smaller leaks are caught by the live-tensor count, which must
not grow at all (observed: equal at every pair)."""


class CaptureLatent:
    """Test-only output node: keeps the LATENT reaching it (core KSampler's 'LATENT' does not validate against '*')."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"latent": ("LATENT",)}}

    RETURN_TYPES = ()
    FUNCTION = "keep"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def keep(self, latent):
        CAPTURED["soak"] = latent
        return ()


class PromptQueue:
    """Validate and execute prompts one after another on one executor, as the server's prompt worker does."""

    def __init__(self):
        nodes.NODE_CLASS_MAPPINGS.setdefault("TestSoakCaptureLatent", CaptureLatent)
        self.server = ServerStub()
        self.executor = execution.PromptExecutor(self.server, cache_type=execution.CacheType.CLASSIC,
                                                 cache_args=dict(CACHE_ARGS))

    def run(self, prompt: dict) -> list:
        """The executor's status messages for ``prompt`` (execution_success, _interrupted or _error last)."""
        prompt_id = str(uuid.uuid4())
        valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
        assert valid[0], valid
        asyncio.run(self.executor.execute_async(prompt, prompt_id, {}, valid[2]))
        return [event for event, _ in self.executor.status_messages]


def _stack_node(names):
    inputs = {"rows": len(names)}
    rows = [dict(concept="cat", trigger="sks", category="character"), dict(concept="dog", category="background"),
            dict(category="style")]
    for n, (name, extra) in enumerate(zip(names, rows), start=1):
        inputs.update({f"lora_{n}": name, f"strength_model_{n}": 0.8, f"strength_clip_{n}": 0.8,
                       **{f"{k}_{n}": v for k, v in extra.items()}})
    return {"class_type": "MultiLoRAStack", "inputs": inputs}


def _prompt(method, names, seed, key="hard"):
    """in → LoRA Stack → the method's sampler → capture 'soak' (the output LATENT)."""
    prompt = {"in": {"class_type": "TestHardeningInputs", "inputs": {"key": key}}, "s": _stack_node(names),
              "c": {"class_type": "TestSoakCaptureLatent", "inputs": {"latent": ["k", 0]}}}
    common = dict(seed=seed, steps=3)
    if method == "merge":
        prompt["in"]["inputs"]["key"] = "merge" if key == "hard" else key
        prompt["a"] = {"class_type": "MultiLoRAApplyStack", "inputs": {"lora_stack": ["s", 0], "model": ["in", 0]}}
        prompt["k"] = sampler_node("KSampler", None, model=["a", 0], **common)
        del prompt["k"]["inputs"]["lora_stack"]
    elif method == "clora":
        prompt["k"] = {"class_type": "MultiLoRACLoRASampler", "inputs": {
            "model": ["in", 0], "clip": ["in", 1], "lora_stack": ["s", 0], "prompt": PROMPT, "negative_prompt": "blurry",
            "seed": seed, "steps": 2, "cfg": CFG, "sampler_name": "euler", "scheduler": "normal",
            "latent_image": ["in", 4], "denoise": 1.0, "mask_threshold": 0.4, "temperature": 0.5, "step_size": 20.0,
            "opt_until": 0.5, "refine_iters": 0}}
    else:
        node = {"switch": "MultiLoRASwitchSampler", "composite": "MultiLoRACompositeSampler",
                "cmlora": "MultiLoRACMLoRASampler"}[method]
        extra = {"switch": dict(switch_every=1), "composite": dict(weighting="uniform"),
                 "cmlora": dict(cache="on", stage_switch=0.55, ordering="stack categories")}[method]
        prompt["k"] = sampler_node(node, ["s", 0], **common, **extra)
    return prompt


def _live_tensors(lf) -> int:
    """Tensors alive in the process, less those the (bounded, LRU-ordered) LoRA file cache holds."""
    gc.collect()
    cached = sum(len(sd) for sd in lf._cache.values())
    return sum(1 for o in gc.get_objects() if issubclass(type(o), torch.Tensor)) - cached  # type(): no __class__ hooks


def test_fifty_queued_prompts_alternating_methods_are_reproducible_and_flat(w, ml, monkeypatch):
    lf = ml("host.lora_files")
    monkeypatch.setattr(lf, "CACHE_ENTRIES", CACHE_BOUND)
    files = list(w.good)
    for seed in (501, 502, 503):
        name = w.scratch(f"hard_cycle_{seed}.safetensors")
        lora_files.write_lora(w.model, w.path(name), "kohya", seed=seed, rank=2, targets="attn", clip=w.clip)
        files.append(name)
    refresh()
    stacks = [files[0:3], files[3:6], [files[4], files[0], files[5]]]
    register_inputs(w)
    # Core's merge leaves its parameters with requires_grad=False (World.assert_clean would flag w.model): own model
    INPUTS["merge"] = (tiny_models.build_tiny("sd15", seed=0),) + INPUTS["hard"][1:]
    for key, fault in (("cancel", Fault("cancel_flag", 2)), ("crash", Fault("unet_error", 2))):
        INPUTS[key] = (fault.install(w.model),) + INPUTS["hard"][1:]
    lf.clear_cache()
    gc.collect()  # start from no dead LoadedModel (earlier tests' garbage), so any at the end are these runs'
    loaded = comfy.model_management.current_loaded_models
    loaded[:] = [m for m in loaded if not m.is_dead()]
    queue = PromptQueue()
    reads_before = lf.read_count
    seen, tensors, rss = {}, {}, {}
    for i in range(PROMPTS):
        method, stack, seed = SOAK_METHODS[i % 5], i % 3, (7, 8)[(i // 15) % 2]
        if i in (22, 38):  # Cancel pressed / a node crashing mid-sampling (Composite, CMLoRA), then the queue goes on
            key = "cancel" if i == 22 else "crash"
            events = queue.run(_prompt(method, stacks[stack], seed, key=key))
            assert events[-1] == ("execution_interrupted" if key == "cancel" else "execution_error"), events
            comfy.model_management.interrupt_current_processing(False)
        CAPTURED.pop("soak", None)
        events = queue.run(_prompt(method, stacks[stack], seed))
        assert events[-1] == "execution_success", (i, events)
        out = CAPTURED.pop("soak")["samples"]
        assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()
        result = out.numpy().tobytes()
        assert seen.setdefault((method, stack, seed), result) == result, f"prompt {i}: {method} not reproducible"
        assert len(lf._cache) <= CACHE_BOUND
        state = leak_state(w.model)
        assert state == w.clean, (i, state)
        if i in WARM or i - 30 in WARM:
            tensors[i], rss[i] = _live_tensors(lf), psutil.Process().memory_info().rss
    for i in WARM:
        assert tensors[i + 30] <= tensors[i], f"live tensors grew from prompt {i} to {i + 30}: {tensors}"
        assert rss[i + 30] - rss[i] <= RSS_SLACK, f"RSS grew by {(rss[i + 30] - rss[i]) / 2**20:.0f} MB"
    gc.collect()
    assert not any(m.is_dead() for m in loaded)
    assert len(seen) == 30 and len(set(seen.values())) == 30  # 20 prompts repeated a key; every key differs
    assert lf.read_count - reads_before > len(files)  # evicted files were read again
    w.assert_clean()


def test_file_replaced_on_disk_is_read_again(w, ml):
    lf = ml("host.lora_files")
    name = w.scratch("hard_replaced.safetensors")
    lora_files.write_lora(w.model, w.path(name), "kohya", seed=601)
    refresh()
    first = samples_of(w, "switch", stack=w.stack([name]))
    lora_files.write_lora(w.model, w.path(name), "kohya", seed=602, rank=3)  # new size and mtime
    second = samples_of(w, "switch", stack=w.stack([name]))
    assert (first - second).abs().max() > 1e-3
    assert len(lf._cache) <= lf.CACHE_ENTRIES
    w.assert_clean()
