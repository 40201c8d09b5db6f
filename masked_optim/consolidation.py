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


def combine(importances: list[Tensor], anchors: list[Tensor | None], how: str, groups: tuple = ()) -> list[Tensor]:
    """New anchors of one unit (local shards): normalised importance folded into the old
    anchor, renormalised; ``groups`` are the process groups the unit is sharded across."""
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
