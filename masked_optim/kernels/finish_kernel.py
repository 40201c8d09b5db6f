"""The small fixed-size kernel that ends a step: counters, next thresholds and mask_stats.

It runs after the step kernels of every bucket (and after the next thresholds were derived
from the histogram), so nothing it writes can be read by a step program that is still running.
Everything it writes is conditional on ``found_inf`` on the device: a step skipped by the
GradScaler leaves step counters, thresholds and the reported stats as they were.
"""
import triton
import triton.language as tl

from masked_optim.kernels import layout

_STEP = tl.constexpr(layout.STEP)
_IMPORTANCE_STEP = tl.constexpr(layout.IMPORTANCE_STEP)
_THRESHOLD = tl.constexpr(layout.THRESHOLD)
_UNIT = tl.constexpr(layout.UNIT)
_TENSOR_FIELDS = tl.constexpr(layout.TENSOR_FIELDS)
_COUNT_FIELDS = tl.constexpr(layout.COUNT_FIELDS)


@triton.jit(do_not_specialize=["tensor_count", "unit_count"])
def _finish_step_kernel(
    tensor_table_pointer, tensor_count, unit_table_pointer, unit_count,
    prepass_threshold_pointer, next_threshold_pointer, scratch_pointer, found_inf_pointer,
    counts_pointer, stats_counts_pointer, stats_thresholds_pointer,
    HAS_FOUND_INF: tl.constexpr, HAS_NEXT: tl.constexpr, KEEP_KNOWN: tl.constexpr, BLOCK: tl.constexpr,
):
    """Increment the step counters, store each unit's next threshold, publish the step's stats.

    Grid: (1,); one program loops over units, then (after a barrier) over tensors.

    Args (T tensors in the group, U gated units):
        tensor_table_pointer: int64 [T, layout.TENSOR_FIELDS], read only; through it the step
            and importance_step counters (float32 0-dim) are incremented by 1 and, for gated
            tensors (unit >= 0), the threshold (int64 0-dim) is overwritten with its unit's next
            threshold.
        unit_table_pointer: int64 [U, 2]: address of each unit's stored threshold and 1 where
            the host vouches that it is known, read only.
        prepass_threshold_pointer: int64 [U], the pre-pass's threshold (used where the stored
            one is < 0), read only.
        next_threshold_pointer: int64 [U], the threshold derived from this step's histogram,
            read when HAS_NEXT; the stored threshold stays where there is none, and with
            KEEP_KNOWN (protect: the anchor is fixed) where the host vouches for it
            (``functional.next_thresholds``).
        scratch_pointer: int64 [U], written: each unit's next threshold.
        found_inf_pointer: float32 [1], read when HAS_FOUND_INF; nonzero: nothing but scratch
            is written.
        counts_pointer: int64 [layout.COUNT_FIELDS], this step's counts, read only.
        stats_counts_pointer: int64 [layout.COUNT_FIELDS], overwritten with counts.
        stats_thresholds_pointer: int64 [U], overwritten with the thresholds this step used.
    """
    go = tl.full([], 1, tl.int1)
    if HAS_FOUND_INF:
        go = tl.load(found_inf_pointer) == 0
    fields = tl.arange(0, _COUNT_FIELDS)
    tl.store(stats_counts_pointer + fields, tl.load(counts_pointer + fields), mask=tl.where(go, fields >= 0, False))
    for start in range(0, unit_count, BLOCK):
        units = start + tl.arange(0, BLOCK)
        inside = units < unit_count
        stored_pointer = tl.load(unit_table_pointer + 2 * units, mask=inside, other=0).to(tl.pointer_type(tl.int64))
        stored = tl.load(stored_pointer, mask=inside, other=-1)
        current = tl.where(stored >= 0, stored, tl.load(prepass_threshold_pointer + units, mask=inside, other=-1))
        following = stored
        if HAS_NEXT:
            following = tl.load(next_threshold_pointer + units, mask=inside, other=-1)
            if KEEP_KNOWN:
                known = tl.load(unit_table_pointer + 2 * units + 1, mask=inside, other=0) != 0
                following = tl.where(known, stored, following)
        tl.store(stats_thresholds_pointer + units, current, mask=tl.where(go, inside, False))
        tl.store(scratch_pointer + units, following, mask=inside)
    tl.debug_barrier()  # every stored threshold was read above before any is overwritten below
    for start in range(0, tensor_count, BLOCK):
        tensors = start + tl.arange(0, BLOCK)
        inside = tl.where(go, tensors < tensor_count, False)
        rows = tensor_table_pointer + tensors.to(tl.int64) * _TENSOR_FIELDS
        step_pointer = tl.load(rows + _STEP, mask=inside, other=0).to(tl.pointer_type(tl.float32))
        tl.store(step_pointer, tl.load(step_pointer, mask=inside, other=0) + 1.0, mask=inside)
        importance_step_pointer = tl.load(rows + _IMPORTANCE_STEP, mask=inside, other=0).to(tl.pointer_type(tl.float32))
        tl.store(importance_step_pointer, tl.load(importance_step_pointer, mask=inside, other=0) + 1.0, mask=inside)
        unit = tl.load(rows + _UNIT, mask=inside, other=-1)
        gated = inside & (unit >= 0)
        following = tl.load(scratch_pointer + tl.maximum(unit, 0), mask=gated, other=-1)
        threshold_pointer = tl.load(rows + _THRESHOLD, mask=gated, other=0).to(tl.pointer_type(tl.int64))
        tl.store(threshold_pointer, following, mask=gated)
