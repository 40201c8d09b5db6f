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

from masked_optim import scratch

NUM_BINS = 1 << 15
BIN_SHIFT = 16
#: Threshold value meaning "not known yet": the next step derives it from its own scores.
UNKNOWN = -1


#: the one bin of every NaN score (a canonical quiet NaN's), whatever its payload: backends
#: and dtype conversions write NaN bits differently (torch's CPU bf16 NaN is 0xFFFF, Triton's
#: 0x7FC0), which would otherwise put one NaN in bin 32767 here and 32704 there
NAN_BIN = 0x7FC0


def score_bins(score: Tensor) -> Tensor:
    """Histogram bin of each score: the float32 bit pattern's top 16 bits without the sign
    (``NAN_BIN`` for every NaN)."""
    score = score.to(torch.float32)
    bits = score.contiguous().view(torch.int32)
    return torch.where(score != score, NAN_BIN, (bits >> BIN_SHIFT) & (NUM_BINS - 1))


def histogram(score: Tensor, where: Optional[Tensor] = None) -> Tensor:
    """int64 counts of ``score_bins(score)`` over all ``NUM_BINS`` bins (only ``where`` if given)."""
    return histogram_of_bins(score_bins(score), where)


def histogram_of_bins(bins: Tensor, where: Optional[Tensor] = None) -> Tensor:
    """int64 counts of precomputed bins (any integer dtype) over all ``NUM_BINS`` bins."""
    if where is not None:
        bins = bins[where.reshape(bins.shape)]
    return torch.bincount(bins.reshape(-1), minlength=NUM_BINS)


def memory_order(like: Tensor) -> list[int]:
    """The dimension order of a dense tensor from its largest stride to its smallest: permuted
    so, the tensor's elements come in memory order (the order the kernel's blocks follow)."""
    return sorted(range(like.dim()), key=lambda d: like.stride(d), reverse=True)


def block_bins(bins: Tensor, allowed: Optional[Tensor], gate_block: int, like: Tensor,
               protect: bool = False) -> tuple[Tensor, Tensor, Tensor]:
    """Block gates: the elements of ``like`` (a param, any dense layout) in memory order form
    blocks of ``gate_block``; a block's bin is the largest bin among its allowed elements, and
    the block counts as its number of allowed elements (so a unit's density stays a fraction
    of elements). The last block of a tensor may be short. ``bins`` and ``allowed`` have
    ``like``'s shape (any layout). With ``protect``, elements in bin 0 (anchor 0) always move,
    whatever their block's gate: they are counted apart, in bin 0, not in their block.

    Returns (block bins int64 [blocks], counts int64 [blocks], int64 count of the always-moving
    bin-0 elements). The maximum is taken over bins, not scores, so NaN scores (``NAN_BIN``,
    above +inf's bin) order alike in every backend.
    """
    order = memory_order(like)
    flat = bins.reshape(like.shape).permute(order).reshape(-1)
    numel = flat.numel()
    if allowed is None and not protect:  # every element counts: no mask to apply or sum
        counts = torch.full((-(-numel // gate_block),), gate_block, dtype=torch.int64, device=flat.device)
        if numel % gate_block:
            counts[-1] = numel % gate_block
        return _per_block(flat, gate_block, "amax").to(torch.int64), counts, flat.new_zeros((), dtype=torch.int64)
    mask = allowed.reshape(like.shape).permute(order).reshape(-1) if allowed is not None \
        else torch.ones_like(flat, dtype=torch.bool)
    counted = mask & (flat > 0) if protect else mask
    always = (mask & (flat == 0)).sum() if protect else flat.new_zeros((), dtype=torch.int64)
    block_bin = _per_block(torch.where(mask, flat, 0), gate_block, "amax").to(torch.int64)
    return block_bin, _per_block(counted, gate_block, "sum"), always


def _per_block(flat: Tensor, gate_block: int, reduction: str) -> Tensor:
    """``flat``'s runs of ``gate_block`` elements (the last may be short) reduced to one value
    each (``"amax"`` or ``"sum"``, int64 for a bool ``flat``), as views: no padded copy."""
    whole = flat.numel() - flat.numel() % gate_block
    parts = [flat[:whole].reshape(-1, gate_block), flat[whole:].reshape(1, -1)] if whole < flat.numel() \
        else [flat.reshape(-1, gate_block)]
    reduced = [getattr(part, reduction)(1) for part in parts]
    return reduced[0] if len(reduced) == 1 else torch.cat(reduced)


def block_histogram(block_bin: Tensor, counts: Tensor, always: Tensor, out: Optional[Tensor] = None) -> Tensor:
    """int64 histogram of block bins, each block weighted by its counted elements, and the
    always-moving bin-0 elements in bin 0 (into ``out``, an int64 [NUM_BINS], if given)."""
    hist = torch.zeros(NUM_BINS, dtype=torch.int64, device=block_bin.device) if out is None else out.zero_()
    hist.index_add_(0, block_bin, counts)
    hist[0] += always
    return hist


def expand_blocks(block_values: Tensor, gate_block: int, like: Tensor) -> Tensor:
    """Per-block values repeated over each block's elements, with ``like``'s shape."""
    order = memory_order(like)
    flat = block_values.repeat_interleave(gate_block)[: like.numel()]
    inverse = sorted(range(len(order)), key=lambda i: order[i])
    return flat.reshape([like.shape[d] for d in order]).permute(inverse)


#: ``scratch`` purpose of the cumulative sums (CPU)
CUMULATIVE = "cumulative histograms"


def _cumulative(hist: Tensor) -> Tensor:
    """``hist``'s int64 cumulative sum along its last dimension. On the CPU it is written into a
    reused buffer (``scratch``; 8 B a bin, e.g. 38 MB for GPT-2's 146 tensor units): a fresh one
    that large is page-faulted in on every step, 18 ms instead of 1.3 ms for the sum on a
    2-core VM."""
    if hist.device.type != "cpu":
        return torch.cumsum(hist, -1, dtype=torch.int64)
    out = scratch.reused(CUMULATIVE, hist.device, torch.int64, hist.numel()).view(hist.shape)
    return torch.cumsum(hist, -1, dtype=torch.int64, out=out)


def threshold_bin(hist: Tensor, density: float, protect: bool) -> Tensor:
    """Threshold bin (0-dim int64 tensor) that brings a unit's realised density closest to target
    (``_best``, which documents the rule)."""
    return _best(hist, density, protect)[0]


def flagged(threshold: Tensor) -> Tensor:
    """A stored threshold that tells the next step to derive its own: ``-2 - threshold``
    (``UNKNOWN``, -1, has no candidate; ``candidate`` undoes it)."""
    return -2 - threshold


def candidate(stored: Tensor) -> Tensor:
    """The threshold a stored one names, flagged (``flagged``) or not (where ``stored`` is not
    ``UNKNOWN``)."""
    return torch.where(stored >= 0, stored, flagged(stored)).clamp(0, NUM_BINS)  # (its own inverse)


def next_threshold_bin(hist: Tensor, density: float, protect: bool, stored: Tensor) -> Tensor:
    """The threshold a unit stores for its next step, from this step's histogram ``hist``.

    It is ``threshold_bin(hist)``. With ``select`` it is stored ``flagged`` (the next step
    derives its threshold from its own scores, as a first step does) where the threshold the
    last step derived (``candidate(stored)``) would have missed this step's target by more
    than half SPEC's bound, max(10% of the target, 0.002), and by more than
    ``threshold_bin(hist)`` misses it: the scores' distribution is moving (the first tens of
    steps of the importance average, a new task), and a threshold taken from the previous
    step lags; also where there was none (``UNKNOWN``: a first step), as the importance
    average changes most between its first steps. On stationary scores a stored threshold
    meets the bound, and no step takes the extra pass. ``stored`` holds each unit's stored
    threshold (``hist``'s leading shape).
    """
    choice, below, total, target = _best(hist, density, protect)
    if protect:  # the anchor does not move between consolidations
        return choice

    def error(b: Tensor) -> Tensor:
        return ((total - below(b.unsqueeze(-1))).to(torch.float64) - target).abs().squeeze(-1)

    missed = error(candidate(stored))
    half_bound = 0.5 * max(0.1 * density, 0.002) * total.squeeze(-1).to(torch.float64)
    flag = (stored == UNKNOWN) | (missed > half_bound) & (missed > error(choice))
    return torch.where(flag, flagged(choice), choice)


def _best(hist: Tensor, density: float, protect: bool) -> tuple:
    """The threshold bin that brings a unit's realised density closest to target (0-dim int64),
    and the function ``below(b)`` (elements in bins < b), the total and the target it used.

    ``select``: an element is updated when ``bin >= threshold`` (the top ``density`` of scores).
    ``protect``: an element is updated when ``bin < threshold`` (all but the top ``1 - density``
    of the anchor); the threshold is at least 1, so elements with anchor 0 (bin 0) always move.
    Ties between candidate thresholds go to the lower one (select: more elements update;
    protect: fewer, more of the anchor is kept). ``hist`` may carry leading batch dimensions
    (``[units, NUM_BINS]``): one threshold per row.

    The rule is ``argmin_b |updated(b) - density * total|`` in float64 (first minimum), with
    ``updated(b)`` the elements a threshold ``b`` in ``[0, NUM_BINS]`` updates. ``updated`` is
    monotone in ``b``, so the minimum is one of two candidates around the target, found by
    binary search: one pass over the bins (a cumulative sum) instead of seven; ``tests/
    test_threshold.py`` holds the rule written out as the yardstick.
    """
    cumulative = _cumulative(hist)  # below(b) = cumulative[b - 1], below(0) = 0
    total = cumulative[..., -1:]
    target = density * total.to(torch.float64)
    last = cumulative.shape[-1]  # the largest threshold: nothing is >= it

    def below(b: Tensor) -> Tensor:  # elements in bins < b
        return torch.where(b > 0, cumulative.gather(-1, (b - 1).clamp(min=0)), 0)

    def first_at_least(count: Tensor) -> Tensor:  # first b with below(b) >= count
        return torch.where(count > 0, torch.searchsorted(cumulative, count) + 1, 0)

    def error(updated: Tensor) -> Tensor:
        return (updated.to(torch.float64) - target).abs()

    # below(b) is an integer: below(b) >= target exactly when below(b) >= ceil(target)
    ceiling = target.ceil().to(torch.int64)
    if protect:  # updated(b) = below(b), non-decreasing; b >= 1
        # first b >= 1 updating at least the target, and the start of the plateau before it
        upper = first_at_least(ceiling).clamp(min=1)
        lower = first_at_least(below((upper - 1).clamp(min=1))).clamp(min=1)
        pick_lower = (lower < upper) & (error(below(lower)) <= error(below(upper)))
    else:  # updated(b) = total - below(b), non-increasing
        # the start of the plateau of the last b updating at least the target, and the b after it;
        # that b is the last with below(b) <= total - ceil(target) (>= 0, so b = 0 qualifies)
        at_least = torch.searchsorted(cumulative, total - ceiling, right=True)
        lower = first_at_least(below(at_least))
        upper = (at_least + 1).clamp(max=last)
        pick_lower = (upper == at_least) | (error(total - below(lower)) <= error(total - below(upper)))
    return torch.where(pick_lower, lower, upper).squeeze(-1), below, total, target


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
