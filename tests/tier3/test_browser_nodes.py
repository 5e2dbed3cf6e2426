"""Every node of the pack reaches the frontend and is found through the node search box."""
from __future__ import annotations

import pytest

PACK_NODES = (
    "MultiLoRAStack", "MultiLoRAApplyStack", "MultiLoRASwitchSampler", "MultiLoRASwitch",
    "MultiLoRACompositeSampler", "MultiLoRACompositeGuider", "MultiLoRACLoRASampler", "MultiLoRAMaskPreview",
    "MultiLoRACMLoRASampler", "MultiLoRAFrequencyProfile", "MultiLoRACompare", "MultiLoRARegionalSampler",
    "MultiLoRARegional",
)
"""Node IDs released so far: saved workflows store them, so none may disappear."""


@pytest.fixture(scope="module")
def pack_defs(comfy) -> dict:
    """The server's definitions of this pack's nodes (those loaded from the pack's folder)."""
    info = comfy.get("/api/object_info")
    return {name: d for name, d in info.items() if d.get("python_module", "").startswith("custom_nodes.")}


def test_the_server_defines_every_pack_node(pack_defs):
    assert sorted(pack_defs) == sorted(PACK_NODES), "the pack's node list changed: update PACK_NODES on purpose"
    for name, definition in pack_defs.items():
        assert definition["category"].startswith("multilora"), name
        assert definition["display_name"] and definition["description"], name


def test_the_frontend_registers_every_pack_node(ui, pack_defs):
    registered = ui.js("names => names.filter(n => !window.LiteGraph.registered_node_types[n])", sorted(pack_defs))
    assert registered == []


def test_every_pack_node_is_found_by_the_search_box_and_added(ui, pack_defs):
    """Search by display name and by node ID, pick the suggestion: the canvas gets that node."""
    failures = []
    for node_id in PACK_NODES:
        display = pack_defs[node_id]["display_name"]
        for query in (display, node_id):
            titles = ui.search_and_add(query, display)
            if display not in titles:
                failures.append(f"searching {query!r} offered {titles}, not {display!r}")
            elif ui.node_types() != [node_id]:
                failures.append(f"picking {display!r} added {ui.node_types()}, not {node_id}")
    assert failures == []


def test_search_for_an_unknown_node_finds_nothing(ui):
    """The check above fails for a node that is gone: nothing is offered and nothing added."""
    titles = ui.search_and_add("MultiLoRANoSuchNode", "MultiLoRANoSuchNode")
    assert "MultiLoRANoSuchNode" not in titles and ui.node_types() == []
