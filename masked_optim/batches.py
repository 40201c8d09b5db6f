"""Small tensors stepped as one: which tensors go together, and their inputs gathered and
written back (the ``compile`` backend's batches).

A compiled call costs ~50 us of host time whatever its size (Dynamo's guards, the AOT wrapper,
Inductor's launcher), more than stepping a bias or a norm weight takes: GPT-2 small's 98 such
tensors cost 6.7 ms a step on 2 CPU cores, where ``torch.optim.AdamW(fused=True)`` takes ~1 ms
for them. Tensors of the same kind (device, dtypes, options, step count) are concatenated into
one buffer per input, stepped by one call, and their pieces copied back (``torch.cat`` and
``torch.split_with_sizes_copy``: a few us a tensor). Each member keeps its own histogram (a piece of the
batch's score bins) and its own threshold (a per-element threshold where members belong to
different units).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Hashable, Optional

import torch
from torch import Tensor

from masked_optim import scratch

#: tensors of at most this many elements are batched: below it the host cost of a call of its
#: own (~50 us) outweighs gathering and writing back (~70 B an element more, in cache)
MAX_BATCHED_NUMEL = 16384

#: positions in a tensor's flat inputs (param, grad, exp_avg, exp_avg_sq, importance, anchor,
#: anchor_param, user_mask) that a step writes, and are copied back from the batch
WRITTEN = (0, 2, 3, 4)


#: ``torch.cat`` of fewer elements takes its serial CPU kernel (one loop, ~0.25 us an input);
#: from ATen's grain size on it copies each input in a parallel region of its own (~3 us each
#: on 2 cores), so a batch is gathered in chunks below it
CAT_CHUNK = 32768


@dataclass
class Batch:
    """Tensors (their indices in the group) stepped as one."""

    members: list[int]
    sizes: list[int]
    shared_gate: bool  # every member in one unit: one threshold for the batch
    chunks: list[tuple[int, int, int, int]]  # gathered as (first, last) members into [begin, end)

    @property
    def numel(self) -> int:
        return sum(self.sizes)


def group(keys: list[Optional[Hashable]], sizes: list[int], units: list[list[int]]) -> list[Batch]:
    """Batches of the tensors whose ``keys`` are equal (None: never batched; a key names the
    device), two or more each, in order of their first member. ``units``: the gated members of
    each unit."""
    by_key: dict[Hashable, list[int]] = {}
    for i, key in enumerate(keys):
        if key is not None:
            by_key.setdefault(key, []).append(i)
    unit_of = {i: k for k, members in enumerate(units) for i in members}
    batches = []
    for members in by_key.values():
        if len(members) < 2:
            continue
        member_sizes = [sizes[i] for i in members]
        batches.append(Batch(
            members=members,
            sizes=member_sizes,
            shared_gate=len({unit_of.get(i) for i in members}) == 1,
            chunks=_chunks(member_sizes),
        ))
    return batches


def _chunks(sizes: list[int]) -> list[tuple[int, int, int, int]]:
    """Consecutive runs of members of fewer than ``CAT_CHUNK`` elements together (a member as
    large alone makes a run of its own): (first, last) member, [begin, end) elements."""
    chunks = []
    first = begin = end = 0
    for k, size in enumerate(sizes):
        if k > first and end + size - begin >= CAT_CHUNK:
            chunks.append((first, k, begin, end))
            first, begin = k, end
        end += size
    chunks.append((first, len(sizes), begin, end))
    return chunks


def _scratch(device: torch.device, dtype: torch.dtype, numel: int) -> Tensor:
    """Reused gather buffers, one per device and dtype (``scratch``): fresh ones each step cost
    their page faults, more than the copies themselves (~0.5 ms a step for GPT-2's 98 small
    tensors on a CPU)."""
    return scratch.reused("gathered inputs", device, dtype, numel)


def gather(flat: list[tuple[Optional[Tensor], ...]], batches: list[Batch]) -> list[list[Optional[Tensor]]]:
    """Each batch's members' flat inputs, each kind concatenated into one buffer (None where
    the members have none); the buffers are pieces of reused per-thread scratch, valid until
    the next ``gather`` in this thread. Concatenated in chunks of fewer than ``CAT_CHUNK``
    elements (``torch.cat``'s serial kernel; no thread count is changed)."""
    kinds = [[None if x is None else (x.device, x.dtype) for x in flat[batch.members[0]]] for batch in batches]
    needed: dict[tuple[torch.device, torch.dtype], int] = {}
    for batch, batch_kinds in zip(batches, kinds):
        for kind in batch_kinds:
            if kind is not None:
                needed[kind] = needed.get(kind, 0) + batch.numel
    scratch = {kind: _scratch(*kind, numel) for kind, numel in needed.items()}
    offsets = dict.fromkeys(needed, 0)
    gathered = []
    for batch, batch_kinds in zip(batches, kinds):
        inputs: list[Optional[Tensor]] = []
        for j, kind in enumerate(batch_kinds):
            if kind is None:
                inputs.append(None)
                continue
            start = offsets[kind]
            offsets[kind] = start + batch.numel
            buffer = scratch[kind][start:start + batch.numel]
            for first, last, begin, end in batch.chunks:
                torch.cat([flat[i][j] for i in batch.members[first:last]], out=buffer[begin:end])
            inputs.append(buffer)
        gathered.append(inputs)
    return gathered


def pieces(buffer: Optional[Tensor], batch: Batch) -> list[Optional[Tensor]]:
    """A batch buffer's member pieces (views), or None for each member where it is None."""
    if buffer is None:
        return [None] * len(batch.members)
    return list(buffer.split(batch.sizes))


def scatter(flat: list[tuple[Optional[Tensor], ...]], batch: Batch, inputs: list[Optional[Tensor]]) -> None:
    """Copy the stepped buffers (param, moments, importance) back into the members' tensors."""
    for j in WRITTEN:
        torch.split_with_sizes_copy(inputs[j], batch.sizes, out=[flat[i][j] for i in batch.members])


def element_thresholds(gates: list[Optional[Tensor]], batch: Batch) -> Tensor:
    """The members' thresholds as one per element (one-element int64 tensors, expanded)."""
    stacked = torch.stack([gates[i].reshape(()) for i in batch.members])
    sizes = torch.tensor(batch.sizes, device=stacked.device)  # (made only for gated batches)
    return stacked.repeat_interleave(sizes, output_size=batch.numel)
