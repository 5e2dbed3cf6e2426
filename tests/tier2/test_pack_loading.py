"""The pack inside ComfyUI's real node loader."""
import nodes

EXPECTED_NODES = {"MultiLoRAStack", "MultiLoRAApplyStack", "MultiLoRASwitchSampler", "MultiLoRACompositeSampler",
                  "MultiLoRASwitch", "MultiLoRACompositeGuider", "MultiLoRACLoRASampler", "MultiLoRAMaskPreview",
                  "MultiLoRACMLoRASampler", "MultiLoRAFrequencyProfile", "MultiLoRACompare",
                  "MultiLoRARegional", "MultiLoRARegionalSampler"}


def test_all_node_ids_registered_without_warnings(comfy_state):
    assert comfy_state["loaded"] is True
    assert EXPECTED_NODES <= set(comfy_state["new_nodes"])
    pack_records = [r for r in comfy_state["load_warnings"]
                    if "multilora" in r.getMessage().lower() or r.name == "multilora"]
    assert pack_records == []


def test_every_input_has_a_tooltip_and_every_node_a_description():
    for node_id in EXPECTED_NODES:
        info = nodes.NODE_CLASS_MAPPINGS[node_id].INPUT_TYPES()
        for section in ("required", "optional"):
            for name, spec in info.get(section, {}).items():
                assert len(spec) > 1 and spec[1].get("tooltip"), f"{node_id}.{name} has no tooltip"
        assert nodes.NODE_CLASS_MAPPINGS[node_id].DESCRIPTION


def test_web_directory_registered(comfy_state):
    import os
    web_dirs = {os.path.realpath(p) for p in nodes.EXTENSION_WEB_DIRS.values()}
    assert os.path.realpath(os.path.join(comfy_state["pack_path"], "js")) in web_dirs


def test_every_node_has_a_help_page(comfy_state):
    import os
    for node_id in EXPECTED_NODES:
        path = os.path.join(comfy_state["pack_path"], "js", "docs", f"{node_id}.md")
        assert os.path.isfile(path), f"js/docs/{node_id}.md is missing"
