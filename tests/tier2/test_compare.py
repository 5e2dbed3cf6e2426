"""Compare node: every method from one stack on the tiny real-format checkpoint."""
import pytest
import torch

import folder_paths
import nodes

from support.tiny_checkpoint import ensure_demo_loras, ensure_tiny_checkpoint


@pytest.fixture(scope="module")
def loaded(comfy_state):
    name = ensure_tiny_checkpoint(comfy_state["checkpoints_dir"])
    model, clip, vae = nodes.CheckpointLoaderSimple().load_checkpoint(name)[:3]
    loras = ensure_demo_loras(comfy_state["loras_dir"], model, clip=clip)
    folder_paths.filename_list_cache.clear()
    return model, clip, vae, loras


def test_compare_runs_the_methods_and_labels_the_grid(ml, loaded):
    """CLoRA is left out here for time (its 20 refinement passes on this checkpoint take a minute on two
    cores); its path through Compare is covered by the skip test and its behaviour by test_clora*.py."""
    model, clip, vae, loras = loaded
    s = ml("core.stack")
    stack = s.LoraStack((s.LoraRow(loras[0], 0.8, concept="knight", category="character"),
                         s.LoraRow(loras[1], 0.8, concept="dragon", category="object")))
    node = nodes.NODE_CLASS_MAPPINGS["MultiLoRACompare"]
    grid, table = node.execute(model=model, clip=clip, vae=vae, lora_stack=stack, prompt="a knight and a dragon",
                               negative_prompt="blurry", seed=3, steps=2, cfg=6.0, sampler_name="euler",
                               scheduler="normal", latent_image={"samples": torch.zeros(1, 4, 8, 8)},
                               switch_every=1, run_clora=False).result
    assert grid.shape == (1, 64 + 24, 64 * 4, 3) and float(grid.std()) > 0
    for method in ("Merge", "LoRA Switch", "LoRA Composite", "CMLoRA"):
        assert f"| {method} |" in table
    assert "| CLoRA |" not in table
    tiles = [grid[0, 24:, i * 64:(i + 1) * 64] for i in range(4)]
    assert not torch.equal(tiles[0], tiles[2])  # Merge and Composite differ


def test_compare_skips_a_method_whose_inputs_do_not_fit(ml, loaded):
    model, clip, vae, loras = loaded
    s = ml("core.stack")
    stack = s.LoraStack((s.LoraRow(loras[0], 0.8),))
    node = nodes.NODE_CLASS_MAPPINGS["MultiLoRACompare"]
    grid, table = node.execute(model=model, clip=clip, vae=vae, lora_stack=stack, prompt="a knight",
                               negative_prompt="", seed=3, steps=2, cfg=6.0, sampler_name="euler",
                               scheduler="normal", latent_image={"samples": torch.zeros(1, 4, 8, 8)},
                               switch_every=1, run_lora_switch=False, run_lora_composite=False,
                               run_cmlora=False).result
    assert "| CLoRA | — | — | skipped: CLoRA:" in table and grid.shape[2] == 64 * 2
    with pytest.raises(ValueError, match="every method is switched off"):
        node.execute(model=model, clip=clip, vae=vae, lora_stack=stack, prompt="a", negative_prompt="", seed=1,
                     steps=1, cfg=1.0, sampler_name="euler", scheduler="normal",
                     latent_image={"samples": torch.zeros(1, 4, 8, 8)}, switch_every=1, run_merge=False,
                     run_lora_switch=False, run_lora_composite=False, run_clora=False, run_cmlora=False)
