"""The density-threshold rule that every backend shares: score -> histogram bin -> threshold bin.

A non-negative float32's bit pattern is ordered like its value, so its top 16 bits (the
bfloat16 truncation, sign dropped) index a histogram of 2**15 log-spaced bins with 7 mantissa
bits (bins 0.8% wide). A gate compares an element's bin with the unit's threshold bin, so
elements with tied scores always share one gate, and the threshold is chosen among bin edges to
bring the realised density closest to the target. Backends only have to build the histogram
(``score_bins`` + a bincount); deriving the threshold from it is this module's job for all of
them, on the device, without a host synchronisation.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

NUM_BINS = 1 << 15
BIN_SHIFT = 16
#: Threshold value meaning "not known yet": the next step derives it from its own scores.
UNKNOWN = -1


def score_bins(score: Tensor) -> Tensor:
    """Histogram bin of each score: the float32 bit pattern's top 16 bits without the sign."""
    bits = score.to(torch.float32).contiguous().view(torch.int32)
    return (bits >> BIN_SHIFT) & (NUM_BINS - 1)


def histogram(score: Tensor, where: Optional[Tensor] = None) -> Tensor:
    """int64 counts of ``score_bins(score)`` over all ``NUM_BINS`` bins (only ``where`` if given)."""
    return histogram_of_bins(score_bins(score), where)


def histogram_of_bins(bins: Tensor, where: Optional[Tensor] = None) -> Tensor:
    """int64 counts of precomputed bins (any integer dtype) over all ``NUM_BINS`` bins."""
    if where is not None:
        bins = bins[where.reshape(bins.shape)]
    return torch.bincount(bins.reshape(-1), minlength=NUM_BINS)


def threshold_bin(hist: Tensor, density: float, protect: bool) -> Tensor:
    """Threshold bin (0-dim int64 tensor) that brings a unit's realised density closest to target.

    ``select``: an element is updated when ``bin >= threshold`` (the top ``density`` of scores).
    ``protect``: an element is updated when ``bin < threshold`` (all but the top ``1 - density``
    of the anchor); the threshold is at least 1, so elements with anchor 0 (bin 0) always move.
    Ties between candidate thresholds go to the one that updates more elements.
    ``hist`` may carry leading batch dimensions (``[units, NUM_BINS]``): one threshold per row.
    """
    counts = hist.to(torch.float64)
    total = counts.sum(-1, keepdim=True)
    below = torch.cat([counts.new_zeros(*counts.shape[:-1], 1), torch.cumsum(counts, -1)], -1)  # below[b] = #bins < b
    updated = below if protect else total - below
    error = (updated - density * total).abs()
    if protect:
        error[..., 0] = float("inf")
    return torch.argmin(error, dim=-1)


def gate(bins: Tensor, threshold: Tensor, protect: bool) -> Tensor:
    """Boolean gate of elements whose bins are ``bins`` under a unit's threshold bin."""
    return bins < threshold if protect else bins >= threshold


def threshold_value(threshold_bin_index: int) -> float:
    """The score at a threshold bin's lower edge, for reporting (NaN past the finite range)."""
    if threshold_bin_index < 0:
        return float("nan")
    bits = torch.tensor([threshold_bin_index << BIN_SHIFT], dtype=torch.int64)
    if bits.item() > 0x7F800000:
        return float("nan")
    return float(bits.to(torch.int32).view(torch.float32).item())
