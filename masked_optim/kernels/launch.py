"""The Triton backend's entry point: one MaskedAdamW step of one param group, no host sync.

Per step and group the launches are, whatever the number of tensors:
  1. (gated groups whose stored thresholds the host cannot vouch for: always with select, as
     a step may flag its threshold) the score-histogram pre-pass, one launch per bucket, whose
     programs return at once for units with a usable stored threshold, then
     ``threshold.threshold_bin`` over all units at once;
  2. the step kernel, one launch per bucket (buckets: distinct dtype/feature combinations);
  3. (select with density < 1) ``threshold.next_threshold_bin`` of this step's histogram;
  4. the finish kernel (one program): step counters, next thresholds, stats, all conditional on
     ``found_inf`` on the device.
Grid, memory layout and what each kernel writes: ``step_kernel`` and ``finish_kernel``.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from masked_optim import threshold as thr
from masked_optim.distributed import all_reduce_rows
from masked_optim import functional
from masked_optim.functional import GroupHyper, TensorState
from masked_optim.kernels import layout, tables
from masked_optim.kernels.finish_kernel import _finish_step_kernel
from masked_optim.kernels.step_kernel import _masked_adamw_kernel, _score_histogram_kernel
from masked_optim.reference import DELTA

#: elements per program: large under the interpreter (per-program overhead), GPU-sized on CUDA
_BLOCK = {"cpu": 32768, "cuda": 1024}
_NUM_WARPS = 4
_FINISH_BLOCK = 1024


def _hyper_table(hyper: GroupHyper, device: torch.device) -> Tensor:
    """The float64 hyper table on ``device``; a Tensor lr is copied in on the device (no sync)."""
    values = [0.0] * layout.HYPER_FIELDS
    values[layout.BETA1] = hyper.beta1
    values[layout.BETA2] = hyper.beta2
    values[layout.ONE_MINUS_BETA1] = 1 - hyper.beta1
    values[layout.ONE_MINUS_BETA2] = 1 - hyper.beta2
    values[layout.EPS] = hyper.eps
    values[layout.WEIGHT_DECAY] = hyper.weight_decay
    values[layout.IMPORTANCE_BETA] = hyper.importance_beta
    values[layout.ONE_MINUS_IMPORTANCE_BETA] = 1.0 - hyper.importance_beta
    values[layout.PROTECT_STRENGTH] = hyper.protect_strength
    values[layout.ANCHOR_DECAY] = hyper.anchor_decay
    values[layout.IMPORTANCE_KIND] = layout.IMPORTANCE_KINDS[hyper.importance]
    values[layout.PROTECT] = float(hyper.mask == "protect")
    values[layout.MAXIMIZE] = float(hyper.maximize)
    values[layout.SKIP_NONFINITE] = float(hyper.nonfinite == "skip")
    values[layout.SELECT_DELTA] = DELTA
    lr_is_tensor = isinstance(hyper.lr, Tensor)
    if not lr_is_tensor:
        values[layout.LR] = float(hyper.lr)
    table = torch.tensor(values, dtype=torch.float64)
    if lr_is_tensor and hyper.lr.device.type == "cpu":
        table[layout.LR : layout.LR + 1].copy_(hyper.lr.detach().reshape(1))
    table = tables.to_device(table, device)
    if lr_is_tensor and hyper.lr.device.type != "cpu":
        table[layout.LR : layout.LR + 1].copy_(hyper.lr.detach().reshape(1))
    return table


def _counters(tensors: list[TensorState], device: torch.device, found_inf: Optional[Tensor]) -> tuple[list[tuple[Tensor, Tensor]], bool]:
    """The (step, importance_step) tensors the kernels read and the finish kernel increments.

    Counters on the params' device are used in place. Counters elsewhere (CPU counters of CUDA
    params, e.g. from a reference-backend checkpoint) are copied to the device and incremented
    on the host afterwards, which is only correct when no ``found_inf`` can skip the step.
    Returns the counters and whether the host must increment the originals.
    """
    on_device = all(
        c.device == device and c.dtype == torch.float32 and c.numel() == 1
        for t in tensors for c in (t.step, t.importance_step)
    )
    if on_device:
        return [(t.step, t.importance_step) for t in tensors], False
    if found_inf is not None:
        odd = next(c for t in tensors for c in (t.step, t.importance_step)
                   if not (c.device == device and c.dtype == torch.float32 and c.numel() == 1))
        raise RuntimeError(
            f"backend='triton' under a GradScaler needs one-element float32 step counters on {device} "
            f"(found {odd.dtype} of {odd.numel()} elements on {odd.device}): the skipped-step check happens "
            f"on the device. Make state['step'] and state['importance_step'] float32 on the param's device."
        )
    copies = tables.to_device(torch.stack([c.detach().reshape(()).float() for t in tensors for c in (t.step, t.importance_step)]), device)
    return [(copies[2 * i], copies[2 * i + 1]) for i in range(len(tensors))], True


def _reduce(histogram: Tensor, unit_first: list[int], tensors: list[TensorState]) -> Tensor:
    """Sum each unit's histogram over the process groups its tensors are sharded across (FSDP2)."""
    return all_reduce_rows(histogram, [tensors[first].shard_groups for first in unit_first])


def _compile_options(device: torch.device) -> dict:
    """Launch options: no fp contraction when compiled (the reference rounds every op but its
    lerp/addcmul fmas, which the kernels spell out); none under the interpreter."""
    return {} if device.type == "cpu" else {"num_warps": _NUM_WARPS, "enable_fp_fusion": False}


def _check_device(tensors: list[TensorState], device: torch.device, grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
    for t in tensors:
        for name in ("param", "grad", "exp_avg", "exp_avg_sq", "importance", "threshold", "anchor", "anchor_param", "user_mask"):
            tensor = getattr(t, name)
            if tensor is not None and tensor.device != device:
                raise ValueError(f"backend='triton' needs every tensor of a group on one device: {name} is on {tensor.device}, the first param on {device}")
    for name, tensor in (("grad_scale", grad_scale), ("found_inf", found_inf)):
        if tensor is not None and tensor.device != device:
            raise ValueError(f"backend='triton' needs {name} on {device}, got {tensor.device}")


@dataclass
class Plan:
    """One group's step, checked and its device tables built, before anything changes."""

    device: torch.device
    block: int
    group: tables.GroupTables
    unit_first: list[int]
    unit_known: list[bool]
    #: the counters were copied to the device: the host increments the originals after the step
    host_counters: bool
    #: temporaries the tables point at (grads or masks copied into the param's layout, counters)
    keep_alive: tuple = ()


def prepare_group(
    tensors: list[TensorState],
    hyper: GroupHyper,
    *,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
) -> Plan:
    """Every check of a group's step, its device tables and its kernels (``compile_ahead``),
    changing nothing (a step whose ``tables.signature`` matches an earlier checked one reuses
    its tables unchecked): the optimizer prepares all groups before it steps the first, so that
    a bad group, or a kernel that fails to compile, leaves every group as it was."""
    device = tensors[0].param.device
    if device.type != "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError(
            f"backend='triton' cannot run on {device} under TRITON_INTERPRET=1: the interpreter copies "
            "kernel arguments to the host, but the kernels reach the tensors through device addresses"
        )
    block = _BLOCK.get(device.type, _BLOCK["cuda"])
    scored = functional.gated(tensors, hyper)
    unit_members = functional.gated_units(tensors, scored, hyper.scope)
    unit_of = [-1] * len(tensors)
    for index, members in enumerate(unit_members):
        for i in members:
            unit_of[i] = index
    unit_first = [members[0] for members in unit_members]
    unit_known = [not functional.threshold_may_be_unknown(tensors, members, hyper) for members in unit_members]

    signature = tables.signature(tensors, scored, unit_of, unit_known, block, device)
    group, host_counters, keep_alive = tables.checked_group(signature), False, ()
    if group is None:  # something changed since a step with these tensors: check it all again
        _check_device(tensors, device, grad_scale, found_inf)
        inputs = [tables.flat_inputs(t) for t in tensors]
        keys = [tables.bucket_key(t, grad, mask, scored[i]) for i, (t, (grad, mask)) in enumerate(zip(tensors, inputs))]
        counters, host_counters = _counters(tensors, device, found_inf)
        group = tables.group_tables(tensors, inputs, counters, keys, unit_of, unit_first, unit_known, block, device)
        copied = any(grad is not t.grad or mask is not t.user_mask for t, (grad, mask) in zip(tensors, inputs))
        if not (copied or host_counters):  # tables that point at temporaries are never reused
            tables.remember_checked(signature, group)
        keep_alive = (inputs, counters)
    elif grad_scale is not None and grad_scale.device != device or found_inf is not None and found_inf.device != device:
        _check_device(tensors, device, grad_scale, found_inf)
    plan = Plan(device, block, group, unit_first, unit_known, host_counters, keep_alive)
    compile_ahead(plan, hyper, grad_scale, found_inf)
    return plan


def step_group(
    tensors: list[TensorState],
    hyper: GroupHyper,
    *,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    plan: Optional[Plan] = None,
) -> tuple[Tensor, Tensor]:
    """One MaskedAdamW step of one param group on the device, in place (``reference.step_group``).

    Computes what ``reference.step_group`` computes, for params in float32, bfloat16, float16
    or float64, without reading anything back to the host. ``grad_scale`` (float32 [1]) unscales
    the grads; a nonzero ``found_inf`` (float32 [1]) leaves params, moments, importance, step
    counters and thresholds unchanged. Returns the step's stats (int64 counts, int64 per-unit
    thresholds): zeros and ``threshold.UNKNOWN`` for a skipped step. ``plan`` is this step's
    ``prepare_group`` (made now if not given). Callers go through ``op.fused_step``, the
    ``torch.library`` op, or ``op.step_group``.
    """
    if plan is None:
        plan = prepare_group(tensors, hyper, grad_scale=grad_scale, found_inf=found_inf)
    # Triton launches on the current CUDA device and its current stream: the params' device
    # must be current (params on cuda:1 while cuda:0 is current would run the kernels on GPU 0
    # with GPU 1's addresses)
    with _on(plan.device):
        return _launch(tensors, hyper, grad_scale, found_inf, plan)


def variant(plan: Plan, hyper: GroupHyper, grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> tuple:
    """Everything besides the group's tables that decides which kernels a step compiles."""
    dtypes = tuple(None if t is None else t.dtype for t in (grad_scale, found_inf))
    return (not all(plan.unit_known), hyper.density < 1.0, hyper.mask == "protect", hyper.gate_block, dtypes)


def compile_ahead(plan: Plan, hyper: GroupHyper, grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
    """Compile and load every kernel variant the step will launch, launching nothing (Triton's
    ``warmup``; a no-op under the interpreter), so that a compile or load error is raised while the
    optimizer prepares its groups, before it steps the first. Each group's tables remember the
    variants compiled. The per-step tensors are stood in for by one-element tensors of their
    dtypes (Triton specialises a pointer on its dtype and 16-byte alignment, which every fresh
    allocation has, like theirs)."""
    key = variant(plan, hyper, grad_scale, found_inf)
    if key in plan.group.compiled:
        return
    int64 = torch.empty(1, dtype=torch.int64, device=plan.device)
    float64 = torch.empty(1, dtype=torch.float64, device=plan.device)
    slots = _Slots(
        hyper=float64, grad_scale=grad_scale if grad_scale is not None else float64,
        found_inf=found_inf if found_inf is not None else float64, histogram=int64, prepass_thresholds=int64,
        counts=int64, next_thresholds=int64, stats_counts=int64, stats_thresholds=int64, scratch=int64,
    )
    with _on(plan.device):
        for phase in ("prepass", "step", "finish"):
            for kernel, _, args, constants in _calls(phase, plan, hyper, grad_scale, found_inf, slots):
                compiled = kernel.warmup(*args, grid=(1,), **constants)
                if hasattr(compiled, "result"):  # Triton's asynchronous compile mode
                    compiled = compiled.result()
                # loading the binary is lazy (at the first launch) and raises its own errors
                # (OutOfResources: shared memory, threads): load it now too
                load = getattr(compiled, "_init_handles", None)
                if load is not None:
                    load()
    plan.group.compiled.add(key)


@dataclass
class _Slots:
    """A step's arguments besides the group's tables (to compile ahead: stand-ins)."""

    hyper: object
    grad_scale: object
    found_inf: object
    histogram: object
    prepass_thresholds: object
    counts: object
    next_thresholds: object
    stats_counts: object
    stats_thresholds: object
    scratch: object


def _calls(phase: str, plan: Plan, hyper: GroupHyper, grad_scale: Optional[Tensor], found_inf: Optional[Tensor], slots: _Slots) -> list[tuple]:
    """The kernel launches of one phase of a step ("prepass", "step" or "finish"), each as
    (kernel, grid, args, constants): the one description that both ``_launch`` and
    ``compile_ahead`` use."""
    group, block, device = plan.group, plan.block, plan.device
    options = _compile_options(device)
    prepass = not all(plan.unit_known)
    protect = hyper.mask == "protect"
    units = group.unit_count > 0
    scaled, skippable = grad_scale is not None, found_inf is not None
    if phase == "finish":
        has_next = hyper.density < 1.0 and units and not protect or prepass
        args = (
            group.tensor_table, group.tensor_count, group.unit_table if units else slots.scratch, group.unit_count,
            slots.prepass_thresholds if units else slots.scratch,
            slots.next_thresholds if has_next else slots.scratch, slots.scratch, slots.found_inf,
            slots.counts, slots.stats_counts, slots.stats_thresholds if units else slots.scratch,
        )
        constants = dict(HAS_FOUND_INF=skippable, HAS_NEXT=has_next, KEEP_KNOWN=protect, BLOCK=_FINISH_BLOCK,
                         **({} if device.type == "cpu" else {"num_warps": _NUM_WARPS}))
        return [(_finish_step_kernel, (1,), args, constants)]
    calls = []
    for bucket in group.buckets:
        key = bucket.key
        if bucket.blocks == 0 or phase == "prepass" and not (prepass and key.gated):
            continue
        dtypes = dict(
            PARAM_DTYPE=tables.TRITON_DTYPES[key.param], GRAD_DTYPE=tables.TRITON_DTYPES[key.grad],
            MATH_DTYPE=tables.TRITON_DTYPES[key.math], IMPORTANCE_DTYPE=tables.TRITON_DTYPES[key.importance],
            ANCHOR_DTYPE=tables.TRITON_DTYPES[key.anchor or key.importance],
        )
        if phase == "prepass":
            args = (group.tensor_table, bucket.block_table, group.unit_table, slots.hyper, slots.grad_scale,
                    slots.found_inf, slots.histogram)
            constants = dict(
                **dtypes, HAS_ANCHOR=key.anchor is not None, HAS_USER_MASK=key.user_mask,
                HAS_GRAD_SCALE=scaled, HAS_FOUND_INF=skippable, GATE_BLOCK=hyper.gate_block, BLOCK=block, **options,
            )
        else:
            args = (
                group.tensor_table, bucket.block_table, group.unit_table if units else slots.counts, slots.hyper,
                slots.grad_scale, slots.found_inf, slots.prepass_thresholds if units else slots.counts,
                slots.histogram, slots.counts,
            )
            constants = dict(
                **dtypes, ANCHOR_PARAM_DTYPE=tables.TRITON_DTYPES[key.anchor_param or key.param],
                HAS_ANCHOR=key.anchor is not None, HAS_ANCHOR_PARAM=key.anchor_param is not None,
                HAS_USER_MASK=key.user_mask, HAS_GRAD_SCALE=scaled, HAS_FOUND_INF=skippable, GATED=key.gated,
                HISTOGRAM=key.gated and not protect, PREPASS_RAN=prepass, EMULATE_FMA=device.type == "cpu",
                ALIGNED=key.aligned, GATE_BLOCK=hyper.gate_block if key.gated else 1, BLOCK=block, **options,
            )
        kernel = _score_histogram_kernel if phase == "prepass" else _masked_adamw_kernel
        calls.append((kernel, (bucket.blocks,), args, constants))
    return calls


def _on(device: torch.device):
    """Triton launches (and compiles for) the current CUDA device: make ``device`` current."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def _launch(
    tensors: list[TensorState], hyper: GroupHyper, grad_scale: Optional[Tensor], found_inf: Optional[Tensor], plan: Plan,
) -> tuple[Tensor, Tensor]:
    device, group, unit_first, unit_known = plan.device, plan.group, plan.unit_first, plan.unit_known
    group.ready_on(device)  # cached tables may have been copied on another stream
    gated = hyper.density < 1.0
    protect = hyper.mask == "protect"
    hyper_table = _hyper_table(hyper, device)
    counts = group.fresh_counts.clone()
    # this step's stats: the finish kernel fills them unless found_inf skipped the step (then
    # zero counts and unknown thresholds, and the optimizer keeps the last step taken's:
    # functional.last_taken)
    histogram_shape = (group.unit_count, thr.NUM_BINS)
    slots = _Slots(
        hyper=hyper_table, grad_scale=grad_scale if grad_scale is not None else hyper_table,
        found_inf=found_inf if found_inf is not None else hyper_table, histogram=None,
        prepass_thresholds=group.unknown_thresholds, counts=counts, next_thresholds=None,
        stats_counts=torch.zeros(layout.COUNT_FIELDS, dtype=torch.int64, device=device),
        stats_thresholds=torch.full((group.unit_count,), thr.UNKNOWN, dtype=torch.int64, device=device),
        scratch=torch.empty(max(group.unit_count, 1), dtype=torch.int64, device=device),
    )

    prepass = not all(unit_known)
    prepass_histogram = None
    if prepass:
        prepass_histogram = slots.histogram = torch.zeros(histogram_shape, dtype=torch.int64, device=device)
        for kernel, grid, args, constants in _calls("prepass", plan, hyper, grad_scale, found_inf, slots):
            kernel[grid](*args, **constants)
        prepass_histogram = _reduce(prepass_histogram, unit_first, tensors)
        slots.prepass_thresholds = thr.threshold_bin(prepass_histogram, hyper.density, protect)

    # the step kernel counts the units the pre-pass did not (disjoint rows): unsharded, it adds
    # them into the pre-pass's histogram, one [U, NUM_BINS] buffer zeroed and no sum of two
    # (a select group launches the pre-pass every step); sharded, the pre-pass's rows were
    # already all-reduced, so the step counts into rows of its own
    shared = prepass_histogram is not None and not any(tensors[first].shard_groups for first in unit_first)
    if gated and not protect and group.unit_count:
        slots.histogram = prepass_histogram if shared else torch.zeros(histogram_shape, dtype=torch.int64, device=device)
    else:
        slots.histogram = counts
    for kernel, grid, args, constants in _calls("step", plan, hyper, grad_scale, found_inf, slots):
        kernel[grid](*args, **constants)

    if gated and group.unit_count and not protect:
        histogram = _reduce(slots.histogram, unit_first, tensors)
        if prepass_histogram is not None and not shared:
            histogram = histogram + prepass_histogram
        stored = torch.stack([tensors[first].threshold for first in unit_first])  # (not yet overwritten)
        slots.next_thresholds = thr.next_threshold_bin(histogram, hyper.density, protect, stored)
    elif prepass:
        slots.next_thresholds = slots.prepass_thresholds
    for kernel, grid, args, constants in _calls("finish", plan, hyper, grad_scale, found_inf, slots):
        kernel[grid](*args, **constants)
    if plan.host_counters:
        for t in tensors:
            t.step += 1
            t.importance_step += 1
    return slots.stats_counts, slots.stats_thresholds
