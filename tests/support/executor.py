"""Run API-format prompts through ComfyUI's real validator and executor, and capture node outputs."""
from __future__ import annotations

import asyncio
import uuid

CAPTURED: dict[str, object] = {}
CACHE_ARGS = {"lru": 0, "ram": 0.0, "ram_inactive": 0.0}
"""PromptExecutor's cache settings: no LRU, no RAM-pressure eviction. 0.33 reads ``ram_inactive`` (main.py passes
it); 0.3.75 ignores the key."""


class CaptureAny:
    """Test-only output node: stores whatever reaches its input under its label."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"value": ("*",), "label": ("STRING", {"default": "out"})}}

    RETURN_TYPES = ()
    FUNCTION = "capture"
    OUTPUT_NODE = True
    CATEGORY = "testing"

    def capture(self, value, label):
        CAPTURED[label] = value
        return ()


class ServerStub:
    """What PromptExecutor needs of the server: a message sink."""

    def __init__(self) -> None:
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata: dict = {}
        self.messages: list = []
        self.history_result: dict = {}
        """The executor's UI outputs after a run ({"outputs": {node id: ui}, "meta": ...}), as in /history."""

    def send_sync(self, event, data, sid=None) -> None:
        self.messages.append((event, data))

    def queue_updated(self) -> None:
        pass


def register_capture() -> None:
    import nodes
    nodes.NODE_CLASS_MAPPINGS.setdefault("TestCaptureAny", CaptureAny)


class PromptFailed(AssertionError):
    """Validation or execution failed; ``details`` holds ComfyUI's error payload."""

    def __init__(self, message: str, details: object) -> None:
        super().__init__(f"{message}: {details}")
        self.details = details


def run_prompt(prompt: dict) -> ServerStub:
    """Validate and execute ``prompt``; raise PromptFailed with ComfyUI's error on failure.

    The returned stub holds the messages sent and ``history_result`` (output nodes' UI outputs)."""
    import execution
    register_capture()
    prompt_id = str(uuid.uuid4())
    valid = asyncio.run(execution.validate_prompt(prompt_id, prompt, None))
    if not valid[0]:
        raise PromptFailed("prompt invalid", {"error": valid[1], "node_errors": valid[3]})
    server = ServerStub()
    executor = execution.PromptExecutor(server, cache_type=execution.CacheType.CLASSIC, cache_args=dict(CACHE_ARGS))
    asyncio.run(executor.execute_async(prompt, prompt_id, {}, valid[2]))
    if not executor.success:
        errors = [m for m in executor.status_messages if m[0] == "execution_error"]
        raise PromptFailed("execution failed", errors[0][1] if errors else executor.status_messages)
    server.history_result = executor.history_result
    return server


def capture(source: list, label: str = "out") -> dict:
    """A prompt node capturing output ``source`` = [node_id, index]."""
    return {"class_type": "TestCaptureAny", "inputs": {"value": source, "label": label}}
