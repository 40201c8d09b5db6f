"""Per-group device buffers that hold ``mask_stats``'s view of the last step that was taken.

A step skipped by the GradScaler must leave the reported stats as they were, and the launcher
cannot know on the host whether it was skipped. So each group's stats live in buffers that
persist across steps (keyed by the first tensor's threshold, a state tensor that lives as long
as the optimizer state) and the finish kernel overwrites them only when ``found_inf`` is zero.
"""
from __future__ import annotations

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from masked_optim.kernels import layout
from masked_optim.threshold import UNKNOWN

_buffers: WeakIdKeyDictionary = WeakIdKeyDictionary()


def stats_buffers(owner: Tensor, unit_count: int) -> tuple[Tensor, Tensor]:
    """int64 [COUNT_FIELDS] counts and int64 [unit_count] thresholds for the group of ``owner``.

    When the number of gated units changes (density or mask changed, first consolidate) the
    thresholds buffer is replaced, filled with ``threshold.UNKNOWN``: if that very step is
    skipped by the scaler, ``mask_stats`` reports the new number of thresholds as NaN (the host
    cannot know the step was skipped) and the previous counts.
    """
    counts, thresholds = _buffers.get(owner, (None, None))
    if counts is None or counts.device != owner.device:
        counts = torch.zeros(layout.COUNT_FIELDS, dtype=torch.int64, device=owner.device)
    if thresholds is None or thresholds.numel() != unit_count or thresholds.device != owner.device:
        thresholds = torch.full((unit_count,), UNKNOWN, dtype=torch.int64, device=owner.device)
    _buffers[owner] = (counts, thresholds)
    return counts, thresholds

