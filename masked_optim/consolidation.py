"""Task boundaries: fold the running importance into the anchor (SPEC ``consolidate``)."""
from __future__ import annotations

import torch
from torch import Tensor

from masked_optim.distributed import all_reduce_sum, global_count

HOWS = ("max", "sum")


def unit_mean(tensors: list[Tensor], groups: tuple = ()) -> Tensor:
    """Mean over all elements of a unit, over all its shards (0-dim float64; 0 when empty)."""
    device = tensors[0].device
    total = sum((t.double().sum() for t in tensors), torch.zeros((), dtype=torch.float64, device=device))
    total = all_reduce_sum(total, groups)
    return total / global_count(tensors, groups, device).clamp_min(1.0)


def normalise(tensors: list[Tensor], groups: tuple = ()) -> list[Tensor]:
    """Scale a unit to mean 1 (fp32); a unit whose mean is 0 stays all zeros."""
    mean = unit_mean(tensors, groups)
    inverse = torch.where(mean > 0, 1.0 / mean, torch.zeros_like(mean)).float()
    return [t.float() * inverse for t in tensors]


def host_values(counters: list[Tensor]) -> list[float]:
    """The values of one-element counters (step counts) on the host: one copy per device, not
    one sync per counter (``consolidate()`` reads every param's importance step count)."""
    values = [0.0] * len(counters)
    by_device: dict[torch.device, list[int]] = {}
    for index, counter in enumerate(counters):
        by_device.setdefault(counter.device, []).append(index)
    for indices in by_device.values():
        read = torch.stack([counters[i].detach().reshape(()).double() for i in indices]).tolist()
        for i, value in zip(indices, read):
            values[i] = value
    return values


def bias_corrected(importance: Tensor, steps: float, beta: float) -> Tensor:
    """A running importance over ``steps`` updates divided by ``1 - beta**steps`` (fp32), as the
    step's scores are (SPEC step 6): tensors of one unit that started late (a grad that was
    None, a param group added later) then weigh alike. Unchanged after no update."""
    if steps <= 0:
        return importance.float()
    return importance.float() * (1.0 / (1.0 - beta**steps))


def combine(importances: list[Tensor], anchors: list[Tensor | None], how: str, groups: tuple = ()) -> list[Tensor]:
    """New anchors of one unit (local shards): its (bias-corrected) importance normalised and
    folded into the old anchor, renormalised; ``groups`` are the process groups the unit is
    sharded across."""
    fresh = normalise(importances, groups)
    merged = []
    for new, old in zip(fresh, anchors):
        if old is None:
            merged.append(new)
        elif how == "max":
            merged.append(torch.maximum(old.float(), new))
        else:
            merged.append(old.float() + new)
    return normalise(merged, groups)
