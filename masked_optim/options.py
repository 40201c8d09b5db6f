"""Hyper-parameter defaults and validation for MaskedAdamW param groups.

Every check raises before anything is changed, with a message naming the argument and value.
"""
from __future__ import annotations

import difflib
import math
import numbers
import sys
import warnings
from typing import Any

import torch
from torch import Tensor

MASKS = ("select", "protect")
IMPORTANCES = ("fisher", "taylor", "magnitude")
NONFINITE = ("skip", "propagate")
SCOPES = ("tensor", "group")
BACKENDS = ("auto", "torch", "compile", "triton")
IMPORTANCE_DTYPES = ("float32", "bfloat16")

DEFAULTS: dict[str, Any] = dict(
    lr=1e-3,
    betas=(0.9, 0.999),
    eps=1e-8,
    weight_decay=1e-2,
    density=1.0,
    mask="select",
    importance="fisher",
    importance_beta=0.99,
    protect_strength=0.0,
    anchor_decay=0.0,
    scope="tensor",
    maximize=False,
    nonfinite="skip",
    backend="auto",
    importance_dtype="float32",
    gate_block=1,
    # torch.optim.AdamW's implementation flags, kept in each group as AdamW keeps them (code
    # written for it reads them): ``foreach`` and ``fused`` are hints (the backend chooses; the
    # constructor's fused=True makes the step unscale a GradScaler's grads itself), the others
    # name variants MaskedAdamW does not have, so they must stay at AdamW's defaults. Not
    # ``capturable`` (False only, checked by the constructor): Dynamo sets a group's
    # ``capturable`` to True when it traces a step, which would claim CUDA-graph capture
    amsgrad=False,
    foreach=None,
    fused=None,
    differentiable=False,
    decoupled_weight_decay=True,
)

#: largest ``gate_block``: it must divide the Triton kernel's block (1024 elements on CUDA)
MAX_GATE_BLOCK = 1024


def _number(name: str, value: Any, read_tensors: bool = True) -> float:
    """``value`` as a float; a 1-element Tensor is read only when ``read_tensors`` (else NaN-free
    0.0 stands in: the step path never synchronises with the device to re-check a Tensor lr)."""
    if isinstance(value, Tensor):
        if value.numel() != 1:
            raise ValueError(f"{name} must be a float or a 1-element Tensor, got a Tensor of shape {tuple(value.shape)}")
        return float(value.detach().reshape(()).item()) if read_tensors else 0.0
    if isinstance(value, bool) or not isinstance(value, (int, float, numbers.Real)):  # numbers.Real: numpy scalars
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


def _finite(value: float) -> bool:
    """``math.isfinite`` spelled with comparisons, which torch.compile can trace when it makes
    an option a symbolic float (several optimizers compiled through the same ``step``)."""
    return -math.inf < value < math.inf


def importance_dtype_name(value: Any) -> Any:
    """``"float32"``/``"bfloat16"`` for the name or the torch dtype (anything else unchanged)."""
    if isinstance(value, torch.dtype):
        return {torch.float32: "float32", torch.bfloat16: "bfloat16"}.get(value, value)
    return value


def _choice(name: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise ValueError(f"Invalid {name}: {value!r} (expected one of {', '.join(map(repr, allowed))})")


def validate_group(group: dict[str, Any], read_tensors: bool = True) -> None:
    """Raise ValueError naming the first invalid hyper-parameter of ``group``.

    ``read_tensors=False`` (every step) checks the shape but not the value of lr, betas, eps,
    weight_decay, protect_strength or anchor_decay given as a 1-element Tensor, which would
    cost a device synchronisation; their values are checked when the group is added.
    """
    lr = _number("lr", group["lr"], read_tensors)
    if not _finite(lr) or lr < 0:
        raise ValueError(f"Invalid lr: {lr} (must be finite and >= 0)")
    betas = group["betas"]
    if not isinstance(betas, (tuple, list)) or len(betas) != 2:
        raise ValueError(f"Invalid betas: {betas!r} (expected a pair)")
    for index, beta in enumerate(betas):
        value = _number(f"betas[{index}]", beta, read_tensors)
        if not 0.0 <= value < 1.0:
            raise ValueError(f"Invalid beta parameter at index {index}: {value} (must be in [0, 1))")
    ranges = (("eps", 0.0), ("weight_decay", 0.0), ("protect_strength", 0.0), ("anchor_decay", 0.0))
    for name, low in ranges:
        value = _number(name, group[name], read_tensors)
        if not _finite(value) or value < low:
            raise ValueError(f"Invalid {name}: {value} (must be finite and >= {low})")
    for name in ("density", "importance_beta"):  # read on the host every step: never a Tensor
        if isinstance(group[name], Tensor):
            raise ValueError(f"Invalid {name}: {group[name]!r} (must be a number: {name} has no Tensor form)")
    density = _number("density", group["density"])
    if not 0.0 < density <= 1.0:
        raise ValueError(f"Invalid density: {density} (must be in (0, 1])")
    importance_beta = _number("importance_beta", group["importance_beta"])
    if not 0.0 <= importance_beta < 1.0:
        raise ValueError(f"Invalid importance_beta: {importance_beta} (must be in [0, 1))")
    _choice("mask", group["mask"], MASKS)
    _choice("importance", group["importance"], IMPORTANCES)
    _choice("nonfinite", group["nonfinite"], NONFINITE)
    _choice("scope", group["scope"], SCOPES)
    _choice("backend", group["backend"], BACKENDS)
    _choice("importance_dtype", importance_dtype_name(group["importance_dtype"]), IMPORTANCE_DTYPES)
    gate_block = group["gate_block"]
    if isinstance(gate_block, bool) or not isinstance(gate_block, numbers.Integral) or not 1 <= gate_block <= MAX_GATE_BLOCK \
            or gate_block & (gate_block - 1):
        raise ValueError(f"Invalid gate_block: {gate_block!r} (must be a power of two in [1, {MAX_GATE_BLOCK}])")
    if not isinstance(group["maximize"], bool):
        raise ValueError(f"Invalid maximize: {group['maximize']!r} (must be a bool)")
    validate_adamw_flags(group, read_tensors)


def validate_adamw_flags(group: dict[str, Any], read_tensors: bool = True) -> None:
    """torch.optim.AdamW's implementation flags in ``group`` (absent ones are not checked;
    ``capturable`` never is, as Dynamo's view of a traced step's groups has it True):
    speed hints taken, variants MaskedAdamW does not have refused (``adamw_flag``). Adam's
    ``decoupled_weight_decay=False`` is refused unless ``weight_decay`` is 0 (then Adam's
    step is AdamW's; ``read_tensors``: as ``validate_group``'s)."""
    for name in ("amsgrad", "foreach", "fused", "differentiable"):
        if name in group:
            adamw_flag(name, group[name])
    decoupled = group.get("decoupled_weight_decay", True)
    if not isinstance(decoupled, bool):
        raise ValueError(f"Invalid decoupled_weight_decay: {decoupled!r} (must be a bool)")
    if not decoupled and _number("weight_decay", group["weight_decay"], read_tensors) != 0.0:
        raise ValueError(f"Invalid decoupled_weight_decay: False with weight_decay={group['weight_decay']} (Adam's "
                         "L2 decay; MaskedAdamW's decay is AdamW's, decoupled)")


def adamw_flag(name: str, value: Any) -> None:
    """One of torch.optim.AdamW's flags: ``foreach``/``fused`` are hints (None or a bool), the
    others (``amsgrad``, ``capturable``, ``differentiable``) False only (ValueError)."""
    hint = name in ("foreach", "fused")
    if not (isinstance(value, bool) or (hint and value is None)):
        raise ValueError(f"Invalid {name}: {value!r} (must be a bool{' or None' if hint else ''})")
    if value and not hint:
        raise ValueError(f"Invalid {name}: True (MaskedAdamW has no {name} variant; it takes the flag for "
                         "torch.optim.AdamW compatibility, False only)")


def validate_param(param: Tensor) -> None:
    """Reject parameters the optimizer cannot step."""
    if not isinstance(param, Tensor):
        raise TypeError(f"params must be Tensors, got {type(param).__name__}")
    if not (param.is_floating_point() or param.is_complex()):
        raise ValueError(f"Invalid param dtype: {param.dtype} (MaskedAdamW steps floating-point and complex params only)")


#: packages between a user's line and a warning: ours, torch's, and the training frameworks
#: that call ``opt.step()`` for the user (accelerate's optimizer wrapper, the HF Trainer, Lightning)
_LIBRARY_PACKAGES = ("masked_optim", "torch", "accelerate", "transformers", "lightning", "pytorch_lightning")


def user_stacklevel() -> int:
    """``warnings.warn``'s stacklevel, called from the function that warns, of the first frame
    outside masked_optim, torch and the training frameworks: a warning names the user's line
    (``trainer.train()`` under a Trainer), not a decorator's, ``Optimizer.__init__``'s or
    accelerate's."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").split(".")[0] in _LIBRARY_PACKAGES:
        frame, level = frame.f_back, level + 1
    return level


#: keys torch and its schedulers (and ours) put in param groups besides the options
_KNOWN_EXTRA_KEYS = ("params", "param_names", "initial_lr", "initial_density", "capturable")


def warn_misspelt_options(group: dict) -> None:
    """Warn about a param-group key that is no option but close to one (``densityy``): extra
    keys are kept, as torch's optimizers keep them (names, tags), so a misspelt option would
    otherwise be silently ignored."""
    for key in group:
        if not isinstance(key, str) or key in DEFAULTS or key in _KNOWN_EXTRA_KEYS:
            continue
        close = difflib.get_close_matches(key, list(DEFAULTS), n=1, cutoff=0.8)
        if close:
            warnings.warn(f"param group key {key!r} is not a MaskedAdamW option (did you mean {close[0]!r}?): it is kept, "
                          "as torch's optimizers keep extra keys, and changes nothing", UserWarning, stacklevel=user_stacklevel())
