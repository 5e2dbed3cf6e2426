"""Shared world of the hardening suite (tests/tier2/test_hardening_*.py): one tiny SD1.5 + CLIP, good LoRA
files, probes that a run left nothing on the user's MODEL, and helpers to run the pack's sampler nodes
directly or as API prompts through ComfyUI's real executor.

Import after ComfyUI is booted (tests/tier2/conftest.py does it). The fixtures ``w``, ``errors`` and
``forget_dead_loaded_models`` are imported by each hardening module; ``w`` is one World per process (its
scratch files are removed at the end of every module that used it).
"""
from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file

import comfy.model_management
import comfy.patcher_extension
import comfy.sample
import folder_paths
import nodes

from support import lora_files, tiny_models
from support.executor import CAPTURED, run_prompt

CFG = 5.0
RUN_TOL = 1e-3  # whole runs: other batch sizes change BLAS blocking, ~1e-6 per call compounds (as test_switch_composite)
PROMPT = "a photo of a cat and a dog in a park"
METHODS = ("switch", "composite", "cmlora", "clora")
NODE_IDS = {"switch": "MultiLoRASwitchSampler", "composite": "MultiLoRACompositeSampler",
            "cmlora": "MultiLoRACMLoRASampler", "clora": "MultiLoRACLoRASampler"}
NODE_NAMES = {"switch": "KSampler (LoRA Switch)", "composite": "KSampler (LoRA Composite)",
              "cmlora": "KSampler (CMLoRA)", "clora": "KSampler (CLoRA)"}
APPLY_MODEL = comfy.patcher_extension.WrappersMP.APPLY_MODEL
UNICODE_NAME = "mädchen lora v2.safetensors"
INPUTS: dict = {}
"""Objects the TestHardeningInputs node hands to API prompts, by key."""


# --- the world: one tiny SD1.5 + CLIP, good LoRA files, and a snapshot of the clean model ---------------------
class World:
    """The tiny model/CLIP, LoRA files hard_301..303 (+ a Unicode-named one) and the clean model's snapshot."""

    def __init__(self, ml, loras_dir):
        self.ml = ml
        self.dir = loras_dir
        self.made = set()
        self.model = tiny_models.build_tiny("sd15", seed=0)
        self.clip = tiny_models.build_tiny_clip(seed=0)
        self.good = []
        for seed in (301, 302, 303):
            name = f"hard_{seed}.safetensors"
            lora_files.write_lora(self.model, self.path(name), "kohya", seed=seed, clip=self.clip)
            self.good.append(name)
        self.spec = lora_files.build_lora(self.model, "kohya", seed=304)  # UNet only, for doctored files
        lora_files.write_lora(self.model, self.path(UNICODE_NAME), "kohya", seed=305, clip=self.clip)
        refresh()
        self.clean = leak_state(self.model)
        self.weights = {k: v.clone() for k, v in self.model.model.state_dict().items()}
        self.grad_flags = [p.requires_grad for p in self.model.model.parameters()]
        self.fresh = base_sample(self.model)

    def path(self, name):
        return os.path.join(self.dir, name)

    def put(self, name, tensors):
        save_file(tensors, self.path(name))
        return self.scratch(name)

    def scratch(self, name):
        """A file this module made broken on purpose: removed from the shared loras folder at module end."""
        self.made.add(name)
        refresh()
        return name

    def remove_scratch(self):
        for name in self.made:
            path = self.path(name)
            if os.path.isdir(path):
                os.rmdir(path)
            elif os.path.exists(path):
                os.remove(path)
        self.made.clear()
        refresh()

    def stack(self, names=None, strengths=(0.8, 0.9, 0.6)):
        """Cat (character, trigger), dog (background), style: usable by every method, CLoRA included."""
        s = self.ml("core.stack")
        names = list(names or self.good)
        extras = [dict(concept="cat", trigger="sks", category="character"), dict(concept="dog", category="background"),
                  dict(category="style")]
        return s.LoraStack(tuple(s.LoraRow(n, st, st, **extras[i % 3]) for i, (n, st) in enumerate(zip(names, strengths))))

    def assert_clean(self, model=None):
        model = model or self.model
        assert leak_state(model) == self.clean
        assert all(torch.equal(self.weights[k], v) for k, v in model.model.state_dict().items())
        assert [p.requires_grad for p in model.model.parameters()] == self.grad_flags
        assert self.clip.patcher.patches == {}
        torch.testing.assert_close(base_sample(model), self.fresh, atol=0, rtol=0)


def refresh():
    folder_paths.filename_list_cache.clear()


def leak_state(model):
    """Everything the pack could leave on a ModelPatcher or its modules."""
    modules = list(model.model.modules())
    return {
        "forward_hooks": sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in modules),
        "weight_functions": sum(len(getattr(m, "weight_function", None) or []) + len(getattr(m, "bias_function", None) or [])
                                for m in modules),
        "wrappers": {k: sorted(v) for k, v in model.wrappers.items() if v},
        "callbacks": {k: sorted(v) for k, v in model.callbacks.items() if v},
        "patches": len(model.patches), "object_patches": sorted(model.object_patches),
        "model_options": sorted(model.model_options),
        "transformer_options": sorted(model.model_options.get("transformer_options", {})),
        "additional_models": sorted(model.additional_models), "injections": sorted(model.injections),
    }


def base_sample(model, seed=5):
    """Plain core KSampler on ``model`` (no pack involved): the bit-identity probe."""
    return nodes.common_ksampler(model, seed, 3, CFG, "euler", "normal", tiny_models.make_conditioning("sd15", seed=1),
                                 tiny_models.make_conditioning("sd15", seed=2), tiny_models.make_latent("sd15"))[0]["samples"]


class CallCounter:
    """APPLY_MODEL wrapper on a clone of the input model: counts UNet calls made through it."""

    def __init__(self):
        self.calls = 0

    def __call__(self, executor, *args, **kwargs):
        self.calls += 1
        return executor(*args, **kwargs)


def sample(model, steps=4, seed=3, latent=None):
    """comfy.sample.sample with the sampler nodes' defaults here (euler/normal, CFG, conds 1/2, seed 3)."""
    latent = torch.zeros(1, 4, 8, 8) if latent is None else latent
    return comfy.sample.sample(model, comfy.sample.prepare_noise(latent, seed), steps, CFG, "euler", "normal",
                               tiny_models.make_conditioning("sd15", seed=1), tiny_models.make_conditioning("sd15", seed=2),
                               latent, disable_pbar=True, seed=seed)


def counted(model):
    """A clone of ``model`` counting its UNet calls, and the counter."""
    clone = model.clone()
    counter = CallCounter()
    clone.add_wrapper_with_key(APPLY_MODEL, "test.count", counter)
    return clone, counter


def node_kwargs(w, method, model=None, stack=None, latent=None, **kw):
    """Inputs of the ``method`` sampler node: the world's model and stack, seed 3, 4 steps, an 8×8 latent."""
    args = dict(model=model or w.model, lora_stack=stack if stack is not None else w.stack(), seed=3, steps=4, cfg=CFG,
                sampler_name="euler", scheduler="normal",
                latent_image=latent if latent is not None else {"samples": torch.zeros(1, 4, 8, 8)}, denoise=1.0)
    if method == "clora":
        args.update(clip=w.clip, prompt=PROMPT, negative_prompt="blurry", refine_iters=1)
    else:
        args.update(positive=tiny_models.make_conditioning("sd15", seed=1),
                    negative=tiny_models.make_conditioning("sd15", seed=2))
    if method == "switch":
        args["switch_every"] = 1
    args.update(kw)
    return args


def run_node(w, method, **kw):
    """The sampler node's full result tuple (LATENT first)."""
    return nodes.NODE_CLASS_MAPPINGS[NODE_IDS[method]].execute(**node_kwargs(w, method, **kw)).result


def samples_of(w, method, **kw):
    """The sampler node's output latent tensor."""
    return run_node(w, method, **kw)[0]["samples"]


def fails_before_sampling(w, method, error, match, **kw):
    """Run the node on a counting clone; it must raise ``error`` matching ``match`` with 0 UNet calls."""
    clone, counter = counted(w.model)
    with pytest.raises(error, match=match) as info:
        run_node(w, method, model=clone, **kw)
    assert counter.calls == 0, f"raised after {counter.calls} UNet calls: {info.value}"
    w.assert_clean()
    return info.value


# --- faults: Cancel, exceptions in the UNet, out of memory -------------------------------------------------------
class Fault:
    """On the ``at``-th UNet call: raise Cancel ('cancel') or a simulated CUDA OOM ('oom') in the APPLY_MODEL
    wrapper, set ComfyUI's interrupt flag so that its own per-op check raises inside the UNet ('cancel_flag'),
    or arm an attn1 patch raising a RuntimeError ('unet_error') or the OOM ('oom_unet') in the middle of the
    UNet, after LoRA-hooked layers have run. Installed on a clone of the user's model, which the node clones
    again (ModelPatcher.clone keeps wrappers and patches)."""

    def __init__(self, mode, at):
        self.mode, self.at, self.calls, self.armed, self.fired = mode, at, 0, False, False

    def wrapper(self, executor, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            self.fired = True
            if self.mode == "cancel":
                raise comfy.model_management.InterruptProcessingException()
            if self.mode == "oom":
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")
            if self.mode == "cancel_flag":
                comfy.model_management.interrupt_current_processing(True)
            else:
                self.armed = True
        return executor(*args, **kwargs)

    def patch(self, q, k, v, extra_options):
        if self.armed:
            self.armed = False
            if self.mode == "oom_unet":
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB (simulated)")
            raise RuntimeError("boom inside the UNet (simulated)")
        return q, k, v

    def install(self, model):
        clone = model.clone()
        clone.add_wrapper_with_key(APPLY_MODEL, "test.fault", self.wrapper)
        fault = self
        clone.set_model_attn1_patch(lambda q, k, v, extra_options: fault.patch(q, k, v, extra_options))
        return clone


_WORLD: list = []


@pytest.fixture(scope="module")
def w(comfy_state, ml):
    """The process's World (built once: ~4 s); each module's scratch files are removed when it ends."""
    if not _WORLD:
        _WORLD.append(World(ml, comfy_state["loras_dir"]))
    yield _WORLD[0]
    _WORLD[0].remove_scratch()


@pytest.fixture(scope="module")
def errors(ml):
    return ml("core.errors")


@pytest.fixture(autouse=True)
def forget_dead_loaded_models():
    """Harness hygiene, not a check: when a test's clone chain (counting/fault clone → the node's clone) is freed
    parent-first (pytest keeps failing frames alive), ComfyUI keeps a 'dead' LoadedModel for the still-living
    base model forever and runs a full gc.collect() on every later model load (~4× slower runs). Drop such
    entries after each test; the soak asserts that the pack's own runs leave none."""
    yield
    loaded = comfy.model_management.current_loaded_models
    loaded[:] = [m for m in loaded if not m.is_dead()]


# --- API prompts through ComfyUI's real executor ---------------------------------------------------------------
def stack_rows(names):
    """LoRA Stack node inputs: one enabled row per file, strengths 0.5."""
    inputs = {"rows": len(names)}
    for n, name in enumerate(names, start=1):
        inputs.update({f"lora_{n}": name, f"on_{n}": True, f"strength_model_{n}": 0.5, f"strength_clip_{n}": 0.5,
                       f"category_{n}": "other"})
    return inputs


class HardeningInputs:
    """Test-only node: hands the tiny MODEL/CLIP, conds and latent of this module to an API prompt."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"key": ("STRING", {"default": "hard"})}}

    RETURN_TYPES = ("MODEL", "CLIP", "CONDITIONING", "CONDITIONING", "LATENT")
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, key):
        return INPUTS[key]


def register_inputs(w):
    """Make ``TestHardeningInputs`` (key 'hard') hand out the world's model, CLIP, conds and 8×8 latent."""
    nodes.NODE_CLASS_MAPPINGS.setdefault("TestHardeningInputs", HardeningInputs)
    INPUTS["hard"] = (w.model, w.clip, tiny_models.make_conditioning("sd15", seed=1),
                      tiny_models.make_conditioning("sd15", seed=2), {"samples": torch.zeros(1, 4, 8, 8)})


def sampler_node(class_type, stack_ref, **extra):
    """An API-prompt sampler node fed by node 'in' (TestHardeningInputs) and ``stack_ref``; 2 steps."""
    inputs = {"model": ["in", 0], "lora_stack": stack_ref, "seed": 3, "steps": 2, "cfg": CFG, "sampler_name": "euler",
              "scheduler": "normal", "positive": ["in", 2], "negative": ["in", 3], "latent_image": ["in", 4],
              "denoise": 1.0}
    inputs.update(extra)
    return {"class_type": class_type, "inputs": inputs}


def run_all(prompt, runner=run_prompt):
    """``runner(prompt)``, and every capture node really ran (ComfyUI drops outputs that fail validation silently)."""
    labels = [n["inputs"]["label"] for n in prompt.values() if n["class_type"] == "TestCaptureAny"]
    for label in labels:
        CAPTURED.pop(label, None)
    runner(prompt)
    missing = [label for label in labels if label not in CAPTURED]
    assert not missing, f"outputs not produced (invalid prompt?): {missing}"

