"""A PyTorch Lightning callback that schedules MaskedAdamW's density.

Lightning refuses a ``DensityScheduler`` in ``configure_optimizers`` (it is not an LR
scheduler). ``DensityCallback`` builds one on the Trainer's optimizer when training starts and
sets the density of ``trainer.global_step`` (optimizer steps, gradient accumulation included)
after every batch. Nothing needs saving: the density is a function of the step, and Lightning
restores ``global_step`` and the optimizer's densities when it resumes from a checkpoint.

Example::

    trainer = lightning.Trainer(callbacks=[DensityCallback(end=0.1, steps=1000, mode="cosine")])
"""
from __future__ import annotations

from typing import Any, Optional

from lightning.pytorch import Callback

from masked_optim.integrations import check_schedule, make_scheduler
from masked_optim.schedules import DensityScheduler


class DensityCallback(Callback):
    """Step a :class:`~masked_optim.DensityScheduler` with Lightning's optimizer steps.

    Args:
        schedule, **options: as for :class:`~masked_optim.DensityScheduler`; checked when the
            callback is made.
        optimizer_index: which of ``trainer.optimizers`` to schedule (default 0).
    """

    def __init__(self, schedule: Any = None, *, optimizer_index: int = 0, **options: Any) -> None:
        self.schedule, self.options, self.optimizer_index = schedule, options, optimizer_index
        self.scheduler: Optional[DensityScheduler] = None
        check_schedule(schedule, options)

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Build the scheduler on the trainer's optimizer at ``global_step`` (0, or a resume's)."""
        if not 0 <= self.optimizer_index < len(trainer.optimizers):
            raise ValueError(f"Invalid optimizer_index: {self.optimizer_index} (the trainer has "
                             f"{len(trainer.optimizers)} optimizer(s))")
        optimizer = trainer.optimizers[self.optimizer_index]
        self.scheduler = make_scheduler(optimizer, self.schedule, self.options, trainer.global_step)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Set the density of ``trainer.global_step`` once an optimizer step was taken."""
        if self.scheduler.last_epoch != trainer.global_step:
            self.scheduler.step_to(trainer.global_step)
