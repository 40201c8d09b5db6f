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


_DTENSOR: list = []  # [DTensor class or None], filled on first use (a plain global: Dynamo traces it)


def _dtensor_type() -> Optional[type]:
    if not _DTENSOR:
        try:
            from torch.distributed.tensor import DTensor
        except ImportError:  # torch built without distributed
            DTensor = None
        _DTENSOR.append(DTensor)
    return _DTENSOR[0]


def is_dtensor(tensor: Optional[Tensor]) -> bool:
    """Whether ``tensor`` is a DTensor."""
    cls = _dtensor_type()
    return cls is not None and isinstance(tensor, cls)


def local(tensor: Optional[Tensor]) -> Optional[Tensor]:
    """The local shard of a DTensor (a view: in-place changes reach the DTensor), else the tensor."""
    return tensor.to_local() if is_dtensor(tensor) else tensor


def sharded_like(full: Tensor, like: Tensor) -> Tensor:
    """A full (unsharded) tensor as a DTensor laid out like the DTensor ``like``: each rank keeps
    its own piece of its own copy, without communication (every rank holds the full value, as
    when a full optimizer state dict is loaded on every rank)."""
    import inspect

    from torch.distributed.tensor import distribute_tensor

    local_only = {"src_data_rank": None} if "src_data_rank" in inspect.signature(distribute_tensor).parameters else {}
    return distribute_tensor(full.to(local(like).device), like.device_mesh, like.placements, **local_only)


def shard_groups(tensor: Tensor) -> tuple:
    """Process groups over which ``tensor`` is sharded (empty for plain or replicated tensors)."""
    if not is_dtensor(tensor):
        return ()
    from torch.distributed.tensor import Shard

    mesh = tensor.device_mesh
    return tuple(mesh.get_group(dim) for dim, placement in enumerate(tensor.placements) if isinstance(placement, Shard))


def common_shard_groups(params: list[Tensor], group_index: int) -> tuple:
    """The process groups every param of param group ``group_index`` is sharded over; a
    ValueError if they differ (per-group counts of such a group cannot be summed)."""
    groups = {shard_groups(p) for p in params}
    if len(groups) > 1:
        raise ValueError(
            f"mask_stats(global_counts=True): param group {group_index} mixes params sharded over different "
            f"process groups ({len(groups)} different placements, e.g. sharded and replicated); put them in "
            "separate param groups"
        )
    return groups.pop() if groups else ()


def all_reduce_sum(tensor: Tensor, groups: tuple) -> Tensor:
    """Sum ``tensor`` in place over every group in ``groups`` (no-op when there are none)."""
    if groups:
        import torch.distributed as dist

        for group in groups:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM, group=group)
    return tensor


def all_reduce_rows(rows: Tensor, groups: list[tuple]) -> Tensor:
    """Sum each row of ``rows`` in place over its own process groups (``groups[i]`` for row i):
    one collective for all rows when they share their groups, else one per row."""
    if not any(groups):
        return rows
    if all(g == groups[0] for g in groups):
        return all_reduce_sum(rows, groups[0])
    for row, row_groups in zip(rows, groups):
        all_reduce_sum(row, row_groups)
    return rows


def global_count(tensors: list[Tensor], groups: tuple, device: torch.device) -> Tensor:
    """Number of elements of a unit over all shards, as a float64 0-dim tensor."""
    count = torch.tensor(float(sum(t.numel() for t in tensors)), dtype=torch.float64, device=device)
    return all_reduce_sum(count, groups)


#: state entries that exist only after ``consolidate()`` / ``set_mask()``: a fresh optimizer
#: lacks them, so DCP would not load them unless they are created first
OPTIONAL_STATE_KEYS = ("anchor", "anchor_param", "user_mask")


def load_optimizer_checkpoint(model: torch.nn.Module, optimizer: torch.optim.Optimizer, checkpoint_id: str, key: str = "optim") -> None:
    """Load a MaskedAdamW state saved with ``torch.distributed.checkpoint`` (FSDP2 or not).

    DCP fills only the entries the live optimizer already has; a fresh optimizer has no
    ``anchor``, ``anchor_param`` or ``user_mask`` yet, so a plain ``dcp.load`` would drop them
    silently. This reads the checkpoint's metadata, creates those entries where it holds them,
    then loads: ``dcp.save({key: get_optimizer_state_dict(model, optimizer)}, checkpoint_id=...)``
    is the matching save. Every rank must call it.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict, set_optimizer_state_dict

    saved = set(dcp.FileSystemReader(checkpoint_id).read_metadata().state_dict_metadata)
    get_optimizer_state_dict(model, optimizer)  # a fresh optimizer creates its state here
    for name, param in model.named_parameters():
        wanted = [k for k in OPTIONAL_STATE_KEYS if f"{key}.state.{name}.{k}" in saved]
        if wanted:
            optimizer._create_state_entries(param, wanted)
    state = get_optimizer_state_dict(model, optimizer)
    dcp.load({key: state}, checkpoint_id=checkpoint_id)
    set_optimizer_state_dict(model, optimizer, state)
