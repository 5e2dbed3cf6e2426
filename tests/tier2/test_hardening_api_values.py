"""Hardening, API values: every input of every node of the pack, sent a bad value in an API prompt, is refused
with a clear error before any sampling: the pack's InputError with its exact message, or ComfyUI's own
validation error naming that input where ComfyUI refuses the value first.

A case travels as a prompt sent to ComfyUI's server does: the pack's on-prompt handler (installed by the pack's
extension on a stand-in server, run the way ``PromptServer.trigger_on_prompt`` runs handlers), then ComfyUI's
own ``validate_prompt`` and ``PromptExecutor``, where each node's checked ``execute`` runs the same checks on what
it received. The model handed to the nodes counts its UNet calls: every case must end with 0.

Where each refusal happens (both ComfyUI versions):
- on/off "maybe", numbers given as lists/booleans/NaN/out of range: the handler, reported by validation;
- text sent to number inputs: ComfyUI's int()/float() (its message), or the node ("nan");
- a dropdown value that is not an option: ComfyUI 0.33's validation, or the node on 0.3.x (which never checks them);
- a literal value on a socket: the node (ComfyUI passes it through).
"""
import asyncio
import copy
import functools
import re
import sys
import types

import pytest
import torch

import nodes

from support import tiny_models
from support.executor import CAPTURED, PromptFailed, capture, run_prompt
from support.hardening import counted, errors, forget_dead_loaded_models, w  # noqa: F401

ROW_FIELDS = ("lora", "on", "strength_model", "strength_clip", "category", "concept", "trigger")
ROW_INPUT = re.compile(rf"^({'|'.join(ROW_FIELDS)})_(\d+)$")
PROMPT = "a photo of a cat and a dog in a park"
LINKS = {"MODEL": ["in", 0], "CLIP": ["in", 1], "LATENT": ["in", 4], "VAE": ["in", 5], "IMAGE": ["in", 6],
         "MULTILORA_ATTENTION": ["in", 7], "MULTILORA_STACK": ["s", 0]}
CONDS = {"positive": ["in", 2], "negative": ["in", 3]}
SOURCES = {"MULTILORA_STACK": "a LoRA Stack node", "MULTILORA_ATTENTION": "the attention_maps output of KSampler (CLoRA)"}
WIDGETS = ("INT", "FLOAT", "BOOLEAN", "STRING", "COMBO")
INPUTS: dict = {}


class ApiValueInputs:
    """Test-only node: the counting model, CLIP, conds, latent, a VAE/attention stand-in and an image."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"key": ("STRING", {"default": "api"})}}

    RETURN_TYPES = ("MODEL", "CLIP", "CONDITIONING", "CONDITIONING", "LATENT", "VAE", "IMAGE", "MULTILORA_ATTENTION")
    FUNCTION = "load"
    CATEGORY = "testing"

    def load(self, key):
        return INPUTS[key]


class UnusedVae:
    """Stands in for a VAE: every case stops before one would be used."""

    def decode(self, *args):
        raise AssertionError("the VAE was used")

    encode = decode


class StandInServer:
    def __init__(self):
        self.handlers = []

    def add_on_prompt_handler(self, handler):
        self.handlers.append(handler)


@pytest.fixture(scope="module")
def api(w, comfy_state):
    """Registers the inputs node; installs the pack's prompt handler through its extension on a stand-in server."""
    nodes.NODE_CLASS_MAPPINGS.setdefault("TestApiValueInputs", ApiValueInputs)
    model, counter = counted(w.model)
    INPUTS["api"] = (model, w.clip, tiny_models.make_conditioning("sd15", seed=1),
                     tiny_models.make_conditioning("sd15", seed=2), {"samples": torch.zeros(1, 4, 8, 8)}, UnusedVae(),
                     torch.zeros(1, 64, 64, 3), types.SimpleNamespace(steps=[], latent_size=(8, 8)))
    server = StandInServer()
    stand_in = types.ModuleType("server")
    stand_in.PromptServer = types.SimpleNamespace(instance=server)
    saved = sys.modules.get("server")
    sys.modules["server"] = stand_in
    try:
        extension = asyncio.run(comfy_state["pack"].comfy_entrypoint())
        asyncio.run(extension.get_node_list())
        asyncio.run(extension.get_node_list())  # a second load must not add a second handler
    finally:
        if saved is None:
            del sys.modules["server"]
        else:
            sys.modules["server"] = saved
    assert len(server.handlers) == 1
    yield types.SimpleNamespace(handlers=server.handlers, counter=counter, good=w.good)
    INPUTS.pop("api")


def submit(api, prompt):
    """The prompt as the server receives it: on-prompt handlers, then ComfyUI's validation and executor."""
    json_data = {"prompt": copy.deepcopy(prompt)}
    for handler in api.handlers:
        json_data = handler(json_data)
    return run_prompt(json_data["prompt"])


# --- the table: every declared input of every node, with bad values for its type -----------------------------
def pack_nodes(comfy_state):
    return {n: nodes.NODE_CLASS_MAPPINGS[n] for n in comfy_state["new_nodes"]}


def declared(node_class):
    types_ = node_class.INPUT_TYPES()
    return [(name, entry[0], (entry[1] if len(entry) > 1 else None) or {}, section == "optional")
            for section in ("required", "optional") for name, entry in types_.get(section, {}).items()]


def fmt(value):
    return str(int(value)) if float(value).is_integer() and abs(value) < 1e16 else str(value)


def options_text(options):
    more = len(options) - 12
    return ", ".join(repr(o) for o in options[:12]) + (f" (and {more} more)" if more > 0 else "")


def cases_for(node_id, node_class, good_lora):
    """(input, value, expected pack message or None, ComfyUI's own validation may refuse it first)."""
    node = node_class.define_schema().display_name
    out = []
    for name, kind, extra, optional in declared(node_class):
        row = ROW_INPUT.match(name) if node_id == "MultiLoRAStack" else None
        label = f"row {row.group(2)}: '{name}'" if row else f"'{name}'"
        lo, hi = extra.get("min"), extra.get("max")
        span = f"from {fmt(lo)} to {fmt(hi)}" if lo is not None and hi is not None else ""
        options = kind if isinstance(kind, list) else extra.get("options")
        kind = "COMBO" if isinstance(kind, list) else kind
        if kind == "INT":
            whole = f"{node}: {label} must be a whole number, got {{}}. Set a whole number {span}."
            cases = [([1, 2], whole.format("[1, 2] (list)"), False), (True, whole.format("True (bool)"), False),
                     (hi + 1, f"{node}: {label} is {fmt(hi + 1)}, out of range. Set a value {span}.", False),
                     (lo - 1, f"{node}: {label} is {fmt(lo - 1)}, out of range. Set a value {span}.", False),
                     ("abc", None, True)]
        elif kind == "FLOAT":
            number = f"{node}: {label} must be a number, got {{}}. Set a number {span}."
            nan = f"{node}: {label} is {{}}, not a number. Set a value {span}."
            cases = [(float("nan"), nan.format("nan"), False), ("nan", nan.format("nan"), False),
                     (float("inf"), nan.format("inf"), False), (float("-inf"), nan.format("-inf"), False),
                     ([0.5, 1], number.format("[0.5, 1] (list)"), False), (False, number.format("False (bool)"), False),
                     (hi * 2 + 1, f"{node}: {label} is {fmt(hi * 2 + 1)}, out of range. Set a value {span}.", False),
                     ("inf", None, True)]
        elif kind == "BOOLEAN":
            boolean = (f"{node}: {label} must be true or false, got {{}}. Send a JSON boolean, or the text \"true\" "
                       "or \"false\".")
            cases = [("maybe", boolean.format("'maybe' (str)"), False), ("", boolean.format("'' (str)"), False),
                     (2, boolean.format("2 (int)"), False), (None, boolean.format("None (NoneType)"), False)]
        elif kind == "COMBO" and row and row.group(1) == "lora":
            cases = [(5, f"{node}: {label} must be text, got 5 (int). Send a name from its list.", True),
                     (None, f"{node}: {label} must be text, got None (NoneType). Send a name from its list.", True),
                     ("bogus.safetensors", (f"{node}: row {row.group(2)}: LoRA file 'bogus.safetensors' was not found "
                                            "in the loras folder. Check the file name or refresh the node list (press R "
                                            "in the UI)."), True)]
        elif kind == "COMBO":
            listed = options_text(options)
            cases = [(5, f"{node}: {label} must be text, got 5 (int). Send one of: {listed}.", True),
                     ("bogus", f"{node}: {label} is 'bogus', which is not an option. Pick one of: {listed}.", True)]
        elif kind == "STRING":
            cases = [([1, 2, 3], None, True)]
        else:
            source = SOURCES.get(kind, f"{'an' if kind[0] in 'AEIOU' else 'a'} {kind} output")
            cases = [(5, f"{node}: {label} must come from {source}, got 5 (int). Connect {source} to it.", False)]
        if row and row.group(2) != "1":
            cases = cases[:1]  # rows 2-10 are declared by the same code as row 1: one value each
        out += [(name, value, message, comfy_first) for value, message, comfy_first in cases]
    return out


def base_prompt(node_id, node_class, good_lora):
    """A prompt whose target node 't' gets valid values (defaults, links) for every input."""
    inputs = {}
    for name, kind, extra, optional in declared(node_class):
        if kind == "CONDITIONING":
            inputs[name] = CONDS[name]
        elif isinstance(kind, str) and kind in LINKS:
            inputs[name] = LINKS[kind]
        elif isinstance(kind, list) or kind in WIDGETS:
            inputs[name] = extra.get("default", (kind if isinstance(kind, list) else extra.get("options", [None]))[0])
    inputs.update({k: v for k, v in {"steps": 2, "prompt": PROMPT, "rows": 1, "lora_1": good_lora}.items()
                   if k in inputs})
    return {"in": {"class_type": "TestApiValueInputs", "inputs": {"key": "api"}},
            "s": {"class_type": "MultiLoRAStack", "inputs": {"rows": 1, "lora_1": good_lora}},
            "t": {"class_type": node_id, "inputs": inputs}, "c": capture(["t", 0], "api_values")}


@functools.cache
def _all_cases(good_lora):
    from support.comfy_boot import boot
    state = boot()
    return [(node_id, *case) for node_id, cls in sorted(pack_nodes(state).items())
            for case in cases_for(node_id, cls, good_lora)]


def all_cases(comfy_state, good_lora):
    return _all_cases(good_lora)


def test_the_table_covers_every_input_of_every_node(comfy_state, w):
    covered = {(node_id, name) for node_id, name, *_ in all_cases(comfy_state, w.good[0])}
    every = {(node_id, name) for node_id, cls in pack_nodes(comfy_state).items() for name, *_ in declared(cls)}
    assert len(pack_nodes(comfy_state)) >= 11 and every == covered
    assert {("MultiLoRAStack", f"{f}_{n}") for f in ROW_FIELDS for n in range(1, 11)} <= covered


def refusal(api, prompt):
    """('validation', node errors of 't') or ('execution', ComfyUI's error payload); fails if the prompt ran."""
    before = api.counter.calls
    try:
        submit(api, prompt)
    except PromptFailed as failure:
        assert api.counter.calls == before, "refused only after sampling started"
        details = failure.details
        if "node_errors" in details:
            return "validation", details["node_errors"].get("t", {}).get("errors", [])
        return "execution", details
    raise AssertionError(f"accepted: {CAPTURED.get('api_values')!r}")


def case_ids():
    from support.comfy_boot import boot
    state = boot()
    return [f"{n}.{name}={value!r}" for n, name, value, *_ in all_cases(state, "good")]


@pytest.mark.parametrize("case", range(len(case_ids())), ids=case_ids())
def test_bad_value_is_refused_by_name_before_sampling(api, comfy_state, case):
    node_id, name, value, message, comfy_first = all_cases(comfy_state, api.good[0])[case]
    prompt = base_prompt(node_id, pack_nodes(comfy_state)[node_id], api.good[0])
    prompt["t"]["inputs"][name] = value
    stage, found = refusal(api, prompt)
    if stage == "validation":
        named = [e for e in found if e["extra_info"].get("input_name") == name]
        assert named, f"validation failed, but not on '{name}': {found}"
        ours = [e for e in named if message is not None and e["details"].endswith(", " + message)]
        assert ours or comfy_first, f"ComfyUI refused '{name}' with its own error, the pack's was expected: {named}"
    else:
        assert message is not None, f"expected ComfyUI's validation to refuse it, got {found}"
        assert found["node_id"] == "t" and found["exception_message"].strip() == message, found
        assert found["exception_type"].endswith(("InputError", "StackError"))


# --- on/off values: what is accepted, on every BOOLEAN input of every node ------------------------------------
@pytest.mark.parametrize("value, enabled", [("false", False), ("FALSE", False), (" False ", False), (0, False),
                                            ("true", True), ("TRUE", True), (1, True), (True, True), (False, False)])
def test_on_off_text_is_read_as_a_boolean(api, value, enabled):
    prompt = {"s": {"class_type": "MultiLoRAStack", "inputs": {"rows": 1, "lora_1": api.good[0], "on_1": value}},
              "c": capture(["s", 0], "on_off")}
    submit(api, prompt)
    assert [r.enabled for r in CAPTURED["on_off"].rows] == [enabled]


def test_every_boolean_input_reads_false_as_off(api, comfy_state):
    booleans = {(node_id, name) for node_id, cls in pack_nodes(comfy_state).items()
                for name, kind, *_ in declared(cls) if kind == "BOOLEAN"}
    assert len(booleans) >= 10 + 7  # the rows' on/off, CMLoRA's cache, Compare's toggles, Mask Preview, CLoRA
    prompt = {f"{node_id}.{name}": {"class_type": node_id, "inputs": {name: "False", "unrelated": "False"}}
              for node_id, name in booleans}
    original = copy.deepcopy(prompt)
    json_data = {"prompt": prompt}
    for handler in api.handlers:
        json_data = handler(json_data)
    for key, node in json_data["prompt"].items():
        assert node["inputs"] == {key.split(".", 1)[1]: False, "unrelated": "False"}
        assert type(node["inputs"][key.split(".", 1)[1]]) is bool
    other = {"x": {"class_type": "KSampler", "inputs": {"add_noise": "false"}}}
    assert api.handlers[0]({"prompt": copy.deepcopy(other)}) == {"prompt": other}  # other nodes are not touched
    assert original != json_data["prompt"]


def test_lora_name_that_is_not_text_never_reaches_the_stack_headless(w, errors):
    """Without the server's handler (headless use of the nodes), the node's own check still refuses it."""
    stack_node = nodes.NODE_CLASS_MAPPINGS["MultiLoRAStack"]
    with pytest.raises(errors.InputError, match=r"^LoRA Stack: row 1: 'lora_1' must be text, got 5 \(int\)\. Send a "
                                                r"name from its list\.$"):
        stack_node.execute(rows=1, lora_1=5)
    with pytest.raises(errors.InputError, match=r"^LoRA Stack: row 1: 'on_1' must be true or false, got 'maybe'"):
        stack_node.execute(rows=1, lora_1=w.good[0], on_1="maybe")
    assert stack_node.execute(rows=1, lora_1=w.good[0], on_1="false").result[0].rows[0].enabled is False
