"""``torch.ops.masked_optim.fused_step``: the Triton step registered through ``torch.library``.

Every ``backend="triton"`` step runs the launcher (``launch.step_group``): through this op
while ``torch.compile`` traces, directly in eager mode (``step_group``). Registering it lets
``torch.compile`` trace a training step with the optimizer inside without a graph break: Dynamo
and AOTAutograd see one opaque op that mutates the params and state in place (its fake
implementation only allocates the two small stats outputs), and Inductor calls the real
launcher at run time. Schema (per-tensor lists are parallel, one entry per param)::

    fused_step(params, grads, exp_avgs, exp_avg_sqs, importances, steps, importance_steps,
               thresholds, anchors, anchor_params, user_masks, threshold_known, shard_groups,
               lr, scalars, mask, importance, scope, nonfinite, grad_scale, found_inf)
        -> (counts int64[COUNT_FIELDS], thresholds int64[gated units])

``params``, the moments, importances, counters and thresholds are mutated. ``lr`` is the
group's Tensor lr (None: the float in ``scalars``); ``scalars`` packs the float options in
``_SCALARS`` order; ``shard_groups`` names the FSDP2 process groups of each tensor
(``";"`` between tensors, ``","`` between groups). The outputs are the step's stats, fresh
tensors (zero counts and unknown thresholds for a step ``found_inf`` skipped).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor
from torch.utils._python_dispatch import is_in_torch_dispatch_mode

from masked_optim.functional import GroupHyper, GroupStats, TensorState, gated_unit_count
from masked_optim.kernels import layout

_SCALARS = (
    "lr", "beta1", "beta2", "eps", "weight_decay", "density", "importance_beta",
    "protect_strength", "anchor_decay", "maximize", "gate_block",
)
_MUTATED = ("params", "exp_avgs", "exp_avg_sqs", "importances", "steps", "importance_steps", "thresholds")


def _encode_groups(tensors: list[TensorState]) -> str:
    return ";".join(",".join(group.group_name for group in t.shard_groups) for t in tensors)


def _decode_groups(encoded: str, count: int) -> list[tuple]:
    if not encoded.strip(";"):
        return [()] * count
    from torch.distributed.distributed_c10d import _resolve_process_group

    return [tuple(_resolve_process_group(name) for name in part.split(",") if name) for part in encoded.split(";")]


def _hyper(lr: Optional[Tensor], scalars: list[float], mask: str, importance: str, scope: str, nonfinite: str) -> GroupHyper:
    values = dict(zip(_SCALARS, scalars))
    return GroupHyper(
        lr=lr if lr is not None else values["lr"], beta1=values["beta1"], beta2=values["beta2"],
        eps=values["eps"], weight_decay=values["weight_decay"], density=values["density"], mask=mask,
        importance=importance, importance_beta=values["importance_beta"],
        protect_strength=values["protect_strength"], anchor_decay=values["anchor_decay"],
        scope=scope, maximize=bool(values["maximize"]), nonfinite=nonfinite, gate_block=int(values["gate_block"]),
    )


def _fused_step(
    params: list[Tensor],
    grads: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    importances: list[Tensor],
    steps: list[Tensor],
    importance_steps: list[Tensor],
    thresholds: list[Tensor],
    anchors: list[Optional[Tensor]],
    anchor_params: list[Optional[Tensor]],
    user_masks: list[Optional[Tensor]],
    threshold_known: list[bool],
    shard_groups: str,
    lr: Optional[Tensor],
    scalars: list[float],
    mask: str,
    importance: str,
    scope: str,
    nonfinite: str,
    grad_scale: Optional[Tensor],
    found_inf: Optional[Tensor],
) -> tuple[Tensor, Tensor]:
    """One MaskedAdamW step of one param group on the device (``launch.step_group``)."""
    from masked_optim.kernels import launch

    groups = _decode_groups(shard_groups, len(params))
    tensors = [
        TensorState(
            param=p, grad=g, exp_avg=m, exp_avg_sq=v, importance=s, step=t, importance_step=ts,
            threshold=tau, threshold_known=known, anchor=a, anchor_param=ap, shard_groups=sg, user_mask=um,
        )
        for p, g, m, v, s, t, ts, tau, known, a, ap, sg, um in zip(
            params, grads, exp_avgs, exp_avg_sqs, importances, steps, importance_steps, thresholds,
            threshold_known, anchors, anchor_params, groups, user_masks,
        )
    ]
    hyper = _hyper(lr, scalars, mask, importance, scope, nonfinite)
    counts, unit_thresholds = launch.step_group(tensors, hyper, grad_scale=grad_scale, found_inf=found_inf)
    return counts, unit_thresholds


fused_step = torch.library.custom_op("masked_optim::fused_step", mutates_args=_MUTATED)(_fused_step)


@fused_step.register_fake
def _(params, grads, exp_avgs, exp_avg_sqs, importances, steps, importance_steps, thresholds, anchors,
      anchor_params, user_masks, threshold_known, shard_groups, lr, scalars, mask, importance, scope,
      nonfinite, grad_scale, found_inf):
    hyper = _hyper(lr, scalars, mask, importance, scope, nonfinite)
    units = gated_unit_count([a is not None for a in anchors], hyper)
    device = params[0].device
    return (
        torch.empty(layout.COUNT_FIELDS, dtype=torch.int64, device=device),
        torch.empty(units, dtype=torch.int64, device=device),
    )


def _direct_call_allowed(params: list[Tensor], grads: list[Tensor]) -> bool:
    """Whether the dispatcher has nothing to do: plain tensors, no mode to honour, no tracing."""
    if torch.compiler.is_compiling() or is_in_torch_dispatch_mode() or torch._C._is_torch_function_mode_enabled():
        return False
    return all(type(t) in _PLAIN for t in params) and all(type(t) in _PLAIN for t in grads)


_PLAIN = (Tensor, torch.nn.Parameter)


def prepare_group(
    tensors: list[TensorState],
    hyper: GroupHyper,
    *,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
):
    """The eager step's checks and tables (``launch.prepare_group``), changing nothing; None
    where the step goes through the op (under ``torch.compile`` or a mode: the op checks each
    group as it steps it)."""
    if not _direct_call_allowed([t.param for t in tensors], [t.grad for t in tensors]):
        return None
    from masked_optim.kernels import launch

    return launch.prepare_group(tensors, hyper, grad_scale=grad_scale, found_inf=found_inf)


def step_group(
    tensors: list[TensorState],
    hyper: GroupHyper,
    *,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    plan=None,
) -> GroupStats:
    """One group's Triton step: the registered op while ``torch.compile`` traces, under a
    dispatch or function mode (e.g. ``FakeTensorMode``) or for tensor subclasses, else the
    launcher called directly with the group's ``TensorState``s.

    Eagerly the dispatcher would only add its wrappers and bump the version counter of every
    mutated tensor, ~2 ms of host time per step on GPT-2 small's 148 tensors (7 state lists),
    and packing the op's arguments and unpacking them again ~0.25 ms more; here the launcher
    gets the group's tensors as they are and only the params' versions are bumped (what
    autograd checks: a graph that saved a param before the step refuses to backward through
    it, as with torch.optim). ``plan``: this step's ``prepare_group``, if made.
    """
    params = [t.param for t in tensors]
    if plan is not None or _direct_call_allowed(params, [t.grad for t in tensors]):  # a plan: it was
        from masked_optim.kernels import launch

        counts, unit_thresholds = launch.step_group(tensors, hyper, grad_scale=grad_scale, found_inf=found_inf, plan=plan)
        torch.autograd.graph.increment_version(params)
    else:
        counts, unit_thresholds = torch.ops.masked_optim.fused_step(*_op_args(tensors, hyper, grad_scale, found_inf))
    return GroupStats(
        elements=counts[layout.ELEMENTS], updated=counts[layout.UPDATED], frozen=counts[layout.FROZEN],
        skipped=counts[layout.SKIPPED], thresholds=list(unit_thresholds.unbind(0)),
    )


def _op_args(tensors: list[TensorState], hyper: GroupHyper, grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> tuple:
    """``fused_step``'s arguments: per-tensor lists, the float options packed, the groups named."""
    lr = hyper.lr if isinstance(hyper.lr, Tensor) else None
    scalars = [0.0 if lr is not None else float(hyper.lr), hyper.beta1, hyper.beta2, hyper.eps,
               hyper.weight_decay, hyper.density, hyper.importance_beta, hyper.protect_strength,
               hyper.anchor_decay, float(hyper.maximize), float(hyper.gate_block)]
    return (
        [t.param for t in tensors], [t.grad for t in tensors], [t.exp_avg for t in tensors],
        [t.exp_avg_sq for t in tensors], [t.importance for t in tensors], [t.step for t in tensors],
        [t.importance_step for t in tensors], [t.threshold for t in tensors], [t.anchor for t in tensors],
        [t.anchor_param for t in tensors], [t.user_mask for t in tensors], [t.threshold_known for t in tensors],
        _encode_groups(tensors), lr, scalars, hyper.mask, hyper.importance, hyper.scope, hyper.nonfinite,
        grad_scale, found_inf,
    )
