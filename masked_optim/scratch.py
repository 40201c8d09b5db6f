"""Buffers reused from step to step, one per purpose, device and dtype (and thread).

A step at density < 1 needs large temporaries: a tensor's score bins (4 B an element), one
histogram row per gated tensor (256 KB each), their cumulative sums, the gathered inputs of
batched small tensors. Allocated afresh each step, each is page-faulted in again: on a CPU that
cost as much as the step itself (score bins at 16M elements; the cumulative sums of GPT-2's 146
units: 18 ms instead of 1.3 ms). So each purpose keeps one buffer per device and dtype, grown
to the largest size asked for and kept for the life of the process (README: Known limitations),
per thread, so that steps in two threads never share one.
"""
from __future__ import annotations

import threading

import torch
from torch import Tensor

_BUFFERS = threading.local()


def reused(purpose: str, device: torch.device, dtype: torch.dtype, numel: int) -> Tensor:
    """A 1-D buffer of ``numel`` elements (uninitialised), the same memory for every call with
    the same ``purpose``, device and dtype in this thread until a larger one is asked for: a
    result is valid until the next call for its purpose."""
    buffers: dict = _BUFFERS.__dict__.setdefault("buffers", {})
    key = (purpose, torch.device(device), dtype)
    buffer = buffers.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = buffers[key] = torch.empty(numel, dtype=dtype, device=device)
    return buffer[:numel]


def held(purpose: str, device: torch.device, dtype: torch.dtype) -> int:
    """Elements of the buffer this thread holds for ``purpose`` (0: none yet)."""
    buffer = _BUFFERS.__dict__.get("buffers", {}).get((purpose, torch.device(device), dtype))
    return 0 if buffer is None else buffer.numel()
