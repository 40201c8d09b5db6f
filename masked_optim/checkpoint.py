"""Checkpoints: what a MaskedAdamW checkpoint may hold, the checks that refuse one it cannot
continue from (before anything changes), and how a loaded state tensor is put back."""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
from torch import Tensor

from masked_optim import threshold as thr
from masked_optim.distributed import is_dtensor, sharded_like
from masked_optim.layouts import STATE_LIKE_PARAM, real_view
from masked_optim.options import _number, validate_group

#: the per-param state tensors laid out like the param (or its real view)
STATE_KINDS = STATE_LIKE_PARAM
#: every per-param state entry; entries that only come together (a checkpoint holding part of
#: one of these sets is refused: the step would have to invent the rest)
STATE_KEYS = frozenset(STATE_KINDS) | {"step", "importance_step", "threshold", "threshold_for", "user_mask"}
STATE_SETS = (("step", "exp_avg", "exp_avg_sq"), ("importance", "importance_step"), ("threshold", "threshold_for"))
#: param-group options of torch's other optimizers (SGD, RMSprop, Adagrad, Adadelta, NAdam): a
#: checkpoint with one is another optimizer's even when it holds no state (SGD without momentum)
FOREIGN_OPTIONS = ("momentum", "dampening", "nesterov", "alpha", "centered", "lr_decay", "initial_accumulator_value",
                   "rho", "momentum_decay")
#: per-param state entries of torch's other optimizers (SGD, RMSprop, Adagrad, Adadelta, Adamax,
#: ASGD, NAdam, Rprop, Adafactor; AMSGrad's): a checkpoint with one is another optimizer's. Other
#: entries a MaskedAdamW does not keep (a wrapper's, e.g. timm's Lookahead keeps its slow
#: weights in its base optimizer's state) load and are saved again untouched, as torch's
#: optimizers carry them
FOREIGN_STATE = ("momentum_buffer", "max_exp_avg_sq", "sum", "square_avg", "acc_delta", "grad_avg", "exp_inf", "eta",
                 "mu", "ax", "mu_product", "prev", "step_size", "row_var", "col_var", "variance")


def layout_like(key: str, param: Tensor) -> Optional[Tensor]:
    """The tensor whose shape and memory layout state ``key`` of ``param`` has (None: free). A
    loaded user mask takes its param's layout too (the fused backends read it so; on a DTensor
    param it is sharded like it)."""
    if key in ("exp_avg", "exp_avg_sq", "anchor_param", "user_mask"):
        return param
    if key in ("importance", "anchor"):
        return real_view(param)
    return None


def restored(value: Tensor, like: Optional[Tensor], device: torch.device, dtype: torch.dtype) -> Tensor:
    """A loaded state tensor as this optimizer keeps it: its own copy, on the param's device,
    in ``dtype``, laid out like ``like`` (a checkpoint may hold another layout, e.g. saved
    while the param was channels_last), sharded like a DTensor ``like`` if it comes whole (a
    full state dict: torch reshards only the keys a fresh optimizer has, so not ``anchor``,
    ``anchor_param`` or ``user_mask``)."""
    if is_dtensor(like) and not is_dtensor(value) and tuple(value.shape) == tuple(like.shape):
        return sharded_like(value.to(dtype=dtype, copy=True), like)
    if like is None or is_dtensor(like) or is_dtensor(value):
        return value.to(device=device, dtype=dtype, copy=True)
    restored = torch.empty_like(like, dtype=dtype)
    restored.copy_(value)
    return restored


def _check_threshold(pid: Any, threshold: Tensor, threshold_for: Any) -> None:
    """A stored threshold is one integer: ``threshold.UNKNOWN``, a bin in [0, NUM_BINS], or a
    flagged one (``threshold.flagged``); any other value would gate with a bin no score has.
    ``threshold_for`` is a number (``optimizer._threshold_key``)."""
    if threshold.numel() != 1 or threshold.dtype.is_floating_point or threshold.is_complex() or threshold.dtype == torch.bool:
        raise ValueError(f"Invalid checkpoint: state[{pid!r}]['threshold'] is a {threshold.dtype} tensor of shape "
                         f"{tuple(threshold.shape)}, a unit's threshold is one integer (a bin)")
    value = int(threshold.detach().reshape(()).item())  # (one element: read on the host)
    lowest = thr.flagged(thr.NUM_BINS)  # (-2 - NUM_BINS)
    if not lowest <= value <= thr.NUM_BINS:
        raise ValueError(f"Invalid checkpoint: state[{pid!r}]['threshold'] is {value}, outside [{lowest}, "
                         f"{thr.NUM_BINS}] (a bin of {thr.NUM_BINS}, {thr.UNKNOWN} for unknown, or a flagged bin)")
    try:
        number = _number(f"state[{pid!r}]['threshold_for']", threshold_for)
    except ValueError as error:
        raise ValueError(f"Invalid checkpoint: {error}") from None
    if not math.isfinite(number):
        raise ValueError(f"Invalid checkpoint: state[{pid!r}]['threshold_for'] is {number} (a finite number)")


def without_unsaved_entries(state_dict: dict[str, Any]) -> dict[str, Any]:
    """``state_dict`` without the state entries that are empty dicts, which is how torch's DCP
    rebuilds a flattened state dict (``flatten_optimizer_state_dict=True``) for an entry the live
    optimizer has and the checkpoint lacks (an anchor made after the checkpoint was saved): the
    checkpoint has no such entry. The same dict when there are none; a copy otherwise."""
    states = state_dict.get("state") if isinstance(state_dict, dict) else None
    if not isinstance(states, dict):
        return state_dict
    unsaved = {pid: [key for key, value in state.items() if key in STATE_KEYS and isinstance(value, dict) and not value]
               for pid, state in states.items() if isinstance(state, dict)}
    if not any(unsaved.values()):
        return state_dict
    cleaned = {pid: {key: value for key, value in state.items() if key not in unsaved.get(pid, ())}
               if isinstance(state, dict) else state for pid, state in states.items()}
    return {**state_dict, "state": cleaned}


def check(param_groups: list[dict[str, Any]], state_dict: dict[str, Any]) -> dict[str, Any]:
    """Refuse a checkpoint the optimizer with ``param_groups`` cannot continue from (ValueError),
    before anything changes; returns what ``MaskedAdamW._restore_checkpoint`` needs."""

    missing = [key for key in ("state", "param_groups") if key not in state_dict]
    if missing:
        raise ValueError(f"Invalid checkpoint: no {' or '.join(map(repr, missing))} (an optimizer's state_dict() has "
                         f"'state' and 'param_groups'; got keys {sorted(map(str, state_dict))[:8]})")
    saved_groups = state_dict["param_groups"]
    current_groups = [{k: v for k, v in g.items() if k != "params"} for g in param_groups]
    for index, (saved, current) in enumerate(zip(saved_groups, current_groups)):
        foreign = [key for key in FOREIGN_OPTIONS if key in saved]
        if foreign:
            raise ValueError(f"Invalid checkpoint: param group {index} has {', '.join(map(repr, foreign))}, which "
                             "MaskedAdamW does not have (the checkpoint of another optimizer?)")
        options = {k: v for k, v in saved.items() if k not in ("params", "param_names")}
        try:
            validate_group({**current, **options, "backend": current["backend"]})
        except ValueError as error:
            raise ValueError(f"Invalid checkpoint: param group {index}: {error}") from None
    originals = {pid: dict(state) for pid, state in state_dict["state"].items()}
    for saved, group in zip(saved_groups, param_groups):
        for pid, param in zip(saved["params"], group["params"]):
            state = originals.get(pid, {})
            if "step" not in state and any(key in state for key in ("exp_avg", "exp_avg_sq")):
                raise ValueError(f"Invalid checkpoint: the state of param {pid} has moments but no 'step'")
            for key in state:
                if key in FOREIGN_STATE:
                    raise ValueError(f"Invalid checkpoint: state[{pid!r}] has {key!r}, which MaskedAdamW does not "
                                     "keep (the state of another optimizer?)")
            for keys in STATE_SETS:
                if any(key in state for key in keys) and not all(key in state for key in keys):
                    missing = [key for key in keys if key not in state]
                    raise ValueError(f"Invalid checkpoint: state[{pid!r}] has {', '.join(repr(k) for k in keys if k in state)} "
                                     f"but no {', '.join(map(repr, missing))}")
            if "anchor_param" in state and "anchor" not in state:
                raise ValueError(f"Invalid checkpoint: state[{pid!r}] has 'anchor_param' but no 'anchor'")
            for key, value in state.items():
                if key in STATE_KEYS and key not in ("step", "importance_step", "threshold_for") and not isinstance(value, Tensor):
                    raise ValueError(f"Invalid checkpoint: state[{pid!r}][{key!r}] must be a Tensor, got "
                                     f"{type(value).__name__}")
            if "threshold" in state:
                _check_threshold(pid, state["threshold"], state["threshold_for"])
            for key in ("step", "importance_step"):  # (counters are small: read on the host)
                if key in state:
                    count = _number(key, state[key])
                    if not (math.isfinite(count) and count >= 0):
                        raise ValueError(f"Invalid checkpoint: state[{pid!r}][{key!r}] is {count} (a step count is "
                                         "finite and >= 0)")
            mask = state.get("user_mask")
            if mask is not None and not (isinstance(mask, Tensor) and mask.dtype == torch.bool):
                raise ValueError(f"Invalid checkpoint: state[{pid!r}]['user_mask'] must be a bool Tensor, got "
                                 f"{getattr(mask, 'dtype', type(mask).__name__)}")
            for key, value in state.items():
                like = layout_like(key, param)
                if like is not None and isinstance(value, Tensor) and tuple(value.shape) != tuple(like.shape):
                    raise ValueError(f"Invalid checkpoint: state[{pid!r}][{key!r}] has shape {tuple(value.shape)}, "
                                     f"its param {tuple(like.shape)}")
    return dict(originals=originals, saved_groups=saved_groups, current_groups=current_groups)
