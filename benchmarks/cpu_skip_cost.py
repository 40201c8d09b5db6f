"""What ``nonfinite="skip"`` costs the CPU ``compile`` backend (16M fp32, density 1).

    PYTHONPATH=. python benchmarks/cpu_skip_cost.py [--numel N] [--repeats R]

Times, interleaved in one run: torch AdamW fused (the peer), MaskedAdamW ``compile`` with the
default ``nonfinite="skip"`` and with ``nonfinite="propagate"`` (AdamW's own semantics), and a
device copy of one tensor. With "skip" the step also counts the non-finite grads for
``mask_stats`` (a reduction fused into the step's loop since 2026-11-29; before, Inductor ran
it as a loop of its own, one more read of the grads) and selects kept or skipped values.
"""
from __future__ import annotations

import argparse

import torch

from benchmarks.common import interleaved_medians, make_optimizer


def _optimizer(impl: str, numel: int, **options) -> torch.optim.Optimizer:
    param = torch.nn.Parameter(torch.randn(numel))
    param.grad = torch.randn(numel)
    optimizer = make_optimizer(impl, [param], 1.0)
    for group in optimizer.param_groups:
        group.update(options)
    optimizer.step()  # state and compilation
    return optimizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--numel", type=int, default=1 << 24)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--importance-dtype", choices=("float32", "bfloat16"), default="float32",
                        help="importance storage of the MaskedAdamW steps (bfloat16: 32 B per element, not 36)")
    args = parser.parse_args()
    src = torch.randn(args.numel)
    dst = torch.empty_like(src)
    fns = {
        "torch AdamW fused": _optimizer("torch_adamw_fused", args.numel).step,
        "compile, nonfinite=skip": _optimizer("masked_compile", args.numel, importance_dtype=args.importance_dtype).step,
        "compile, nonfinite=propagate": _optimizer(
            "masked_compile", args.numel, nonfinite="propagate", importance_dtype=args.importance_dtype,
        ).step,
        "copy (one tensor)": lambda: dst.copy_(src),
    }
    medians = interleaved_medians(fns, "cpu", args.repeats)
    peer = medians["torch AdamW fused"]
    print(f"torch {torch.__version__}, {args.numel} fp32 elements, importance {args.importance_dtype}, median of {args.repeats}")
    for name, seconds in medians.items():
        print(f"{name:30s} {seconds * 1e3:8.2f} ms  {seconds / peer:5.2f}x")


if __name__ == "__main__":
    main()
