"""DensityScheduler: values per step, LRScheduler conventions, state_dict, realised density."""
from __future__ import annotations

import io
import math

import pytest
import torch

from masked_optim import DensityScheduler, MaskedAdamW
from tests.helpers import assert_bitwise_equal, lognormal_grads, snapshot


def params(*shapes: tuple[int, ...]) -> list[torch.nn.Parameter]:
    gen = torch.Generator().manual_seed(3)
    return [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in shapes]


def densities(scheduler: DensityScheduler, steps: int) -> list[list[float]]:
    """Group densities after construction and after each of ``steps`` scheduler steps."""
    out = [[g["density"] for g in scheduler.optimizer.param_groups]]
    for _ in range(steps):
        scheduler.step()
        out.append([g["density"] for g in scheduler.optimizer.param_groups])
    return out


def test_linear_from_start_to_end_then_flat():
    opt = MaskedAdamW(params((3,)))
    scheduler = DensityScheduler(opt, start=0.8, end=0.2, steps=3)
    assert scheduler.last_epoch == 0
    values = densities(scheduler, 5)
    assert [v for (v,) in values] == pytest.approx([0.8, 0.6, 0.4, 0.2, 0.2, 0.2], rel=1e-12)
    assert values[3] == [0.2]  # exactly end, not end +- rounding
    assert scheduler.last_epoch == 5 and scheduler.get_last_density() == [0.2]


def test_cosine_and_per_group_start():
    opt = MaskedAdamW([{"params": params((3,))}, {"params": params((2,)), "density": 0.5}], density=1.0)
    scheduler = DensityScheduler(opt, end=0.1, steps=4, mode="cosine")  # start: each group's own density
    half = [(1 - math.cos(math.pi * k / 4)) / 2 for k in range(5)]
    expected = [[1.0 * (1 - h) + 0.1 * h, 0.5 * (1 - h) + 0.1 * h] for h in half]
    for got, want in zip(densities(scheduler, 4), expected, strict=True):
        assert got == pytest.approx(want, rel=1e-12)
    assert [g["initial_density"] for g in opt.param_groups] == [1.0, 0.5]


def test_functions_per_group_and_none_leaves_a_group_alone():
    opt = MaskedAdamW([{"params": params((3,))}, {"params": params((2,)), "density": 0.7}])
    scheduler = DensityScheduler(opt, [lambda step: 1.0 / (step + 1), None])
    assert densities(scheduler, 3) == [[1.0, 0.7], [0.5, 0.7], [1 / 3, 0.7], [0.25, 0.7]]
    assert scheduler.get_last_density() == [0.25, 0.7]  # every group's, the one left alone included


def test_bad_values_raise_and_change_nothing():
    opt = MaskedAdamW([{"params": params((3,))}, {"params": params((2,))}], density=0.9)
    scheduler = DensityScheduler(opt, [lambda step: 0.5, lambda step: 1.0 if step < 2 else 1.5])
    scheduler.step()
    with pytest.raises(ValueError, match=r"density \(param_groups\[1\] at step 2\): 1.5"):
        scheduler.step()
    assert [g["density"] for g in opt.param_groups] == [0.5, 1.0] and scheduler.last_epoch == 1


@pytest.mark.parametrize("kwargs, error, message", [
    (dict(end=0.0, steps=3), ValueError, "end: 0.0"),
    (dict(end=True, steps=3), ValueError, "end: True"),
    (dict(schedule=lambda step: 0.5, steps=3), ValueError, "start/steps"),
    (dict(schedule=[None]), ValueError, "schedule"),
    (dict(end=0.5, steps=3, last_epoch=-2), ValueError, "last_epoch: -2"),
    (dict(end=0.5, steps=3, last_epoch=True), ValueError, "last_epoch: True"),
    (dict(end=1.5, steps=3), ValueError, "end: 1.5"),
    (dict(start=-0.1, end=0.5, steps=3), ValueError, "start: -0.1"),
    (dict(end=0.5, steps=0), ValueError, "steps: 0"),
    (dict(end=0.5, steps=3, mode="exponential"), ValueError, "mode: 'exponential'"),
    (dict(), ValueError, "schedule"),
    (dict(schedule=lambda step: 0.5, end=0.5), ValueError, "schedule"),
    (dict(schedule=0.5), ValueError, "schedule: 0.5"),
    (dict(schedule=lambda step: float("nan")), ValueError, "density .*nan"),
    (dict(end=0.5, steps=3, last_epoch=4), KeyError, "initial_density"),
])
def test_bad_arguments(kwargs, error, message):
    opt = MaskedAdamW(params((3,)), density=0.9)
    with pytest.raises(error, match=message):
        DensityScheduler(opt, **kwargs)
    assert opt.param_groups[0]["density"] == 0.9 and "initial_density" not in opt.param_groups[0]


def test_needs_a_density_in_every_group():
    with pytest.raises(ValueError, match="has no 'density'"):
        DensityScheduler(torch.optim.AdamW(params((3,))), end=0.5, steps=2)


def run(opt: MaskedAdamW, scheduler: DensityScheduler, steps: int, gen: torch.Generator) -> list[dict]:
    """Random log-normal grads, one optimizer step and one scheduler step each; mask_stats per step."""
    stats = []
    for _ in range(steps):
        lognormal_grads([p for g in opt.param_groups for p in g["params"]], gen)
        opt.step()
        stats.append(opt.mask_stats()[0])
        scheduler.step()
    return stats


def test_realised_density_follows_the_schedule():
    opt = MaskedAdamW(params((64, 70), (3000,), (17, 13)), lr=1e-3, density=1.0, importance_beta=0.9)
    scheduler = DensityScheduler(opt, end=0.05, steps=8, mode="cosine")
    gen = torch.Generator().manual_seed(0)
    stats = run(opt, scheduler, 10, gen)
    targets = [s["target_density"] for s in stats]
    assert targets[0] == 1.0 and targets[-1] == 0.05 and targets == sorted(targets, reverse=True)
    for s in stats:
        bound = max(0.1 * s["target_density"], 0.002)  # SPEC's threshold accuracy
        assert abs(s["realised_density"] - s["target_density"]) <= bound, s
    assert stats[0]["frozen"] == 0 and stats[-1]["frozen"] > 0.9 * stats[-1]["elements"]


@pytest.mark.parametrize("kind", ["linear", "function"])
def test_state_dict_round_trip_reproduces_the_run(kind):
    def make():
        torch.manual_seed(0)
        opt = MaskedAdamW(params((40, 30), (500,)), lr=1e-2, density=0.9, importance_beta=0.9)
        if kind == "linear":
            return opt, DensityScheduler(opt, end=0.1, steps=7)
        return opt, DensityScheduler(opt, lambda step: max(0.1, 0.9 - 0.1 * step))

    gen = torch.Generator().manual_seed(1)
    opt, scheduler = make()
    run(opt, scheduler, 4, gen)
    buffer = io.BytesIO()
    weights = [p.detach().clone() for g in opt.param_groups for p in g["params"]]
    torch.save({"params": weights, "opt": opt.state_dict(), "density": scheduler.state_dict()}, buffer)
    gen_state = gen.get_state()
    uninterrupted = run(opt, scheduler, 6, gen)

    buffer.seek(0)
    saved = torch.load(buffer, weights_only=True)
    resumed_opt, resumed = make()
    with torch.no_grad():
        for p, saved_p in zip([p for g in resumed_opt.param_groups for p in g["params"]], saved["params"]):
            p.copy_(saved_p)
    resumed_opt.load_state_dict(saved["opt"])
    resumed.load_state_dict(saved["density"])
    assert resumed.last_epoch == 4
    gen.set_state(gen_state)
    again = run(resumed_opt, resumed, 6, gen)
    assert [s["target_density"] for s in again] == [s["target_density"] for s in uninterrupted]
    assert again == uninterrupted
    assert_bitwise_equal(snapshot(resumed_opt), snapshot(opt))


def test_a_group_added_after_the_scheduler_is_named_not_silently_skipped():
    """A group added later would be left alone by this scheduler but scheduled by one made after
    it (a resumed run): the runs would part, so step() refuses, changing nothing; a scheduler
    made after the group was added (None leaves it alone) works, and its state refuses to load
    into a scheduler of another number of groups."""
    a, b = params((64,), (64,))
    opt = MaskedAdamW([a], lr=0.01)
    scheduler = DensityScheduler(opt, end=0.2, steps=4)
    opt.add_param_group({"params": [b]})
    before = [dict(g) for g in opt.param_groups]
    for call in (scheduler.step, lambda: scheduler.step_to(2)):
        with pytest.raises(ValueError, match=r"Invalid optimizer: it has 2 param groups, and this DensityScheduler was "
                                             r"made for 1 \(add_param_group after the scheduler was made\?\)"):
            call()
    assert scheduler.last_epoch == 0 and [dict(g) for g in opt.param_groups] == before
    both = DensityScheduler(opt, [lambda step: max(0.2, 1.0 - 0.2 * step), None])
    both.step()
    assert [g["density"] for g in opt.param_groups] == [0.8, 1.0]
    with pytest.raises(ValueError, match=r"Invalid state_dict: it schedules 1 param groups, this DensityScheduler 2"):
        both.load_state_dict(scheduler.state_dict())
    assert both.last_epoch == 1


def test_a_state_of_another_kind_of_schedule_is_refused_before_any_change():
    """A state saved by a scheduler that schedules other groups, or by one made with schedule=
    where this one has end and steps (or the reverse), would leave a given function unused or
    step with None: refused at load, nothing changed."""
    f, g = (lambda step: max(0.2, 1.0 - 0.1 * step)), (lambda step: max(0.3, 1.0 - 0.2 * step))

    def make(*args, **kwargs):
        return DensityScheduler(MaskedAdamW([{"params": params((4,))}, {"params": params((4,))}]), *args, **kwargs)

    both, first_only, linear = make([f, g]), make([f, None]), make(end=0.2, steps=4)
    for target, source, message in (
        (first_only, both, r"it schedules the param groups \[True, True\], this DensityScheduler \[True, False\]"),
        (both, first_only, r"it schedules the param groups \[True, False\], this DensityScheduler \[True, True\]"),
        (linear, both, r"saved by a DensityScheduler made with schedule=, this one with end and steps"),
        (both, linear, r"saved by a DensityScheduler made with end and steps, this one with schedule="),
    ):
        source.step()
        before = dict(vars(target))
        with pytest.raises(ValueError, match=r"Invalid state_dict: " + message):
            target.load_state_dict(source.state_dict())
        assert dict(vars(target)) == before


def test_resume_with_last_epoch_like_lr_schedulers():
    opt = MaskedAdamW(params((3,)), density=1.0)
    DensityScheduler(opt, end=0.2, steps=4).step()  # records initial_density = 1.0, density now 0.8
    resumed = DensityScheduler(opt, end=0.2, steps=4, last_epoch=1)  # starts from initial_density, not 0.8
    assert resumed.last_epoch == 2 and opt.param_groups[0]["density"] == pytest.approx(0.6, rel=1e-12)
    resumed.step()
    assert opt.param_groups[0]["initial_density"] == 1.0 and opt.param_groups[0]["density"] == pytest.approx(0.4, rel=1e-12)


def test_step_to_equals_stepping_there():
    """``step_to(k)`` (what the trainer callbacks call) sets what k calls of ``step()`` set."""
    stepped, jumped = (MaskedAdamW([torch.zeros(3)], density=0.8) for _ in range(2))
    a = DensityScheduler(stepped, end=0.1, steps=5, mode="cosine")
    b = DensityScheduler(jumped, end=0.1, steps=5, mode="cosine")
    for _ in range(3):
        a.step()
    b.step_to(3)
    assert b.last_epoch == a.last_epoch == 3 and jumped.param_groups[0]["density"] == stepped.param_groups[0]["density"]
    with pytest.raises(ValueError, match="Invalid step: -1"):
        b.step_to(-1)
    assert jumped.param_groups[0]["density"] == stepped.param_groups[0]["density"]


def test_trainer_callbacks_check_their_schedule_when_made():
    from masked_optim.integrations import check_schedule

    with pytest.raises(ValueError, match="Invalid mode: 'square'"):
        check_schedule(None, dict(end=0.1, steps=5, mode="square"))
    with pytest.raises(ValueError, match="Invalid last_epoch"):
        check_schedule(None, dict(end=0.1, steps=5, last_epoch=3))


def test_trainer_callbacks_take_one_schedule_per_group_and_name_a_resume_they_cannot_continue():
    from masked_optim.integrations import check_schedule, make_scheduler

    check_schedule([None, lambda step: 0.5], {})  # one function (or None) per param group
    with pytest.raises(ValueError, match="Invalid schedule: 2 functions for 3 param groups"):
        opt = MaskedAdamW([{"params": [torch.zeros(1)]} for _ in range(3)])
        make_scheduler(opt, [None, lambda step: 0.5], {}, 0)
    opt = MaskedAdamW([torch.zeros(3)], density=0.8)  # a checkpoint made without a schedule
    with pytest.raises(ValueError, match="resuming at step 5 from a checkpoint saved without a density schedule"):
        make_scheduler(opt, None, dict(end=0.1, steps=10), 5)
    scheduler = make_scheduler(opt, None, dict(start=0.8, end=0.1, steps=10), 5)
    assert scheduler.last_epoch == 5 and opt.param_groups[0]["density"] == pytest.approx(0.45)


def test_load_state_dict_restores_the_saved_schedule_numbers():
    """Like ``LRScheduler``, a load restores what was saved (mode, end, steps, start), whatever
    the loading scheduler was made with: the resumed densities are the saved run's."""
    opt = MaskedAdamW(params((3,)), density=0.9)
    saved = DensityScheduler(opt, start=0.8, end=0.2, steps=6, mode="cosine")
    other = DensityScheduler(MaskedAdamW(params((3,)), density=0.9), end=0.5, steps=2, mode="linear")
    other.load_state_dict(saved.state_dict())
    assert [other.density_at(k) for k in range(8)] == [saved.density_at(k) for k in range(8)]
