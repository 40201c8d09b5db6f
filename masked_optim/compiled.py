"""The ``compile`` backend: SPEC's step per tensor as one ``torch.compile``-fused loop (CPU path).

Each tensor's whole step — importance, score bins, gate, restoring force, scaled AdamW — is one
function that ``torch.compile`` (Inductor) turns into a single vectorised loop over the tensor.
Hyper-parameters and per-step values (lr, bias corrections, ...) arrive packed in one float64
tensor, so a scheduler changing lr never recompiles; feature flags (importance kind, gate mode,
anchor present, ...) are Python values and compile one variant each. Score bins are written as
int32 into a reused buffer and counted (``cpu_histogram`` on the CPU, ``torch.bincount``
elsewhere) for the next step's threshold. A
step whose threshold is not known yet runs a first compiled pass that only updates the
importance and bins the scores.
The step's counts (updated, frozen, non-finite skipped) are reductions fused into the same loop.
Small tensors of one kind (biases, norms) are concatenated and stepped by one call
(``batches``): a compiled call's host cost (~50 us) exceeds their whole step.
With block gates (``gate_block`` > 1) every gated tensor takes the first pass each step; the
block maxima of its bins and the gate they give are the reference's (``reference.GateBins``),
taken between the passes, and the gate reaches the step in the user mask's place.
"""
from __future__ import annotations

import collections
import functools
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor

from masked_optim import batches as batching
from masked_optim import cpu_histogram, scratch
from masked_optim import threshold as thr
from masked_optim.functional import (
    GroupHyper, GroupStats, TensorState, gate_thresholds, gated, gated_units, math_dtype, next_thresholds,
    threshold_may_be_unknown,
)
from masked_optim.layouts import checked_inputs, memory_order_view
from masked_optim.reference import DELTA, GateBins, importance_signal

# index of each value in the packed scalar tensor; products and differences of hyper-parameters
# are formed in double on the host, exactly as the reference's Python-float arithmetic does
(LR, ONE_MINUS_BETA1, BETA2, ONE_MINUS_BETA2, EPS, WD, DECAY, STEP_SIZE, BC1, BC2_SQRT, BETA_S,
 ONE_MINUS_BETA_S, INV_S_CORRECTION, INV_SCALE, LAMBDA, LR_MU) = range(16)
_SCALARS = 16


def _scalars(
    step: float, importance_step: float, hyper: GroupHyper, grad_scale: Optional[Tensor], device: torch.device
) -> Tensor:
    lr = float(hyper.lr)
    bias_correction1 = 1 - hyper.beta1**step
    values = [
        lr, 1 - hyper.beta1, hyper.beta2, 1 - hyper.beta2, hyper.eps, hyper.weight_decay,
        1 - lr * hyper.weight_decay, lr / bias_correction1, bias_correction1,
        (1 - hyper.beta2**step) ** 0.5, hyper.importance_beta, 1.0 - hyper.importance_beta,
        1.0 / (1.0 - hyper.importance_beta**importance_step), 1.0, hyper.protect_strength,
        lr * hyper.anchor_decay,
    ]
    packed = torch.tensor(values, dtype=torch.float64, device=device)  # beside the params: no mixed devices
    if grad_scale is not None:
        packed[INV_SCALE] = grad_scale.double().reciprocal().float().double()
    return packed


def _grad(grad: Tensor, scalars: Tensor, dtype: torch.dtype, scaled: bool, maximize: bool) -> Tensor:
    g = grad.to(dtype)
    if scaled:
        g = g * scalars[INV_SCALE].to(torch.float32).to(dtype)
    return -g if maximize else g


def _new_importance(param, g, importance, live, scalars, kind):
    x = importance_signal(g, param.to(g.dtype), kind).to(torch.float32)
    s_new = importance.float() * scalars[BETA_S].float() + x * scalars[ONE_MINUS_BETA_S].float()
    if live is not None:
        s_new = torch.where(live, s_new, importance.float())
    return s_new.to(importance.dtype)


#: Inductor's C++ codegen before torch 2.13 folds an in-register fp32->bf16->fp32 round trip
#: back to the unrounded fp32 value even with emulate_precision_casts (pytorch#185337)
_FOLDS_BF16_ROUND_TRIP = torch.torch_version.TorchVersion(torch.__version__) < (2, 13)


def _widen(x):
    """``x.float()``; where Inductor would fold the rounding away, a bf16 value widened by its bit
    pattern (exact, but the C++ loop is then not vectorised)."""
    if x.dtype != torch.bfloat16 or not _FOLDS_BF16_ROUND_TRIP:
        return x.float()
    return (x.view(torch.int16).to(torch.int32) << 16).view(torch.float32)


def _bins(importance, anchor, scalars, protect):
    if protect:
        return thr.score_bins(anchor.float())
    s_hat = _widen(importance) * scalars[INV_S_CORRECTION].float()
    score = s_hat if anchor is None else s_hat / (anchor.float() + DELTA)
    return thr.score_bins(score)


def importance_pass(param, grad, importance, anchor, scalars, bins_out, *, kind, skip, scaled, maximize, protect):
    """First pass of a step whose threshold is unknown: update importance, write score bins."""
    g = _grad(grad, scalars, math_dtype(param.dtype), scaled, maximize)
    live = torch.isfinite(g) if skip else None
    s_new = _new_importance(param, g, importance, live, scalars, kind)
    importance.copy_(s_new)
    bins_out.copy_(_bins(s_new, anchor, scalars, protect))


def fused_step(
    param, grad, exp_avg, exp_avg_sq, importance, anchor, anchor_param, user_mask, threshold, scalars, bins_out,
    *, kind, skip, scaled, maximize, gate, soft, pull, update_importance, high_weight,
):
    """One tensor's whole step in place, score bins into ``bins_out`` if given; returns the
    counts [updated, frozen, skipped]."""
    dtype = math_dtype(param.dtype)
    g = _grad(grad, scalars, dtype, scaled, maximize)
    live = torch.isfinite(g) if skip else None
    s_new = _new_importance(param, g, importance, live, scalars, kind) if update_importance else importance
    bins = _bins(s_new, anchor, scalars, gate == "protect") if (gate is not None or bins_out is not None) else None
    k = None if gate is None else thr.gate(bins, threshold, gate == "protect")
    if user_mask is not None:
        k = user_mask if k is None else k & user_mask
    moving = live if k is None else (k if live is None else k & live)
    theta = param.to(dtype)
    pulled = theta
    if pull:
        weight = (anchor.to(dtype) * scalars[LR_MU].to(dtype)).clamp(max=1.0)
        pulled = theta.lerp(anchor_param.to(dtype), weight)
    # torch's lerp with its branch (|weight| < 0.5 or not) taken on the host, not per element,
    # and a multiply by the reciprocal bias correction: ~5% of a CPU step, within a unit in the
    # last place of torch's
    weight = scalars[ONE_MINUS_BETA1].to(dtype)
    m = g - (g - exp_avg) * (1 - weight) if high_weight else exp_avg + (g - exp_avg) * weight
    v = exp_avg_sq * scalars[BETA2].to(dtype) + g * g * scalars[ONE_MINUS_BETA2].to(dtype)
    denom = v.sqrt() * (1.0 / scalars[BC2_SQRT]).to(dtype) + scalars[EPS].to(dtype)
    if soft:  # the reference's per-element learning rate lr*c
        lr_element = (1.0 / (1.0 + scalars[LAMBDA].float() * anchor.float())).to(dtype) * scalars[LR].to(dtype)
        new_theta = pulled * (1 - lr_element * scalars[WD].to(dtype)) - (lr_element / scalars[BC1].to(dtype)) * m / denom
    else:
        new_theta = pulled * scalars[DECAY].to(dtype) - scalars[STEP_SIZE].to(dtype) * (m / denom)
    if moving is None:  # every element moves: no gate, no mask, non-finite grads propagate
        new_param = new_theta.to(param.dtype)
        new_m, new_v = m, v
    else:
        new_param = torch.where(moving, new_theta, theta).to(param.dtype)
        new_m, new_v = torch.where(moving, m, exp_avg), torch.where(moving, v, exp_avg_sq)
    param.copy_(new_param)
    exp_avg.copy_(new_m)
    exp_avg_sq.copy_(new_v)
    if update_importance:
        importance.copy_(s_new)
    if bins_out is not None:
        bins_out.copy_(bins)
    return _counts(g.numel(), moving, k, live, new_param)


def _counts(numel, moving, k, live, written):
    """[updated, frozen, skipped], with as few reductions as the flags allow.

    ``written > inf`` is never true; or-ing it into every counted flag makes the counts read a
    value the step writes (the new param). That orders the reductions after the element-wise
    step, and Inductor then fuses them into the step's one loop instead of running a loop of its
    own first (one more read of the grads: ~20% of a 16M-element step with ``nonfinite="skip"``
    on a 2-core CPU). Partial sums are int32 where they cannot overflow.
    """
    accumulate = torch.int32 if numel < 2**31 else torch.int64
    never = written > float("inf")

    def count(flag):
        return (flag | never).sum(dtype=accumulate).to(torch.int64)

    total = torch.full((), numel, dtype=torch.int64, device=written.device)
    zero = torch.zeros((), dtype=torch.int64, device=written.device)
    skipped = zero if live is None else count(~live)
    frozen = zero if k is None else count(~k)
    if moving is None:
        updated = total
    elif k is None:  # moving == live
        updated = total - skipped
    else:
        updated = count(moving)
    return torch.stack([updated, frozen, skipped])


#: one compiled variant per combination of feature flags and dtypes: a hyper-parameter sweep in
#: one process builds dozens (about six per configuration), far more than Dynamo's default of 8
#: per function (and, with fullgraph, a hard failure past it), so ``step_group`` lifts the
#: per-function and the process-wide limits while it runs; each variant costs its compile
#: time once, and a new one is compiled before a step changes anything (``_prepare``)
RECOMPILE_LIMIT = 1 << 16


@functools.lru_cache(maxsize=None)
def _recompile_limits() -> dict[str, int]:
    """Dynamo's per-function and process-wide limits by the names this torch has (older ones:
    ``cache_size_limit``, ``accumulated_cache_size_limit``)."""
    config = torch._dynamo.config
    limits = {}
    for current, older in (("recompile_limit", "cache_size_limit"), ("accumulated_recompile_limit", "accumulated_cache_size_limit")):
        for name in (current, older):
            if hasattr(config, name):
                limits[name] = RECOMPILE_LIMIT
                break
    return limits


@functools.lru_cache(maxsize=None)
def _compiled_function(name: str):
    return torch.compile(_FUNCTIONS[name], dynamic=True, fullgraph=True, options=INDUCTOR_OPTIONS)


#: emulate_precision_casts: round a bf16 importance before scoring it, as stored (and as the
#: reference does); Inductor would otherwise score the unrounded fp32 value.
#: cpp.dynamic_threads: every loop gets an OpenMP scope and the runtime splits it. Otherwise
#: Inductor decides at compile time from the size it first sees (a hint, not a guard): a
#: variant first compiled for a small tensor (or loaded from the on-disk cache, which ignores
#: hints) runs a 16M-element step's counting reduction on one thread (21 ms instead of 13 ms).
INDUCTOR_OPTIONS = {"emulate_precision_casts": True, "cpp.dynamic_threads": True}


#: single-element tensors run the same function eagerly: Dynamo specialises size 1, so each
#: would build a variant of its own. Anything larger is compiled: even at 768 elements the
#: compiled step takes a third of the eager one's ~60 small ops (GPT-2's 86 bias and norm
#: tensors: 4.8 ms a step instead of 12.9 ms on 2 cores)
MIN_COMPILED_NUMEL = 2


def _compiled(name: str):
    eager = _FUNCTIONS[name]

    def call(*args, **kwargs):  # under step_group's raised recompile limit
        if args[0].numel() < MIN_COMPILED_NUMEL:
            return eager(*args, **kwargs)
        return _compiled_function(name)(*args, **kwargs)

    return call


_FUNCTIONS = {"fused_step": fused_step, "importance_pass": importance_pass}
#: positions of each function's param-sized arguments (the others: thresholds, scalars)
_ELEMENTWISE = {"fused_step": (0, 1, 2, 3, 4, 5, 6, 7, 10), "importance_pass": (0, 1, 2, 3, 5)}
#: position of the threshold: 0-d (one unit), or 1-D and param-sized (a batch of several units)
_THRESHOLD = {"fused_step": 8}
#: the variants this process has compiled: (function, device, each argument's dtype and rank,
#: options); forgotten when Dynamo has dropped them (``torch._dynamo.reset()``, ``_forget_dropped``)
_READY: set = set()
#: Dynamo's cache entries of a code object (an introspection hook it has kept since torch 2.1)
_CACHE_ENTRIES = getattr(torch._C._dynamo.eval_frame, "_debug_get_cache_entry_list", None)


def _forget_dropped() -> None:
    """Forget the variants of a function whose code Dynamo no longer holds compiled (after
    ``torch._dynamo.reset()``): the check compiles them again, instead of the step itself
    midway (where a compiler failure would leave it half-applied)."""
    if _CACHE_ENTRIES is None or not _READY:
        return
    for name, function in _FUNCTIONS.items():
        if not _CACHE_ENTRIES(function.__code__):
            _READY.difference_update([key for key in _READY if key[0] == name])


def _prepare(name: str, args: tuple, kwargs: dict) -> None:
    """Compile the variant a call needs on two-element stand-ins of its param-sized arguments,
    unless this process has it already: a step then compiles every variant it needs before it
    changes anything, so a compiler failure leaves nothing half-applied."""
    key = (name, args[0].device, tuple(None if a is None else (a.dtype, a.dim()) for a in args), tuple(kwargs.items()))
    if key in _READY:
        return
    stand_ins = [
        None if a is None else torch.zeros(2, *a.shape[1:], dtype=a.dtype, device=a.device) if _elementwise(name, index, a)
        else a.clone()
        for index, a in enumerate(args)
    ]
    _compiled_function(name)(*stand_ins, **kwargs)
    _READY.add(key)


def _elementwise(name: str, index: int, arg: Tensor) -> bool:
    return index in _ELEMENTWISE[name] or (index == _THRESHOLD.get(name) and arg.dim() == 1)


def _bins_scratch(device: torch.device, numel: int) -> Tensor:
    """A tensor's score bins: one reused int32 buffer (``scratch``), grown to the largest gated
    tensor (int32, not int16: Inductor's CPU backend vectorises no int16 store)."""
    return scratch.reused("score bins", device, torch.int32, numel)


def _histograms_scratch(device: torch.device, rows: int) -> Tensor:
    """The histograms of one step's gated tensors, one row each, in one reused int64 [rows,
    NUM_BINS] buffer (``scratch``; consecutive rows: the thresholds read them as one batch)."""
    return scratch.reused("histograms", device, torch.int64, rows * thr.NUM_BINS).view(rows, thr.NUM_BINS)


def _histogram(bins: Tensor, where: Optional[Tensor], out: Tensor) -> Tensor:
    """The histogram of a tensor's score bins into ``out``: on the CPU a C++ loop ~2.5x faster
    than ``torch.bincount`` (``cpu_histogram``), elsewhere ``torch.bincount``."""
    if bins.device.type == "cpu" and out.device.type == "cpu":
        return cpu_histogram.histogram_of_bins(bins, where, out=out)
    return out.copy_(thr.histogram_of_bins(bins, where))


def _flat_inputs(t: TensorState) -> tuple[Optional[Tensor], ...]:
    """One tensor's (param, grad, exp_avg, exp_avg_sq, importance, anchor, anchor_param,
    user_mask) as 1-D views in the param's memory order, checked before the step changes
    anything (``layouts.checked_inputs``: any dense param layout steps)."""
    param = t.param
    grad, mask = checked_inputs(t, "compile")
    # every param goes in detached (a plain tensor, same storage and version counter), as the
    # stand-ins its variant was compiled on: Dynamo guards on a Parameter's type and
    # requires_grad and keeps its shape static, so a Parameter compiled a variant of its own in
    # the step, one per size (and Dynamo refuses a param whose .grad has another dtype)
    inputs = (param.detach(), grad, t.exp_avg, t.exp_avg_sq, t.importance, t.anchor, t.anchor_param, mask)
    if param.dim() == 1:  # dense, and every input laid out like it (checked): 1-D views already
        return inputs
    return tuple(None if x is None else memory_order_view(x) for x in inputs)


#: a tensor of a multiple of this many elements (two rows or more) steps as [n / ROW, ROW] views
#: of its inputs: Inductor then knows the inner loop's length and emits no tail. For a 1-D
#: dynamic size it emits a masked tail inside the vectorised loop, and with bf16 importance that
#: loop ran 15.2 ms instead of 11.2 ms at 16M elements (fp32: the same 9.2 ms), 2 cores
ROW = 16


def _in_rows(inputs: tuple[Optional[Tensor], ...]) -> tuple[Optional[Tensor], ...]:
    """A tensor's flat inputs as [n / ROW, ROW] views where its size allows (else as they are)."""
    numel = inputs[0].numel()
    if numel % ROW or numel < 2 * ROW:
        return inputs
    return tuple(None if x is None else x.view(-1, ROW) for x in inputs)


def _like(bins: Tensor, inputs: tuple[Optional[Tensor], ...]) -> Tensor:
    """The flat ``bins`` buffer shaped as the tensor's inputs are (``_in_rows``)."""
    return bins if inputs[0].dim() == 1 else bins.view(-1, ROW)


@dataclass
class Plan:
    """One group's step, checked and its compiled variants built, before anything changes."""

    flat: list[tuple]  # each tensor's inputs as 1-D views in its param's memory order
    shaped: list[tuple]  # the same as its compiled calls take them (``_in_rows``)
    has_gate: list[bool]
    calls: list[tuple]  # per tensor: the first pass's options (or None), the step's, binned
    batches: list[batching.Batch]  # small tensors stepped as one (``batches``)
    batched: list[bool]  # per tensor: whether it is a member of a batch


def prepare_group(tensors: list[TensorState], hyper: GroupHyper, *, grad_scale: Optional[Tensor] = None,
                  found_inf: Optional[Tensor] = None) -> Plan:
    """Every check of a group's step and every compile it needs, changing nothing: the
    optimizer prepares all groups before it steps the first, so that a bad group leaves every
    group as it was."""
    with torch._dynamo.config.patch(**_recompile_limits()):
        return _plan(tensors, hyper, grad_scale)


def step_group(
    tensors: list[TensorState],
    hyper: GroupHyper,
    *,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    plan: Optional[Plan] = None,
) -> Optional[GroupStats]:
    """One MaskedAdamW step of one param group through the compiled per-tensor loops
    (``plan``: this step's ``prepare_group``, made now if not given)."""
    # the limit is raised once per group step: patching Dynamo's config costs ~80 us a call
    with torch._dynamo.config.patch(**_recompile_limits()):
        if plan is None:
            plan = _plan(tensors, hyper, grad_scale)
        return _step_group(tensors, hyper, grad_scale, plan)


def _plan(tensors: list[TensorState], hyper: GroupHyper, grad_scale: Optional[Tensor]) -> Plan:
    _forget_dropped()
    protect = hyper.mask == "protect"
    flags = dict(kind=hyper.importance, skip=hyper.nonfinite == "skip", scaled=grad_scale is not None, maximize=hyper.maximize)
    has_gate = gated(tensors, hyper)
    blocks = hyper.gate_block > 1
    # a unit whose threshold may be unknown derives it from this step's scores of all its gated
    # tensors, so if any of them lacks a known threshold (a new param, a grad that appears late,
    # set_mask) every one of them takes the first pass
    flat = [_flat_inputs(t) for t in tensors]  # every check before anything changes
    if any(has_gate) and any(t.param.device.type == "cpu" for t in tensors):
        cpu_histogram._library()  # built or loaded now: a failed build changes nothing
    first_pass = [False] * len(tensors)
    units = gated_units(tensors, has_gate, hyper.scope)
    for members in units:
        if blocks or threshold_may_be_unknown(tensors, members, hyper, read_host=True):
            for i in members:
                first_pass[i] = True
    device = tensors[0].param.device if tensors else torch.device("cpu")
    scalars_like = torch.zeros(_SCALARS, dtype=torch.float64, device=device)
    threshold_like = torch.zeros((), dtype=torch.int64, device=device)
    bins_like = torch.zeros(0, dtype=torch.int32, device=device)
    calls = []
    for i, t in enumerate(tensors):
        first = dict(protect=protect, **flags) if first_pass[i] else None
        step = dict(
            gate=("protect" if protect else "select") if has_gate[i] and not blocks else None,
            soft=t.anchor is not None and hyper.protect_strength != 0.0,
            pull=t.anchor is not None and t.anchor_param is not None and hyper.anchor_decay != 0.0,
            update_importance=not first_pass[i], high_weight=abs(1.0 - hyper.beta1) >= 0.5, **flags,
        )
        binned = has_gate[i] and not first_pass[i] and not protect
        calls.append((first, step, binned))
    batches = _batches(tensors, flat, calls, units)
    batched = [False] * len(tensors)
    for batch in batches:
        for i in batch.members:
            batched[i] = True
    likes = (scalars_like, bins_like)
    shaped = [inputs if batched[i] else _in_rows(inputs) for i, inputs in enumerate(flat)]
    for i, t in enumerate(tensors):  # each call's variant, compiled now
        if t.param.numel() >= MIN_COMPILED_NUMEL and not batched[i]:
            inputs = _gate_in_mask(shaped[i]) if blocks and has_gate[i] else shaped[i]
            _prepare_calls(calls[i], inputs, threshold_like if has_gate[i] and not blocks else None, *likes)
    for batch in batches:
        first = batch.members[0]
        if blocks and has_gate[first]:
            _prepare_calls(calls[first], _gate_in_mask(flat[first]), None, *likes)
            continue
        gate_like = None if not has_gate[first] else threshold_like if batch.shared_gate else threshold_like.reshape(1)
        _prepare_calls(calls[first], flat[first], gate_like, *likes)
    return Plan(flat=flat, shaped=shaped, has_gate=has_gate, calls=calls, batches=batches, batched=batched)


def _gate_in_mask(inputs: tuple, gate: Optional[Tensor] = None) -> tuple:
    """A block-gated tensor's inputs with its gate (and-ed with its user mask) in the mask's
    place, shaped as the inputs are; without ``gate``, a stand-in of that shape (to compile)."""
    if gate is None:
        return (*inputs[:7], torch.ones((), dtype=torch.bool, device=inputs[0].device).expand(inputs[0].shape))
    if inputs[7] is not None:
        gate = gate & inputs[7].reshape(-1)
    return (*inputs[:7], _like(gate, inputs))


def _prepare_calls(call: tuple, inputs: tuple, gate_like: Optional[Tensor], scalars_like: Tensor, bins_like: Tensor) -> None:
    """Compile the variants of one tensor's (or batch's) calls (``_prepare``)."""
    first, step, binned = call
    param, grad, _, _, importance, anchor, _, _ = inputs
    bins_like = _like(bins_like, inputs)
    if first is not None:
        _prepare("importance_pass", (param, grad, importance, anchor, scalars_like, bins_like), first)
    _prepare("fused_step", (*inputs, gate_like, scalars_like, bins_like if binned else None), step)


def _batches(tensors: list[TensorState], flat: list[tuple], calls: list[tuple], units: list[list[int]]) -> list[batching.Batch]:
    """Small tensors that step as one: same device, input dtypes, options and step counts."""
    # small ones only, and not a param listed twice (torch warns, and steps it twice)
    addresses = [t.param.data_ptr() if 0 < t.param.numel() <= batching.MAX_BATCHED_NUMEL else None for t in tensors]
    listed = collections.Counter(addresses)
    keys = []
    for t, inputs, (first, step, binned), address in zip(tensors, flat, calls, addresses):
        keys.append(None if address is None or listed[address] > 1 else (
            t.param.device, *[None if x is None else x.dtype for x in inputs],  # (every tensor's option
            None if first is None else tuple(first.values()), *step.values(), binned,  # dicts have the same
            t.step.item(), t.importance_step.item(),  # keys in the same order)
        ))
    return batching.group(keys, [t.param.numel() for t in tensors], units)


def _step_group(tensors: list[TensorState], hyper: GroupHyper, grad_scale: Optional[Tensor], plan: Plan) -> GroupStats:
    flat, has_gate, calls, batched = plan.flat, plan.has_gate, plan.calls, plan.batched
    device = tensors[0].param.device if tensors else torch.device("cpu")
    # each tensor's histogram is counted right after the pass that bins its scores, so that one
    # scratch buffer of bins serves every tensor; the histograms go to consecutive rows of one
    # reused buffer, which the thresholds read as one batch (functional._rows)
    counted: list[Optional[Tensor]] = [None] * len(tensors)
    gated_rows = [i for i, gated_ in enumerate(has_gate) if gated_]
    scratch_rows = _histograms_scratch(device, len(gated_rows)) if gated_rows else None
    row_of = {i: scratch_rows[r] for r, i in enumerate(gated_rows)}
    gate_bins: list[Optional[GateBins]] = [None] * len(tensors)  # block gates' (gate_block > 1)
    histograms = [(lambda i=i: counted[i] if gate_bins[i] is None else gate_bins[i].histogram(out=row_of[i]))
                  if gated else None for i, gated in enumerate(has_gate)]

    def count(members: list[int], bins: list[Tensor], masks: list[Optional[Tensor]]) -> None:
        for i, piece, where in zip(members, bins, masks):
            if hyper.gate_block > 1:  # block maxima now (``bins`` is reused); a histogram when asked
                gate_bins[i] = GateBins(piece, where, piece, hyper.gate_block, hyper.mask == "protect")
            else:
                counted[i] = _histogram(piece, where, row_of[i])

    gathered = batching.gather(flat, plan.batches)  # first: before any member (or counter) changes
    if tensors:  # one call per counter list, not two per tensor
        torch._foreach_add_([t.step for t in tensors], 1)
        torch._foreach_add_([t.importance_step for t in tensors], 1)
    packed: dict[tuple[float, float, torch.device], Tensor] = {}  # tensors at the same step share their scalars
    scalars: list[Optional[Tensor]] = [None] * len(tensors)
    leads = {batch.members[0] for batch in plan.batches}
    for i, t in enumerate(tensors):
        if batched[i] and i not in leads:
            continue  # a batch's members are at one step: its first member's scalars serve
        key = (float(t.step), float(t.importance_step), t.param.device)
        if key not in packed:
            packed[key] = _scalars(key[0], key[1], hyper, grad_scale, t.param.device)
        scalars[i] = packed[key]
    for i, t in enumerate(tensors):
        if t.param.numel() == 0:
            if has_gate[i]:
                counted[i] = row_of[i].zero_()
        elif calls[i][0] is not None and not batched[i]:  # this step's scores set the gate
            out = _bins_scratch(t.param.device, t.param.numel())
            param, grad, _, _, importance, anchor, _, _ = plan.shaped[i]
            _compiled("importance_pass")(param, grad, importance, anchor, scalars[i], _like(out, plan.shaped[i]), **calls[i][0])
            count([i], [out], [flat[i][7]])
    for batch, inputs in zip(plan.batches, gathered):
        first = batch.members[0]
        if calls[first][0] is not None:
            param, grad, _, _, importance, anchor, _, mask = inputs
            out = _bins_scratch(param.device, batch.numel)
            _compiled("importance_pass")(param, grad, importance, anchor, scalars[first], out, **calls[first][0])
            count(batch.members, batching.pieces(out, batch), batching.pieces(mask, batch))
    gates, per_unit = gate_thresholds(tensors, histograms, hyper)
    counts_per_tensor = [torch.zeros(3, dtype=torch.int64, device=device)]
    for i, t in enumerate(tensors):
        if t.param.numel() == 0 or batched[i]:
            continue
        _, step, binned = calls[i]
        out = _bins_scratch(t.param.device, t.param.numel()) if binned else None
        inputs, gate = plan.shaped[i], gates[i]
        if gate_bins[i] is not None:
            inputs, gate = _gate_in_mask(inputs, gate_bins[i].gate(gate)), None
        counts = _compiled("fused_step")(*inputs, gate, scalars[i], None if out is None else _like(out, inputs), **step)
        if out is not None:
            count([i], [out], [flat[i][7]])
        counts_per_tensor.append(counts)
    for batch, inputs in zip(plan.batches, gathered):
        first = batch.members[0]
        _, step, binned = calls[first]
        if gate_bins[first] is not None:
            inputs, gate = _gate_in_mask(inputs, torch.cat([gate_bins[i].gate(gates[i]) for i in batch.members])), None
        else:
            gate = None if gates[first] is None else gates[first] if batch.shared_gate else batching.element_thresholds(gates, batch)
        out = _bins_scratch(inputs[0].device, batch.numel) if binned else None
        counts_per_tensor.append(_compiled("fused_step")(*inputs, gate, scalars[first], out, **step))
        if out is not None:
            count(batch.members, batching.pieces(out, batch), batching.pieces(inputs[7], batch))
        batching.scatter(flat, batch, inputs)
    for t, following in zip(tensors, next_thresholds(tensors, histograms, hyper)):
        if following is not None:
            t.threshold.copy_(following)
    totals = torch.stack(counts_per_tensor).sum(0)
    elements = torch.tensor(sum(t.param.numel() for t in tensors), device=device)
    return GroupStats(elements=elements, updated=totals[0], frozen=totals[1], skipped=totals[2], thresholds=per_unit)
