"""DensityScheduler: change MaskedAdamW's ``density`` over training, like an LR scheduler.

It follows ``torch.optim.lr_scheduler.LRScheduler``'s conventions: construction applies step 0
(``last_epoch`` becomes 0), each :meth:`DensityScheduler.step` advances ``last_epoch`` by one and
writes ``group["density"]`` of every scheduled param group, and ``state_dict()`` /
``load_state_dict()`` carry ``last_epoch`` (the densities themselves live in the optimizer's
``param_groups`` and are restored by its ``load_state_dict``). A change of density makes the
optimizer derive the next threshold afresh from the current scores.
"""
from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Sequence
from typing import Any, Optional, Union

from torch.optim import Optimizer

Schedule = Callable[[int], float]
MODES = ("linear", "cosine")
_SAVED = ("last_epoch", "start", "end", "steps", "mode", "_last_density", "_scheduled")


def _check_density(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not 0.0 < value <= 1.0:
        raise ValueError(f"Invalid {name}: {value!r} (a density must be in (0, 1])")
    return float(value)


class DensityScheduler:
    """Set ``group["density"]`` of an optimizer's param groups as a function of the step.

    Either give ``schedule`` (a function ``step -> density``, or one such function per param
    group, ``None`` for a group to leave alone), or ``end`` and ``steps``: the density moves
    from ``start`` (default: each group's density at construction, kept as
    ``group["initial_density"]`` like ``initial_lr``) to ``end`` over ``steps`` steps,
    ``mode="linear"`` or ``"cosine"``, and stays at ``end`` afterwards.

    Args:
        optimizer: a MaskedAdamW (any optimizer whose param groups have ``"density"``).
        schedule: function(s) of the step index returning a density in (0, 1].
        start, end: densities in (0, 1] (``start`` None: each group's own).
        steps: number of steps from ``start`` to ``end``, >= 1.
        mode: ``"linear"`` or ``"cosine"``.
        last_epoch: index of the last step taken; -1 starts a fresh schedule.

    Raises:
        ValueError: naming the argument and value, for densities outside (0, 1] (also a value
            a ``schedule`` returns; then no group is changed), steps < 1, an unknown mode, or
            both / neither of ``schedule`` and ``end``.

    Under ``torch.compile`` with the triton backend each new density is a new graph (a float
    the traced step is specialised on): schedule a few distinct values there (a staircase).

    Example::

        opt = MaskedAdamW(model.parameters(), density=1.0)
        densities = DensityScheduler(opt, end=0.05, steps=1000, mode="cosine")
        for batch in data:
            loss(batch).backward(); opt.step(); opt.zero_grad()
            densities.step()
    """

    def __init__(
        self,
        optimizer: Optimizer,
        schedule: Union[Schedule, Sequence[Optional[Schedule]], None] = None,
        *,
        start: Optional[float] = None,
        end: Optional[float] = None,
        steps: Optional[int] = None,
        mode: str = "linear",
        last_epoch: int = -1,
    ) -> None:
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(optimizer).__name__} is not an Optimizer")
        for index, group in enumerate(optimizer.param_groups):
            if "density" not in group:
                name = type(getattr(optimizer, "optimizer", optimizer)).__name__  # (accelerate's wrapper)
                raise ValueError(f"Invalid optimizer: param_groups[{index}] has no 'density' ({name} is not a MaskedAdamW)")
        if (schedule is None) == (end is None):
            raise ValueError(f"Invalid schedule: {schedule!r} with end={end!r} (give either a schedule or end and steps)")
        if schedule is not None:
            schedules = list(schedule) if isinstance(schedule, Sequence) else [schedule] * len(optimizer.param_groups)
            if not all(s is None or callable(s) for s in schedules) or not any(schedules):
                raise ValueError(
                    f"Invalid schedule: {schedule!r} (expected a function of the step, or one function or None per param group)"
                )
            if len(schedules) != len(optimizer.param_groups):
                raise ValueError(f"Invalid schedule: {len(schedules)} functions for {len(optimizer.param_groups)} param groups")
            if start is not None or steps is not None:
                raise ValueError(f"Invalid start/steps: {start!r}/{steps!r} (they go with end, not with a schedule)")
        else:
            schedules = [None] * len(optimizer.param_groups)
            if start is not None:
                start = _check_density("start", start)
            end = _check_density("end", end)
            if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
                raise ValueError(f"Invalid steps: {steps!r} (must be an int >= 1)")
            if mode not in MODES:
                raise ValueError(f"Invalid mode: {mode!r} (expected one of {MODES!r})")
        if isinstance(last_epoch, bool) or not isinstance(last_epoch, int) or last_epoch < -1:
            raise ValueError(f"Invalid last_epoch: {last_epoch!r} (must be an int >= -1)")
        self.optimizer = optimizer
        self.schedules = schedules
        self.start, self.end, self.steps, self.mode = start, end, steps, mode
        self._scheduled = [s is not None for s in schedules] if schedule is not None else [True] * len(schedules)
        for index, group in enumerate(optimizer.param_groups):
            if last_epoch >= 0 and "initial_density" not in group:
                raise KeyError(
                    f"param 'initial_density' is not specified in param_groups[{index}] "
                    "when resuming a DensityScheduler with last_epoch >= 0"
                )
        values = self.density_at(last_epoch + 1)  # raises before anything changes
        for group in optimizer.param_groups:
            group.setdefault("initial_density", group["density"])
        self.last_epoch = last_epoch + 1
        self._apply(values)

    def density_at(self, step: int) -> list[Optional[float]]:
        """The density of every param group at ``step`` (None for groups left alone), validated."""
        groups = len(self.optimizer.param_groups)
        if groups != len(self.schedules):  # zip would leave a group added later alone, silently
            raise ValueError(
                f"Invalid optimizer: it has {groups} param groups, and this DensityScheduler was made for "
                f"{len(self.schedules)} (add_param_group after the scheduler was made?): make the scheduler after "
                "adding the group (schedule=[..., None] leaves a group alone), as a resumed run would"
            )
        values: list[Optional[float]] = []
        for index, (group, schedule) in enumerate(zip(self.optimizer.param_groups, self.schedules)):
            if not self._scheduled[index]:
                values.append(None)
            elif schedule is not None:
                values.append(_check_density(f"density (param_groups[{index}] at step {step})", schedule(step)))
            else:
                start = self.start if self.start is not None else group.get("initial_density", group["density"])
                values.append(_check_density(f"density (param_groups[{index}] at step {step})", self._interpolate(start, step)))
        return values

    def _interpolate(self, start: float, step: int) -> float:
        fraction = min(max(step, 0), self.steps) / self.steps
        if self.mode == "cosine":
            fraction = (1.0 - math.cos(math.pi * fraction)) / 2.0
        return start * (1.0 - fraction) + self.end * fraction  # exact at both ends

    def step(self) -> None:
        """Advance one step and set the density of every scheduled param group."""
        values = self.density_at(self.last_epoch + 1)  # raises before anything changes
        self.last_epoch += 1
        self._apply(values)

    def step_to(self, step: int) -> None:
        """Set the density of every scheduled param group to the schedule's at ``step`` (as if
        :meth:`step` had been called until ``last_epoch == step``): for callbacks that follow
        a trainer's optimizer-step count (``masked_optim.integrations``)."""
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise ValueError(f"Invalid step: {step!r} (must be an int >= 0)")
        values = self.density_at(step)  # raises before anything changes
        self.last_epoch = step
        self._apply(values)

    def _apply(self, values: list[Optional[float]]) -> None:
        for group, value in zip(self.optimizer.param_groups, values):
            if value is not None:
                group["density"] = value
        self._last_density = [float(g["density"]) for g in self.optimizer.param_groups]

    def get_last_density(self) -> list[float]:
        """The density of every param group after the last :meth:`step`."""
        return list(self._last_density)

    def state_dict(self) -> dict[str, Any]:
        """``last_epoch`` and the schedule's numbers (schedule functions are not saved: pass the
        same ones to the scheduler you load into). Loads with ``torch.load(weights_only=True)``."""
        return {key: getattr(self, key) for key in _SAVED}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore what :meth:`state_dict` saved. Like ``LRScheduler`` it does not touch the
        optimizer: its ``load_state_dict`` restores the densities in ``param_groups``. A state
        saved for another number of param groups is refused (ValueError) before anything changes."""
        saved = state_dict.get("_scheduled")  # (absent from states saved before it was kept)
        if saved is not None and len(saved) != len(self.schedules):
            raise ValueError(f"Invalid state_dict: it schedules {len(saved)} param groups, this DensityScheduler "
                             f"{len(self.schedules)}")
        if saved is not None and list(saved) != self._scheduled:
            raise ValueError(f"Invalid state_dict: it schedules the param groups {list(saved)}, this DensityScheduler "
                             f"{self._scheduled} (make it with a function or None per group as the saved one)")
        if "end" in state_dict and (state_dict["end"] is None) != (self.end is None):
            made = "schedule=" if self.end is None else "end and steps"
            raise ValueError(f"Invalid state_dict: saved by a DensityScheduler made with "
                             f"{'schedule=' if state_dict['end'] is None else 'end and steps'}, this one with {made}")
        for key in _SAVED:
            if key in state_dict:
                setattr(self, key, state_dict[key])
