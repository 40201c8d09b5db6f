"""MaskedAdamW: the optimizer class (validation, state, hooks); the math lives in functional.py."""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Iterable
from typing import Any, Optional

import torch
from torch import Tensor
from torch.optim import Optimizer

from masked_optim import backends, checkpoint, consolidation, functional
from masked_optim import threshold as thr
from masked_optim.distributed import all_reduce_sum, common_shard_groups, is_dtensor, local, shard_groups, sharded_like
from masked_optim.functional import GroupHyper, GroupStats, TensorState
from masked_optim.layouts import check_dense, is_dense, real_view
from masked_optim.options import (
    DEFAULTS, IMPORTANCES, _number, adamw_flag, importance_dtype_name, user_stacklevel, validate_group, validate_param,
    warn_misspelt_options,
)

_IMPORTANCE_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
#: param types stepped as they are (no DTensor shard to take, no complex view)
_PLAIN = (Tensor, torch.nn.Parameter)


def _real_mask(mask: Optional[Tensor], param: Tensor) -> Optional[Tensor]:
    """A user mask over a complex param's real view (both parts share the element's gate)."""
    if mask is None or not param.is_complex():
        return mask
    return mask.unsqueeze(-1).expand(*mask.shape, 2)


def _stale(state: dict[str, Any], key: float) -> bool:
    """Whether the step resets ``state``'s stored threshold (``_threshold_key``)."""
    return not _same_key(state["threshold_for"], key) and not _same_key(state["threshold_for"], -key)


def _unit_changed(states: list[dict[str, Any]], key: float) -> bool:
    """Whether a stored threshold of ``states`` (one group-scope unit) is reset by this step."""
    return any(_stale(state, key) for state in states)


def _forget_stale_thresholds(states: list[dict[str, Any]], key: float, whole_unit: bool) -> None:
    """Reset to unknown the stored thresholds derived for other options than ``key``'s, or
    marked ``_STALE`` (done as the step runs, after every group was checked: a step that raises
    changes nothing). ``whole_unit`` (group scope: ``states`` are one unit): if any is reset,
    all are, so the unit derives its threshold afresh from this step's scores, whichever member
    is listed first (a unit gates with its first member's stored threshold where it is known)."""
    stale = [state for state in states if _stale(state, key)]
    for state in (states if stale and whole_unit else stale):  # (the step was told: _unit_changed)
        state["threshold"].fill_(thr.UNKNOWN)
        state["threshold_for"] = -key


def _same_key(a: float, b: float) -> bool:
    """Whether two threshold keys (``_threshold_key``) are the same: ``a == b`` for any two keys
    one float apart or more (keys stay below 2**15, where a float step is 3.6e-12), spelled as a
    distance because under ``torch.compile`` the density can be a symbolic float, and Dynamo
    turns ``threshold_for == key`` into a substitution whose value-range check fails on the
    key's rounding (``AssertionError: 2.70000009 not in VR[2.70000009, 2.70000009]``, a density
    staircase with protect)."""
    return abs(a - b) < 1e-13


def _threshold_key(group: dict[str, Any]) -> float:
    """A positive number naming the options a stored threshold was derived for.

    ``state["threshold_for"]`` holds it: ``key`` when the stored threshold is known to be valid,
    ``-key`` when it is either valid for these options or still unknown (``threshold.UNKNOWN``
    on the device: fresh state, after ``consolidate()``, or after Triton steps under a fused
    GradScaler, whose ``found_inf`` the host does not read). Any other value: the options
    (density, mask, scope, gate_block, importance or its beta) changed, or
    (``_STALE``) the tensor missed a step of its group-scope unit, so the next step resets the
    threshold to unknown.
    """
    # plain arithmetic: Dynamo makes options that differ between optimizers symbolic floats, and
    # the key must be the same in every process (a checkpoint's threshold_for after a resume).
    # beta's term is tiny: two option sets collide only if density and beta change together by
    # exactly compensating amounts
    return (float(group["density"]) + 2.0 * (group["mask"] == "protect") + 4.0 * (group["scope"] == "group")
            + 8.0 * IMPORTANCES.index(group["importance"]) + 24.0 * (int(group["gate_block"]) - 1)
            + 1e-7 * float(group["importance_beta"]))


#: ``threshold_for`` of a tensor whose group-scope unit stepped without it (no grad): its
#: stored threshold is older than its unit's, so it is unknown again when it returns (else the
#: unit's threshold would depend on which member is listed first)
_STALE = 0.0


def _members_left(params: list[Tensor], stepped: list[int], state_of: dict) -> bool:
    """Whether a member of a group-scope unit that took part in its last step (its stored
    threshold is not ``_STALE``) has no grad in this one: the unit's population changed, so its
    stored threshold, taken over the old population, is unknown for the new one (a protect
    threshold would miss its density for as long as the member stays away; a select one for a
    step)."""
    taken = set(stepped)
    return any(
        position not in taken and param in state_of and state_of[param].get("threshold_for", _STALE) != _STALE
        for position, param in enumerate(params)
    )


def _mark_missed(params: list[Tensor], stepped: list[int], state_of: dict) -> None:
    """Mark ``_STALE`` the stored thresholds of ``params`` not at positions ``stepped``."""
    taken = set(stepped)
    for position, param in enumerate(params):
        state = state_of.get(param) if position not in taken else None
        if state is not None and "threshold_for" in state:
            state["threshold_for"] = _STALE


def _uses_anchor(group: dict[str, Any]) -> bool:
    """Whether the steps of ``group`` read what ``consolidate()`` makes: a restoring force, the
    soft scale, or a gate (a density below 1 now, or one a DensityScheduler sets later)."""
    return (_number("anchor_decay", group["anchor_decay"]) > 0 or _number("protect_strength", group["protect_strength"]) > 0
            or _number("density", group["density"]) < 1 or "initial_density" in group)


def _same_stats(kept: list, current: list) -> bool:
    """Whether ``current`` (``_last_stats``) still holds the stats objects ``kept`` copied: no
    step has replaced them since."""
    return len(kept) == len(current) and all(a is b for a, b in zip(kept, current))


def _in_importance_dtype(state: dict[str, Any], dtype: torch.dtype) -> dict[str, Tensor]:
    """The entries of ``state`` stored in the group's importance dtype that are not in ``dtype``
    (importance and anchor, converted): ``importance_dtype`` changed since they were made."""
    return {k: state[k].to(dtype) for k in ("importance", "anchor") if k in state and state[k].dtype != dtype}


def _warn_without_anchor_param(index: int) -> None:
    """A restoring force asked for after the boundary that would have kept its target."""
    warnings.warn(
        f"param group {index} has anchor_decay > 0 but tensors without anchor_param: consolidate() copies "
        "the params only in groups with anchor_decay > 0 at that time, so these tensors are pulled back "
        "toward nothing; set anchor_decay before consolidate() (or call it again)", UserWarning, stacklevel=user_stacklevel(),
    )


class MaskedAdamW(Optimizer):
    r"""AdamW that learns new data while protecting what the model already knows.

    A drop-in replacement for :class:`torch.optim.AdamW`. It keeps a running importance ``s``
    for every parameter element and, after :meth:`consolidate`, an anchor ``a`` (consolidated
    importance of earlier data, mean 1 per unit ``U`` = tensor or param group) and the
    parameters ``theta*`` at that point. With ``density=1`` and no anchor a step is AdamW.

    .. code-block:: text

        for each element i of unit U, step t, gradient g (unscaled, negated if maximize):
            if g is not finite and nonfinite == "skip": leave theta, m, v, s as they are
            x = g^2 (fisher) | |g*theta| (taylor) | |g| (magnitude)
            s = beta_s*s + (1-beta_s)*x
            r = s/(1-beta_s^t_s) / (a + 1e-3)    (select; "/ (a+1e-3)" only with an anchor)
            r = a                                 (protect)
            k = 1 if density == 1
                r >= tau_U                        (select: the top `density` scores move)
                a <  tau_U or a == 0              (protect: the top 1-density anchors stay)
            c = 1 / (1 + protect_strength*a)      (1 without anchor)
            if k:
                theta -= min(1, lr*anchor_decay*a) * (theta - theta*)   (with an anchor)
                theta *= 1 - lr*c*weight_decay
                m = b1*m + (1-b1)*g;  v = b2*v + (1-b2)*g^2
                theta -= lr*c/(1-b1^t) * m / (sqrt(v)/sqrt(1-b2^t) + eps)
            else: theta, m, v stay bit-identical
            (gate_block G > 1: k is shared by each run of G elements in memory order, from
             the block's largest r (select) or a (protect); the block enters the histogram
             weighted by its elements)
            r enters U's histogram, from which tau_U of the next step is derived
            (the step derives it from its own scores instead after creation, consolidate(),
            a change of density, mask, scope, gate_block, importance or importance_beta, a
            set_mask(), a change of a group-scope unit's members, or when the stored
            threshold was flagged as lagging)

    Args:
        params: iterable of parameters, of ``(name, parameter)`` pairs (``named_parameters()``)
            or of param-group dicts. Every option below may be set per group.
        lr, betas, eps, weight_decay: as in :class:`torch.optim.AdamW` (lr may be a 1-element
            Tensor).
        density: fraction of elements updated per step, in (0, 1].
        mask: ``"select"`` (move the elements most important for the new data relative to the
            old) or ``"protect"`` (freeze the elements most important for earlier data).
        importance: ``"fisher"`` (g^2), ``"taylor"`` (|g*theta|) or ``"magnitude"`` (|g|).
        importance_beta: EMA decay of the running importance, in [0, 1).
        protect_strength: lambda >= 0 of the soft per-element update scale 1/(1+lambda*a).
        anchor_decay: mu >= 0, restoring force toward the consolidated parameters.
        scope: ``"tensor"`` or ``"group"``: the unit over which importance is normalised and the
            density threshold taken.
        maximize: maximise the objective instead of minimising it.
        nonfinite: ``"skip"`` (elements with NaN/Inf grads are left unchanged and counted) or
            ``"propagate"`` (they flow through as in AdamW).
        backend: ``"auto"``, ``"torch"`` (the reference), ``"compile"`` (a ``torch.compile``-fused
            loop per tensor: the CPU fast path) or ``"triton"`` (fused multi-tensor kernel).
        importance_dtype: ``"float32"`` or ``"bfloat16"`` storage for importance and anchor.
        gate_block: elements per gate (a power of two up to 1024; default 1, every element
            its own gate). With G > 1 each run of G elements in memory order (per tensor, per
            FSDP2 shard) moves or stays as one, scored by its largest score, so the Triton
            kernel skips the param and moment traffic of whole gated-off blocks; ``density``
            stays a fraction of elements.
        fused: as in :class:`torch.optim.AdamW`, ``True`` makes the step unscale the grads
            itself under a :class:`torch.amp.GradScaler` (``_step_supports_amp_scaling``): no
            separate unscaling pass over the grads, and with the Triton kernel no host sync for
            ``found_inf``. Lightning then refuses ``gradient_clip_val``, as for torch's fused
            AdamW. Default (``None``/``False``): the GradScaler unscales the grads and skips inf
            steps itself, as for torch's default AdamW. Which kernels run is ``backend``'s choice.
        amsgrad, foreach, capturable, differentiable: :class:`torch.optim.AdamW`'s, taken so
            that code written for it runs unchanged. ``foreach`` (``None`` or a bool) chooses
            nothing here: ``backend`` does. ``amsgrad``, ``capturable`` and ``differentiable``
            have no MaskedAdamW variant: ``True`` raises ValueError. All but ``capturable``
            stay in ``defaults`` and each group, as AdamW keeps them (Dynamo sets a traced
            step's ``capturable``), so ``MaskedAdamW(params, **opt.defaults)`` builds a twin.
        decoupled_weight_decay: :class:`torch.optim.Adam`'s; ``False`` (Adam's L2 decay) raises
            ValueError unless ``weight_decay`` is 0.

    Example::

        opt = MaskedAdamW(model.parameters(), lr=1e-3, anchor_decay=10.0)
        train(model, old_task, opt)          # importance accumulates during training
        opt.consolidate()                    # task boundary: remember what mattered
        train(model, new_task, opt)          # important weights are pulled back
    """

    #: GradScaler hands the step ``grad_scale``/``found_inf`` instead of unscaling (``fused=True``)
    _step_supports_amp_scaling = False

    def __init__(
        self,
        params: Iterable[Tensor] | Iterable[dict[str, Any]],
        lr: float | Tensor = 1e-3,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 1e-2,
        amsgrad: bool = False,
        *,
        density: float = 1.0,
        mask: str = "select",
        importance: str = "fisher",
        importance_beta: float = 0.99,
        protect_strength: float = 0.0,
        anchor_decay: float = 0.0,
        scope: str = "tensor",
        maximize: bool = False,
        nonfinite: str = "skip",
        backend: str = "auto",
        importance_dtype: str | torch.dtype = "float32",
        gate_block: int = 1,
        foreach: Optional[bool] = None,
        fused: Optional[bool] = None,
        capturable: bool = False,
        differentiable: bool = False,
        decoupled_weight_decay: bool = True,
    ) -> None:
        adamw_flag("capturable", capturable)  # (not kept: see options.DEFAULTS)
        defaults = dict(
            lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, density=density, mask=mask,
            importance=importance, importance_beta=importance_beta,
            protect_strength=protect_strength, anchor_decay=anchor_decay, scope=scope,
            maximize=maximize, nonfinite=nonfinite, backend=backend,
            importance_dtype=importance_dtype_name(importance_dtype), gate_block=gate_block,
            amsgrad=amsgrad, foreach=foreach, fused=fused, differentiable=differentiable,
            decoupled_weight_decay=decoupled_weight_decay,
        )
        validate_group(defaults)
        self._last_stats: list[Optional[GroupStats]] = []
        if fused:
            self._step_supports_amp_scaling = True
        try:
            super().__init__(params, defaults)
        except ValueError as error:
            if "empty parameter list" in str(error) and iter(params) is params:  # (an iterator: e.g. a generator)
                raise ValueError(f"{error} (params is an iterator that yielded nothing: model.parameters() is a "
                                 "generator, used up by an optimizer made from it before; call it again)") from None
            raise

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        if "_step_supports_amp_scaling" in self.__dict__:  # fused=True (or set): kept by deepcopy/pickle
            state["_step_supports_amp_scaling"] = self._step_supports_amp_scaling
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        for key, value in DEFAULTS.items():
            self.defaults.setdefault(key, value)
        for group in self.param_groups:
            for key in DEFAULTS:
                group.setdefault(key, self.defaults[key])
        self.__dict__.setdefault("_last_stats", [])
        self.__dict__.setdefault("_group_keys", {id(group): frozenset(group) for group in self.param_groups})

    def add_param_group(self, param_group: dict[str, Any]) -> None:
        """Add a param group after checking all of it, so a bad group adds nothing."""
        merged = {**self.defaults, **param_group}
        if "importance_dtype" in param_group:
            merged["importance_dtype"] = importance_dtype_name(merged["importance_dtype"])
            param_group = {**param_group, "importance_dtype": merged["importance_dtype"]}
        validate_group(merged)
        warn_misspelt_options(param_group)
        params = param_group["params"]
        if isinstance(params, set):
            raise TypeError("optimizer parameters need to be organized in ordered collections, but the ordering of "
                            "tensors in sets will change between runs. Please use a list instead.")
        params = [params] if isinstance(params, Tensor) else list(params)
        param_group = {**param_group, "params": params}
        seen: dict[int, int] = {}
        for position, param in enumerate(params):  # (name, tensor) pairs, as from named_parameters(), are torch's to unpack
            param = param[1] if isinstance(param, tuple) and len(param) == 2 and isinstance(param[0], str) else param
            if id(param) in seen:
                raise ValueError(f"param group lists one param twice (positions {seen[id(param)]} and {position}): torch "
                                 "warns and steps it twice, and will refuse it; MaskedAdamW refuses it now")
            seen[id(param)] = position
            validate_param(param)
            if merged["backend"] != "torch":
                backends.resolve(merged["backend"], param.device)
            if merged["backend"] == "compile":  # (the step checks again: a layout may change)
                check_dense(real_view(local(param)), "compile")
        super().add_param_group(param_group)
        added = self.param_groups[-1]
        self.__dict__.setdefault("_group_keys", {})[id(added)] = frozenset(added)

    def _check_anchors_used(self, stepping: bool) -> None:
        """Once after ``consolidate()``, at the next eager step (or at ``mask_stats()`` once a
        step was taken: a loop of compiled Triton steps reaches it eagerly): warn when no param
        group uses the anchors, so that they change nothing (the usual cause: ``anchor_decay``
        forgotten). Checked then rather than in ``consolidate()``: a DensityScheduler or a
        callback may set the options in between. ``_anchors_unchecked`` holds the step stats of
        ``consolidate()``'s time (a step since has replaced them), or None."""
        before = self.__dict__.get("_anchors_unchecked")
        if before is None:
            return
        if not stepping and _same_stats(before, self._last_stats):
            return  # no step since consolidate(): the options may still change
        self._anchors_unchecked = None
        if not any(_uses_anchor(group) for group in self.param_groups):
            warnings.warn(
                "the anchors consolidate() made are unused: no param group has anchor_decay > 0, protect_strength > 0 "
                "or a density below 1 (or a DensityScheduler), so they change nothing the steps do. Set anchor_decay "
                "before consolidate() (it copies θ* only for groups that have it)", UserWarning, stacklevel=user_stacklevel(),
            )

    def _recheck_after_compiled_steps(self) -> None:
        """The eager step's warnings that a traced step (the Triton backend under
        ``torch.compile``) cannot give: a misspelt option and a restoring force without targets.
        ``mask_stats()`` gives them when the last step was not an eager one."""
        eager = self.__dict__.get("_eager_stats")
        if not self._last_stats or (eager is not None and _same_stats(eager, self._last_stats)):
            return
        self._eager_stats = list(self._last_stats)  # (once per compiled stretch)
        for index, group in enumerate(self.param_groups):
            self._warn_new_keys(group)
            if _number("anchor_decay", group["anchor_decay"]) > 0 and any(
                    "anchor" in self.state.get(p, {}) and "anchor_param" not in self.state[p] for p in group["params"]):
                _warn_without_anchor_param(index)

    def _warn_new_keys(self, group: dict[str, Any]) -> None:
        """Warn about a misspelt option set in a param group after it was made
        (``opt.param_groups[0]["anchr_decay"] = 3``): keys not seen in this group before are
        checked once, as ``add_param_group`` checks a new group's."""
        keys, seen = frozenset(group), self._group_keys.get(id(group))
        if keys != seen:
            warn_misspelt_options({key: group[key] for key in keys - (seen or frozenset())})
            current = {id(g) for g in self.param_groups}  # (groups a load_state_dict replaced go)
            self._group_keys = {i: k for i, k in self._group_keys.items() if i in current}
            self._group_keys[id(group)] = keys

    # ------------------------------------------------------------------ state
    def _importance_dtype(self, group: dict[str, Any]) -> torch.dtype:
        return _IMPORTANCE_DTYPES[importance_dtype_name(group["importance_dtype"])]

    def _state_dtype(self, key: str, param: Tensor, group: dict[str, Any]) -> Optional[torch.dtype]:
        """The dtype a state tensor must have (None: whatever it has, e.g. counters)."""
        if key in ("exp_avg", "exp_avg_sq"):
            return param.dtype if param.is_complex() else functional.math_dtype(param.dtype)
        if key in ("importance", "anchor"):
            return self._importance_dtype(group)
        if key == "anchor_param":
            return param.dtype
        if key == "threshold":
            return torch.int64
        return None

    def _init_state(self, param: Tensor, group: dict[str, Any], state: Optional[dict[str, Any]] = None) -> dict[str, Any]:
        """Fill in ``param``'s missing state entries, in ``state`` if given, else in ``self.state``."""
        state = self.state[param] if state is None else state
        if "step" in state and "importance_step" in state and "threshold" in state:
            return state  # the steady state: nothing to create

        if "step" not in state:
            state["step"] = self._counter(param, group)
        for key in ("exp_avg", "exp_avg_sq"):
            if key not in state:
                state[key] = torch.zeros_like(param, dtype=self._state_dtype(key, param, group), memory_format=torch.preserve_format)
        if "importance" not in state:
            state["importance"] = torch.zeros_like(real_view(param), dtype=self._importance_dtype(group))
            state["importance_step"] = self._counter(param, group)
        if "threshold" not in state:  # (_STALE: in group scope the whole unit derives afresh)
            state["threshold"] = torch.full((), thr.UNKNOWN, dtype=torch.int64, device=param.device)
            state["threshold_for"] = _STALE
        return state

    def _counter(self, param: Tensor, group: dict[str, Any], value: Any = 0.0) -> Tensor:
        """A step counter (float32 scalar) holding ``value``. The Triton kernels update the
        counters on the device (a GradScaler-skipped step must leave them unchanged without a
        host sync); the other backends keep them on the CPU, like torch's AdamW."""
        triton = backends.resolve(group["backend"], param.device) == "triton"
        device = param.device if triton else torch.device("cpu")
        if isinstance(value, Tensor):
            return value.detach().to(device=device, dtype=torch.float32, copy=True).reshape(())
        return torch.tensor(float(value), dtype=torch.float32, device=device)

    def _create_state_entries(self, param: Tensor, keys: list[str]) -> None:
        """Placeholders (zeros, the right dtype and placement) for optional state entries that a
        checkpoint holds, so that loaders which fill only existing entries (DCP) load them."""
        group = next(g for g in self.param_groups if any(param is p for p in g["params"]))
        state = self._init_state(param, group)
        for key in keys:
            if key not in state:
                like = state["importance"] if key == "anchor" else param
                dtype = torch.bool if key == "user_mask" else self._state_dtype(key, param, group)
                state[key] = torch.zeros_like(like, dtype=dtype)

    def _tensor_states(self, group: dict[str, Any]) -> tuple[list[Tensor], list[int], list[TensorState], list[dict[str, Any]], list]:
        """The group's params that have grads, their indices in ``group["params"]``, each one's
        ``TensorState`` and its state dict (created on first use). A stored threshold derived for other options is not known
        (``threshold_known`` False); ``_forget_stale_thresholds`` resets it when the step runs.
        State a param lacks is made in a new dict, listed in ``fresh`` (param, state): the caller
        stores it (``_keep_fresh``) once the step cannot fail any more."""
        params, positions, tensors, states, fresh = [], [], [], [], []
        key = _threshold_key(group)
        state_of = self.state
        importance_dtype = self._importance_dtype(group)
        for position, param in enumerate(group["params"]):
            grad = param.grad
            if grad is None:
                continue
            state = state_of.get(param)
            if state is None or "threshold" not in state or "step" not in state or "importance_step" not in state:
                state = self._init_state(param, group, dict(state or {}))
                fresh.append((param, state))
            elif converted := _in_importance_dtype(state, importance_dtype):  # the option changed
                state = {**state, **converted}
                fresh.append((param, state))
            threshold_for = state["threshold_for"]  # another key: the options changed (not known)
            params.append(param)
            positions.append(position)
            states.append(state)
            if type(param) in _PLAIN and not param.is_complex():  # the common case, spelled cheaply
                tensors.append(TensorState(
                    param, grad, state["exp_avg"], state["exp_avg_sq"], state["importance"], state["step"],
                    state["importance_step"], state["threshold"], _same_key(threshold_for, key),
                    state.get("anchor"), state.get("anchor_param"), (), state.get("user_mask"),
                ))
                continue
            tensors.append(
                TensorState(
                    param=real_view(local(param)), grad=real_view(local(grad)),
                    exp_avg=real_view(local(state["exp_avg"])), exp_avg_sq=real_view(local(state["exp_avg_sq"])),
                    importance=local(state["importance"]), step=state["step"],
                    importance_step=state["importance_step"], threshold=state["threshold"],
                    threshold_known=_same_key(threshold_for, key), anchor=local(state.get("anchor")),
                    anchor_param=real_view(local(state["anchor_param"])) if "anchor_param" in state else None,
                    shard_groups=shard_groups(param),
                    user_mask=_real_mask(local(state.get("user_mask")), param),
                )
            )
        return params, positions, tensors, states, fresh

    def _keep_fresh(self, fresh: list[tuple[Tensor, dict[str, Any]]]) -> None:
        for param, state in fresh:
            self.state[param] = state

    def _check_grads(self) -> None:
        for group in self.param_groups:
            validate_group(group, read_tensors=False)
            if not torch.compiler.is_compiling():  # (Dynamo refuses warnings.warn)
                self._warn_new_keys(group)
            for param in group["params"]:
                if param.grad is not None and param.grad.is_sparse:
                    raise RuntimeError("MaskedAdamW does not support sparse gradients")

    # ------------------------------------------------------------------ public API
    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], Any]] = None) -> Any:
        """Take one step: importance, gate, restoring force and scaled AdamW update.

        Under a :class:`torch.amp.GradScaler` with ``fused=True`` the grads are unscaled inside
        the step and a step with ``found_inf`` changes nothing at all (without it the scaler
        unscales, and skips such a step itself).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        grad_scale, found_inf = getattr(self, "grad_scale", None), getattr(self, "found_inf", None)
        if self._all_triton():
            self._step_groups(grad_scale, found_inf)
        else:
            self._step_groups_outside_graph(grad_scale, found_inf)
        return loss

    def _all_triton(self) -> bool:
        """Whether every group with params steps with the Triton kernel."""
        return all(
            backends.resolve(group["backend"], group["params"][0].device) == "triton"
            for group in self.param_groups if group["params"]
        )

    @torch.compiler.disable
    def _step_groups_outside_graph(self, grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
        """The step of the torch and compile backends. Inside a ``torch.compile``-d training step
        it runs as it is (each brings its own fusion): one graph break, no recompiles when lr or
        other options change."""
        self._step_groups(grad_scale, found_inf)

    def _step_groups(self, grad_scale: Optional[Tensor], found_inf: Optional[Tensor]) -> None:
        """The step proper. With the Triton backend ``torch.compile`` traces it: the kernel is
        the ``torch.library`` op ``masked_optim::fused_step`` (``kernels/op.py``)."""
        self._check_grads()
        if not torch.compiler.is_compiling():
            self._check_anchors_used(stepping=True)
        # every group is checked (and its compiles and tables made) before the first one steps:
        # a group that cannot step leaves all of them unchanged
        steps = []
        for index, group in enumerate(self.param_groups):
            params, positions, tensors, states, fresh = self._tensor_states(group)
            if not tensors:
                steps.append(None)
                continue
            backend = backends.resolve(group["backend"], params[0].device, sum(t.param.numel() for t in tensors))
            if backend == "compile" and group["backend"] == "auto" and not all(is_dense(t.param) for t in tensors):
                backend = "torch"  # the compile backend steps dense params only
            hyper = GroupHyper.from_group(group)
            left = hyper.scope == "group" and len(positions) < len(group["params"]) \
                and _members_left(group["params"], positions, self.state)
            if hyper.scope == "group" and (left or _unit_changed(states, _threshold_key(group))):
                for t in tensors:  # the step resets the unit's thresholds (_forget_stale_thresholds)
                    t.threshold_known = False
            if hyper.anchor_decay > 0 and not torch.compiler.is_compiling() \
                    and any(t.anchor is not None and t.anchor_param is None for t in tensors):
                _warn_without_anchor_param(index)  # (eager steps only: Dynamo refuses warnings.warn)
            plan = functional.prepare(tensors, hyper, backend=backend, grad_scale=grad_scale, found_inf=found_inf)
            steps.append((positions, tensors, states, fresh, backend, hyper, plan, left))
        stats: list[Optional[GroupStats]] = []
        skipped_on_host: Optional[bool] = None  # found_inf, read once for the torch and compile backends
        for index, (group, prepared) in enumerate(zip(self.param_groups, steps)):
            previous = self._last_stats[index] if index < len(self._last_stats) else None
            if prepared is None:
                stats.append(previous)
                continue
            positions, tensors, states, fresh, backend, hyper, plan, left = prepared
            if found_inf is not None and backend != "triton":
                if skipped_on_host is None:
                    skipped_on_host = bool(found_inf.reshape(-1)[0] != 0)
                if skipped_on_host:  # the step changes nothing, no state or threshold bookkeeping either
                    stats.append(previous)
                    continue
            self._keep_fresh(fresh)
            if left:  # a member left the unit: its threshold is derived afresh from this step's scores
                for state in states:
                    state["threshold_for"] = _STALE
            _forget_stale_thresholds(states, _threshold_key(group), hyper.scope == "group")
            result = functional.masked_adamw(  # (found_inf was read above for the host backends: taken)
                tensors, hyper, backend=backend, grad_scale=grad_scale,
                found_inf=found_inf if backend == "triton" else None, plan=plan,
            )
            if result is not None:
                members = functional.gated_units(tensors, functional.gated(tensors, hyper), hyper.scope)
                result.units = [[positions[i] for i in unit] for unit in members]
                result.masked = functional.masked_count(tensors)
            # under a scaler the Triton step may have been skipped on the device: keep the hint;
            # the torch and compile backends got here only for a step taken (found_inf read above)
            if found_inf is None or backend != "triton":
                key = _threshold_key(group)
                for state in states:
                    state["threshold_for"] = key
            elif result is not None:  # Triton: found_inf stays on the device
                result = functional.last_taken(previous, result, found_inf)
            if hyper.scope == "group" and len(positions) < len(group["params"]):
                _mark_missed(group["params"], positions, self.state)
            stats.append(result if result is not None else previous)
        self._last_stats[:] = stats  # in place: a compiled step replays list mutations
        if not torch.compiler.is_compiling():  # (mask_stats() re-checks after compiled steps)
            self._eager_stats = list(stats)

    @torch.no_grad()
    def observe(self, grad_scale: Optional[float | Tensor] = None) -> None:
        """Update the running importance from the current grads; change no parameter or moment.

        Use it to calibrate importance on earlier data (forward + backward, then ``observe()``)
        before :meth:`consolidate`. Grads from ``scaler.scale(loss).backward()`` (fp16 autocast
        with a ``torch.amp.GradScaler``) are scaled: pass ``grad_scale=scaler.get_scale()`` to
        divide them by it, as :meth:`step` does under the scaler, or the observed importance
        comes out scale² (fisher) times too large against what the steps accumulate.
        """
        scale = None
        if grad_scale is not None:
            value = _number("grad_scale", grad_scale)
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"Invalid grad_scale: {value} (must be finite and > 0)")
            scale = value
        self._check_grads()
        observed = []  # every group checked (as a step checks it) before the first one changes
        for group in self.param_groups:
            _, _, tensors, _, fresh = self._tensor_states(group)
            if tensors:
                hyper = GroupHyper.from_group(group)
                functional.prepare(tensors, hyper, backend="torch")
                observed.append((tensors, fresh, hyper))
        if not observed:
            warnings.warn("observe(): no param has a grad, so nothing was observed (run backward() on a batch first; "
                          "zero_grad() clears the grads)", UserWarning, stacklevel=user_stacklevel())
        for tensors, fresh, hyper in observed:
            self._keep_fresh(fresh)
            device_scale = None if scale is None else torch.tensor(scale, dtype=torch.float32, device=tensors[0].param.device)
            functional.observe(tensors, hyper, backend="torch", grad_scale=device_scale)

    @torch.no_grad()
    def consolidate(self, how: str = "max", *, reset_moments: bool = False) -> None:
        """Task boundary: fold the running importance into the anchor and reset it.

        Per unit, the importance (bias-corrected per tensor, as the step's scores are) is
        normalised to mean 1 and combined into the anchor
        (``"max"``: elementwise maximum, ``"sum"``: addition), which is renormalised to mean 1.
        The importance restarts from 0, the parameters are copied into ``anchor_param`` in groups
        with ``anchor_decay > 0``, and every threshold is derived afresh by the next step.

        ``reset_moments=True`` also restarts AdamW's moments and step counts, so the next task
        starts as with a fresh optimizer (bias corrections from step 1), anchors kept; by
        default they carry over, as in one long run.
        """
        if how not in consolidation.HOWS:
            raise ValueError(f"Invalid how: {how!r} (expected 'max' or 'sum')")
        if not isinstance(reset_moments, bool):
            raise ValueError(f"Invalid reset_moments: {reset_moments!r} (must be a bool)")
        for index, group in enumerate(self.param_groups):  # every group checked before any changes
            try:
                validate_group(group)
            except ValueError as error:
                raise ValueError(f"consolidate(): param group {index}: {error}") from None
            for p in group["params"]:  # (a param resized after its state was made: state.data = ...)
                importance = self.state.get(p, {}).get("importance")
                like = checkpoint.layout_like("importance", p)  # (a complex param's real view)
                if importance is not None and importance.shape != like.shape:
                    raise ValueError(f"consolidate(): param group {index}: importance of shape {tuple(importance.shape)} "
                                     f"does not match its param (shape {tuple(like.shape)})")
        if reset_moments:  # every param with moments (also one that never had importance)
            for group in self.param_groups:
                for p in group["params"]:
                    state = self.state.get(p, {})
                    if "exp_avg" in state:
                        state["exp_avg"].zero_()
                        state["exp_avg_sq"].zero_()
                        state["step"].zero_()
        # a param takes part once its importance was measured or it has an anchor: one whose state
        # only set_mask made (importance_step 0, no anchor) would halve its group-scope unit's
        # mean importance, doubling the others' anchors, and get an anchor of zeros (the step
        # counts are read on the host: one copy per device)
        measured = [p for group in self.param_groups for p in group["params"] if "importance" in self.state.get(p, {})]
        steps = dict(zip(measured, consolidation.host_values([self.state[p]["importance_step"] for p in measured])))
        taking_part = [
            [p for p in group["params"] if p in steps and ("anchor" in self.state[p] or steps[p] > 0)]
            for group in self.param_groups
        ]
        if not any(taking_part):
            warnings.warn(
                "consolidate() before any step() or observe(): no importance has been measured, so no anchor "
                "is made and nothing will be protected or pulled back" + (" (the moments were reset)" if reset_moments else "")
                + ". Run observe() on gradients of the old data (or train on it) first", UserWarning, stacklevel=user_stacklevel(),
            )
            return
        self._anchors_unchecked = list(self._last_stats)  # the next step says whether any group uses them
        for group, params in zip(self.param_groups, taking_part):
            dtype = self._importance_dtype(group)
            for p in params:  # an importance_dtype changed since the last step takes effect now
                self.state[p].update(_in_importance_dtype(self.state[p], dtype))
            unit_lists = [params] if group["scope"] == "group" and params else [[p] for p in params]
            for unit in unit_lists:
                states = [self.state[p] for p in unit]
                importances = [
                    consolidation.bias_corrected(local(self.state[p]["importance"]), steps[p], group["importance_beta"])
                    for p in unit
                ]
                anchors = consolidation.combine(
                    importances, [local(s.get("anchor")) for s in states],
                    how, shard_groups(unit[0]),
                )
                for param, state, anchor in zip(unit, states, anchors):
                    if "anchor" not in state:
                        state["anchor"] = torch.zeros_like(state["importance"])
                    local(state["anchor"]).copy_(anchor)
                    state["importance"].zero_()
                    state["importance_step"].zero_()
                    state["threshold"].fill_(thr.UNKNOWN)
                    state["threshold_for"] = -_threshold_key(group)
                    if group["anchor_decay"] > 0:
                        state["anchor_param"] = param.detach().clone()
                    else:
                        state.pop("anchor_param", None)

    @torch.no_grad()
    def set_mask(self, param: Tensor, mask: Optional[Tensor]) -> None:
        """Fix which elements of ``param`` may ever move (e.g. a pruning, FISH or LT-SFT mask).

        Elements where ``mask`` is False keep their parameter and both moments exactly
        unchanged, whatever the density gate says (their importance is still measured, so
        ``consolidate`` sees them). The density gate works within the mask: ``density`` is the
        fraction of the *allowed* elements updated per step, and masked elements stay out of
        the threshold histogram. ``mask=None`` removes the mask. Under FSDP2 pass the full
        mask (the same on every rank): each rank keeps its own shard, without communicating.
        """
        if not any(param is p for group in self.param_groups for p in group["params"]):
            raise ValueError("set_mask: param is not managed by this optimizer")
        group = next(g for g in self.param_groups if any(param is p for p in g["params"]))
        if mask is not None:
            if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
                raise ValueError(f"set_mask: mask must be a bool Tensor, got {getattr(mask, 'dtype', type(mask).__name__)}")
            if tuple(mask.shape) != tuple(param.shape):
                raise ValueError(f"set_mask: mask shape {tuple(mask.shape)} does not match param shape {tuple(param.shape)}")
            if is_dtensor(param) and not is_dtensor(mask):  # each rank keeps its piece: no collective
                mask = sharded_like(mask, param)
            mask = mask.to(param.device).clone()
        state = self._init_state(param, group)
        if mask is None:
            state.pop("user_mask", None)
        else:
            state["user_mask"] = mask
        # the unit's population changed: derived afresh by its next step, in group scope for all
        # of its members (were only this one marked, and it then had no grad, the others would
        # keep the threshold taken over the old population: _members_left skips a _STALE member)
        _mark_missed(group["params"] if group["scope"] == "group" else [param], [], self.state)

    def mask_stats(self, global_counts: bool = False) -> list[Optional[dict[str, Any]]]:
        """Per param group, what the last step did (synchronises with the device).

        Keys: ``target_density``, ``realised_density`` (the gated-on fraction of the elements
        stepped that no ``set_mask`` mask holds, as ``density`` is), ``threshold`` (one
        score threshold per unit that had one), ``units`` (per threshold, the indices in the
        group's ``params`` of its unit's tensors), ``elements``, ``updated``, ``frozen`` (gated
        off, masked ones included), ``nonfinite_skipped`` and ``masked`` (held by user masks). Groups that have not stepped yet report None. Under FSDP2 the
        counts are this rank's shards (thresholds are global: histograms are all-reduced);
        ``global_counts=True`` sums them over the shards — a collective, so every rank must
        call it then; it needs every param of a group sharded over the same process groups
        (counts are per group, so a group mixing sharded and replicated params cannot be summed).
        """
        if not isinstance(global_counts, bool):
            raise ValueError(f"Invalid global_counts: {global_counts!r} (must be a bool)")
        self._check_anchors_used(stepping=False)
        self._recheck_after_compiled_steps()
        report: list[dict[str, Any]] = []
        count_groups = [common_shard_groups(g["params"], i) for i, g in enumerate(self.param_groups)] if global_counts else []
        for index, group in enumerate(self.param_groups):
            stats = self._last_stats[index] if index < len(self._last_stats) else None
            if stats is None or stats.never_taken is not None and bool(stats.never_taken):
                report.append(None)
                continue
            masked = stats.masked if stats.masked is not None else torch.zeros_like(stats.elements)
            counts = torch.stack([stats.elements, stats.updated, stats.frozen, stats.skipped, masked]).to(torch.int64)
            if global_counts:
                counts = all_reduce_sum(counts, count_groups[index])
            elements, updated, frozen, skipped, masked = counts.tolist()
            allowed = elements - masked
            report.append(dict(
                target_density=float(group["density"]),
                realised_density=(elements - frozen) / allowed if allowed else 1.0,
                threshold=[thr.threshold_value(int(t.item())) for t in stats.thresholds],
                units=[list(unit) for unit in stats.units],
                elements=elements, updated=updated, frozen=frozen, nonfinite_skipped=skipped, masked=masked,
            ))
        return report

    def state_bytes(self) -> dict[str, int]:
        """Bytes of optimizer state: ``total`` and one entry per kind (``other``: counters)."""
        sizes = dict.fromkeys((*checkpoint.STATE_KINDS, "other"), 0)
        for state in self.state.values():
            for key, value in state.items():
                if isinstance(value, Tensor):
                    shard = local(value)
                    sizes[key if key in sizes else "other"] += shard.numel() * shard.element_size()
        sizes["total"] = sum(sizes.values())
        return sizes

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Load state like :class:`torch.optim.Optimizer`, keeping this optimizer's state dtypes.

        ``Optimizer.load_state_dict`` casts floating state to the param's dtype (fp32 importance
        of a bf16 param would come back bf16) and keeps a saved tensor's strides; here every
        state tensor is restored from the checkpoint (as the load-state-dict pre-hooks left it)
        with the dtype it must have, in its param's memory layout, before any post-hook runs.
        Each group keeps this optimizer's ``backend`` (a choice for the machine, not training
        state) and the options a checkpoint lacks. A ``torch.optim.AdamW`` state_dict loads
        too: moments carry over, importance starts at zero. Refused before anything changes:
        a checkpoint whose options are invalid here, one with AMSGrad state or Adam's coupled
        (L2) weight decay, which MaskedAdamW would ignore or change, another optimizer's state
        or options, state tensors whose shape is not their param's, part of a state set
        (moments without a ``step``, ...), step counts that are negative or not finite, and
        MaskedAdamW's own tensor entries (moments, importance, anchors, mask, threshold) that
        are not Tensors. Other per-param entries (a wrapper's) load as they are.
        """
        loaded: dict[str, Any] = {}

        def check(optimizer: Optimizer, hooked: dict[str, Any]) -> Optional[dict[str, Any]]:  # after every user pre-hook
            cleaned = checkpoint.without_unsaved_entries(hooked)
            loaded.update(self._check_checkpoint(cleaned))
            return cleaned if cleaned is not hooked else None

        def restore(optimizer: Optimizer) -> None:  # before every user post-hook
            self._restore_checkpoint(**loaded)

        pre = self.register_load_state_dict_pre_hook(check)
        post = self.register_load_state_dict_post_hook(restore, prepend=True)
        try:
            super().load_state_dict(state_dict)
        finally:
            pre.remove()
            post.remove()

    def _check_checkpoint(self, state_dict: dict[str, Any]) -> dict[str, Any]:
        """Refuse a checkpoint this optimizer cannot continue from, before anything changes
        (``checkpoint.check``)."""
        return checkpoint.check(self.param_groups, state_dict)

    def _restore_checkpoint(self, originals: dict, saved_groups: list, current_groups: list) -> None:
        """Put back what ``Optimizer.load_state_dict`` changed: state dtypes and layouts, the
        counters' device, this optimizer's backend and the options the checkpoint lacks."""
        self._last_stats.clear()  # the stats of a step taken before the load describe nothing loaded
        self._anchors_unchecked = None  # (anchors made before the load are gone)
        for saved, current, group in zip(saved_groups, current_groups, self.param_groups):
            for key, value in current.items():  # options a foreign checkpoint lacks stay as set
                if key not in saved:
                    group[key] = value
            group["backend"] = current["backend"]
            if group.get("decoupled_weight_decay") is False:  # Adam without weight decay (check) is
                group["decoupled_weight_decay"] = True  # AdamW without it: weight decay set later is AdamW's
            for pid, param in zip(saved["params"], group["params"]):
                for key, value in originals.get(pid, {}).items():
                    if key in ("step", "importance_step"):  # the saved value, not a copy cast to the param's dtype
                        self.state[param][key] = self._counter(param, group, value)
                    elif isinstance(value, Tensor):
                        if key == "threshold":  # one element (checked): kept 0-dim, as the step makes it
                            value = value.reshape(())
                        dtype = self._state_dtype(key, param, group) or value.dtype
                        self.state[param][key] = checkpoint.restored(value, checkpoint.layout_like(key, param), param.device, dtype)
