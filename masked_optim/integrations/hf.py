"""Hugging Face ``Trainer`` callbacks for MaskedAdamW: measure what the model knows before
fine-tuning, and schedule the density.

``ConsolidateCallback`` runs MaskedAdamW's task boundary when training starts, on the Trainer's
own optimizer (which the Trainer makes inside ``train()``): a forward and backward pass and
``observe()`` on batches of the old data, then ``consolidate()``. A run resumed from a checkpoint
skips it: the anchors are in the optimizer's checkpoint.

``DensityScheduler`` is not an LR scheduler, so the Trainer neither steps it nor saves it.
``DensityCallback`` builds one on the Trainer's optimizer when training starts and sets the
density of the Trainer's optimizer-step count after every step (gradient accumulation
included). Nothing needs saving: the density is a function of the step, the step count
comes back from ``trainer_state.json`` and the densities from the optimizer's checkpoint, so a
run resumed with ``resume_from_checkpoint`` continues the schedule exactly.

Example::

    trainer = Trainer(..., optimizer_cls_and_kwargs=(MaskedAdamW, {"lr": 3e-4, "anchor_decay": 30.0}),
                      callbacks=[ConsolidateCallback(old_batches),
                                 DensityCallback(end=0.1, steps=1000, mode="cosine")])
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Mapping
from typing import Any, Optional

import torch
from transformers import TrainerCallback

from masked_optim.integrations import (
    check_consolidate_options, check_schedule, make_scheduler, masked_adamw, observe_and_consolidate, take_batches,
)
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



class ConsolidateCallback(TrainerCallback):
    """Measure the importance of what the model knows on ``batches`` of old data, then
    ``consolidate()``, before the Trainer's first step (not when resuming from a checkpoint).

    Args:
        batches: an iterable (a list, a ``DataLoader``) of model inputs for the old data, each a
            mapping the model takes as ``model(**batch)`` and whose output has a ``loss`` (e.g.
            ``input_ids`` and ``labels`` for a causal LM); iterated once per run.
        max_batches: use at most this many batches (None: all).
        how: ``consolidate(how=...)``: ``"max"`` or ``"sum"``.
        reset_moments: ``consolidate(reset_moments=...)``.

    The model is in eval mode during the passes (no dropout) and its grads are cleared before
    and after; with ``bf16=True`` or ``fp16=True`` in the Trainer's arguments the forward pass
    runs under the same autocast. Under torch.distributed (DDP) each batch's grads are averaged
    over the ranks before ``observe()``, as DDP's own backward would (the passes call the model,
    not its DDP wrapper), so every rank holds the same importance and anchors: give every rank
    the same number of batches (e.g. its share of a ``DistributedSampler``). Raises ValueError on bad arguments when made, TypeError at the
    start of training when the Trainer's optimizer is not a MaskedAdamW.
    """

    def __init__(self, batches: Iterable[Mapping[str, Any]], *, max_batches: Optional[int] = None,
                 how: str = "max", reset_moments: bool = False) -> None:
        check_consolidate_options(batches, max_batches, how, reset_moments)
        self.batches, self.max_batches, self.how, self.reset_moments = batches, max_batches, how, reset_moments
        #: how many batches the last consolidation observed
        self.observed = 0

    def on_train_begin(self, args: Any, state: Any, control: Any, model: Any = None, optimizer: Any = None,
                       **kwargs: Any) -> None:
        """Observe the old batches and consolidate, unless the run resumes past step 0."""
        if state.global_step > 0:  # resumed from a checkpoint: its optimizer state holds the anchors
            return
        opt = masked_adamw(optimizer, "the Trainer's optimizer", "pass optimizer_cls_and_kwargs=(MaskedAdamW, {...})")  # accelerate wraps it
        batches = take_batches(self.batches, self.max_batches)  # their kind checked before anything is observed
        for index, batch in enumerate(batches):
            if not isinstance(batch, Mapping):
                raise ValueError(f"Invalid batches: batch {index} is a {type(batch).__name__} (expected a mapping of "
                                 "model inputs, e.g. {'input_ids': ..., 'labels': ...})")
        device = next(model.parameters()).device
        dtype = torch.bfloat16 if getattr(args, "bf16", False) else torch.float16 if getattr(args, "fp16", False) else None

        def forward_context() -> Any:
            return torch.autocast(device.type, dtype=dtype) if dtype is not None else contextlib.nullcontext()

        def loss_of(index: int, batch: Mapping[str, Any]) -> torch.Tensor:
            loss = model(**{k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()}).loss
            if loss is None:
                raise ValueError(f"Invalid batches: the model returned no loss for batch {index} (give 'labels'); "
                                 f"{index} batch(es) before it were observed")
            return loss

        observe_and_consolidate(self, opt, model, batches, loss_of, forward_context)
