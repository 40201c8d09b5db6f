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

        counts = torch.tensor([len(taken), -len(taken)], device=_collective_device(torch.device("cpu")))
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


def _collective_device(like: Any) -> Any:
    """A device the default process group's collectives take: ``like`` where the group has a
    backend for its type (gloo for the CPU, nccl for CUDA, ...), else the CPU where it has one,
    else the current accelerator."""
    import torch
    import torch.distributed as dist

    types = _backend_device_types(str(dist.get_backend_config()))
    if like.type in types:
        return like
    if "cpu" in types:
        return torch.device("cpu")
    accelerator = getattr(torch, "accelerator", None)  # (torch >= 2.6)
    current = accelerator.current_accelerator() if accelerator is not None else (
        torch.device("cuda") if torch.cuda.is_available() else None)
    if current is None:
        raise RuntimeError(f"ConsolidateCallback: the default process group has no backend for {like.type} tensors "
                           f"(it has {sorted(types)}) and there is no accelerator")
    index = accelerator.current_device_index() if accelerator is not None else torch.cuda.current_device()
    return torch.device(current.type, index)


def _backend_device_types(config: str) -> set:
    """The device types of a process group's backend config (``dist.get_backend_config()``):
    ``"cpu:gloo,cuda:nccl"``, or a backend's name alone (``"gloo"``: the CPU; ``"nccl"``: CUDA)."""
    types = {part.split(":")[0].strip() for part in config.split(",") if ":" in part}
    if not types:
        types = {"cpu"} if "gloo" in config else {"cuda"} if "nccl" in config else set()
    return types


def _reduces_its_own_grads(model: Any) -> bool:
    """Whether ``model``'s backward reduces its grads itself: FSDP1 units (their grads are
    reduce-scattered shards, which differ by rank). FSDP2 and tensor-parallel params are
    DTensors, which ``average_grads_over_ranks`` leaves alone."""
    try:
        from torch.distributed.fsdp import FullyShardedDataParallel
    except ImportError:
        return False
    return any(isinstance(module, FullyShardedDataParallel) for module in model.modules())


#: elements per collective of ``average_grads_over_ranks`` (its transient buffer: 64 MB of fp32)
BUCKET_NUMEL = 1 << 24


def average_grads_over_ranks(model: Any) -> None:
    """Average the grads of ``model``'s trainable params over the default process group, as
    DDP's backward does: a callback's passes call the module itself, not its DDP wrapper, so its
    grads are this rank's own (each rank's importance would differ, and so would its masks and
    anchors). Every param takes part on every rank, with zeros where this rank has no grad (a
    branch its batch did not reach), so the ranks make the same collectives; a param left
    without a grad on every rank stays without. One collective per dtype and ``BUCKET_NUMEL``
    elements (a param larger than that is one of its own). DTensor grads (FSDP2,
    tensor parallel) and models with FSDP1 units reduce their own grads and are left alone;
    averaging grads that are already equal on every rank changes nothing."""
    world = _world()
    if world is None or _reduces_its_own_grads(model):
        return
    import torch
    import torch.distributed as dist

    from masked_optim.distributed import is_dtensor

    params = [p for p in model.parameters() if p.requires_grad and not is_dtensor(p) and p.device.type != "meta"]
    if not params:
        return
    device = _collective_device(params[0].device)
    sparse = any(p.grad is not None and p.grad.is_sparse for p in params)
    present = torch.tensor([p.grad is not None for p in params] + [sparse], dtype=torch.float32, device=device)
    dist.all_reduce(present, op=dist.ReduceOp.SUM)
    present = present.tolist()  # (one read on the host)
    if present[-1] > 0:  # on every rank, also those without the sparse grad (they would wait)
        raise RuntimeError("MaskedAdamW does not support sparse gradients (a rank's old batch gave one)")
    buckets: dict[Any, list] = {}  # per dtype, runs of params of up to BUCKET_NUMEL elements
    filled: dict[Any, int] = {}
    for index, p in enumerate(params):  # (the same order on every rank: the model's)
        runs = buckets.setdefault(p.dtype, [[]])
        if runs[-1] and filled[p.dtype] + p.numel() > BUCKET_NUMEL:
            runs.append([])
            filled[p.dtype] = 0
        runs[-1].append((index, p))
        filled[p.dtype] = filled.get(p.dtype, 0) + p.numel()
    for members in (run for runs in buckets.values() for run in runs):
        flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).detach().reshape(-1).to(device)
                          for _, p in members])
        dist.all_reduce(torch.view_as_real(flat) if flat.is_complex() else flat, op=dist.ReduceOp.SUM)
        flat.div_(world)
        offset = 0
        for index, p in members:
            piece = flat[offset:offset + p.numel()].view_as(p)
            offset += p.numel()
            if p.grad is not None:
                p.grad.copy_(piece)
            elif present[index] > 0:  # another rank's batch reached it
                p.grad = piece.to(p.device).clone()


def observe_batches(opt: Any, model: Any, batches: list, loss_of: Callable[[int, Any], Any],
                    forward_context: Callable[[], ContextManager], observed: Callable[[int], None]) -> None:
    """Forward and backward passes on ``batches`` with ``opt.observe()`` after each, the model in
    eval mode and its grads cleared before every pass and afterwards; ``observed(n)`` is told
    how many batches were observed after each. ``loss_of(index, batch)`` runs the forward pass
    (under ``forward_context()``) and returns the loss, or raises. Under torch.distributed
    every rank must reach every pass (a rank that raises leaves the others waiting)."""
    was_training = model.training
    model.eval()
    try:
        for index, batch in enumerate(batches):
            model.zero_grad(set_to_none=True)
            with forward_context():
                loss = loss_of(index, batch)
            loss.backward()
            average_grads_over_ranks(model)
            opt.observe()  # importance only: no parameter or moment changes
            observed(index + 1)
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)


def observe_and_consolidate(callback: Any, opt: Any, model: Any, batches: list, loss_of: Callable[[int, Any], Any],
                            forward_context: Callable[[], ContextManager]) -> None:
    """The callbacks' task boundary: :func:`observe_batches`, with ``callback.observed``
    counting the batches observed (also when a later one fails), then
    ``opt.consolidate(callback.how, reset_moments=callback.reset_moments)``."""
    callback.observed = 0

    def observed(count: int) -> None:
        callback.observed = count

    observe_batches(opt, model, batches, loss_of, forward_context, observed)
    opt.consolidate(callback.how, reset_moments=callback.reset_moments)
