"""A Hugging Face ``Trainer`` callback that schedules MaskedAdamW's density.

``DensityScheduler`` is not an LR scheduler, so the Trainer neither steps it nor saves it.
``DensityCallback`` builds one on the Trainer's optimizer when training starts and sets the
density of the Trainer's optimizer-step count after every step (gradient accumulation
included). Nothing needs saving: the density is a function of the step, the step count
comes back from ``trainer_state.json`` and the densities from the optimizer's checkpoint, so a
run resumed with ``resume_from_checkpoint`` continues the schedule exactly.

Example::

    trainer = Trainer(..., optimizer_cls_and_kwargs=(MaskedAdamW, {"lr": 3e-4, "density": 1.0}),
                      callbacks=[DensityCallback(end=0.1, steps=1000, mode="cosine")])
"""
from __future__ import annotations

from typing import Any, Optional

from transformers import TrainerCallback

from masked_optim.integrations import check_schedule, make_scheduler
from masked_optim.schedules import DensityScheduler


class DensityCallback(TrainerCallback):
    """Step a :class:`~masked_optim.DensityScheduler` with the Trainer's optimizer steps.

    Args:
        schedule, **options: as for :class:`~masked_optim.DensityScheduler` (``schedule``, or
            ``end`` and ``steps`` with ``start`` and ``mode``); checked when the callback is
            made.
    """

    def __init__(self, schedule: Any = None, **options: Any) -> None:
        self.schedule, self.options = schedule, options
        self.scheduler: Optional[DensityScheduler] = None
        check_schedule(schedule, options)

    def on_train_begin(self, args: Any, state: Any, control: Any, optimizer: Any = None, **kwargs: Any) -> None:
        """Build the scheduler on the Trainer's optimizer at its step count (0, or a resume's)."""
        if optimizer is None:
            raise RuntimeError("DensityCallback: the Trainer passed no optimizer to on_train_begin")
        self.scheduler = make_scheduler(optimizer, self.schedule, self.options, state.global_step)

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        """Set the density of the Trainer's optimizer-step count."""
        self.scheduler.step_to(state.global_step)

