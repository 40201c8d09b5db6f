"""Scenarios run inside each rank of tests/test_distributed.py (gloo, CPU)."""
from __future__ import annotations

import copy
import faulthandler
import os
import sys

import torch
import torch.distributed as dist

from masked_optim import MaskedAdamW
from tests.tolerances import assert_close

OPTIONS = dict(lr=1e-2, weight_decay=0.01, density=0.3, anchor_decay=5.0, importance_beta=0.9)


def model_factory() -> torch.nn.Module:
    torch.manual_seed(0)
    # odd sizes give uneven shards; the 1-output head's bias is an empty shard on rank 1
    return torch.nn.Sequential(torch.nn.Linear(13, 7), torch.nn.Tanh(), torch.nn.Linear(7, 9), torch.nn.Tanh(), torch.nn.Linear(9, 1))


def batches(steps: int, rank: int = 0) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = torch.Generator().manual_seed(100 + rank)
    return [(torch.randn(16, 13, generator=gen), torch.randn(16, 1, generator=gen)) for _ in range(steps)]


def train(model, opt, data, consolidate_at=None) -> None:
    for index, (x, y) in enumerate(data):
        opt.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        opt.step()
        if index == consolidate_at:
            opt.consolidate()


def _full(tensor):
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def set_rank_averaged_grads(model: torch.nn.Module, world: int, loss_of_rank) -> None:
    """Give ``model`` the grads DDP's backward gives every rank: the mean over ranks ``r`` of the
    grads of ``loss_of_rank(r)`` (zeros for a param one rank's loss does not reach)."""
    summed = [torch.zeros_like(p) for p in model.parameters()]
    for r in range(world):
        model.zero_grad(set_to_none=True)
        loss_of_rank(r).backward()
        for total, p in zip(summed, model.parameters()):
            if p.grad is not None:
                total.add_(p.grad / world)
    for total, p in zip(summed, model.parameters()):
        p.grad = total


def scenario_ddp(rank: int, world: int) -> None:
    model = torch.nn.parallel.DistributedDataParallel(model_factory())
    opt = MaskedAdamW(model.parameters(), **OPTIONS)
    train(model, opt, batches(8, rank), consolidate_at=3)  # different data on every rank
    for p in model.parameters():
        gathered = [torch.empty_like(p) for _ in range(world)]
        dist.all_gather(gathered, p.detach())
        assert all(torch.equal(g, gathered[0]) for g in gathered), "DDP ranks diverged"

    # one process stepping on the grads DDP averages (each rank's grad / world, summed)
    single = model_factory()
    single_opt = MaskedAdamW(single.parameters(), **OPTIONS)
    data = [batches(8, r) for r in range(world)]
    for index in range(8):
        set_rank_averaged_grads(single, world, lambda r: torch.nn.functional.mse_loss(single(data[r][index][0]), data[r][index][1]))
        single_opt.step()
        if index == 3:
            single_opt.consolidate()
    for p, q in zip(model.parameters(), single.parameters()):
        assert_close(p.detach(), q.detach(), "DDP param vs single process")
        for key in ("exp_avg", "exp_avg_sq", "importance", "anchor", "anchor_param"):
            assert_close(opt.state[p][key], single_opt.state[q][key], f"DDP {key} vs single process")


def scenario_ddp_observe_batches(rank: int, world: int) -> None:
    """The callbacks' passes (``integrations.observe_batches``) call the module, not its DDP
    wrapper: each batch's grads are averaged over the ranks, so every rank's anchors are one
    process's on the averaged grads; through the wrapper (grads already averaged) too. Ranks
    taking different numbers of batches are refused on every rank."""
    import contextlib

    from masked_optim.integrations import observe_batches, take_batches

    data = [batches(3, r) for r in range(world)]
    single = model_factory()
    single_opt = MaskedAdamW(single.parameters(), **OPTIONS)
    for index in range(3):
        set_rank_averaged_grads(single, world, lambda r: torch.nn.functional.mse_loss(single(data[r][index][0]), data[r][index][1]))
        single_opt.observe()
    single_opt.consolidate()

    for through_wrapper in (False, True):
        model = torch.nn.parallel.DistributedDataParallel(model_factory())
        opt = MaskedAdamW(model.parameters(), **OPTIONS)
        forward = model if through_wrapper else model.module

        def loss_of(index, batch):
            return torch.nn.functional.mse_loss(forward(batch[0]), batch[1])

        counts = []
        observe_batches(opt, model.module, take_batches(data[rank], None), loss_of, contextlib.nullcontext, counts.append)
        assert counts == [1, 2, 3]
        opt.consolidate()
        for p, q in zip(model.parameters(), single.parameters()):
            for key in ("importance", "anchor", "anchor_param"):
                assert_close(opt.state[p][key], single_opt.state[q][key], f"observe_batches {key} vs single process")

    # a branch one rank's batch does not reach (rank 0 skips the last layer): its grads are
    # None there and the ranks still make the same collectives (zeros in their place)
    def branch_loss(net, r, batch):
        x, y = batch
        out = net(x) if r == 1 else net[:4](x).sum(1, keepdim=True)
        return torch.nn.functional.mse_loss(out, y)

    single = model_factory()
    single_opt = MaskedAdamW(single.parameters(), **OPTIONS)
    for index in range(3):
        set_rank_averaged_grads(single, world, lambda r: branch_loss(single, r, data[r][index]))
        single_opt.observe()
    import masked_optim.integrations as integrations

    for bucket in (integrations.BUCKET_NUMEL, 40):  # one collective per dtype, or several (params of 7-91 elements)
        integrations.BUCKET_NUMEL, default = bucket, integrations.BUCKET_NUMEL
        try:
            model = model_factory()
            opt = MaskedAdamW(model.parameters(), **OPTIONS)
            observe_batches(opt, model, take_batches(data[rank], None), lambda i, batch: branch_loss(model, rank, batch),
                            contextlib.nullcontext, lambda count: None)
        finally:
            integrations.BUCKET_NUMEL = default
        for p, q in zip(model.parameters(), single.parameters()):
            assert_close(opt.state[p]["importance"], single_opt.state[q]["importance"], f"observe_batches with a branch ({bucket})")

    # FSDP1 reduces its own grads (per-rank shards): averaging them would mix the ranks' shards
    from torch.distributed.fsdp import FullyShardedDataParallel

    from masked_optim.integrations import average_grads_over_ranks

    wrapped = FullyShardedDataParallel(model_factory(), device_id=torch.device("cpu"))
    x, y = data[rank][0]
    torch.nn.functional.mse_loss(wrapped(x), y).backward()
    before = [p.grad.clone() for p in wrapped.parameters() if p.grad is not None]
    average_grads_over_ranks(wrapped)
    assert all(torch.equal(a, p.grad) for a, p in zip(before, [p for p in wrapped.parameters() if p.grad is not None]))

    # a layer no rank's batch reaches stays without grads (no zeros made up for it: observe()
    # would then give it state and importance steps it never had); the others are averaged
    model = model_factory()
    x, y = data[rank][0]
    torch.nn.functional.mse_loss(model[:4](x).sum(1, keepdim=True), y).backward()
    average_grads_over_ranks(model)
    assert all(p.grad is None for p in model[4].parameters())
    assert all(p.grad is not None for p in model[:4].parameters())

    # a sparse grad on one rank only: every rank raises (none is left waiting in a collective)
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    if rank == 0:
        embedding(torch.tensor([1, 2])).sum().backward()
    try:
        average_grads_over_ranks(embedding)
    except RuntimeError as error:
        assert "does not support sparse gradients" in str(error), str(error)
    else:
        raise AssertionError("a sparse grad on rank 0 was averaged")
    try:
        take_batches(data[rank][:2 + rank], None)
    except ValueError as error:
        assert "the ranks took different numbers of batches (2 to 3" in str(error), str(error)
    else:
        raise AssertionError("take_batches accepted different numbers of batches")


def scenario_fsdp2(rank: int, world: int, tmpdir: str) -> None:
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
    from torch.distributed.fsdp import fully_shard

    from masked_optim.distributed import load_optimizer_checkpoint
    import torch.distributed.checkpoint as dcp

    data = batches(12)  # the same global batch on every rank: averaged grads equal the single-process ones
    single = model_factory()
    single_opt = MaskedAdamW(single.parameters(), **OPTIONS, scope="group")
    train(single, single_opt, data, consolidate_at=3)

    def sharded():
        model = model_factory()
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        return model, MaskedAdamW(model.parameters(), **OPTIONS, scope="group")

    model, opt = sharded()
    train(model, opt, data[:6], consolidate_at=3)
    assert any(p.to_local().numel() == 0 for p in model.parameters()) == (rank == 1)
    state = get_optimizer_state_dict(model, opt)
    dcp.save({"optim": state}, checkpoint_id=os.path.join(tmpdir, "ckpt"))
    saved_params = [p.detach().clone() for p in model.parameters()]
    train(model, opt, data[6:])

    for p, q in zip(model.parameters(), single.parameters()):
        assert_close(p.full_tensor(), q.detach(), "FSDP2 param vs single process")
        threshold, expected = opt.state[p]["threshold"], single_opt.state[q]["threshold"]
        assert int(threshold) == int(expected) and int(expected) >= 0, (int(threshold), int(expected))
        for key in ("exp_avg", "importance", "anchor", "anchor_param"):
            assert_close(_full(opt.state[p][key]), single_opt.state[q][key], key)

    # resume from the DCP checkpoint in a fresh model and optimizer
    resumed, resumed_opt = sharded()
    with torch.no_grad():
        for p, q in zip(resumed.parameters(), saved_params):
            p.copy_(q)
    load_optimizer_checkpoint(resumed, resumed_opt, os.path.join(tmpdir, "ckpt"))
    assert "anchor" in resumed_opt.state[next(resumed.parameters())]  # not dropped by DCP
    train(resumed, resumed_opt, data[6:])
    for p, q in zip(resumed.parameters(), model.parameters()):
        assert torch.equal(p.to_local(), q.to_local()), "resumed FSDP2 run differs"
        for key, value in opt.state[q].items():
            other = resumed_opt.state[p][key]
            if torch.is_tensor(value):
                assert torch.equal(_full(other), _full(value)), key


def scenario_fsdp2_observe(rank: int, world: int) -> None:
    """observe() on sharded params (every group checked first, as a step checks it) and the
    consolidate() after it (step counts read in one copy) give the single process's importance
    and anchors, group scope over uneven and empty shards."""
    from torch.distributed.fsdp import fully_shard

    data = batches(4)
    single = model_factory()
    single_opt = MaskedAdamW(single.parameters(), **OPTIONS, scope="group")
    model = model_factory()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = MaskedAdamW(model.parameters(), **OPTIONS, scope="group")
    for net, optimizer in ((single, single_opt), (model, opt)):
        for x, y in data:
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(net(x), y).backward()
            optimizer.observe()
        optimizer.zero_grad()
        optimizer.consolidate()
    for p, q in zip(model.parameters(), single.parameters()):
        assert float(opt.state[p]["importance_step"]) == 0.0  # reset by consolidate
        for key in ("anchor", "anchor_param"):
            assert_close(_full(opt.state[p][key]), single_opt.state[q][key], f"observe + consolidate: {key}")


def scenario_fsdp2_triton(rank: int, world: int) -> None:
    """The Triton kernel (interpreter) on FSDP2 shards, its histograms all-reduced through the
    op's process-group names, against a single-process run of the reference."""
    from torch.distributed.fsdp import fully_shard

    data = batches(6)
    single = model_factory()
    single_opt = MaskedAdamW(single.parameters(), **OPTIONS, scope="group", backend="torch")
    train(single, single_opt, data, consolidate_at=2)
    model = model_factory()
    for layer in model:
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    opt = MaskedAdamW(model.parameters(), **OPTIONS, scope="group", backend="triton")
    train(model, opt, data, consolidate_at=2)
    local_stats, global_stats, expected = opt.mask_stats()[0], opt.mask_stats(global_counts=True)[0], single_opt.mask_stats()[0]
    assert local_stats["elements"] == sum(p.to_local().numel() for p in model.parameters())
    for key in ("elements", "updated", "frozen", "nonfinite_skipped", "threshold"):
        assert global_stats[key] == expected[key], (key, global_stats[key], expected[key])
    mixed = MaskedAdamW([*model.parameters(), torch.nn.Parameter(torch.zeros(3))], backend="torch")
    try:  # sharded and plain params in one group: per-group counts cannot be summed
        mixed.mask_stats(global_counts=True)
        raise AssertionError("a group mixing placements was summed")
    except ValueError as error:
        assert "param group 0 mixes params sharded" in str(error), error
    for p, q in zip(model.parameters(), single.parameters()):
        assert_close(p.full_tensor(), q.detach(), "FSDP2 triton param vs single-process reference")
        assert int(opt.state[p]["threshold"]) == int(single_opt.state[q]["threshold"])
        for key in ("exp_avg", "exp_avg_sq", "importance", "anchor"):
            assert_close(_full(opt.state[p][key]), single_opt.state[q][key], key)


def scenario_fsdp2_block_gates(rank: int, world: int) -> None:
    """Block gates under FSDP2: blocks are runs of each rank's shard, so the reference is
    another FSDP2 run (not a single process); the Triton kernel must match it, and the
    all-reduced thresholds must agree across ranks."""
    from torch.distributed.fsdp import fully_shard

    data = batches(6)
    runs = []
    for backend in ("torch", "triton"):
        model = model_factory()
        for layer in model:
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
        opt = MaskedAdamW(model.parameters(), **OPTIONS, gate_block=4, scope="group", backend=backend)
        train(model, opt, data, consolidate_at=2)
        runs.append((model, opt))
    (ref, ref_opt), (ours, opt) = runs
    assert opt.mask_stats(global_counts=True) == ref_opt.mask_stats(global_counts=True)
    thresholds = [None] * world
    dist.all_gather_object(thresholds, opt.mask_stats()[0]["threshold"])
    assert all(t == thresholds[0] for t in thresholds), thresholds
    for p, q in zip(ours.parameters(), ref.parameters()):
        assert_close(p.full_tensor(), q.full_tensor(), "FSDP2 block gates: triton vs reference")
        for key in ("exp_avg", "exp_avg_sq", "importance", "anchor"):
            assert_close(_full(opt.state[p][key]), _full(ref_opt.state[q][key]), key)


def scenario_fsdp2_full_state_dict(rank: int, world: int) -> None:
    """A full (unsharded) optimizer state dict, loaded on every rank into a fresh sharded model
    after ``consolidate()`` and ``set_mask()``: torch reshards only the keys the fresh optimizer
    has, so the anchors and masks arrive whole and must be sharded like their params."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict, set_optimizer_state_dict
    from torch.distributed.fsdp import fully_shard

    data = batches(10)

    def sharded():
        model = model_factory()
        fully_shard(model)
        return model, MaskedAdamW(model.parameters(), **{**OPTIONS, "mask": "protect", "density": 0.5})

    model, opt = sharded()
    train(model, opt, data[:4], consolidate_at=2)
    first = next(model.parameters())
    mask = torch.rand(first.shape, generator=torch.Generator().manual_seed(9)) < 0.7  # the same on every rank
    opt.set_mask(first, mask)
    train(model, opt, data[4:6])
    # on every rank; copied as a save would (its counters are the live tensors, as torch's are)
    full = copy.deepcopy(get_optimizer_state_dict(model, opt, options=StateDictOptions(full_state_dict=True)))
    saved_params = [p.detach().clone() for p in model.parameters()]
    train(model, opt, data[6:])

    from masked_optim.distributed import set_optimizer_state_dict as ours

    # every rank holds the full dict (torch's function), or only rank 0 (broadcast_from_rank0:
    # masked_optim's, which makes the anchors and mask rank 0's dict holds on every rank)
    loads = [(set_optimizer_state_dict, full, StateDictOptions(full_state_dict=True)),
             (ours, full if rank == 0 else {}, StateDictOptions(full_state_dict=True, broadcast_from_rank0=True))]
    for load, given, options in loads:
        resumed, resumed_opt = sharded()
        with torch.no_grad():
            for p, q in zip(resumed.parameters(), saved_params):
                p.copy_(q)
        load(resumed, resumed_opt, copy.deepcopy(given), options=options)
        for p in resumed.parameters():
            for key in ("anchor", "anchor_param") + (("user_mask",) if p is next(resumed.parameters()) else ()):
                value = resumed_opt.state[p][key]
                assert hasattr(value, "to_local") and value.to_local().shape == p.to_local().shape, key
        train(resumed, resumed_opt, data[6:])
        for p, q in zip(resumed.parameters(), model.parameters()):
            assert torch.equal(p.to_local(), q.to_local()), f"run resumed from a full state dict differs ({load.__module__})"
            for key, value in opt.state[q].items():
                if torch.is_tensor(value):
                    assert torch.equal(_full(resumed_opt.state[p][key]), _full(value)), key


def scenario_set_mask_keeps_each_ranks_own_shard(rank: int, world: int) -> None:
    """``set_mask`` shards the full mask on each rank without communicating (a scatter from rank
    0 would hang when one rank calls it alone): with masks that differ between ranks, each rank
    keeps the piece of its own."""
    from torch.distributed.fsdp import fully_shard

    model = model_factory()
    fully_shard(model)
    opt = MaskedAdamW(model.parameters(), **OPTIONS)
    first = next(model.parameters())
    mask = torch.rand(first.shape, generator=torch.Generator().manual_seed(20 + rank)) < 0.5
    opt.set_mask(first, mask)
    mine = opt.state[first]["user_mask"]
    rows = first.to_local().shape[0]
    start = sum(-(-first.shape[0] // world) for _ in range(rank))  # Shard(0): ceil-sized pieces
    assert torch.equal(mine.to_local(), mask[start:start + rows]), "set_mask took another rank's mask"


def run(rank: int, world: int, port: int, tmpdir: str) -> None:
    # a C++ abort (one CI run: "terminate called without an active exception" in rank 0, not
    # reproduced in 14 reruns) then prints every thread's Python stack, after the markers below
    faulthandler.enable()
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=world)
    try:
        scenario_ddp(rank, world)
        _mark(rank, "ddp")
        scenario_ddp_observe_batches(rank, world)
        _mark(rank, "ddp observe_batches")
        scenario_fsdp2(rank, world, tmpdir)
        _mark(rank, "fsdp2 + dcp")
        scenario_fsdp2_observe(rank, world)
        _mark(rank, "fsdp2 observe")
        scenario_fsdp2_triton(rank, world)
        _mark(rank, "fsdp2 triton")
        scenario_fsdp2_block_gates(rank, world)
        _mark(rank, "fsdp2 block gates")
        scenario_fsdp2_full_state_dict(rank, world)
        _mark(rank, "fsdp2 full state dict")
        scenario_set_mask_keeps_each_ranks_own_shard(rank, world)
        _mark(rank, "set_mask shards")
    finally:
        dist.destroy_process_group()
    _mark(rank, "process group destroyed")
    # every scenario passed: leave without the interpreter's teardown, where torch's own
    # background threads (gloo, the store) can abort the process on a busy machine
    os._exit(0)


def _mark(rank: int, done: str) -> None:
    print(f"rank {rank}: {done} ok", file=sys.stderr, flush=True)
    sys.stdout.flush()
