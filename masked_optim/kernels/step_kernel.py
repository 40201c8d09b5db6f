"""The fused MaskedAdamW step kernel and its score-histogram pre-pass (SPEC.md "One step").

Memory layout and grid (both kernels)
-------------------------------------
A param group's tensors are split into *buckets* of equal dtypes (param, grad, importance,
anchor, anchor_param) and equal presence of anchor / anchor_param / user mask; each bucket is
one launch, so launches per step grow with the number of distinct dtype combinations, never
with the number of tensors. Within a launch every tensor is cut into blocks of ``BLOCK``
elements; ``grid = (blocks in the bucket,)`` and program ``pid`` handles elements
``[(pid - first_block) * BLOCK, ... + BLOCK)`` of tensor ``block_table[pid]`` (64-bit offsets,
so tensors may exceed 2**31 elements). Tensors are addressed through the group's tensor table:
each row holds int64 data addresses that the kernel casts with ``tl.pointer_type`` (columns in
``layout.py``). All per-element tensors of a row are flat: ``numel`` elements laid out in the
same (dense) order as the param, so element ``i`` of each is the same parameter element.

Hyper-parameters are read at run time from the float64 hyper table and rounded to the math
dtype in the kernel, so a new lr, beta, eps, weight decay, density, protect strength, anchor
decay, importance kind, mask, maximize or nonfinite setting never recompiles. ``tl.constexpr``
arguments are dtypes, block size and feature flags (what is loaded at all).
"""
import triton
import triton.language as tl

from masked_optim.kernels import arith, layout
from masked_optim.threshold import BIN_SHIFT, NUM_BINS

_PARAM = tl.constexpr(layout.PARAM)
_GRAD = tl.constexpr(layout.GRAD)
_EXP_AVG = tl.constexpr(layout.EXP_AVG)
_EXP_AVG_SQ = tl.constexpr(layout.EXP_AVG_SQ)
_IMPORTANCE = tl.constexpr(layout.IMPORTANCE)
_ANCHOR = tl.constexpr(layout.ANCHOR)
_ANCHOR_PARAM = tl.constexpr(layout.ANCHOR_PARAM)
_USER_MASK = tl.constexpr(layout.USER_MASK)
_STEP = tl.constexpr(layout.STEP)
_IMPORTANCE_STEP = tl.constexpr(layout.IMPORTANCE_STEP)
_NUMEL = tl.constexpr(layout.NUMEL)
_FIRST_BLOCK = tl.constexpr(layout.FIRST_BLOCK)
_UNIT = tl.constexpr(layout.UNIT)
_TENSOR_FIELDS = tl.constexpr(layout.TENSOR_FIELDS)
_NUM_BINS = tl.constexpr(NUM_BINS)
_UPDATED = tl.constexpr(layout.UPDATED)
_FROZEN = tl.constexpr(layout.FROZEN)
_SKIPPED = tl.constexpr(layout.SKIPPED)
assert BIN_SHIFT == 16 and NUM_BINS == 1 << 15, "arith.score_bin hard-codes the bin layout"


@triton.jit
def _block(tensor_table_pointer, block_table_pointer, found_inf_pointer, HAS_FOUND_INF: tl.constexpr, BLOCK: tl.constexpr):
    """This program's tensor-table row, element offsets, in-bounds mask (empty when found_inf)
    and whether the whole block is in bounds (a scalar from the block's index: a reduction of
    the offsets would cost two barriers before the first load on a GPU)."""
    pid = tl.program_id(0)
    tensor = tl.load(block_table_pointer + pid)
    row = tensor_table_pointer + tensor.to(tl.int64) * _TENSOR_FIELDS
    numel = tl.load(row + _NUMEL)
    first_block = tl.load(row + _FIRST_BLOCK)
    start = (pid.to(tl.int64) - first_block) * BLOCK
    offsets = start + tl.arange(0, BLOCK).to(tl.int64)
    mask = offsets < numel
    if HAS_FOUND_INF:
        mask = tl.where(tl.load(found_inf_pointer) == 0, mask, False)
    return row, offsets, mask, start + BLOCK <= numel


@triton.jit
def _pointer(row, field, DTYPE: tl.constexpr, ALIGNED: tl.constexpr):
    """The data pointer in column ``field`` of a tensor-table row; with ALIGNED the host has
    checked that every address of the row is a multiple of 16 bytes, which lets full blocks
    use 128-bit loads and stores."""
    pointer = tl.load(row + field).to(tl.pointer_type(DTYPE))
    if ALIGNED:
        pointer = tl.multiple_of(pointer, 16)
    return pointer


@triton.jit
def _load(pointer, offsets, mask, FULL: tl.constexpr):
    """Elements ``offsets`` of a tensor: every one in a full block, else those under ``mask``."""
    if FULL:
        return tl.load(pointer + offsets)
    return tl.load(pointer + offsets, mask=mask, other=0)


@triton.jit
def _unscaled_grad(row, offsets, mask, hyper_pointer, grad_scale_pointer,
                   GRAD_DTYPE: tl.constexpr, MATH_DTYPE: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
                   FULL: tl.constexpr = False, ALIGNED: tl.constexpr = False):
    """reference.unscaled_grad and live_elements: g in math dtype, and which elements are live."""
    g = _load(_pointer(row, _GRAD, GRAD_DTYPE, ALIGNED), offsets, mask, FULL).to(MATH_DTYPE)
    if HAS_GRAD_SCALE:
        inverse_scale = (1.0 / tl.load(grad_scale_pointer).to(tl.float64)).to(tl.float32)
        g = g * inverse_scale.to(MATH_DTYPE)
    g = tl.where(tl.load(hyper_pointer + layout.MAXIMIZE) != 0, -g, g)
    live = tl.where(tl.load(hyper_pointer + layout.SKIP_NONFINITE) == 0, True, tl.abs(g) < float("inf"))
    return g, live


@triton.jit
def _new_importance(row, offsets, mask, g, theta, live, hyper_pointer, IMPORTANCE_DTYPE: tl.constexpr,
                    FULL: tl.constexpr = False, ALIGNED: tl.constexpr = False):
    """reference.update_importance: s <- beta*s + (1-beta)*x on live elements, as stored."""
    kind = tl.load(hyper_pointer + layout.IMPORTANCE_KIND)
    signal = tl.where(kind == 0, g * g, tl.where(kind == 1, tl.abs(g * theta), tl.abs(g))).to(tl.float32)
    old = _load(_pointer(row, _IMPORTANCE, IMPORTANCE_DTYPE, ALIGNED), offsets, mask, FULL).to(tl.float32)
    beta = tl.load(hyper_pointer + layout.IMPORTANCE_BETA).to(tl.float32)
    one_minus_beta = tl.load(hyper_pointer + layout.ONE_MINUS_IMPORTANCE_BETA).to(tl.float32)
    new = old * beta + signal * one_minus_beta
    return arith.round_for_store(tl.where(live, new, old), IMPORTANCE_DTYPE)


@triton.jit
def _select_score(row, importance, anchor, hyper_pointer, HAS_ANCHOR: tl.constexpr):
    """reference.select_score from the stored importance: s_hat (/ (a + delta) with an anchor)."""
    importance_step = tl.load(tl.load(row + _IMPORTANCE_STEP).to(tl.pointer_type(tl.float32))).to(tl.float64) + 1.0
    beta = tl.load(hyper_pointer + layout.IMPORTANCE_BETA)
    # the reference's product with the reciprocal (in double, rounded once to fp32), not a
    # division by the correction: the two differ by an ulp in ~20% of elements, enough to move
    # a score across a bin edge
    inverse_correction = (1.0 / (1.0 - arith.power(beta, importance_step))).to(tl.float32)
    score = importance.to(tl.float32) * inverse_correction
    if HAS_ANCHOR:
        delta = tl.load(hyper_pointer + layout.SELECT_DELTA).to(tl.float32)
        score = tl.div_rn(score, anchor + delta)
    return score


@triton.jit
def _block_bins(bins, allowed, protect, BLOCK: tl.constexpr, GATE_BLOCK: tl.constexpr):
    """threshold.block_bins within one program: each run of GATE_BLOCK elements' largest bin
    among its allowed elements, its number of counted elements (allowed; with protect, of
    anchor > 0), and the number of allowed always-moving elements (protect, bin 0)."""
    grid = tl.reshape(tl.where(allowed, bins, 0), [BLOCK // GATE_BLOCK, GATE_BLOCK])
    counted = allowed & tl.where(protect, bins > 0, True)
    counts = tl.reshape(counted.to(tl.int32), [BLOCK // GATE_BLOCK, GATE_BLOCK])
    always = tl.sum((allowed & tl.where(protect, bins == 0, False)).to(tl.int32))
    return tl.max(grid, axis=1), tl.sum(counts, axis=1), always


@triton.jit
def _count_bins(histogram_pointer, unit, bins, weight, counted, more_zeros):
    """Add ``weight`` (int) at each ``counted`` entry's ``bins`` to the unit's histogram row,
    and ``more_zeros`` (a scalar) to its bin 0.

    Bin 0 (score 0: elements whose grads were always 0, e.g. unused embedding rows, or
    protect's anchor 0) is summed in the program and added by one atomic: element-wise, every
    such element of the launch would hit one address, serialised in the L2. Other bins get one
    relaxed atomic per entry (scores spread over 2**15 bins)."""
    row = histogram_pointer + unit * _NUM_BINS
    zero = tl.sum(tl.where(counted & (bins == 0), weight, 0).to(tl.int64)) + more_zeros
    tl.atomic_add(row, zero, mask=zero > 0, sem="relaxed")
    tl.atomic_add(row + bins, weight, mask=counted & (bins != 0), sem="relaxed")


@triton.jit
def _expand_blocks(values, BLOCK: tl.constexpr, GATE_BLOCK: tl.constexpr):
    """Per-block values repeated over each block's GATE_BLOCK elements."""
    return tl.reshape(tl.broadcast_to(values[:, None], [BLOCK // GATE_BLOCK, GATE_BLOCK]), [BLOCK])


@triton.jit
def _stored_threshold(row, unit_table_pointer):
    """The row's unit, its stored threshold bin (its first gated member's) and whether the host
    vouches that it is known (``functional.gate_thresholds``)."""
    unit = tl.load(row + _UNIT)
    stored = tl.load(tl.load(unit_table_pointer + 2 * unit).to(tl.pointer_type(tl.int64)))
    return unit, stored, tl.load(unit_table_pointer + 2 * unit + 1) != 0


@triton.jit
def _prepass_counts(stored, known, protect):
    """Whether the pre-pass histograms the unit: its threshold may be unknown and is needed,
    as the gate's fallback (stored < 0) or, with protect, as the next threshold."""
    return (known == 0) & (protect | (stored < 0))


@triton.jit
def _score_histogram_kernel(
    tensor_table_pointer, block_table_pointer, unit_table_pointer, hyper_pointer,
    grad_scale_pointer, found_inf_pointer, histogram_pointer,
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, MATH_DTYPE: tl.constexpr,
    IMPORTANCE_DTYPE: tl.constexpr, ANCHOR_DTYPE: tl.constexpr,
    HAS_ANCHOR: tl.constexpr, HAS_USER_MASK: tl.constexpr, HAS_GRAD_SCALE: tl.constexpr,
    HAS_FOUND_INF: tl.constexpr, GATE_BLOCK: tl.constexpr, BLOCK: tl.constexpr,
):
    """Pre-pass: histogram of this step's scores for units whose stored threshold is unknown.

    Run only for gated buckets when the host cannot vouch that every stored threshold is known.
    It computes exactly the scores the step kernel will (the new importance is computed, not
    stored), so ``threshold.threshold_bin`` of its histogram is the reference's ``derived``.
    A unit the host vouches for is skipped, and so is, with ``select``, a unit whose stored
    threshold is >= 0 (the step kernel builds the histograms of those: select always derives
    the next threshold from this step's scores); with ``protect`` a unit the host does not
    vouch for is always counted (its next threshold is rederived from the anchor).

    Args (pointers; T tensors in the group, U gated units):
        tensor_table_pointer: int64 [T, layout.TENSOR_FIELDS], read only.
        block_table_pointer: int32 [grid], the tensor-table row of each program, read only.
        unit_table_pointer: int64 [U, 2]: address of each unit's stored threshold (int64 0-dim)
            and 1 where the host vouches that it is known, read only.
        hyper_pointer: float64 [layout.HYPER_FIELDS], read only.
        grad_scale_pointer: float32 [1], the GradScaler's scale (read when HAS_GRAD_SCALE).
        found_inf_pointer: float32 [1], nonzero: do nothing (read when HAS_FOUND_INF).
        histogram_pointer: int64 [U, threshold.NUM_BINS], counts added atomically (with
            GATE_BLOCK > 1 one entry per block of GATE_BLOCK elements, weighted by its allowed
            elements, as ``threshold.block_bins``).
        Through the table: param (PARAM_DTYPE), grad (GRAD_DTYPE), importance
        (IMPORTANCE_DTYPE), anchor (ANCHOR_DTYPE), user mask (bool as int8), each [numel]; the
        importance step counter (float32 0-dim). Nothing is written but the histogram.
    """
    # (Scalar conditions enter element masks through tl.where, never through & or |: the
    # triton 3.6 interpreter splats a scalar comparison in its operands' dtype.)
    row, offsets, mask, _ = _block(tensor_table_pointer, block_table_pointer, found_inf_pointer, HAS_FOUND_INF, BLOCK)
    unit, stored, known = _stored_threshold(row, unit_table_pointer)
    protect = tl.load(hyper_pointer + layout.PROTECT) != 0
    if not _prepass_counts(stored, known, protect):
        return  # (a select unit with a usable stored threshold: the launch is every step's)
    anchor = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_ANCHOR:
        anchor = tl.load(tl.load(row + _ANCHOR).to(tl.pointer_type(ANCHOR_DTYPE)) + offsets, mask=mask, other=0).to(tl.float32)
    selecting = tl.where(protect, False, mask)
    g, live = _unscaled_grad(row, offsets, selecting, hyper_pointer, grad_scale_pointer, GRAD_DTYPE, MATH_DTYPE, HAS_GRAD_SCALE)
    taylor = tl.where(tl.load(hyper_pointer + layout.IMPORTANCE_KIND) == 1, selecting, False)
    theta = tl.load(tl.load(row + _PARAM).to(tl.pointer_type(PARAM_DTYPE)) + offsets, mask=taylor, other=0).to(MATH_DTYPE)
    importance = _new_importance(row, offsets, selecting, g, theta, live, hyper_pointer, IMPORTANCE_DTYPE)
    score = tl.where(protect, anchor, _select_score(row, importance, anchor, hyper_pointer, HAS_ANCHOR))
    if HAS_USER_MASK:
        mask = mask & (tl.load(tl.load(row + _USER_MASK).to(tl.pointer_type(tl.int8)) + offsets, mask=mask, other=0) != 0)
    bins = arith.score_bin(score)
    if GATE_BLOCK > 1:
        block_bin, weight, always = _block_bins(bins, mask, protect, BLOCK, GATE_BLOCK)
        _count_bins(histogram_pointer, unit, block_bin, weight, weight > 0, always)
    else:
        _count_bins(histogram_pointer, unit, bins, 1, mask, 0)


@triton.jit
def _masked_adamw_kernel(
    tensor_table_pointer, block_table_pointer, unit_table_pointer, hyper_pointer,
    grad_scale_pointer, found_inf_pointer, prepass_threshold_pointer, histogram_pointer, counts_pointer,
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, MATH_DTYPE: tl.constexpr,
    IMPORTANCE_DTYPE: tl.constexpr, ANCHOR_DTYPE: tl.constexpr, ANCHOR_PARAM_DTYPE: tl.constexpr,
    HAS_ANCHOR: tl.constexpr, HAS_ANCHOR_PARAM: tl.constexpr, HAS_USER_MASK: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, HAS_FOUND_INF: tl.constexpr, GATED: tl.constexpr,
    HISTOGRAM: tl.constexpr, PREPASS_RAN: tl.constexpr, EMULATE_FMA: tl.constexpr, ALIGNED: tl.constexpr,
    GATE_BLOCK: tl.constexpr, BLOCK: tl.constexpr,
):
    """One MaskedAdamW step (SPEC steps 1-6) of every element of a bucket, in one memory pass.

    Per element: unscale (and negate if maximize) the grad; update the importance on live
    elements; with GATED, score it (select: s_hat / (a + delta); protect: a), gate it against
    the unit's threshold (the stored one, or the pre-pass's when the stored one is unknown) and
    the user mask, and count its bin into the unit's histogram (HISTOGRAM); on moving elements
    apply the restoring force (lerp toward theta*) and the AdamW update with lr scaled by
    c = 1/(1 + lambda*a). Gated-off and non-live elements keep param and moments bit-identical
    (in partial blocks they are not written; full blocks write back their unchanged bits). Bias corrections come from the tensor's step counters (read here,
    incremented afterwards by ``_finish_step_kernel``), as in torch AdamW.

    A *full* block (all BLOCK elements inside the tensor, step not skipped by found_inf) reads
    every input without masks and writes param and moments back in full, the kept elements
    with their own unchanged bits; with ALIGNED (every address of the bucket's rows a multiple
    of 16 bytes) these are 128-bit accesses. A tensor's last, partial block uses masks and
    writes only the moving elements. (Full blocks trade bytes for vector width: at low density
    a masked store would write fewer bytes; unmeasured on a GPU so far.)

    With GATE_BLOCK > 1 (``gate_block``, block gates; GATED only) each run of GATE_BLOCK
    elements shares one gate from its largest allowed score bin and enters the histogram once,
    weighted by its allowed elements (``threshold.block_bins``; with protect, elements of
    anchor 0 move whatever their block's gate and are counted in bin 0). The param (except for
    taylor's signal), moments and theta* are then read and written only where ``io``: in
    gated-on blocks (and at protect's anchor-0 elements), the kept elements of those blocks
    with their own bits: a step at density d moves ~(grad + 2 x importance) + d x (param and
    moments both ways) bytes.

    Args (pointers; T tensors in the group, U gated units):
        tensor_table_pointer: int64 [T, layout.TENSOR_FIELDS], read only.
        block_table_pointer: int32 [grid], the tensor-table row of each program, read only.
        unit_table_pointer: int64 [U, 2]: address of each unit's stored threshold (int64 0-dim)
            and 1 where the host vouches that it is known, read only (read when GATED).
        hyper_pointer: float64 [layout.HYPER_FIELDS], read only.
        grad_scale_pointer: float32 [1], the GradScaler's scale (read when HAS_GRAD_SCALE).
        found_inf_pointer: float32 [1]; nonzero: the program writes nothing at all.
        prepass_threshold_pointer: int64 [U], the threshold derived by the pre-pass (used where
            the stored one is < 0), read only (read when GATED).
        histogram_pointer: int64 [U, threshold.NUM_BINS]; with HISTOGRAM the bins of this
            step's scores are added atomically (for the units the pre-pass did not count).
        counts_pointer: int64 [layout.COUNT_FIELDS]; updated / frozen / non-finite-skipped
            element counts are added atomically.
        Through each table row, flat [numel] in the param's element order:
            param (PARAM_DTYPE): read; written where the element moves (full blocks with
                element gates: all, kept elements with their old bits, as for the moments;
                block gates: every element of a gated-on block, likewise).
            grad (GRAD_DTYPE): read.
            exp_avg, exp_avg_sq (MATH_DTYPE: fp32, or fp64 for fp64 params): read; written
                where the element moves.
            importance (IMPORTANCE_DTYPE: fp32 or bf16): read and written (every element).
            anchor (ANCHOR_DTYPE), read when HAS_ANCHOR.
            anchor_param (ANCHOR_PARAM_DTYPE), read when HAS_ANCHOR_PARAM and anchor_decay > 0.
            user mask (bool, read as int8), read when HAS_USER_MASK.
            step, importance_step (float32 0-dim): read only.
    """
    row, offsets, mask, full = _block(tensor_table_pointer, block_table_pointer, found_inf_pointer, HAS_FOUND_INF, BLOCK)
    if HAS_FOUND_INF:
        full = tl.where(tl.load(found_inf_pointer) == 0, full, False)
    if full:
        _step_elements(
            row, offsets, mask, unit_table_pointer, hyper_pointer, grad_scale_pointer, prepass_threshold_pointer,
            histogram_pointer, counts_pointer, PARAM_DTYPE, GRAD_DTYPE, MATH_DTYPE, IMPORTANCE_DTYPE, ANCHOR_DTYPE,
            ANCHOR_PARAM_DTYPE, HAS_ANCHOR, HAS_ANCHOR_PARAM, HAS_USER_MASK, HAS_GRAD_SCALE, GATED, HISTOGRAM,
            PREPASS_RAN, EMULATE_FMA, ALIGNED, GATE_BLOCK, BLOCK, True, GATE_BLOCK == 1,
        )
    else:
        _step_elements(
            row, offsets, mask, unit_table_pointer, hyper_pointer, grad_scale_pointer, prepass_threshold_pointer,
            histogram_pointer, counts_pointer, PARAM_DTYPE, GRAD_DTYPE, MATH_DTYPE, IMPORTANCE_DTYPE, ANCHOR_DTYPE,
            ANCHOR_PARAM_DTYPE, HAS_ANCHOR, HAS_ANCHOR_PARAM, HAS_USER_MASK, HAS_GRAD_SCALE, GATED, HISTOGRAM,
            PREPASS_RAN, EMULATE_FMA, ALIGNED, GATE_BLOCK, BLOCK, False, False,
        )


@triton.jit
def _step_elements(
    row, offsets, mask, unit_table_pointer, hyper_pointer, grad_scale_pointer, prepass_threshold_pointer,
    histogram_pointer, counts_pointer,
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, MATH_DTYPE: tl.constexpr,
    IMPORTANCE_DTYPE: tl.constexpr, ANCHOR_DTYPE: tl.constexpr, ANCHOR_PARAM_DTYPE: tl.constexpr,
    HAS_ANCHOR: tl.constexpr, HAS_ANCHOR_PARAM: tl.constexpr, HAS_USER_MASK: tl.constexpr,
    HAS_GRAD_SCALE: tl.constexpr, GATED: tl.constexpr, HISTOGRAM: tl.constexpr, PREPASS_RAN: tl.constexpr,
    EMULATE_FMA: tl.constexpr, ALIGNED: tl.constexpr, GATE_BLOCK: tl.constexpr, BLOCK: tl.constexpr,
    FULL: tl.constexpr, DENSE_IO: tl.constexpr,
):
    """The body of ``_masked_adamw_kernel`` for one block: FULL (no masks on the grad,
    importance, anchor and user mask) or not; DENSE_IO (FULL with element gates: param,
    moments and theta* read and written in full too) or not (only moving elements' are)."""
    lr = tl.load(hyper_pointer + layout.LR)
    weight_decay = tl.load(hyper_pointer + layout.WEIGHT_DECAY)
    step = tl.load(tl.load(row + _STEP).to(tl.pointer_type(tl.float32))).to(tl.float64) + 1.0
    bias_correction1 = 1.0 - arith.power(tl.load(hyper_pointer + layout.BETA1), step)
    bias_correction2_sqrt = tl.sqrt(1.0 - arith.power(tl.load(hyper_pointer + layout.BETA2), step))

    param_pointer = _pointer(row, _PARAM, PARAM_DTYPE, ALIGNED)
    if GATE_BLOCK == 1:
        stored_theta = _load(param_pointer, offsets, mask, FULL)
        theta = stored_theta.to(MATH_DTYPE)
    else:  # before the gate only taylor's signal needs theta: gated-off blocks are not read
        taylor = tl.where(tl.load(hyper_pointer + layout.IMPORTANCE_KIND) == 1, mask, False)
        theta = tl.load(param_pointer + offsets, mask=taylor, other=0).to(MATH_DTYPE)
    g, live = _unscaled_grad(row, offsets, mask, hyper_pointer, grad_scale_pointer, GRAD_DTYPE, MATH_DTYPE, HAS_GRAD_SCALE, FULL, ALIGNED)
    importance = _new_importance(row, offsets, mask, g, theta, live, hyper_pointer, IMPORTANCE_DTYPE, FULL, ALIGNED)
    importance_pointer = _pointer(row, _IMPORTANCE, IMPORTANCE_DTYPE, ALIGNED)
    if FULL:
        tl.store(importance_pointer + offsets, importance)
    else:
        tl.store(importance_pointer + offsets, importance, mask=mask)

    anchor = tl.zeros([BLOCK], dtype=tl.float32)
    if HAS_ANCHOR:
        anchor = _load(_pointer(row, _ANCHOR, ANCHOR_DTYPE, ALIGNED), offsets, mask, FULL).to(tl.float32)
    allowed = mask
    if HAS_USER_MASK:
        allowed = mask & (_load(_pointer(row, _USER_MASK, tl.int8, ALIGNED), offsets, mask, FULL) != 0)
    gate = allowed
    if GATED:
        protect = tl.load(hyper_pointer + layout.PROTECT) != 0
        score = tl.where(protect, anchor, _select_score(row, importance, anchor, hyper_pointer, HAS_ANCHOR))
        bins = arith.score_bin(score)
        unit, stored, known = _stored_threshold(row, unit_table_pointer)
        current = tl.where(stored >= 0, stored, tl.load(prepass_threshold_pointer + unit))
        if GATE_BLOCK > 1:
            block_bin, weight, always = _block_bins(bins, allowed, protect, BLOCK, GATE_BLOCK)
            block_gate = tl.where(protect, block_bin < current, block_bin >= current)
            # protect: elements of anchor 0 move whatever their block's gate (SPEC)
            on = _expand_blocks(block_gate, BLOCK, GATE_BLOCK) | tl.where(protect, bins == 0, False)
            gate = allowed & on
            if HISTOGRAM:  # select only (protect's steady state keeps its threshold): no bin-0 rule
                counted = weight > 0
                if PREPASS_RAN:
                    counted = tl.where(_prepass_counts(stored, known, protect), False, counted)
                _count_bins(histogram_pointer, unit, block_bin, weight, counted, 0)
        else:
            gate = allowed & tl.where(protect, bins < current, bins >= current)
            if HISTOGRAM:
                counted = allowed
                if PREPASS_RAN:
                    counted = tl.where(_prepass_counts(stored, known, protect), False, allowed)
                _count_bins(histogram_pointer, unit, bins, 1, counted, 0)
    moving = gate & live
    # Without DENSE_IO, param, moments and theta* are read and written where ``io``: the moving
    # elements, or with block gates every element of a gated-on block (a mask constant over
    # GATE_BLOCK elements, so accesses stay vectorised; gated-off blocks cost no traffic).
    io = moving
    if GATE_BLOCK > 1:
        io = on
        if not FULL:
            io = io & mask
        stored_theta = tl.load(param_pointer + offsets, mask=io, other=0)
        theta = stored_theta.to(MATH_DTYPE)

    # SPEC step 5a: restoring force toward theta* (reference.restoring_force)
    pulled = theta
    if HAS_ANCHOR_PARAM:
        anchor_decay = tl.load(hyper_pointer + layout.ANCHOR_DECAY)
        restoring = tl.where(anchor_decay != 0, io, False)
        anchor_param_pointer = _pointer(row, _ANCHOR_PARAM, ANCHOR_PARAM_DTYPE, ALIGNED)
        if DENSE_IO:
            theta_star = tl.load(anchor_param_pointer + offsets).to(MATH_DTYPE)
        else:
            theta_star = tl.load(anchor_param_pointer + offsets, mask=restoring, other=0).to(MATH_DTYPE)
        # NaN propagates, as in the reference's clamp (compiled, min.f32 would return 1.0)
        pull = tl.minimum(anchor.to(MATH_DTYPE) * (lr * anchor_decay).to(MATH_DTYPE), 1.0,
                          propagate_nan=tl.PropagateNan.ALL)
        pulled = tl.where(anchor_decay != 0, arith.lerp(theta, theta_star, pull, MATH_DTYPE, EMULATE_FMA), theta)

    # SPEC step 5b: AdamW (reference.adamw_update, torch's single-tensor arithmetic)
    exp_avg_pointer = _pointer(row, _EXP_AVG, MATH_DTYPE, ALIGNED)
    exp_avg_sq_pointer = _pointer(row, _EXP_AVG_SQ, MATH_DTYPE, ALIGNED)
    if DENSE_IO:
        old_exp_avg = tl.load(exp_avg_pointer + offsets)
        old_exp_avg_sq = tl.load(exp_avg_sq_pointer + offsets)
    else:
        old_exp_avg = tl.load(exp_avg_pointer + offsets, mask=io, other=0)
        old_exp_avg_sq = tl.load(exp_avg_sq_pointer + offsets, mask=io, other=0)
    exp_avg = old_exp_avg
    exp_avg_sq = old_exp_avg_sq
    one_minus_beta1 = tl.load(hyper_pointer + layout.ONE_MINUS_BETA1).to(MATH_DTYPE)
    exp_avg = arith.lerp(exp_avg, g, one_minus_beta1, MATH_DTYPE, EMULATE_FMA)
    beta2 = tl.load(hyper_pointer + layout.BETA2).to(MATH_DTYPE)
    one_minus_beta2 = tl.load(hyper_pointer + layout.ONE_MINUS_BETA2).to(MATH_DTYPE)
    exp_avg_sq = arith.fma(one_minus_beta2 * g, g, exp_avg_sq * beta2, MATH_DTYPE, EMULATE_FMA)
    denom = arith.divide(arith.square_root(exp_avg_sq, MATH_DTYPE), bias_correction2_sqrt.to(MATH_DTYPE), MATH_DTYPE)
    denom = denom + tl.load(hyper_pointer + layout.EPS).to(MATH_DTYPE)
    # lr unscaled (no anchor or lambda = 0): factors rounded from float64, as torch's scalars
    decayed = pulled * (1.0 - lr * weight_decay).to(MATH_DTYPE)
    new_theta = decayed + arith.divide((-(lr / bias_correction1)).to(MATH_DTYPE) * exp_avg, denom, MATH_DTYPE)
    if HAS_ANCHOR:
        # lr scaled per element by c = 1 / (1 + lambda*a) (reference.soft_scale), fp32 c
        protect_strength = tl.load(hyper_pointer + layout.PROTECT_STRENGTH)
        scale = tl.div_rn(tl.full([BLOCK], 1.0, tl.float32), 1.0 + protect_strength.to(tl.float32) * anchor)
        lr_element = scale.to(MATH_DTYPE) * lr.to(MATH_DTYPE)
        scaled = pulled * (1.0 - lr_element * weight_decay.to(MATH_DTYPE))
        step_size = arith.divide(lr_element, bias_correction1.to(MATH_DTYPE), MATH_DTYPE)
        scaled = scaled - arith.divide(step_size * exp_avg, denom, MATH_DTYPE)
        new_theta = tl.where(protect_strength != 0, scaled, new_theta)

    if DENSE_IO:  # kept elements are written back with their own bits
        tl.store(param_pointer + offsets, tl.where(moving, arith.round_for_store(new_theta, PARAM_DTYPE), stored_theta))
        tl.store(exp_avg_pointer + offsets, tl.where(moving, exp_avg, old_exp_avg))
        tl.store(exp_avg_sq_pointer + offsets, tl.where(moving, exp_avg_sq, old_exp_avg_sq))
    else:
        # where io: the moving elements (element gates), or whole gated-on blocks whose kept
        # elements (user mask, non-finite) are written back with their own bits
        tl.store(param_pointer + offsets, tl.where(moving, arith.round_for_store(new_theta, PARAM_DTYPE), stored_theta), mask=io)
        tl.store(exp_avg_pointer + offsets, tl.where(moving, exp_avg, old_exp_avg), mask=io)
        tl.store(exp_avg_sq_pointer + offsets, tl.where(moving, exp_avg_sq, old_exp_avg_sq), mask=io)
    # one atomic per count and program, left out where it adds 0 (frozen and skipped mostly do)
    updated = tl.sum(moving.to(tl.int64))
    frozen = tl.sum((mask & (gate == 0)).to(tl.int64))
    skipped = tl.sum((mask & (live == 0)).to(tl.int64))
    tl.atomic_add(counts_pointer + _UPDATED, updated, mask=updated > 0, sem="relaxed")
    tl.atomic_add(counts_pointer + _FROZEN, frozen, mask=frozen > 0, sem="relaxed")
    tl.atomic_add(counts_pointer + _SKIPPED, skipped, mask=skipped > 0, sem="relaxed")
