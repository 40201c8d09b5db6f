"""DTensor (FSDP2) support: backends see local shards; unit-wide sums go through collectives.

Under ``fully_shard`` every parameter is a DTensor holding one shard of the full tensor
(possibly empty). State created with ``zeros_like(p)`` stays a DTensor; the backends work on
``to_local()`` views, and the only cross-shard quantities — a unit's histogram (for its
threshold) and its importance mean (for ``consolidate``) — are all-reduced over the groups the
tensor is sharded across, so every rank derives the single-process values.
"""
from __future__ import annotations

from typing import Any, Optional

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


def _fqns(model: torch.nn.Module, name: str) -> set:
    """The names DCP's state dicts give the param ``name`` of ``model`` (wrappers' prefixes such as
    ``_orig_mod.`` removed, as torch's ``get_optimizer_state_dict`` removes them)."""
    try:
        from torch.distributed.checkpoint.state_dict import _get_fqns
    except ImportError:  # (a torch without it: the plain name)
        return {name}
    return set(_get_fqns(model, name))


def _create_saved_entries(model: torch.nn.Module, optimizer: torch.optim.Optimizer, holds,
                          from_rank0: bool = False) -> None:
    """Create, on ``optimizer``, the optional state entries (``OPTIONAL_STATE_KEYS``) that a
    state dict or checkpoint holds: ``holds(fqn, key)``; with ``from_rank0``, the ones rank 0's
    holds (the other ranks' state dicts are empty under ``broadcast_from_rank0``). A fresh
    optimizer first makes its state as torch's loaders make it (one step with zero grads and lr 0)."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    if not optimizer.state:
        get_optimizer_state_dict(model, optimizer)  # a fresh optimizer creates its state here
    in_optimizer = {id(p) for group in optimizer.param_groups for p in group["params"]}
    named = [(name, param) for name, param in model.named_parameters() if id(param) in in_optimizer]
    wanted = [[k for k in OPTIONAL_STATE_KEYS if any(holds(fqn, k) for fqn in _fqns(model, name))] for name, _ in named]
    if from_rank0:
        import torch.distributed as dist

        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            shared = [wanted]
            dist.broadcast_object_list(shared, src=0)
            wanted = shared[0]
    for (_, param), keys in zip(named, wanted):
        if keys:
            optimizer._create_state_entries(param, keys)


def _flattened(options: Any) -> bool:
    return bool(getattr(options, "flatten_optimizer_state_dict", False))


def set_optimizer_state_dict(model: torch.nn.Module, optimizer: torch.optim.Optimizer,
                             optim_state_dict: dict, *, options: Any = None) -> None:
    """``torch.distributed.checkpoint.state_dict.set_optimizer_state_dict`` for MaskedAdamW: the
    same arguments, and the anchors and masks in ``optim_state_dict`` load into an optimizer that
    lacks them (a fresh one, or one not consolidated yet).

    torch rebuilds a *flattened* state dict (``StateDictOptions(flatten_optimizer_state_dict=True)``,
    torchtitan's format) from the entries the live optimizer already has, so ``anchor``,
    ``anchor_param`` and ``user_mask`` would be dropped silently; they are created first here. A
    nested state dict loads whole either way. With ``broadcast_from_rank0`` the entries rank 0's
    state dict holds are made on every rank. Every rank must call it (as torch's).
    """
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict as torch_set

    if _flattened(options):
        def holds(fqn: str, key: str) -> bool:
            return f"state.{fqn}.{key}" in optim_state_dict
    else:
        saved = optim_state_dict.get("state", {}) if isinstance(optim_state_dict, dict) else {}

        def holds(fqn: str, key: str) -> bool:
            return isinstance(saved.get(fqn), dict) and key in saved[fqn]
    _create_saved_entries(model, optimizer, holds, from_rank0=bool(getattr(options, "broadcast_from_rank0", False)))
    torch_set(model, optimizer, optim_state_dict, options=options)


def load_optimizer_checkpoint(model: torch.nn.Module, optimizer: torch.optim.Optimizer, checkpoint_id: str,
                              key: str = "optim", *, options: Any = None) -> None:
    """Load a MaskedAdamW state saved with ``torch.distributed.checkpoint`` (FSDP2 or not).

    DCP fills only the entries the live optimizer already has; a fresh optimizer has no
    ``anchor``, ``anchor_param`` or ``user_mask`` yet, so a plain ``dcp.load`` would drop them
    silently. This reads the checkpoint's metadata, creates those entries where it holds them,
    then loads: ``dcp.save({key: get_optimizer_state_dict(model, optimizer, options=options)},
    checkpoint_id=...)`` is the matching save; give the same ``options`` (``StateDictOptions``,
    e.g. ``flatten_optimizer_state_dict=True``) here. Entries the checkpoint lacks are removed
    (an optimizer consolidated after the checkpoint was saved returns to it). Every rank must
    call it.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict as torch_set

    saved = set(dcp.FileSystemReader(checkpoint_id).read_metadata().state_dict_metadata)
    # (nested and flattened state dicts give the same names in the checkpoint)
    def holds(fqn: str, k: str) -> bool:
        return f"{key}.state.{fqn}.{k}" in saved

    _create_saved_entries(model, optimizer, holds)
    for name, param in model.named_parameters():  # entries made after the checkpoint (a rollback) go
        state = optimizer.state.get(param, {})
        for k in OPTIONAL_STATE_KEYS:
            if k in state and not any(holds(fqn, k) for fqn in _fqns(model, name)):
                del state[k]
    state = get_optimizer_state_dict(model, optimizer, options=options)
    dcp.load({key: state}, checkpoint_id=checkpoint_id)
    torch_set(model, optimizer, state, options=options)
