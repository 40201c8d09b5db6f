"""PyTorch Lightning callbacks for MaskedAdamW: schedule the density, and measure what the
model knows before fine-tuning.

``ConsolidateCallback`` runs MaskedAdamW's task boundary when training starts, on the trainer's
own optimizer (which Lightning makes from ``configure_optimizers`` inside ``fit()``): a forward
and backward pass and ``observe()`` on batches of the old data, then ``consolidate()``. A fit
resumed from a checkpoint skips it: the anchors are in the optimizer's checkpoint.

Lightning refuses a ``DensityScheduler`` in ``configure_optimizers`` (it is not an LR
scheduler). ``DensityCallback`` builds one on the Trainer's optimizer when training starts and
sets the density of ``trainer.global_step`` (optimizer steps, gradient accumulation included)
after every batch. Nothing needs saving: the density is a function of the step, and Lightning
restores ``global_step`` and the optimizer's densities when it resumes from a checkpoint.

Example::

    trainer = lightning.Trainer(callbacks=[ConsolidateCallback(old_batches, max_batches=16),
                                           DensityCallback(end=0.1, steps=1000, mode="cosine")])
"""
from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Optional

import torch
from lightning.pytorch import Callback

from masked_optim.integrations import (
    check_consolidate_options, check_schedule, make_scheduler, masked_adamw, observe_and_consolidate, take_batches,
)
from masked_optim.schedules import DensityScheduler


def _optimizer(trainer: Any, optimizer_index: int) -> Any:
    if not 0 <= optimizer_index < len(trainer.optimizers):
        raise ValueError(f"Invalid optimizer_index: {optimizer_index} (the trainer has "
                         f"{len(trainer.optimizers)} optimizer(s))")
    return trainer.optimizers[optimizer_index]


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
        optimizer = _optimizer(trainer, self.optimizer_index)
        self.scheduler = make_scheduler(optimizer, self.schedule, self.options, trainer.global_step)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        """Set the density of ``trainer.global_step`` once an optimizer step was taken."""
        if self.scheduler.last_epoch != trainer.global_step:
            self.scheduler.step_to(trainer.global_step)


class ConsolidateCallback(Callback):
    """Measure the importance of what the model knows on ``batches`` of old data, then
    ``consolidate()``, before the trainer's first optimizer step (not when resuming from a
    checkpoint past step 0).

    Args:
        batches: an iterable (a list, a ``DataLoader``) of batches of the old data, in the form
            the module's ``training_step`` takes; iterated once per fit. Each is moved to the
            module's device as Lightning moves training batches (``transfer_batch_to_device``).
        loss_fn: ``loss_fn(module, batch) -> loss``; by default ``module.training_step(batch,
            index)``, whose loss (a tensor, or a dict's ``"loss"``) is used, and whose
            ``self.log``/``self.log_dict`` calls are dropped during these passes (they would log
            the old data's loss as the epoch's). Required under manual optimization, whose
            ``training_step`` steps the optimizer itself.
        max_batches: use at most this many batches (None: all).
        how: ``consolidate(how=...)``: ``"max"`` or ``"sum"``.
        reset_moments: ``consolidate(reset_moments=...)``.
        optimizer_index: which of ``trainer.optimizers`` (default 0).

    The module is in eval mode during the passes (no dropout) and its grads are cleared before
    and after; the forward passes run in the trainer's precision context (the autocast of
    ``precision="bf16-mixed"``). Under DDP each batch's grads are averaged over the ranks before
    ``observe()``, as DDP's backward would (the passes call the module, not its DDP wrapper), so
    every rank holds the same importance and anchors: give every rank the same number of batches.
    Raises ValueError on bad arguments when made, TypeError at the start of training when the
    optimizer is not a MaskedAdamW.
    """

    def __init__(self, batches: Iterable[Any], *, loss_fn: Optional[Callable[[Any, Any], torch.Tensor]] = None,
                 max_batches: Optional[int] = None, how: str = "max", reset_moments: bool = False,
                 optimizer_index: int = 0) -> None:
        check_consolidate_options(batches, max_batches, how, reset_moments)
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"Invalid loss_fn: {loss_fn!r} (expected a callable (module, batch) -> loss, or None)")
        if isinstance(optimizer_index, bool) or not isinstance(optimizer_index, int) or optimizer_index < 0:
            raise ValueError(f"Invalid optimizer_index: {optimizer_index!r} (must be an int >= 0)")
        self.batches, self.loss_fn, self.max_batches = batches, loss_fn, max_batches
        self.how, self.reset_moments, self.optimizer_index = how, reset_moments, optimizer_index
        #: how many batches the last consolidation observed
        self.observed = 0

    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        """Observe the old batches and consolidate, unless the fit resumes past step 0."""
        if trainer.ckpt_path is not None and trainer.global_step > 0:  # resumed: the checkpoint holds the anchors
            return
        opt = masked_adamw(_optimizer(trainer, self.optimizer_index), "the trainer's optimizer",
                           "return one from configure_optimizers")
        if self.loss_fn is None and not pl_module.automatic_optimization:
            raise ValueError("ConsolidateCallback: the module uses manual optimization, whose training_step steps the "
                             "optimizer: pass loss_fn=(module, batch) -> loss")
        batches = take_batches(self.batches, self.max_batches)

        def loss_of(index: int, batch: Any) -> torch.Tensor:
            batch = trainer.strategy.batch_to_device(batch)
            if self.loss_fn is not None:
                loss = self.loss_fn(pl_module, batch)
            else:
                with _logging_dropped(pl_module):
                    loss = pl_module.training_step(batch, index)
                loss = loss.get("loss") if isinstance(loss, Mapping) else loss
            if not isinstance(loss, torch.Tensor):
                raise ValueError(f"Invalid batches: no loss tensor for batch {index} (got {type(loss).__name__}); "
                                 f"{index} batch(es) before it were observed")
            return loss

        observe_and_consolidate(self, opt, pl_module, batches, loss_of, trainer.precision_plugin.forward_context)


@contextlib.contextmanager
def _logging_dropped(module: Any) -> Any:
    """``module.log`` and ``module.log_dict`` do nothing within (instance attributes shadowing
    the methods; the module's own instance attributes of those names, if any, are put back)."""
    def drop(*args: Any, **kwargs: Any) -> None:
        return None

    names = ("log", "log_dict")
    saved = {name: module.__dict__[name] for name in names if name in module.__dict__}
    for name in names:
        setattr(module, name, drop)
    try:
        yield
    finally:
        for name in names:
            if name in saved:
                setattr(module, name, saved[name])
            else:
                delattr(module, name)
