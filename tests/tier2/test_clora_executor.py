"""CLoRA through ComfyUI's real validator and executor (nodes run under torch.inference_mode) on tiny
SD1.5 and SDXL models, fed by a test-only loader node that hands the tiny MODEL/CLIP to the graph."""

import pytest
import torch

import comfy.sd
import comfy.sd1_clip
import comfy.sdxl_clip
import comfy.supported_models_base
import folder_paths
import nodes

from support import lora_files, tiny_models
from support.executor import CAPTURED, capture, run_prompt

TINY: dict = {}


def tiny_sdxl_clip(seed: int = 0):
    """A real SDXL CLIP (CLIP-L + CLIP-G) shrunk so that [l | g] = 64 = the tiny SDXL context, pooled = 32."""
    def config(hidden):
        return {"hidden_size": hidden, "intermediate_size": 2 * hidden, "num_attention_heads": 2,
                "num_hidden_layers": 3, "max_position_embeddings": 77, "vocab_size": 49408,
                "projection_dim": tiny_models.SDXL_POOLED_DIM, "hidden_act": "gelu", "eos_token_id": 49407,
                "bos_token_id": 0, "pad_token_id": 1, "layer_norm_eps": 1e-05}
    cpu = torch.device("cpu")
    target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
    options = {"clip_l_model_config": config(32), "clip_g_model_config": config(32), "dtype": torch.float32,
               "load_device": cpu, "offload_device": cpu, "initial_device": cpu}
    clip = comfy.sd.CLIP(target=target, model_options=options)
    tiny_models.init_weights_(clip.cond_stage_model, seed)
    return clip


class TinyModelLoader:
    """Test-only: the tiny model and CLIP of a family, built inside the executor (inference mode)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"kind": (["sd15", "sdxl"],)}}

    RETURN_TYPES = ("MODEL", "CLIP")
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, kind):
        if kind not in TINY:
            model = tiny_models.build_tiny(kind, seed=0)
            clip = tiny_models.build_tiny_clip(seed=0) if kind == "sd15" else tiny_sdxl_clip()
            TINY[kind] = (model, clip)
        return TINY[kind]


@pytest.fixture(scope="module")
def loras(comfy_state):
    nodes.NODE_CLASS_MAPPINGS.setdefault("TestTinyModelLoader", TinyModelLoader)
    names = {}
    for kind in ("sd15", "sdxl"):
        model = tiny_models.build_tiny(kind, seed=0)  # same seed → same architecture/keys as the loader's
        clip = tiny_models.build_tiny_clip(seed=0) if kind == "sd15" else None
        names[kind] = lora_files.write_lora_set(model, comfy_state["loras_dir"], f"clx_{kind}", (91, 92), clip=clip)
    folder_paths.filename_list_cache.clear()
    return names


def stack_inputs(names):
    inputs = {"rows": 2}
    for n, (name, word) in enumerate(zip(names, ("cat", "dog")), start=1):
        inputs.update({f"lora_{n}": name, f"on_{n}": True, f"strength_model_{n}": 0.8, f"strength_clip_{n}": 0.8,
                       f"category_{n}": "character", f"concept_{n}": word, f"trigger_{n}": "sks" if n == 1 else ""})
    return inputs


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_clora_workflow_through_the_executor(loras, kind):
    prompt = {
        "1": {"class_type": "TestTinyModelLoader", "inputs": {"kind": kind}},
        "2": {"class_type": "MultiLoRAStack", "inputs": stack_inputs(loras[kind])},
        "3": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 96, "batch_size": 1}},
        "4": {"class_type": "MultiLoRACLoRASampler", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "lora_stack": ["2", 0], "prompt": "a cat and a dog, photo",
            "negative_prompt": "blurry", "seed": 7, "steps": 4, "cfg": 5.0, "sampler_name": "euler",
            "scheduler": "normal", "latent_image": ["3", 0], "denoise": 1.0, "mask_threshold": 0.4,
            "temperature": 0.5, "step_size": 20.0, "opt_until": 0.5, "refine_iters": 2}},
        "5": {"class_type": "MultiLoRAMaskPreview", "inputs": {"attention_maps": ["4", 1], "mask_threshold": 0.3,
                                                               "step": -1, "average_steps": False}},
        "6": capture(["4", 0], f"latent_{kind}"),
        "7": capture(["4", 2], f"masks_{kind}"),
        "8": capture(["4", 1], f"maps_{kind}"),
    }
    run_prompt(prompt)
    latent = CAPTURED[f"latent_{kind}"]["samples"]
    assert latent.shape == (1, 4, 12, 8) and torch.isfinite(latent).all()
    assert CAPTURED[f"masks_{kind}"].shape == (2, 96, 64)
    record = CAPTURED[f"maps_{kind}"]
    assert len(record.steps) == 4 and len(record.losses) == 2 * (1 + 2) and record.losses[0] > 0
    model, clip = TINY[kind]
    assert model.wrappers == {} and clip.patcher.patches == {}
    assert sum(len(m._forward_hooks) + len(getattr(m, "weight_function", [])) for m in model.model.modules()) == 0
