"""Host side of the multi-tensor launch: checks, dtype buckets and the device pointer tables.

A group's tensors become one int64 tensor table (addresses, sizes, units: ``layout.py``), one
int64 unit table (address of each gated unit's stored threshold) and, per bucket of equal
dtypes and features, an int32 block table (the tensor-table row of every program). Tables are
cached by their contents (which are addresses and sizes only), so a steady training loop
builds them once and then only hashes the addresses; and a step whose ``signature`` (address,
dtype, shape and strides of every tensor, and the gating) matches an earlier checked step
reuses its tables without repeating the per-tensor checks. (With the eager call that skips the
op dispatcher, ``op.step_group``, the host-side cost of a step of GPT-2 small's 148 tensors went
from ~11 ms to ~0.85 ms on a 2-core CPU, about a third of it the signature:
``benchmarks/host_overhead.py``.)
"""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass, field
from typing import Optional

import torch
import triton.language as tl
from torch import Tensor

from masked_optim import threshold as thr
from masked_optim.functional import TensorState, math_dtype
from masked_optim.layouts import checked_inputs
from masked_optim.kernels import layout

#: param dtype -> Triton dtype; the math and moment dtype is fp32 except for fp64 params
TRITON_DTYPES = {
    torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float64: tl.float64,
}
IMPORTANCE_DTYPES = (torch.float32, torch.bfloat16)
_CACHE_SIZE = 64


@dataclass(frozen=True)
class BucketKey:
    """What a launch compiles for: the dtypes and which optional tensors exist."""

    param: torch.dtype
    grad: torch.dtype
    importance: torch.dtype
    anchor: Optional[torch.dtype]
    anchor_param: Optional[torch.dtype]
    user_mask: bool
    gated: bool
    #: every address of the tensor's row is a multiple of 16 bytes (128-bit accesses)
    aligned: bool = False

    @property
    def math(self) -> torch.dtype:
        return math_dtype(self.param)


@dataclass
class Bucket:
    """One launch: its compile-time key, its block table and its grid size."""

    key: BucketKey
    block_table: Tensor
    blocks: int


@dataclass
class GroupTables:
    """Everything a group's step needs on the device that does not change between steps."""

    tensor_table: Tensor
    unit_table: Tensor  # int64 [units, 2]: stored-threshold address, host vouches it is known
    unknown_thresholds: Tensor  # int64 [units] of -1: the "no pre-pass" threshold
    fresh_counts: Tensor  # int64 [COUNT_FIELDS]: elements, then zeros
    buckets: list[Bucket]
    tensor_count: int
    unit_count: int
    #: on CUDA, recorded on the stream the tables were copied on (they arrive without the host
    #: waiting): a step on another stream waits for it on the device (``ready_on``)
    copied: Optional["torch.cuda.Event"] = None
    #: the launch variants (``launch.variant``) whose kernels were compiled ahead of a step
    compiled: set = field(default_factory=set)

    def ready_on(self, device: torch.device) -> None:
        """Order the current stream of ``device`` after the tables' copies (no host wait)."""
        if self.copied is not None:
            torch.cuda.current_stream(device).wait_event(self.copied)


_cache: "OrderedDict[tuple, GroupTables]" = OrderedDict()
_checked: "dict[tuple, GroupTables]" = {}


_ABSENT = (None, None, None, None)


def signature(tensors: list[TensorState], scored: list[bool], unit_of: list[int], unit_known: list[bool], block: int, device: torch.device) -> tuple:
    """What a group's checked tables depend on, cheap to compute every step: the address,
    dtype, shape and strides of every param-shaped tensor the kernel reads or writes, the
    counters' addresses and dtypes, and the gating layout (a tensor's device is implied by its
    address: CUDA's unified virtual addressing keeps host and device addresses apart).

    Two steps with equal signatures step the same memory with the same layouts, so the second
    may skip ``flat_inputs``' and ``_counters``' checks. Addresses alone are not enough: a freed
    tensor's memory is reused by the next allocation of the same size, e.g. a transposed
    ``set_mask`` mask after a contiguous one. One flat tuple, a fixed number of fields per
    tensor: each attribute read costs ~0.1 us on a slow CPU, ~0.3 ms a step for GPT-2 small's
    148 tensors, about a third of the fast path's host time.
    """
    parts: list = [device, block, tuple(unit_known)]
    extend = parts.extend
    for t, gated, unit in zip(tensors, scored, unit_of):
        param, grad, exp_avg, exp_avg_sq, importance = t.param, t.grad, t.exp_avg, t.exp_avg_sq, t.importance
        step, importance_step, threshold = t.step, t.importance_step, t.threshold
        extend((
            param.data_ptr(), param.dtype, param.shape, param.stride(),
            grad.data_ptr(), grad.dtype, grad.shape, grad.stride(),
            exp_avg.data_ptr(), exp_avg.dtype, exp_avg.shape, exp_avg.stride(),
            exp_avg_sq.data_ptr(), exp_avg_sq.dtype, exp_avg_sq.shape, exp_avg_sq.stride(),
            importance.data_ptr(), importance.dtype, importance.shape, importance.stride(),
            step.data_ptr(), step.dtype, importance_step.data_ptr(), importance_step.dtype,
            threshold.data_ptr(), threshold.dtype, gated, unit,
        ))
        for optional in (t.anchor, t.anchor_param, t.user_mask):
            extend(_ABSENT if optional is None else (optional.data_ptr(), optional.dtype, optional.shape, optional.stride()))
    return tuple(parts)


def checked_group(key: tuple) -> Optional[GroupTables]:
    """The tables of an earlier step with this ``signature`` whose inputs passed every check.

    One hash and one comparison of the key, no reordering: ``move_to_end`` would hash the
    ~6,000-element key of a GPT-2 step again (~40 us), so the oldest entry is dropped first.
    """
    return _checked.get(key)


def remember_checked(key: tuple, tables: GroupTables) -> None:
    """Remember tables built from checked inputs that are the tensors themselves (no copies)."""
    _checked[key] = tables
    if len(_checked) > _CACHE_SIZE:
        del _checked[next(iter(_checked))]


def flat_inputs(t: TensorState) -> tuple[Tensor, Optional[Tensor]]:
    """Check one tensor's state for the kernel; return its grad and user mask in the param's layout.

    Raises ValueError naming the tensor and the problem for dtypes the kernel does not handle
    and for a param or state tensor that is not dense or not laid out like the param. The grad
    and user mask are only read, so one in another layout is copied into the param's layout.
    """
    grad, mask = checked_inputs(t, "triton")  # what every backend checks first (functional.check_state)
    param = t.param
    if param.dtype not in TRITON_DTYPES:
        raise ValueError(f"backend='triton' steps float32, bfloat16, float16 and float64 params, got {param.dtype}")
    if t.grad.dtype not in TRITON_DTYPES:
        raise ValueError(f"backend='triton' cannot read {t.grad.dtype} gradients")
    for name in ("importance", "anchor"):
        tensor = getattr(t, name)
        if tensor is not None and tensor.dtype not in IMPORTANCE_DTYPES:
            raise ValueError(f"backend='triton' stores {name} in float32 or bfloat16, got {tensor.dtype}")
    if t.threshold.dtype != torch.int64 or t.threshold.numel() != 1:
        raise ValueError(
            f"backend='triton' needs state['threshold'] as a one-element int64 tensor, got {t.threshold.dtype} "
            f"of shape {tuple(t.threshold.shape)}"
        )
    if t.anchor_param is not None and (t.anchor is None or t.anchor_param.dtype not in TRITON_DTYPES):
        raise ValueError(f"backend='triton' needs anchor_param ({t.anchor_param.dtype}) together with an anchor")
    return grad, mask


def bucket_key(t: TensorState, grad: Tensor, user_mask: Optional[Tensor], gated: bool) -> BucketKey:
    """The compile-time key of the launch that steps ``t``."""
    return BucketKey(
        param=t.param.dtype, grad=grad.dtype, importance=t.importance.dtype,
        anchor=None if t.anchor is None else t.anchor.dtype,
        anchor_param=None if t.anchor_param is None else t.anchor_param.dtype,
        user_mask=user_mask is not None, gated=gated,
        aligned=all(tensor is None or tensor.data_ptr() % 16 == 0 for tensor in (
            t.param, grad, t.exp_avg, t.exp_avg_sq, t.importance, t.anchor, t.anchor_param, user_mask,
        )),
    )


def _address(tensor: Optional[Tensor]) -> int:
    return 0 if tensor is None else tensor.data_ptr()


def to_device(host: Tensor, device: torch.device) -> Tensor:
    """A tensor built on the host, on ``device``: to CUDA through pinned memory without waiting
    (a copy from pageable memory may wait for the device's queued work, CUDA's documentation
    says: a host sync that would stop the host running ahead of the device; torch's
    pinned-memory allocator keeps the buffer until the copy is done). The launcher's
    per-step hyper table and copied counters go through here too."""
    if device.type != "cuda" or host.device.type != "cpu":
        return host.to(device)
    return host.pin_memory().to(device, non_blocking=True)


def group_tables(
    tensors: list[TensorState],
    inputs: list[tuple[Tensor, Optional[Tensor]]],
    counters: list[tuple[Tensor, Tensor]],
    keys: list[BucketKey],
    unit_of: list[int],
    unit_first: list[int],
    unit_known: list[bool],
    block: int,
    device: torch.device,
) -> GroupTables:
    """Device tables of one group (cached by content).

    ``inputs`` are the (grad, user mask) of ``flat_inputs``; ``counters`` the (step,
    importance_step) float32 0-dim tensors the kernels read and the finish kernel increments;
    ``unit_of[i]`` the gated unit of tensor i (-1: not gated); ``unit_first[u]`` the tensor whose
    stored threshold is unit u's; ``unit_known[u]`` whether the host vouches for it.
    """
    order = {key: index for index, key in enumerate(dict.fromkeys(keys))}
    bucket_rows: list[list[int]] = [[] for _ in order]
    bucket_blocks = [0] * len(order)
    rows = []
    for index, (t, (grad, user_mask), (step, importance_step), key) in enumerate(zip(tensors, inputs, counters, keys)):
        bucket_rows[order[key]].append(index)
        first_block = bucket_blocks[order[key]]
        bucket_blocks[order[key]] += -(-t.param.numel() // block)
        row = [0] * layout.TENSOR_FIELDS
        row[layout.PARAM] = _address(t.param)
        row[layout.GRAD] = _address(grad)
        row[layout.EXP_AVG] = _address(t.exp_avg)
        row[layout.EXP_AVG_SQ] = _address(t.exp_avg_sq)
        row[layout.IMPORTANCE] = _address(t.importance)
        row[layout.ANCHOR] = _address(t.anchor)
        row[layout.ANCHOR_PARAM] = _address(t.anchor_param)
        row[layout.USER_MASK] = _address(user_mask)
        row[layout.STEP] = _address(step)
        row[layout.IMPORTANCE_STEP] = _address(importance_step)
        row[layout.THRESHOLD] = _address(t.threshold)
        row[layout.NUMEL] = t.param.numel()
        row[layout.FIRST_BLOCK] = first_block
        row[layout.UNIT] = unit_of[index]
        rows.append(row)
    units = [(rows[i][layout.THRESHOLD], int(known)) for i, known in zip(unit_first, unit_known)]
    cache_key = (device, block, tuple(map(tuple, rows)), tuple(units), tuple(order), tuple(map(tuple, bucket_rows)))
    cached = _cache.get(cache_key)
    if cached is not None:
        _cache.move_to_end(cache_key)
        return cached
    buckets = []
    for key, members in zip(order, bucket_rows):
        blocks = [-(-rows[i][layout.NUMEL] // block) for i in members]
        block_table = torch.repeat_interleave(torch.tensor(members, dtype=torch.int32), torch.tensor(blocks, dtype=torch.int64))
        buckets.append(Bucket(key=key, block_table=to_device(block_table, device), blocks=sum(blocks)))
    elements = sum(row[layout.NUMEL] for row in rows)
    tables = GroupTables(
        tensor_table=to_device(torch.tensor(rows, dtype=torch.int64).reshape(len(rows), layout.TENSOR_FIELDS), device),
        unit_table=to_device(torch.tensor(units, dtype=torch.int64).reshape(len(units), 2), device),
        unknown_thresholds=torch.full((len(units),), thr.UNKNOWN, dtype=torch.int64, device=device),
        fresh_counts=to_device(torch.tensor([elements] + [0] * (layout.COUNT_FIELDS - 1), dtype=torch.int64), device),
        buckets=buckets, tensor_count=len(rows), unit_count=len(units),
    )
    if device.type == "cuda":  # the copies went to the device's current stream (``to_device``)
        tables.copied = torch.cuda.Event()
        tables.copied.record(torch.cuda.current_stream(device))
    _cache[cache_key] = tables
    if len(_cache) > _CACHE_SIZE:
        _cache.popitem(last=False)
    return tables
