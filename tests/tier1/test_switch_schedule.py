"""Tier 1: LoRA Switch's two schedules (core.routing), no ComfyUI."""
import pytest

from support.pack_loader import load_pure

routing = load_pure("core.routing")


def authors_loop(steps, every, count):
    """The released code's loop, written out: sample step i with the active LoRA, then switch after step i
    when i > 0 and i % τ == 0."""
    active, out = 0, []
    for i in range(steps):
        out.append(active)
        if i > 0 and i % every == 0:
            active = (active + 1) % count
    return out


@pytest.mark.parametrize("every,count", [(1, 2), (2, 3), (3, 2), (5, 3), (7, 4)])
def test_authors_schedule_equals_the_released_loop(every, count):
    got = [routing.switch_active_index(i, every, count, routing.SWITCH_AUTHORS) for i in range(40)]
    assert got == authors_loop(40, every, count)


def test_authors_schedule_gives_the_first_lora_tau_plus_one_steps():
    got = [routing.switch_active_index(i, 5, 3, routing.SWITCH_AUTHORS) for i in range(17)]
    assert got == [0] * 6 + [1] * 5 + [2] * 5 + [0]
    paper = [routing.switch_active_index(i, 5, 3) for i in range(17)]
    assert paper == [0] * 5 + [1] * 5 + [2] * 5 + [0] * 2  # the default is unchanged: τ steps each
    assert paper == [routing.switch_active_index(i, 5, 3, routing.SWITCH_PAPER) for i in range(17)]


def test_unknown_schedule_is_refused():
    with pytest.raises(ValueError, match=r"switch schedule must be one of \['⌊i/τ⌋ mod k', \"as the authors' code\"\], "
                                         r"got 'tau'"):
        routing.switch_active_index(3, 2, 2, "tau")
    with pytest.raises(ValueError, match="switch_every must be >= 1"):
        routing.switch_active_index(0, 0, 2, routing.SWITCH_AUTHORS)


def test_switch_routing_follows_its_schedule():
    sigmas = [10.0, 8.0, 6.0, 4.0, 2.0, 0.0]

    class Sig(list):
        def flatten(self):
            return self

        def tolist(self):
            return list(self)

    def active(schedule):
        r = routing.SwitchRouting(2, 2, schedule=schedule)
        return [r.active_for({"sigmas": s, "sample_sigmas": Sig(sigmas)}) for s in sigmas[:-1]]

    assert active(routing.SWITCH_PAPER) == [0, 0, 1, 1, 0]
    assert active(routing.SWITCH_AUTHORS) == [0, 0, 0, 1, 1]
    assert routing.SwitchRouting(2, 2).schedule == routing.SWITCH_PAPER
