"""Training-framework glue on the public API only: ``hf`` (Hugging Face Trainer) and
``lightning`` (PyTorch Lightning) callbacks that step a :class:`~masked_optim.DensityScheduler`
with the trainer's optimizer steps. Each module imports its framework: import the one you use."""
from __future__ import annotations

from typing import Any


def check_schedule(schedule: Any, options: dict) -> None:
    """Raise what :class:`~masked_optim.DensityScheduler` would for these arguments, at a
    callback's construction (its optimizer only comes when training starts): a scheduler is
    made on a stand-in optimizer and dropped."""
    if "last_epoch" in options:
        raise ValueError("Invalid last_epoch: the callback takes the step from the trainer")
    import torch

    from masked_optim import DensityScheduler, MaskedAdamW

    DensityScheduler(MaskedAdamW([torch.zeros(1)]), schedule, **options)
