"""Memory layouts the fused backends step: any dense layout, state laid out like its param.

A param may be stored in any dimension order (channels_last, a transposed weight); its state
tensors are created in the same layout (``torch.zeros_like`` keeps it), so the fused backends
walk param and state in memory order, element for element. Read-only inputs in another layout
(a grad, a user mask) are copied into the param's layout first.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from masked_optim.functional import TensorState, check_state

#: state tensors created like their param (in its layout)
STATE_LIKE_PARAM = ("exp_avg", "exp_avg_sq", "importance", "anchor", "anchor_param")


def is_dense(tensor: Tensor) -> bool:
    """Whether the tensor's elements fill a contiguous memory range (any dimension order)."""
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(tensor.stride(), tensor.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def same_layout(tensor: Tensor, param: Tensor) -> bool:
    """Whether ``tensor`` has ``param``'s shape and strides (strides of size-1 dims aside)."""
    if tensor.shape != param.shape:
        return False
    return all(s == p for s, p, n in zip(tensor.stride(), param.stride(), param.shape) if n != 1)


def in_param_layout(tensor: Tensor, param: Tensor) -> Tensor:
    """A read-only input laid out like the param: itself, or a copy in the param's layout."""
    if same_layout(tensor, param):
        return tensor
    return torch.empty_like(param, dtype=tensor.dtype).copy_(tensor)


def memory_order_view(tensor: Tensor) -> Tensor:
    """A dense tensor's elements as a 1-D view in memory order (the tensor itself if 1-D)."""
    if tensor.dim() == 1 and tensor.stride(0) == 1:
        return tensor
    return tensor.as_strided((tensor.numel(),), (1,), tensor.storage_offset())


def check_dense(param: Tensor, backend: str) -> None:
    """ValueError, naming ``backend`` and the layout, unless ``param`` is dense."""
    if not (param.is_contiguous() or is_dense(param)):
        raise ValueError(f"backend={backend!r} needs dense params (any dimension order), got strides {param.stride()} "
                         f"for shape {tuple(param.shape)}; use backend='torch'")


def checked_inputs(t: TensorState, backend: str) -> tuple[Tensor, Optional[Tensor]]:
    """Check ``t``'s state as every backend does (``functional.check_state``), and that its
    param is dense and its state laid out like it (ValueError naming ``backend``, the tensor
    and its layout); return its grad and user mask in the param's
    layout (copies where they are laid out otherwise)."""
    param = t.param
    check_dense(param, backend)
    check_state(t)
    contiguous, shape = param.is_contiguous(), param.shape
    for name in STATE_LIKE_PARAM:
        tensor = getattr(t, name)
        if tensor is None or (contiguous and tensor.shape == shape and tensor.is_contiguous()):
            continue  # the common case, checked cheaply (a step's host time is ~10 us a tensor)
        if not same_layout(tensor, param):
            raise ValueError(f"backend={backend!r} needs {name} laid out like its param (shape {tuple(param.shape)}, "
                             f"strides {param.stride()}), got shape {tuple(tensor.shape)}, strides {tensor.stride()}")
    mask = None if t.user_mask is None else in_param_layout(t.user_mask, param)
    grad = t.grad
    if not (contiguous and grad.shape == shape and grad.is_contiguous()):
        grad = in_param_layout(grad, param)
    return grad, mask


def real_view(tensor: Tensor) -> Tensor:
    """A complex tensor as its real view (``[..., 2]``, as torch's optimizers step it), else itself."""
    return torch.view_as_real(tensor) if tensor.is_complex() else tensor
