"""pytest-benchmark microbenchmarks of one optimizer step (not part of the test run).

    make bench                         # all CPU benchmarks here
    .venv/bin/python -m pytest benchmarks -k "16M and fp32" --benchmark-group-by=param:case

Peers timed in the same session: torch AdamW fused and foreach, our reference (``torch``),
our ``compile`` backend and, on CUDA, our ``triton`` backend (element gates, and block gates
of ``BENCH_GATE_BLOCK`` elements at density < 1). Each result's ``extra_info``
records the modelled bytes per element and the achieved GB/s; compare ratios within a group.
"""
from __future__ import annotations

import pytest
import torch

from benchmarks.common import GPT2_SMALL_SHAPES, Case, bytes_per_element, make_optimizer, make_params

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
SIZES = {"1M": 1 << 20, "16M": 1 << 24} if DEVICE == "cpu" else {"1M": 1 << 20, "16M": 1 << 24, "64M": 1 << 26, "256M": 1 << 28}
IMPLS = ["torch_adamw_fused", "torch_adamw_foreach", "masked_torch", "masked_compile"] + (
    ["masked_triton", "masked_triton_blocks"] if DEVICE == "cuda" else ["masked_compile_blocks"])

CASES = [Case(f"one tensor {name}", [(n,)], dtype, density) for name, n in SIZES.items()
         for dtype in (torch.float32, torch.bfloat16) for density in (1.0, 0.1)]
CASES += [Case("gpt2-small shapes", GPT2_SMALL_SHAPES, torch.float32, density) for density in (1.0, 0.1)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"{c.name}-{str(c.dtype)[6:]}-d{c.density}")
def test_step(benchmark, case: Case, impl: str) -> None:
    if impl.startswith("torch_adamw") and case.density < 1.0:
        pytest.skip("torch AdamW has no density: its density-1 figure is the peer")
    if impl.endswith("_blocks") and case.density == 1.0:
        pytest.skip("block gates change nothing at density 1")
    params = make_params(case, DEVICE)
    optimizer = make_optimizer(impl, params, case.density)
    optimizer.step()  # state, compilation, first threshold
    sync = torch.cuda.synchronize if DEVICE == "cuda" else (lambda: None)

    def step() -> None:
        optimizer.step()
        sync()

    benchmark.group = f"{case.name} {case.dtype} density {case.density}"
    benchmark.pedantic(step, rounds=5, warmup_rounds=1)
    if benchmark.stats is None:  # --benchmark-disable: the step ran once, nothing was timed
        return
    model = bytes_per_element(impl, case.dtype, density=case.density)
    benchmark.extra_info.update(
        numel=case.numel, bytes_per_element=model, gbps=model * case.numel / benchmark.stats["median"] / 1e9,
    )
