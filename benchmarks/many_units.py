"""Step time of the ``compile`` backend over many tensors, each its own gated unit.

    PYTHONPATH=. python benchmarks/many_units.py [--tensors 146 --numel 768 | --gpt2] [--density D]

With ``scope="tensor"`` (the default) every tensor has its own threshold, so at density < 1 a
step derives one per tensor: this isolates that per-unit cost (many small tensors) or shows it
on GPT-2 small's 148 shapes. Prints the median and minimum of ``--steps`` timed steps after
three warm-up steps (the first compiles). Compare runs of two trees alternately on one machine:
single runs on a shared VM spread by 15-30%.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchmarks.common import GPT2_SMALL_SHAPES
from masked_optim import MaskedAdamW


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tensors", type=int, default=146)
    parser.add_argument("--numel", type=int, default=768)
    parser.add_argument("--gpt2", action="store_true", help="GPT-2 small's 148 parameter shapes instead")
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--steps", type=int, default=20)
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    shapes = GPT2_SMALL_SHAPES if args.gpt2 else [(args.numel,)] * args.tensors
    params = [torch.nn.Parameter(torch.randn(shape, generator=gen) * 0.02) for shape in shapes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=gen) * 1e-3
    optimizer = MaskedAdamW(params, lr=1e-3, backend="compile", density=args.density)
    for _ in range(3):
        optimizer.step()
    times = []
    for _ in range(args.steps):
        begin = time.perf_counter()
        optimizer.step()
        times.append(time.perf_counter() - begin)
    what = "GPT-2 small shapes" if args.gpt2 else f"{args.tensors} tensors of {args.numel}"
    print(f"torch {torch.__version__}: {what}, density {args.density}: median {statistics.median(times) * 1e3:.1f} ms, "
          f"min {min(times) * 1e3:.1f} ms a step")


if __name__ == "__main__":
    main()
