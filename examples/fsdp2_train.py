"""Train a model sharded with FSDP2 (``fully_shard``) with MaskedAdamW, over two tasks.

Each parameter is a DTensor shard; MaskedAdamW keeps its state as DTensor shards too and
all-reduces what a density threshold needs, so every rank takes the step a single process
would. The script trains on task A, consolidates (task boundary), trains on task B and prints
the loss on both tasks. The defaults follow the README's "Choosing settings": lr 3e-3 x
anchor_decay 10 (a pull of 0.03) and a protect mask at density 0.3 on top, which gates from
task B on (task A trains at density 1, as AdamW). Toy size, 2 ranks: task A's loss rises from
0.011 to 0.24 while B is learnt to 0.014; with ``--density 1 --anchor-decay 0``, which is
AdamW, to 0.73 (B: 0.007); the previous defaults (``--mask select --anchor-decay 100``, a pull
of 0.3, gating task A too) learnt A only to 0.038 and ended at 0.38. With --checkpoint-dir it saves
model and optimizer after task A with torch.distributed.checkpoint (DCP), and a second run
resumes from there and takes exactly the same steps on task B.

Toy size on CPU (gloo), two processes, about half a minute (set OMP_NUM_THREADS=1 when the
machine is busy; torchrun does):

    torchrun --nproc_per_node 2 examples/fsdp2_train.py

One process without torchrun works as well (``python examples/fsdp2_train.py``). Real size:

    torchrun --nproc_per_node 8 examples/fsdp2_train.py --device cuda --bf16 \
        --width 4096 --layers 32 --batch-size 16 --steps 1000 --density 0.3
"""
from __future__ import annotations

import argparse
import gc
import os
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from masked_optim import MaskedAdamW, decay_groups
from masked_optim.distributed import load_optimizer_checkpoint


class Block(nn.Module):
    """A pre-norm residual MLP block, the unit that ``fully_shard`` shards and gathers."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.up = nn.Linear(width, 4 * width)
        self.down = nn.Linear(4 * width, width)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.down(torch.nn.functional.gelu(self.up(self.norm(x))))


def model_for(args: argparse.Namespace) -> nn.Module:
    torch.manual_seed(args.seed)  # the same initial weights on every rank
    return nn.Sequential(*(Block(args.width) for _ in range(args.layers)), nn.LayerNorm(args.width), nn.Linear(args.width, 1))


def shard(model: nn.Module, args: argparse.Namespace) -> nn.Module:
    """FSDP2: every block is one shard unit, the root takes the rest."""
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32) if args.bf16 else MixedPrecisionPolicy()
    for module in model:
        if isinstance(module, Block):
            fully_shard(module, mp_policy=policy)
    return fully_shard(model, mp_policy=policy)


def task_batch(task: int, step: int, rank: int, args: argparse.Namespace, device: torch.device):
    """Inputs and targets of a task: its own input region and a fixed random teacher."""
    fixed = torch.Generator().manual_seed(1000 + task)
    center, teacher = torch.randn(args.width, generator=fixed), torch.randn(args.width, generator=fixed) / args.width**0.5
    gen = torch.Generator().manual_seed(args.seed + 7919 * task + 104729 * rank + step)
    x = center + 0.5 * torch.randn(args.batch_size, args.width, generator=gen)
    y = torch.tanh(2 * (x - center) @ teacher)[:, None]
    return x.to(device), y.to(device)


def train(model: nn.Module, opt: MaskedAdamW, task: int, steps: range, args: argparse.Namespace, device: torch.device) -> None:
    rank = dist.get_rank()
    for step in steps:
        x, y = task_batch(task, step, rank, args, device)  # each rank its own part of the global batch
        loss = torch.nn.functional.mse_loss(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        if rank == 0 and (step % args.log_every == 0 or step == steps[-1]):
            print(f"task {task} step {step:5d} loss {loss.item():.4f}", flush=True)


@torch.no_grad()
def evaluate(model: nn.Module, task: int, args: argparse.Namespace, device: torch.device) -> float:
    x, y = task_batch(task, -1, 0, args, device)  # the same held-out batch on every rank
    return torch.nn.functional.mse_loss(model(x).float(), y).item()


def save(model: nn.Module, opt: MaskedAdamW, path: str, task_done: int) -> None:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_state_dict

    model_state, optim_state = get_state_dict(model, opt)
    dcp.save({"model": model_state, "optim": optim_state, "task_done": torch.tensor(task_done)}, checkpoint_id=path)


def load(model: nn.Module, opt: MaskedAdamW, path: str) -> int:
    """Restore model and optimizer from a DCP checkpoint; returns the last finished task.

    ``load_optimizer_checkpoint`` creates the optimizer entries that exist only after a task
    boundary (anchor, anchor_param) when the checkpoint holds them, which a plain ``dcp.load``
    into a fresh optimizer would silently drop.
    """
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, set_model_state_dict

    state = {"model": get_model_state_dict(model), "task_done": torch.tensor(0)}
    dcp.load(state, checkpoint_id=path)
    set_model_state_dict(model, state["model"])
    load_optimizer_checkpoint(model, opt, path, key="optim")
    return int(state["task_done"])


def parse(argv: Optional[list[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add = parser.add_argument
    add("--device", choices=("cpu", "cuda"), default="cpu")
    add("--bf16", action="store_true", help="FSDP2 mixed precision: bf16 compute, fp32 reductions")
    add("--width", type=int, default=32)
    add("--layers", type=int, default=3)
    add("--batch-size", type=int, default=32, help="per rank")
    add("--steps", type=int, default=100, help="steps per task")
    add("--lr", type=float, default=3e-3)
    add("--weight-decay", type=float, default=0.0)
    add("--density", type=float, default=0.3, help="fraction of elements updated per step (protect: that move)")
    add("--mask", choices=("select", "protect"), default="protect",
        help="protect: gates from task A's importance, from task B on (task A trains at density 1)")
    add("--anchor-decay", type=float, default=10.0, help="restoring force toward the weights after task A")
    add("--scope", choices=("tensor", "group"), default="tensor")
    add("--checkpoint-dir", default=None, help="DCP checkpoint after task A; resumes from it if it exists")
    add("--log-every", type=int, default=25)
    add("--seed", type=int, default=0)
    return parser.parse_args(argv)


def setup(args: argparse.Namespace) -> torch.device:
    """Join the process group torchrun describes, or make a world of one."""
    os.environ.setdefault("RANK", "0")
    os.environ.setdefault("WORLD_SIZE", "1")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29511")
    if args.device == "cuda":
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local_rank)
        dist.init_process_group("nccl")
        return torch.device("cuda", local_rank)
    dist.init_process_group("gloo")
    return torch.device("cpu")


def main(argv: Optional[list[str]] = None) -> dict[str, float]:
    """Run the example on this rank; returns the final losses on both tasks."""
    args = parse(argv)
    device = setup(args)
    try:
        model = shard(model_for(args).to(device), args)
        opt = MaskedAdamW(decay_groups(model, args.weight_decay), lr=args.lr, density=args.density,
                          mask=args.mask, anchor_decay=args.anchor_decay, scope=args.scope)
        resumed = args.checkpoint_dir is not None and os.path.exists(args.checkpoint_dir)
        if resumed:
            load(model, opt, args.checkpoint_dir)
        else:
            train(model, opt, 0, range(args.steps), args, device)
            opt.consolidate()  # task boundary: what mattered for task A is now protected
            if args.checkpoint_dir:
                save(model, opt, args.checkpoint_dir, task_done=0)
        results = {"task_a_before_b": evaluate(model, 0, args, device)}
        train(model, opt, 1, range(args.steps), args, device)
        results.update(task_a=evaluate(model, 0, args, device), task_b=evaluate(model, 1, args, device))
        stats = [s for s in opt.mask_stats() if s is not None]
        counts = torch.tensor([[s["elements"], s["frozen"]] for s in stats], dtype=torch.float64, device=device).sum(0)
        dist.all_reduce(counts)  # mask_stats counts this rank's shards
        results["realised_density"] = float(1 - counts[1] / counts[0])
        if dist.get_rank() == 0:
            print(f"{'(resumed) ' if resumed else ''}" + "  ".join(f"{k} {v:.4f}" for k, v in results.items()), flush=True)
        return results
    finally:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
    # Collect reference cycles while the interpreter is alive: one that still holds a gloo
    # process group would otherwise be freed at interpreter teardown, where its worker
    # threads abort the process ("terminate called without an active exception"): 6 of 44
    # runs on a busy 2-core machine, none of 80 with this line.
    gc.collect()
