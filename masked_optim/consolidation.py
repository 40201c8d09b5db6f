"""Task boundaries: fold the running importance into the anchor (SPEC ``consolidate``)."""
from __future__ import annotations

import torch
from torch import Tensor

HOWS = ("max", "sum")


def unit_mean(tensors: list[Tensor]) -> Tensor:
    """Mean over all elements of a unit (0-dim float64; 0 for an empty unit), no host sync."""
    total = sum((t.double().sum() for t in tensors), torch.zeros((), dtype=torch.float64, device=tensors[0].device))
    count = sum(t.numel() for t in tensors)
    return total / max(count, 1)


def normalise(tensors: list[Tensor]) -> list[Tensor]:
    """Scale a unit to mean 1 (fp32); a unit whose mean is 0 stays all zeros."""
    mean = unit_mean(tensors)
    inverse = torch.where(mean > 0, 1.0 / mean, torch.zeros_like(mean)).float()
    return [t.float() * inverse for t in tensors]


def combine(importances: list[Tensor], anchors: list[Tensor | None], how: str) -> list[Tensor]:
    """New anchors of one unit: normalised importance folded into the old anchor, renormalised."""
    fresh = normalise(importances)
    merged = []
    for new, old in zip(fresh, anchors):
        if old is None:
            merged.append(new)
        elif how == "max":
            merged.append(torch.maximum(old.float(), new))
        else:
            merged.append(old.float() + new)
    return normalise(merged)
