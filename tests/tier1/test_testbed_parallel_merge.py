"""testbed/evaluate_parallel.py's merge of side-by-side evaluation processes (pure: json + PIL, no ComfyUI)."""
from __future__ import annotations

import json
import os
import sys

import pytest
from PIL import Image

TESTBED = os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "testbed")


@pytest.fixture(scope="module")
def parallel():
    if TESTBED not in sys.path:
        sys.path.insert(0, TESTBED)
    import evaluate_parallel
    return evaluate_parallel


def _job(out, i, ks_methods, base=None, prompts=("p0", "p1")):
    folder = os.path.join(out, f"job{i}")
    os.makedirs(folder)
    part = {"meta": {"steps": 20, "cfg": 5.0, "seeds_per_prompt": 4, "prompts_per_k": len(prompts),
                     "sampler": "euler/normal", "device": "cuda:0", "argv": [f"job{i}"]}, "k": {}}
    if base is not None:
        part["base_caption_following"] = base
    for k, methods in ks_methods.items():
        part["k"][k] = {"prompts": list(prompts), "methods": {m: {"all": [0.1 * i, 0.0, 0.2]} for m in methods}}
    with open(os.path.join(folder, "results.json"), "w") as f:
        json.dump(part, f)
    return folder


def test_merge_unites_the_methods_of_each_k_and_keeps_the_base_check(parallel, tmp_path):
    out = str(tmp_path)
    _job(out, 0, {"1": ["merge"], "2": ["merge", "switch"]}, base={"all_attributes": [0.24, 0.16, 0.34]})
    _job(out, 1, {"3": ["merge"]})
    _job(out, 2, {"2": ["clora"]})
    merged = parallel.merge(out)  # job3 and job4 are missing: reported, not fatal
    assert list(merged["k"]) == ["1", "2", "3"]
    assert list(merged["k"]["2"]["methods"]) == ["merge", "switch", "clora"]
    assert merged["k"]["2"]["methods"]["clora"] == {"all": [0.2, 0.0, 0.2]}
    assert merged["base_caption_following"] == {"all_attributes": [0.24, 0.16, 0.34]}
    assert merged["meta"]["steps"] == 20 and [j["argv"] for j in merged["meta"]["jobs"]] == [["job0"], ["job1"], ["job2"]]


def test_merge_refuses_jobs_that_evaluated_different_prompts(parallel, tmp_path):
    out = str(tmp_path)
    _job(out, 0, {"2": ["merge"]})
    _job(out, 1, {"2": ["clora"]}, prompts=("p0", "other"))
    with pytest.raises(ValueError, match="job1: k = 2 prompts differ from an earlier job's"):
        parallel.merge(out)


def test_sheets_are_stacked_in_job_order(parallel, tmp_path):
    out = str(tmp_path)
    for i, (colour, width) in enumerate((((255, 0, 0), 40), ((0, 0, 255), 30))):
        Image.new("RGB", (width, 10), colour).save(os.path.join(_job(out, i, {"2": ["m"]}), "sheet_k2.png"))
    parallel.stack_sheets(out, "2")
    sheet = Image.open(os.path.join(out, "sheet_k2.png"))
    assert sheet.size == (40, 20)
    assert sheet.getpixel((0, 0)) == (255, 0, 0) and sheet.getpixel((0, 10)) == (0, 0, 255)
    assert sheet.getpixel((35, 15)) == (255, 255, 255)  # the narrower sheet is padded white
