"""Tier 2: tests inside a real ComfyUI on the CPU."""
import pytest

from support.comfy_boot import boot, pack_module

STATE = boot()


@pytest.fixture(scope="session")
def comfy_state() -> dict:
    return STATE


@pytest.fixture(scope="session")
def ml():
    """Accessor for the pack's engine modules as ComfyUI loaded them: ml('host.onthefly')."""
    return lambda name: pack_module(f"multilora.{name}")
