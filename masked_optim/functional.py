"""The functional entry point of one MaskedAdamW step: plain tensors in, dispatch to a backend.

The optimizer class owns validation and state; it hands each param group here as a list of
``TensorState`` (real views of complex tensors already taken) and the group's hyper-parameters.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Optional

import torch
from torch import Tensor
from torch.utils.weak import WeakIdKeyDictionary

from masked_optim import threshold as thr
from masked_optim.distributed import all_reduce_rows


def math_dtype(dtype: torch.dtype) -> torch.dtype:
    """Dtype of the arithmetic and the moments for a (real) param dtype: fp64 stays, others fp32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_moment_dtypes(param: Tensor, exp_avg: Tensor, exp_avg_sq: Tensor) -> None:
    """The moments are in ``math_dtype`` of the param's dtype (a complex param's own), as the
    optimizer makes them and a checkpoint load restores them (ValueError otherwise: the param's
    dtype changed after its state was made, e.g. ``model.double()``)."""
    expected = param.dtype if param.is_complex() else math_dtype(param.dtype)
    for name, moment in (("exp_avg", exp_avg), ("exp_avg_sq", exp_avg_sq)):
        if moment.dtype != expected:
            raise ValueError(
                f"{name} is {moment.dtype} for a {param.dtype} param (expected {expected}): the param's dtype changed "
                "after its state was made; opt.load_state_dict(opt.state_dict()) converts the state to the params' dtypes"
            )


@dataclass
class TensorState:
    """One parameter tensor and its optimizer state, as a backend sees them.

    All tensors are real (complex ones viewed as real) and share ``param``'s shape, except the
    0-dim counters. ``anchor``/``anchor_param`` are None before the first ``consolidate()``.
    ``threshold`` is the 0-dim int64 threshold bin of the tensor's unit (``threshold.UNKNOWN``
    when the next step must derive it from its own scores); ``threshold_known`` is the host's
    conservative view of that, used only to skip work.
    """

    param: Tensor
    grad: Tensor
    exp_avg: Tensor
    exp_avg_sq: Tensor
    importance: Tensor
    step: Tensor
    importance_step: Tensor
    threshold: Tensor
    threshold_known: bool = False
    anchor: Optional[Tensor] = None
    anchor_param: Optional[Tensor] = None
    #: process groups the tensor is sharded across (FSDP2); unit histograms are summed over them
    shard_groups: tuple = ()
    #: user-supplied fixed mask (``set_mask``): False elements never move and stay out of the
    #: histogram, so ``density`` is a fraction of the allowed elements
    user_mask: Optional[Tensor] = None


def check_state(t: TensorState) -> None:
    """What would make a step fail part-way, checked before any backend changes anything
    (ValueError naming the entry): every state tensor has its param's shape and device, the
    moments, importance and anchors a floating dtype, a user mask bool; the moments the
    param's math dtype (``check_moment_dtypes``)."""
    param = t.param
    for name in ("grad", "exp_avg", "exp_avg_sq", "importance", "anchor", "anchor_param", "user_mask"):
        tensor = getattr(t, name)
        if tensor is None:
            continue
        if tensor.shape != param.shape or tensor.device != param.device:
            raise ValueError(
                f"{name} of shape {tuple(tensor.shape)} on {tensor.device} does not match its param "
                f"(shape {tuple(param.shape)} on {param.device})"
            )
        if name == "user_mask" and tensor.dtype != torch.bool:
            raise ValueError(f"user_mask must be bool, got {tensor.dtype}")
        if name not in ("grad", "user_mask") and not tensor.is_floating_point():
            raise ValueError(f"{name} must have a floating dtype, got {tensor.dtype}")
    check_moment_dtypes(param, t.exp_avg, t.exp_avg_sq)


@dataclass
class GroupHyper:
    """A param group's hyper-parameters as plain Python values (lr may be a 1-element Tensor)."""

    lr: float | Tensor
    beta1: float
    beta2: float
    eps: float
    weight_decay: float
    density: float
    mask: str
    importance: str
    importance_beta: float
    protect_strength: float
    anchor_decay: float
    scope: str
    maximize: bool
    nonfinite: str
    #: elements per gate block (1: every element has its own gate)
    gate_block: int = 1

    @classmethod
    def from_group(cls, group: dict) -> "GroupHyper":
        beta1, beta2 = group["betas"]
        return cls(
            lr=group["lr"] if isinstance(group["lr"], Tensor) else float(group["lr"]), beta1=float(beta1), beta2=float(beta2), eps=float(group["eps"]),
            weight_decay=float(group["weight_decay"]), density=float(group["density"]),
            mask=group["mask"], importance=group["importance"],
            importance_beta=float(group["importance_beta"]),
            protect_strength=float(group["protect_strength"]),
            anchor_decay=float(group["anchor_decay"]), scope=group["scope"],
            maximize=bool(group["maximize"]), nonfinite=group["nonfinite"],
            gate_block=int(group["gate_block"]),
        )


@dataclass
class GroupStats:
    """Device-side counts of the last step of one group (``mask_stats`` reads them)."""

    elements: Tensor
    updated: Tensor
    frozen: Tensor
    skipped: Tensor
    thresholds: list[Tensor] = field(default_factory=list)
    #: per threshold, the indices in its param group's ``params`` of its unit's tensors (set by
    #: the optimizer, which knows the group: ``mask_stats`` labels the thresholds with them)
    units: list[list[int]] = field(default_factory=list)
    #: a bool on the device, true while every step of the group so far was skipped by the
    #: GradScaler (only for backends that do not read ``found_inf`` on the host); None: a step
    #: was taken
    never_taken: Optional[Tensor] = None
    #: elements a user mask (``set_mask``) holds, of ``elements`` (None: no tensor has a mask)
    masked: Optional[Tensor] = None


#: user mask -> (its version counter, the elements it holds): masks change only through
#: ``set_mask`` (a new tensor) or in place (a new version), so a steady step counts none
_held_counts = WeakIdKeyDictionary()


def _held(mask: Tensor) -> Tensor:
    """How many elements ``mask`` holds (False entries), as an int64 on its device, counted
    again only when the mask is new or was changed in place (its version counter moved)."""
    if torch.compiler.is_compiling():  # (a traced step counts every time: no Python cache)
        return mask.numel() - torch.count_nonzero(mask)
    cached = _held_counts.get(mask)
    if cached is None or cached[0] != mask._version:
        cached = (mask._version, mask.numel() - torch.count_nonzero(mask))
        _held_counts[mask] = cached
    return cached[1]


def masked_count(tensors: list[TensorState]) -> Optional[Tensor]:
    """How many elements of ``tensors`` their user masks hold (int64 on the device, no sync), or
    None when none has a mask. Each mask is counted once, not every step (``_held``): per
    mask a reduction and a subtraction a step had been ~300 kernel launches a step with masks
    on GPT-2 small's 148 tensors."""
    held = [_held(t.user_mask) for t in tensors if t.user_mask is not None]
    if not held:
        return None
    return held[0] if len(held) == 1 else torch.stack(held).sum()


def last_taken(previous: Optional[GroupStats], current: GroupStats, found_inf: Tensor) -> GroupStats:
    """The stats of the last step taken, chosen on the device (no host sync): ``current``'s
    unless ``found_inf`` skipped this step, then ``previous``'s. Where the skipped step had
    another number of thresholds (options changed, first consolidate, a grad that was None)
    they are ``current``'s: unknown, NaN in ``mask_stats``."""
    skipped = found_inf.reshape(-1)[0] != 0
    if previous is None:
        return GroupStats(current.elements, current.updated, current.frozen, current.skipped, current.thresholds,
                          current.units, skipped, current.masked)
    # stacked: one where per kind, not one per count and unit (GPT-2 has ~150 units)
    keep = torch.where(skipped, torch.stack([previous.elements, previous.updated, previous.frozen, previous.skipped]),
                       torch.stack([current.elements, current.updated, current.frozen, current.skipped])).unbind(0)
    thresholds = current.thresholds
    if thresholds and len(previous.thresholds) == len(thresholds):
        thresholds = list(torch.where(skipped, torch.stack(previous.thresholds), torch.stack(thresholds)).unbind(0))
    never_taken = None if previous.never_taken is None else previous.never_taken & skipped
    masked = current.masked
    if previous.masked is not None or masked is not None:
        zero = torch.zeros((), dtype=torch.int64, device=current.elements.device)
        masked = torch.where(skipped, zero if previous.masked is None else previous.masked, zero if masked is None else masked)
    return GroupStats(*keep, thresholds=thresholds, units=current.units, never_taken=never_taken, masked=masked)


def prepare(
    tensors: list[TensorState],
    hyper: GroupHyper,
    *,
    backend: str,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
) -> Any:
    """Every check one group's step makes (and the compiles and tables it needs), changing no
    tensor: raises what ``masked_adamw`` would. The result goes to ``masked_adamw(plan=...)``
    of the same step. A step over several groups prepares them all first, so that a group that
    cannot step leaves the others unchanged too."""
    return _implementation(backend).prepare_group(tensors, hyper, grad_scale=grad_scale, found_inf=found_inf)


def masked_adamw(
    tensors: list[TensorState],
    hyper: GroupHyper,
    *,
    backend: str,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    plan: Any = None,
) -> Optional[GroupStats]:
    """Take one MaskedAdamW step over one param group's tensors, in place.

    ``backend`` is a resolved backend name ("torch", "compile" or "triton"). ``grad_scale`` is the
    GradScaler's scale (grads are divided by it); a nonzero ``found_inf`` means the step is
    skipped and nothing at all changes: the "torch" and "compile" backends read it on the host and
    return None then; "triton" keeps it on the device and returns the stats it would have had.
    ``plan`` is this step's ``prepare`` of the same tensors, if made.
    """
    if backend in ("torch", "compile") and found_inf is not None and bool(found_inf.item()):
        return None  # host-side backends: the scaler skipped this step, nothing changes at all
    return _implementation(backend).step_group(tensors, hyper, grad_scale=grad_scale, found_inf=found_inf, plan=plan)


def _implementation(backend: str) -> Any:
    """The module implementing ``backend``: each has ``prepare_group`` and ``step_group`` with
    the signatures of ``prepare`` and ``masked_adamw`` (imported on first use: the reference
    must not import the kernels, nor the core import Triton before a group asks for it)."""
    if backend == "torch":
        from masked_optim import reference as implementation
    elif backend == "compile":
        from masked_optim import compiled as implementation
    elif backend == "triton":
        from masked_optim.kernels import op as implementation
    else:
        raise ValueError(f"Invalid backend: {backend!r}")
    return implementation


def observe(tensors: list[TensorState], hyper: GroupHyper, *, backend: str, grad_scale: Optional[Tensor] = None) -> None:
    """Update the running importance from the current grads only (SPEC steps 1-2), the grads
    divided by ``grad_scale`` if given."""
    from masked_optim import reference

    reference.observe_group(tensors, hyper, grad_scale)


def units(tensors: list[TensorState], scope: str) -> list[list[int]]:
    """Indices of ``tensors`` grouped into units: one per tensor, or the whole group."""
    if scope == "group":
        return [list(range(len(tensors)))] if tensors else []
    return [[index] for index in range(len(tensors))]


def gated(tensors: list[TensorState], hyper: GroupHyper) -> list[bool]:
    """Which tensors have a density gate this step: density < 1, and for ``protect`` an anchor."""
    return gate_flags([t.anchor is not None for t in tensors], hyper)


def gate_flags(has_anchor: list[bool], hyper: GroupHyper) -> list[bool]:
    """``gated`` from whether each tensor has an anchor (all the rule needs)."""
    if hyper.density >= 1.0:
        return [False] * len(has_anchor)
    if hyper.mask != "protect":
        return [True] * len(has_anchor)
    return list(has_anchor)


def gated_unit_count(has_anchor: list[bool], hyper: GroupHyper) -> int:
    """How many gated units (each with one threshold) a group's step has (``gated_units``'
    length), from whether each tensor has an anchor: the Triton op's fake (meta) kernel
    shapes its outputs with it."""
    flags = gate_flags(has_anchor, hyper)
    return int(any(flags)) if hyper.scope == "group" else sum(flags)


def gated_units(tensors: list[TensorState], is_gated: list[bool], scope: str) -> list[list[int]]:
    """The gated members of each unit (see ``units``); units without one are left out."""
    if not any(is_gated):
        return []
    units_ = ([i for i in unit if is_gated[i]] for unit in units(tensors, scope))
    return [members for members in units_ if members]


def _gated_units(tensors: list[TensorState], histograms: list, scope: str) -> list[list[int]]:
    return gated_units(tensors, [histogram is not None for histogram in histograms], scope)


def _rows(rows: list[Tensor]) -> Tensor:
    """``rows`` (1-D, equal sizes) as one [len(rows), n] tensor: a view when they already lie
    one after another in one buffer (the ``compile`` backend counts into reused rows), else a
    stack."""
    first = rows[0]
    n, itemsize, start = first.numel(), first.element_size(), first.data_ptr()
    storage = first.untyped_storage().data_ptr()
    if all(
        r.dim() == 1 and r.is_contiguous() and r.dtype == first.dtype and r.numel() == n
        and r.untyped_storage().data_ptr() == storage and r.data_ptr() == start + k * n * itemsize
        for k, r in enumerate(rows)
    ):
        return first.as_strided((len(rows), n), (n, 1))
    return torch.stack(rows)


def _derive(tensors: list[TensorState], units: list[list[int]], histograms: list, hyper: GroupHyper,
            following: bool = False) -> list[Tensor]:
    """Each unit's threshold from its histogram, summed over its tensors and FSDP2 shards: one
    ``threshold_bin`` over all the units at once (per unit, its ~50 small ops cost ~0.1 ms on a
    CPU, more than counting a small tensor's bins); ``following``: the threshold to store for
    the next step (``threshold.next_threshold_bin``)."""
    if not units:
        return []
    if all(len(members) == 1 for members in units):
        batch = _rows([histograms[members[0]]() for members in units])
    else:
        batch = torch.stack([_rows([histograms[i]() for i in members]).sum(0) for members in units])
    groups = [tensors[members[0]].shard_groups for members in units]
    if any(groups):  # summed in a copy: the backend's own rows stay as counted
        batch = all_reduce_rows(batch.clone(), groups)
    protect = hyper.mask == "protect"
    if following:
        stored = torch.stack([tensors[members[0]].threshold for members in units])
        return list(thr.next_threshold_bin(batch, hyper.density, protect, stored).unbind(0))
    return list(thr.threshold_bin(batch, hyper.density, protect).unbind(0))


def threshold_may_be_unknown(tensors: list[TensorState], members: list[int], hyper: GroupHyper,
                             read_host: bool = False) -> bool:
    """Whether the stored threshold of a gated unit may be < 0 (unknown or ``flagged``), so that
    this step may have to derive its threshold from its own scores: the host does not vouch for
    every member's, or, with select, the last step may have flagged it
    (``threshold.next_threshold_bin``). Only the device knows that, but with ``read_host`` a
    threshold on the CPU is read (a CPU read costs no sync; the Triton launcher never reads,
    as it may be traced by ``torch.compile``)."""
    if not all(tensors[i].threshold_known for i in members):
        return True
    if hyper.mask == "protect":  # protect never flags: its scores (the anchor) do not move
        return False
    stored = [tensors[i].threshold for i in members]
    if read_host and all(t.device.type == "cpu" for t in stored):
        return any(int(t) < 0 for t in stored)
    return True


def gate_thresholds(
    tensors: list[TensorState], histograms: list[Optional[Callable[[], Tensor]]], hyper: GroupHyper
) -> tuple[list[Optional[Tensor]], list[Tensor]]:
    """The threshold each tensor's gate uses this step (None: no gate, all move), and per unit.

    The reference and compile backends go through here and ``next_thresholds``; the Triton
    launcher does the same on the device (``kernels.launch``), with the same
    ``threshold.threshold_bin``. ``histograms[i]`` builds tensor i's histogram of this step's
    scores (``threshold.histogram_of_bins`` of their bins), or is None for a tensor
    without a gate (protect without anchor, density 1). A unit uses its stored threshold; one
    whose threshold may be unknown derives it from this step's scores, as
    ``where(stored >= 0, stored, derived)`` on the device (no host sync), so the histogram is
    only built when the host's hint says it may be needed.
    """
    per_tensor: list[Optional[Tensor]] = [None] * len(tensors)
    per_unit: list[Tensor] = []
    units = _gated_units(tensors, histograms, hyper.scope)
    unknown = [k for k, members in enumerate(units) if threshold_may_be_unknown(tensors, members, hyper, read_host=True)]
    derived = dict(zip(unknown, _derive(tensors, [units[k] for k in unknown], histograms, hyper)))
    for k, members in enumerate(units):
        stored = tensors[members[0]].threshold
        if k in derived:
            current = torch.where(stored >= 0, stored, derived[k])
        else:
            current = stored.clone()  # a copy: backends overwrite the stored one mid-step
        per_unit.append(current)
        for i in members:
            per_tensor[i] = current
    return per_tensor, per_unit


def next_thresholds(
    tensors: list[TensorState], histograms: list[Optional[Callable[[], Tensor]]], hyper: GroupHyper
) -> list[Optional[Tensor]]:
    """The threshold each tensor stores for the next step: select derives it from this step's
    scores (flagged where the one this step had lagged: ``threshold.next_threshold_bin``);
    protect keeps a known one (the anchor is fixed between consolidations)."""
    per_tensor: list[Optional[Tensor]] = [None] * len(tensors)
    units = _gated_units(tensors, histograms, hyper.scope)
    kept = [hyper.mask == "protect" and all(tensors[i].threshold_known for i in members) for members in units]
    derived = iter(_derive(tensors, [members for members, keep in zip(units, kept) if not keep], histograms, hyper,
                           following=True))
    for members, keep in zip(units, kept):
        following = tensors[members[0]].threshold if keep else next(derived)
        for i in members:
            per_tensor[i] = following
    return per_tensor
