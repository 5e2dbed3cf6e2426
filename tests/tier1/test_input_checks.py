"""Tier 1: the pure input checks every node runs (core.input_checks), no ComfyUI."""
import math

import pytest
import torch

from support.pack_loader import load_pure

checks = load_pure("core.input_checks")
errors = load_pure("core.errors")
stack = load_pure("core.stack")
Spec = checks.InputSpec

STEPS = Spec("steps", "INT", minimum=1, maximum=10000)
SEED = Spec("seed", "INT", minimum=0, maximum=0xffffffffffffffff)
CFG = Spec("cfg", "FLOAT", minimum=0.0, maximum=100.0)
STRENGTH = Spec("strength_model_2", "FLOAT", optional=True, minimum=-100.0, maximum=100.0,
                label="row 2: 'strength_model_2'")
ON = Spec("on_1", "BOOLEAN", optional=True)
CATEGORY = Spec("category_1", "COMBO", options=("character", "style"))
LORA = Spec("lora_1", "COMBO", optional=True)  # a file list: options checked by the node itself
PROMPT = Spec("prompt", "STRING")


def refused(spec, value, message):
    with pytest.raises(errors.InputError) as info:
        checks.check_value(spec, value, "Node")
    assert str(info.value) == message
    assert isinstance(info.value, errors.MultiLoRAError) and isinstance(info.value, ValueError)


@pytest.mark.parametrize("value, expected", [(5, 5), (5.0, 5), (1, 1), (10000, 10000)])
def test_whole_numbers_are_accepted_as_int(value, expected):
    out = checks.check_value(STEPS, value, "Node")
    assert out == expected and type(out) is int


@pytest.mark.parametrize("value, shown", [("5", "'5' (str)"), (2.5, "2.5 (float)"), (True, "True (bool)"),
                                          ([1, 2], "[1, 2] (list)"), (None, "None (NoneType)")])
def test_whole_number_of_the_wrong_type(value, shown):
    refused(STEPS, value, f"Node: 'steps' must be a whole number, got {shown}. Set a whole number from 1 to 10000.")


def test_whole_number_out_of_range():
    refused(STEPS, 0, "Node: 'steps' is 0, out of range. Set a value from 1 to 10000.")
    refused(SEED, -1, "Node: 'seed' is -1, out of range. Set a value from 0 to 18446744073709551615.")
    assert checks.check_value(SEED, 0xffffffffffffffff, "Node") == 0xffffffffffffffff


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_numbers(value):
    refused(STRENGTH, value, f"Node: row 2: 'strength_model_2' is {value}, not a number. Set a value from -100 to 100.")


def test_numbers():
    out = checks.check_value(CFG, 7, "Node")
    assert out == 7.0 and type(out) is float
    refused(CFG, 100.5, "Node: 'cfg' is 100.5, out of range. Set a value from 0 to 100.")
    refused(CFG, "7", "Node: 'cfg' must be a number, got '7' (str). Set a number from 0 to 100.")
    refused(CFG, False, "Node: 'cfg' must be a number, got False (bool). Set a number from 0 to 100.")
    refused(Spec("x", "FLOAT", minimum=0.01), -1.0, "Node: 'x' is -1, out of range. Set a value from 0.01 to ∞.")


@pytest.mark.parametrize("value, expected", [(True, True), (False, False), (0, False), (1, True), ("false", False),
                                             ("FALSE", False), (" True ", True), ("tRuE", True)])
def test_booleans(value, expected):
    assert checks.check_value(ON, value, "LoRA Stack") is expected


@pytest.mark.parametrize("value, shown", [("no", "'no' (str)"), ("", "'' (str)"), (2, "2 (int)"), (0.0, "0.0 (float)"),
                                          (None, "None (NoneType)"), ([True], "[True] (list)")])
def test_other_booleans_are_refused(value, shown):
    refused(ON, value, f"Node: 'on_1' must be true or false, got {shown}. Send a JSON boolean, or the text "
                       "\"true\" or \"false\".")


def test_choices():
    assert checks.check_value(CATEGORY, "style", "Node") == "style"
    refused(CATEGORY, "hero", "Node: 'category_1' is 'hero', which is not an option. Pick one of: 'character', 'style'.")
    refused(CATEGORY, 5, "Node: 'category_1' must be text, got 5 (int). Send one of: 'character', 'style'.")
    assert checks.check_value(LORA, "any file.safetensors", "Node") == "any file.safetensors"
    refused(LORA, 5, "Node: 'lora_1' must be text, got 5 (int). Send a name from its list.")
    many = Spec("sampler_name", "COMBO", options=tuple(f"s{i}" for i in range(15)))
    refused(many, "x", "Node: 'sampler_name' is 'x', which is not an option. Pick one of: "
                       + ", ".join(f"'s{i}'" for i in range(12)) + " (and 3 more).")


def test_text():
    assert checks.check_value(PROMPT, "a cat", "Node") == "a cat"
    refused(PROMPT, 5, "Node: 'prompt' must be text, got 5 (int). Send a string.")


def test_sockets():
    good = stack.LoraStack(())
    assert checks.check_value(Spec("lora_stack", "MULTILORA_STACK"), good, "Node") is good
    refused(Spec("lora_stack", "MULTILORA_STACK"), 5,
            "Node: 'lora_stack' must come from a LoRA Stack node, got 5 (int). Connect a LoRA Stack node to it.")
    refused(Spec("lora_stack", "MULTILORA_STACK"), None, "Node: 'lora_stack' must come from a LoRA Stack node, got "
                                                         "None (NoneType). Connect a LoRA Stack node to it.")
    assert checks.check_value(Spec("image", "IMAGE", optional=True), None, "Node") is None
    refused(Spec("image", "IMAGE", optional=True), torch.zeros(8, 8),
            "Node: 'image' must come from an IMAGE output, got a tensor of shape [8, 8]. Connect an IMAGE output to it.")
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    assert checks.check_value(Spec("latent_image", "LATENT"), latent, "Node") is latent
    refused(Spec("latent_image", "LATENT"), {"x": 1},
            "Node: 'latent_image' must come from a LATENT output, got {'x': 1} (dict). Connect a LATENT output to it.")
    assert checks.check_value(Spec("positive", "CONDITIONING"), [[torch.zeros(1), {}]], "Node")
    refused(Spec("positive", "CONDITIONING"), "a cat", "Node: 'positive' must come from a CONDITIONING output, got "
                                                       "'a cat' (str). Connect a CONDITIONING output to it.")
    assert checks.check_value(Spec("x", "SOMETHING_ELSE"), 5, "Node") == 5  # unknown socket types are not judged


def test_refused_value_raises_wherever_it_is_converted():
    error = errors.InputError("Node: 'steps' must be a whole number")
    value = checks.RefusedValue([1, 2], error)
    assert isinstance(value, str) and value == "[1, 2]"
    for convert in (bool, int, float, lambda v: [0][v]):
        with pytest.raises(errors.InputError) as info:
            convert(value)
        assert info.value is error
    with pytest.raises(errors.InputError) as info:
        checks.check_value(CATEGORY, value, "Node")
    assert info.value is error
    assert checks.RefusedValue("maybe", error) == "maybe"


def test_check_inputs_returns_a_new_dict_and_leaves_the_input_alone():
    values = {"steps": 5.0, "on_1": "false", "extra": object()}
    before = dict(values)
    out = checks.check_inputs((STEPS, ON, CFG), values, "Node")
    assert values == before
    assert out == {"steps": 5, "on_1": False, "extra": before["extra"]} and out is not values
    with pytest.raises(errors.InputError, match=r"^Node: 'cfg' is nan, not a number\."):
        checks.check_inputs((CFG,), {"cfg": math.nan}, "Node")
