"""Tier 1: CMLoRA's pure modules (partition, refresh schedule, dominant LoRA, weights, profiling), no ComfyUI."""
import math

import pytest
import torch

from support.pack_loader import load_pure

sched = load_pure("core.cmlora_schedule")
freq = load_pure("core.frequency_profile")
stack_mod = load_pure("core.stack")

# Written out by hand from the rule (interval 2 while i < 0.375·T, 3 while i < 0.875·T, then 2).
# 20 steps: 0.375·20 = 7.5, 0.875·20 = 17.5 — the last stage is never reached before step 20.
REFRESH_20 = [0, 2, 4, 6, 8, 11, 14, 17]
# 50 steps: 0.375·50 = 18.75, 0.875·50 = 43.75.
REFRESH_50 = [0, 2, 4, 6, 8, 10, 12, 14, 16, 18, 20,
              23, 26, 29, 32, 35, 38, 41, 44,
              46, 48]


# --- partition ----------------------------------------------------------------------------------------
def test_category_sets_cover_the_stack_categories():
    covered = set(sched.HIGH_FREQUENCY_CATEGORIES) | set(sched.LOW_FREQUENCY_CATEGORIES) | {"other"}
    assert covered == set(stack_mod.CATEGORIES)
    assert not set(sched.HIGH_FREQUENCY_CATEGORIES) & set(sched.LOW_FREQUENCY_CATEGORIES)


def test_partition_by_category_keeps_stack_order_and_other_is_high():
    cats = ["background", "character", "other", "style", "background", "object", "clothing"]
    assert sched.partition(cats) == ([1, 2, 3, 5, 6], [0, 4])
    assert sched.partition(["background"]) == ([], [0])
    assert sched.partition(["style", "character"]) == ([0, 1], [])


def test_partition_by_score_above_median_ties_go_low():
    cats = ["background"] * 4
    assert sched.partition(cats, [0.1, 0.4, 0.3, 0.2]) == ([1, 2], [0, 3])   # median 0.25
    assert sched.partition(cats[:3], [0.1, 0.2, 0.3]) == ([2], [0, 1])        # median 0.2 goes to L
    assert sched.partition(cats[:3], [0.5, 0.5, 0.5]) == ([], [0, 1, 2])      # all tie with the median
    assert sched.partition(["style"], [0.9]) == ([], [0])


def test_partition_ignores_incomplete_scores_and_checks_inputs():
    cats = ["background", "character"]
    assert sched.partition(cats, [0.9, None]) == ([1], [0])
    with pytest.raises(ValueError, match="2 frequency scores for 3 LoRAs"):
        sched.partition(cats + ["style"], [0.1, 0.2])
    with pytest.raises(ValueError, match="category 'hat' is not one of"):
        sched.partition(["hat"])


# --- refresh schedule ---------------------------------------------------------------------------------
def test_refresh_steps_match_hand_written_lists():
    assert sched.refresh_steps(20) == REFRESH_20
    assert sched.refresh_steps(50) == REFRESH_50
    assert sched.refresh_steps(0) == []
    assert sched.refresh_steps(1) == [0]


@pytest.mark.parametrize("steps", [20, 50, 100, 220])
def test_refresh_interval_pattern(steps):
    got = sched.refresh_steps(steps)
    assert got[0] == 0 and all(r < steps for r in got) and got == sorted(set(got))
    early, late = 0.375 * steps, 0.875 * steps
    for a, b in zip(got, got[1:]):
        expected = 2 if a < early else (3 if a < late else 2)
        assert b - a == expected, (steps, a, b)
    # The walk stops only because the next step would pass the end of the run.
    last = got[-1]
    assert last + (2 if last < early or last >= late else 3) >= steps
    # Every stage that the run reaches is used: at least one 2 before 37.5% and one 3 in the middle.
    diffs = [b - a for a, b in zip(got, got[1:])]
    assert diffs[0] == 2 and 3 in diffs


@pytest.mark.parametrize("steps", [100, 220])
def test_long_runs_end_with_interval_two(steps):
    got = sched.refresh_steps(steps)
    tail = [b - a for a, b in zip(got, got[1:]) if a >= 0.875 * steps]
    assert tail and set(tail) == {2}


# --- dominant LoRA ------------------------------------------------------------------------------------
def expected_dominants(steps, high, low, switch):
    """Independent reference: replay the refresh list stage by stage."""
    refresh = sched.refresh_steps(steps)
    first = [r for r in refresh if r < switch * steps]
    second = [r for r in refresh if r >= switch * steps]
    stage1 = list(high) or list(low)
    stage2 = list(low) + list(high)
    at = {r: stage1[n % len(stage1)] for n, r in enumerate(first)}
    at.update({r: stage2[n % len(stage2)] for n, r in enumerate(second)})
    out, current = [], None
    for i in range(steps):
        current = at.get(i, current)
        out.append(current)
    return out


@pytest.mark.parametrize("steps", [20, 50, 100, 220])
@pytest.mark.parametrize("high,low", [([0, 2, 3], [1]), ([1], [0, 2]), ([0, 1], []), ([], [0, 1]), ([0], [1])])
def test_dominant_sequence_table(steps, high, low):
    got = sched.dominant_sequence(steps, high, low)
    assert len(got) == steps
    assert got == expected_dominants(steps, high, low, 0.55)
    refresh = set(sched.refresh_steps(steps))
    changes = {i for i in range(1, steps) if got[i] != got[i - 1]}
    assert changes <= refresh
    boundary = 0.55 * steps
    before = [got[r] for r in sorted(refresh) if r < boundary]
    after = [got[r] for r in sorted(refresh) if r >= boundary]
    stage1 = high or low
    assert before == [stage1[n % len(stage1)] for n in range(len(before))]
    assert after[0] == (low + high)[0]


def test_dominant_sequence_20_steps_by_hand():
    # Refresh at 0,2,4,6,8 (< 11) rotate H = [0, 1]; from 11 on rotate L ++ H = [2, 0, 1].
    assert sched.dominant_sequence(20, [0, 1], [2]) == [0, 0, 1, 1, 0, 0, 1, 1, 0, 0, 0, 2, 2, 2, 0, 0, 0, 1, 1, 1]


def test_dominant_sequence_checks_inputs():
    with pytest.raises(ValueError, match="both the high and the low set are empty"):
        sched.dominant_sequence(10, [], [])
    with pytest.raises(ValueError, match=r"switch fraction must be in \[0, 1\]"):
        sched.dominant_sequence(10, [0], [], switch=1.5)


# --- weights and plan ---------------------------------------------------------------------------------
@pytest.mark.parametrize("count", range(1, 11))
def test_lora_weights_sum_to_one(count):
    for dominant in range(count):
        w = sched.lora_weights(count, dominant)
        assert len(w) == count and math.isclose(sum(w), 1.0, rel_tol=0, abs_tol=1e-12)
        assert all(x > 0 for x in w)
        if count > 1:
            assert math.isclose(w[dominant], (count - 0.5) / (2 * count - 1.5))
            assert all(math.isclose(x, 1 / (2 * count - 1.5)) for i, x in enumerate(w) if i != dominant)
            assert w[dominant] > max(x for i, x in enumerate(w) if i != dominant)
    assert sched.lora_weights(1, 0) == [1.0]
    assert sched.lora_weights(2, 1) == pytest.approx([0.4, 0.6])
    with pytest.raises(ValueError):
        sched.lora_weights(3, 3)


def test_cmlora_plan_combines_the_parts():
    cats = ["background", "character", "style"]
    plan = sched.cmlora_plan(20, cats)
    assert [p.step for p in plan] == list(range(20))
    assert [p.step for p in plan if p.refresh] == REFRESH_20
    assert [p.dominant for p in plan] == sched.dominant_sequence(20, [1, 2], [0])
    assert all(p.weights == tuple(sched.lora_weights(3, p.dominant)) for p in plan)
    assert plan[11].dominant == 0 and plan[0].dominant == 1
    with pytest.raises(Exception):
        plan[0].dominant = 2  # frozen
    scored = sched.cmlora_plan(20, cats, scores=[0.9, 0.1, 0.2])  # scores override categories: H = [0]
    assert scored[0].dominant == 0 and scored[11].dominant == 1


# --- frequency profile --------------------------------------------------------------------------------
def _images():
    g = torch.Generator().manual_seed(0)
    noise = torch.rand(64, 64, generator=g)
    ii = torch.arange(64)
    checker = ((ii[:, None] + ii[None, :]) % 2).float()
    y, x = torch.meshgrid(torch.arange(64.0), torch.arange(64.0), indexing="ij")
    blob = torch.exp(-((y - 32) ** 2 + (x - 32) ** 2) / (2 * 8.0 ** 2))
    gradient = x / 63
    kernel = torch.ones(1, 1, 9, 9) / 81
    blurred = torch.nn.functional.conv2d(
        torch.nn.functional.pad(noise[None, None], (4, 4, 4, 4), mode="circular"), kernel)[0, 0]
    return dict(noise=noise, checker=checker, blob=blob, gradient=gradient, blurred=blurred)


def test_high_frequency_images_score_above_smooth_ones():
    s = {k: freq.high_frequency_score(v) for k, v in _images().items()}
    assert all(0.0 <= v <= 1.0 for v in s.values())
    assert s["noise"] > s["blob"] and s["noise"] > s["gradient"] and s["noise"] > s["blurred"]
    assert s["checker"] > s["blob"]
    assert s["noise"] > s["blurred"] > s["blob"]


def test_score_is_deterministic_and_shape_agnostic():
    img = _images()["noise"]
    a = freq.high_frequency_score(img)
    assert a == freq.high_frequency_score(img.clone())
    rgb = img[:, :, None].expand(64, 64, 3)
    assert math.isclose(freq.high_frequency_score(rgb), a, rel_tol=1e-12)
    batch = torch.stack([rgb, rgb])
    assert math.isclose(freq.high_frequency_score(batch), a, rel_tol=1e-12)
    assert freq.high_frequency_score(torch.zeros(8, 8)) == 0.0
    with pytest.raises(ValueError, match="must be"):
        freq.high_frequency_score(torch.zeros(2, 2, 2, 2, 2))


def test_radial_profile_matches_a_direct_loop():
    g = torch.Generator().manual_seed(1)
    img = torch.rand(9, 12, generator=g, dtype=torch.float64)
    amp = torch.log1p(torch.fft.fftshift(torch.fft.fft2(img)).abs())
    bins = {}
    for yy in range(9):
        for xx in range(12):
            r = round(math.hypot(yy - 4, xx - 6))
            bins.setdefault(r, []).append(float(amp[yy, xx]))
    want = torch.tensor([sum(bins[r]) / len(bins[r]) for r in range(max(bins) + 1)], dtype=torch.float64)
    torch.testing.assert_close(freq.radial_profile(img), want)
    profile = want / want.max()
    r_max = len(want) - 1
    expected = float(profile[[r for r in range(r_max + 1) if r >= 0.2 * r_max]].mean())
    assert math.isclose(freq.high_frequency_score(img), expected, rel_tol=1e-12)

