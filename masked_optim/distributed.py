"""DTensor (FSDP2) support: backends see local shards; unit-wide sums go through collectives.

Under ``fully_shard`` every parameter is a DTensor holding one shard of the full tensor
(possibly empty). State created with ``zeros_like(p)`` stays a DTensor; the backends work on
``to_local()`` views, and the only cross-shard quantities — a unit's histogram (for its
threshold) and its importance mean (for ``consolidate``) — are all-reduced over the groups the
tensor is sharded across, so every rank derives the single-process values.
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


def _dtensor_type() -> Optional[type]:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # torch built without distributed
        return None
    return DTensor


def is_dtensor(tensor: Optional[Tensor]) -> bool:
    """Whether ``tensor`` is a DTensor."""
    cls = _dtensor_type()
    return cls is not None and isinstance(tensor, cls)


def local(tensor: Optional[Tensor]) -> Optional[Tensor]:
    """The local shard of a DTensor (a view: in-place changes reach the DTensor), else the tensor."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def shard_groups(tensor: Tensor) -> tuple:
    """Process groups over which ``tensor`` is sharded (empty for plain or replicated tensors)."""
    if not is_dtensor(tensor):
        return ()
    from torch.distributed.tensor import Shard

    mesh = tensor.device_mesh
    return tuple(mesh.get_group(dim) for dim, placement in enumerate(tensor.placements) if isinstance(placement, Shard))


def all_reduce_sum(tensor: Tensor, groups: tuple) -> Tensor:
    """Sum ``tensor`` in place over every group in ``groups`` (no-op when there are none)."""
    if groups:
        import torch.distributed as dist

        for group in groups:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def global_count(tensors: list[Tensor], groups: tuple, device: torch.device) -> Tensor:
    """Number of elements of a unit over all shards, as a float64 0-dim tensor."""
    count = torch.tensor(float(sum(t.numel() for t in tensors)), dtype=torch.float64, device=device)
    return all_reduce_sum(count, groups)
