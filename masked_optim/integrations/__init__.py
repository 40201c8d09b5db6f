"""Training-framework glue on the public API only: ``hf`` (Hugging Face Trainer) and
``lightning`` (PyTorch Lightning) callbacks that step a :class:`~masked_optim.DensityScheduler`
with the trainer's optimizer steps and run the task boundary (``observe()`` on old batches, then
``consolidate()``) when training starts. Each module imports its framework: import the one you
use."""
from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any, ContextManager, Optional

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


def check_consolidate_options(batches: Any, max_batches: Any, how: Any, reset_moments: Any) -> None:
    """The ``ConsolidateCallback`` arguments both frameworks share, checked when it is made."""
    from collections.abc import Mapping

    if isinstance(batches, Mapping) or not isinstance(batches, Iterable):
        raise ValueError(f"Invalid batches: a {type(batches).__name__} (expected an iterable of batches, "
                         "e.g. a list or a DataLoader)")
    if max_batches is not None and (isinstance(max_batches, bool) or not isinstance(max_batches, int) or max_batches < 1):
        raise ValueError(f"Invalid max_batches: {max_batches!r} (must be an int >= 1 or None)")
    if how not in ("max", "sum"):
        raise ValueError(f"Invalid how: {how!r} (expected 'max' or 'sum')")
    if not isinstance(reset_moments, bool):
        raise ValueError(f"Invalid reset_moments: {reset_moments!r} (must be a bool)")


def masked_adamw(optimizer: Any, where: str, hint: str) -> Any:
    """``optimizer`` (unwrapped from accelerate's or Lightning's wrapper), which must be a MaskedAdamW."""
    from masked_optim import MaskedAdamW

    opt = getattr(optimizer, "optimizer", optimizer)
    if not isinstance(opt, MaskedAdamW):
        raise TypeError(f"ConsolidateCallback needs {where} to be a MaskedAdamW, got {type(opt).__name__} ({hint})")
    return opt


def take_batches(batches: Iterable[Any], max_batches: Optional[int]) -> list:
    """Exactly ``max_batches`` batches (all where None) from ``batches``, taken before anything is
    observed; an iterator loses no batch beyond them. Under torch.distributed every rank must take
    as many as the others (each batch's grads are averaged over the ranks): checked here."""
    taken = list(itertools.islice(batches, max_batches))
    if not taken:
        raise ValueError("ConsolidateCallback: batches yielded no batch (an exhausted iterator?)")
    world = _world()
    if world is not None:
        import torch
        import torch.distributed as dist

        backend = dist.get_backend()
        device = torch.device("cuda", torch.cuda.current_device()) if backend == "nccl" else torch.device("cpu")
        counts = torch.tensor([len(taken), -len(taken)], device=device)
        dist.all_reduce(counts, op=dist.ReduceOp.MAX)
        if counts[0].item() != -counts[1].item():
            raise ValueError(f"ConsolidateCallback: the ranks took different numbers of batches ({-counts[1].item()} to "
                             f"{counts[0].item()}; this rank {len(taken)}): give every rank as many (max_batches=)")
    return taken


def _world() -> Optional[int]:
    """The default process group's size where torch.distributed runs with more than one rank."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return dist.get_world_size()
    return None


def average_grads_over_ranks(params: Iterable[Any]) -> None:
    """Average the plain-tensor grads of ``params`` over the default process group, as DDP's
    backward does: a callback's passes call the module itself, not its DDP wrapper, so its grads
    are this rank's own (each rank's importance would differ, and so would its masks and
    anchors). DTensor grads (FSDP2) are reduced by their own backward and are left alone.
    Averaging grads that are already equal on every rank changes nothing."""
    world = _world()
    if world is None:
        return
    import torch.distributed as dist

    from masked_optim.distributed import is_dtensor

    for p in params:
        if p.grad is not None and not is_dtensor(p.grad):
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad.div_(world)


def observe_batches(opt: Any, model: Any, batches: list, loss_of: Callable[[int, Any], Any],
                    forward_context: Callable[[], ContextManager]) -> int:
    """Forward and backward passes on ``batches`` with ``opt.observe()`` after each, the model in
    eval mode and its grads cleared before every pass and afterwards; returns how many batches
    were observed. ``loss_of(index, batch)`` runs the forward pass (under ``forward_context()``)
    and returns the loss, or raises."""
    was_training = model.training
    model.eval()
    params = [p for p in model.parameters() if p.requires_grad]
    observed = 0
    try:
        for index, batch in enumerate(batches):
            model.zero_grad(set_to_none=True)
            with forward_context():
                loss = loss_of(index, batch)
            loss.backward()
            average_grads_over_ranks(params)
            opt.observe()  # importance only: no parameter or moment changes
            observed += 1
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return observed
