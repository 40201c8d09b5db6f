"""Host-side (Python) time of one ``backend="triton"`` step, the kernels replaced by no-ops.

    PYTHONPATH=. python benchmarks/host_overhead.py [--density D] [--steps N] [--compiled]

On GPT-2 small's 148 parameter tensors this is what the step costs the CPU before the GPU does
any work: optimizer bookkeeping and the launcher's checks and tables (with ``--compiled``, also
Dynamo's guards and the ``torch.library`` op's dispatch). A step is host-bound when this
exceeds the kernel time (~36 B x 124M / bandwidth, ~1.3-1.5 ms on an H100). Runs on the CPU under ``TRITON_INTERPRET=1`` (set here), so it needs no GPU. At density
< 1 the per-unit threshold math runs on the CPU here (on a GPU it is device work), so only the
density-1 figure is host overhead.
"""
from __future__ import annotations

import argparse
import os
import time

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

from benchmarks.common import GPT2_SMALL_SHAPES  # noqa: E402
from masked_optim import MaskedAdamW  # noqa: E402
from masked_optim.kernels import launch  # noqa: E402


class _NoKernel:
    def __getitem__(self, grid):
        return lambda *args, **kwargs: None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--density", type=float, default=1.0)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--compiled", action="store_true", help="time torch.compile(opt.step, fullgraph=True), Tensor lr")
    args = parser.parse_args()
    launch._masked_adamw_kernel = launch._score_histogram_kernel = launch._finish_step_kernel = _NoKernel()
    params = [torch.nn.Parameter(torch.zeros(shape)) for shape in GPT2_SMALL_SHAPES]
    for p in params:
        p.grad = torch.zeros_like(p)
    lr = torch.tensor(1e-3) if args.compiled else 1e-3
    optimizer = MaskedAdamW(params, lr=lr, backend="triton", density=args.density)
    step = torch.compile(optimizer.step, fullgraph=True) if args.compiled else optimizer.step
    for _ in range(3):
        step()
    begin = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = (time.perf_counter() - begin) / args.steps
    how = "compiled" if args.compiled else "eager"
    print(f"torch {torch.__version__}: {len(params)} tensors, density {args.density}, {how}: {seconds * 1e3:.2f} ms host time per step")


if __name__ == "__main__":
    main()
