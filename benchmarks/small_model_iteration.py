"""Cost of a whole training iteration (forward, backward, step) of a small MLP, MaskedAdamW's
settings against torch's AdamW, on the CPU with one thread: what a continual-learning
researcher's loop pays (the demo's model: 64-256-256-10, batch 32, ~85K parameters).

    python benchmarks/small_model_iteration.py [--backends torch,compile] [--iterations 300]

Prints ms per iteration (best of 3 rounds) and the ratio to AdamW measured in the same run.
"""
from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F
from torch import nn

from masked_optim import MaskedAdamW

#: name -> (MaskedAdamW options, consolidate before timing)
SETTINGS = {
    "density 1, no anchor": ({}, False),
    "anchor_decay 3, after consolidate": (dict(anchor_decay=3.0), True),
    "protect 0.3 + anchor_decay 3, after consolidate": (dict(anchor_decay=3.0, mask="protect", density=0.3), True),
    "select 0.1": (dict(density=0.1), False),
}


def iteration_ms(make, consolidate: bool, iterations: int) -> float:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 256), nn.ReLU(), nn.Linear(256, 10))
    opt = make(model)
    x, y = torch.randn(32, 64), torch.randint(0, 10, (32,))

    def one() -> None:
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()

    for _ in range(20):  # warm-up (and the compile backend's compiles)
        one()
    if consolidate:
        opt.consolidate()
        for _ in range(20):
            one()
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(iterations):
            one()
        best = min(best, (time.perf_counter() - start) / iterations)
    return best * 1e3


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", default="torch,compile")
    parser.add_argument("--iterations", type=int, default=300)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    base = iteration_ms(lambda m: torch.optim.AdamW(m.parameters(), weight_decay=0.0), False, args.iterations)
    print(f"torch {torch.__version__}, 1 thread; AdamW {base:.3f} ms/iteration")
    print(f"{'backend':8s} {'setting':48s} {'ms':>7s} {'x AdamW':>8s}")
    for backend in args.backends.split(","):
        for name, (options, consolidate) in SETTINGS.items():
            ms = iteration_ms(lambda m: MaskedAdamW(m.parameters(), weight_decay=0.0, backend=backend, **options),
                              consolidate, args.iterations)
            print(f"{backend:8s} {name:48s} {ms:7.3f} {ms / base:8.2f}")


if __name__ == "__main__":
    main()
