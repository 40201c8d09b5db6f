"""Training-framework glue on the public API only: ``hf`` (Hugging Face Trainer) and
``lightning`` (PyTorch Lightning) callbacks that step a :class:`~masked_optim.DensityScheduler`
with the trainer's optimizer steps. Each module imports its framework: import the one you use."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from masked_optim.schedules import DensityScheduler


def check_schedule(schedule: Any, options: dict) -> None:
    """Raise what :class:`~masked_optim.DensityScheduler` would for these arguments, at a
    callback's construction (its optimizer only comes when training starts): a scheduler is
    made on a stand-in optimizer and dropped."""
    if "last_epoch" in options:
        raise ValueError("Invalid last_epoch: the callback takes the step from the trainer")
    import torch

    from masked_optim import DensityScheduler, MaskedAdamW

    groups = len(schedule) if isinstance(schedule, (list, tuple)) else 1  # one function per group
    DensityScheduler(MaskedAdamW([{"params": [torch.zeros(1)]} for _ in range(max(groups, 1))]), schedule, **options)


def make_scheduler(optimizer: Any, schedule: Any, options: dict, step: int) -> "DensityScheduler":
    """The callbacks' scheduler, at the trainer's optimizer-step count ``step`` (a resumed run:
    the checkpoint's param groups carry each one's ``initial_density``)."""
    from masked_optim import DensityScheduler

    if step > 0 and options.get("start") is None and schedule is None \
            and any("initial_density" not in group for group in optimizer.param_groups):
        raise ValueError(
            f"DensityCallback: resuming at step {step} from a checkpoint saved without a density schedule "
            "(its param groups have no 'initial_density' to start from): pass start="
        )
    if step > 0:  # a given start or schedule does not read it, but DensityScheduler records it
        for group in optimizer.param_groups:
            group.setdefault("initial_density", group["density"])
    return DensityScheduler(optimizer, schedule, **options, last_epoch=step - 1)
