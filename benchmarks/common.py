"""Shared pieces of the benchmarks: the bytes model, parameter sets, peers and timers.

Performance is reported as ratios to peers timed in the same process, interleaved, median of
repeats (see ../shared/PERF.md): absolute times drift on shared machines, ratios much less.
"""
from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch

from masked_optim import MaskedAdamW

#: GPT-2 small (124M): the parameter shapes of a realistic many-tensor model (148 tensors)
GPT2_SMALL_SHAPES: list[tuple[int, ...]] = [(50257, 768), (1024, 768)] + [
    shape
    for _ in range(12)
    for shape in [(768,), (768,), (768, 2304), (2304,), (768, 768), (768,), (768,), (768,), (768, 3072), (3072,), (3072, 768), (768,)]
] + [(768,), (768,)]


#: ``gate_block`` of the ``masked_triton_blocks`` and ``masked_compile_blocks`` implementations
BENCH_GATE_BLOCK = 32


def bytes_per_element(impl: str, param_dtype: torch.dtype, anchor: bool = False, pull: bool = False,
                      importance_bytes: int = 4, density: float = 1.0) -> float:
    """Modelled bytes moved per parameter element and step (each input read, each output
    written once), as in PERF.md's table. With block gates (``masked_triton_blocks``) param and
    moments are read and written only in gated-on blocks: a ``density`` fraction."""
    p = torch.finfo(param_dtype).bits // 8
    if impl.startswith("torch_adamw"):  # its m and v take the param's dtype: 14 B for bf16
        return 7 * p  # read p g m v, write p m v (grads in param dtype)
    moments = 8  # fp32 m and v
    if impl == "masked_triton_blocks":  # read g s (a), write s; p m v (theta*) both ways where on
        return p + 2 * importance_bytes + (importance_bytes if anchor else 0) + density * (2 * p + 2 * moments + (p if pull else 0))
    read = p + p + moments + importance_bytes + (importance_bytes if anchor else 0) + (p if pull else 0)
    write = p + moments + importance_bytes
    return read + write


@dataclass
class Case:
    """One benchmark configuration."""

    name: str
    shapes: list[tuple[int, ...]]
    dtype: torch.dtype
    density: float

    @property
    def numel(self) -> int:
        return sum(int(torch.Size(s).numel()) for s in self.shapes)


def make_params(case: Case, device: str) -> list[torch.Tensor]:
    """Random params with random grads (never zeros: PERF.md)."""
    gen = torch.Generator(device="cpu").manual_seed(0)
    params = []
    for shape in case.shapes:
        p = torch.randn(shape, generator=gen).to(device=device, dtype=case.dtype).requires_grad_()
        p.grad = (torch.randn(shape, generator=gen) * 1e-2).to(device=device, dtype=case.dtype)
        params.append(p)
    return params


def make_optimizer(impl: str, params: list[torch.Tensor], density: float) -> torch.optim.Optimizer:
    """impl: torch_adamw_fused | torch_adamw_foreach | masked_<backend> (torch, compile, triton)
    | masked_triton_compiled (the triton backend, its step to be wrapped in torch.compile)
    | masked_<backend>_blocks (triton or compile, with block gates of ``BENCH_GATE_BLOCK``)."""
    if impl == "torch_adamw_fused":
        return torch.optim.AdamW(params, lr=1e-3, fused=True)
    if impl == "torch_adamw_foreach":
        return torch.optim.AdamW(params, lr=1e-3, foreach=True)
    if impl == "masked_triton_compiled":  # stepped through torch.compile: a Tensor lr, as advised
        return MaskedAdamW(params, lr=torch.tensor(1e-3, device=params[0].device), density=density, backend="triton")
    if impl.endswith("_blocks"):
        backend = impl.removeprefix("masked_").removesuffix("_blocks")
        return MaskedAdamW(params, lr=1e-3, density=density, backend=backend, gate_block=BENCH_GATE_BLOCK)
    backend = impl.removeprefix("masked_")
    return MaskedAdamW(params, lr=1e-3, density=density, backend=backend)


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_call(fn: Callable[[], object], device: str) -> float:
    """Seconds of one call (CUDA events on the GPU, a synchronised host clock elsewhere)."""
    if device.startswith("cuda"):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def host_seconds(fn: Callable[[], object], device: str, calls: int = 5) -> float:
    """Host time of one call: what the Python side takes to issue it, the device's queue empty
    at the start and not waited on until the end (on a CPU, all of the call). A step whose host
    time is near its ``time_call`` time is host-bound: its launches, not its bytes, set the pace."""
    synchronize(device)
    begin = time.perf_counter()
    for _ in range(calls):
        fn()
    seconds = (time.perf_counter() - begin) / calls
    synchronize(device)
    return seconds


def interleaved_medians(fns: dict[str, Callable[[], object]], device: str, repeats: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function, timed round-robin so drift hits all alike."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    synchronize(device)
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeats):
        for name, fn in fns.items():
            samples[name].append(time_call(fn, device))
    return {name: statistics.median(values) for name, values in samples.items()}


def copy_bandwidth(device: str, numel: int, repeats: int = 10) -> float:
    """Device-to-device copy bandwidth in GB/s (bytes read + written)."""
    src = torch.randn(numel, device=device)
    dst = torch.empty_like(src)
    seconds = interleaved_medians({"copy": lambda: dst.copy_(src)}, device, repeats)["copy"]
    return 2 * src.numel() * src.element_size() / seconds / 1e9
