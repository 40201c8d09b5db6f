"""The compiled Triton backend on CUDA against the reference backend on the same device.

Run on a machine with a GPU as ``TRITON_INTERPRET=0 pytest -m gpu tests/test_triton_gpu.py``
(with TRITON_INTERPRET=1, which ``tests/conftest.py`` sets by default, Triton would interpret
the kernels, which cannot reach CUDA memory through the pointer tables). Skipped cleanly where
there is no CUDA device or the interpreter is on.
"""
from __future__ import annotations

import os

import pytest
import torch

from masked_optim import MaskedAdamW
from tests.test_triton_backend import CONFIGS, compare_backends, run

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") == "1", reason="run with TRITON_INTERPRET=0 (compiled kernels)"),
]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_compiled_triton_matches_reference(name):
    """Against the reference on the CPU: the kernel reproduces CPU torch's rounding (its fused
    multiply-adds where CPU torch has them, none elsewhere). CUDA torch rounds some ops
    otherwise (a division by a CPU scalar as a multiplication by its reciprocal, FMA-contracted
    addcmul/addcdiv): about an ulp of difference, which for scores made from the param
    (taylor) can move an element across a histogram bin edge and flip its gate."""
    compare_backends(name, "cuda", reference_device="cpu")


@pytest.mark.parametrize("name", ["adamw-tensor-lr-schedule", "select-group-scope-anchor-soft-restore-usermask"])
def test_torch_compiled_step_matches_reference(name):
    """``torch.compile(opt.step, fullgraph=True)`` through the ``torch.library`` op on CUDA."""
    torch._dynamo.reset()
    compare_backends(name, "cuda", compiled=True)


def test_new_hyper_parameters_do_not_recompile():
    """lr (float and Tensor), betas, eps, weight decay, density, protect strength, anchor decay
    and importance kind are runtime values: changing them adds no compiled kernel."""
    from masked_optim.kernels.step_kernel import _masked_adamw_kernel

    params = [torch.nn.Parameter(torch.randn(4097, device="cuda"))]
    optimizer = MaskedAdamW(params, backend="triton", density=0.5, lr=torch.tensor(1e-3, device="cuda"))

    def step():
        params[0].grad = torch.randn_like(params[0])
        optimizer.step()

    def compiled() -> int:
        return sum(len(cache[0]) for cache in _masked_adamw_kernel.device_caches.values())

    for _ in range(2):  # the first steps compile (pre-pass and histogram variants)
        step()
    optimizer.consolidate()
    step()
    step()
    before = compiled()
    group = optimizer.param_groups[0]
    for change in (
        dict(betas=(0.8, 0.99)), dict(eps=1e-6), dict(weight_decay=0.3), dict(protect_strength=0.7),
        dict(anchor_decay=0.5), dict(importance="taylor"), dict(importance_beta=0.9),
    ):
        group.update(change)
        group["lr"].mul_(0.5)
        step()
    assert compiled() == before


def test_found_inf_on_device_changes_nothing():
    """A GradScaler-skipped step changes nothing, decided on the device (no host sync)."""
    params = [torch.nn.Parameter(torch.randn(4097, device="cuda"))]
    optimizer = MaskedAdamW(params, backend="triton", density=0.5)
    for _ in range(2):
        params[0].grad = torch.randn_like(params[0])
        optimizer.step()
    state = optimizer.state[params[0]]
    assert state["step"].device.type == "cuda"
    before = {key: value.clone() for key, value in state.items() if torch.is_tensor(value)}
    before["param"] = params[0].detach().clone()
    params[0].grad = torch.randn_like(params[0])
    optimizer.grad_scale = torch.full((1,), 8.0, device="cuda")
    optimizer.found_inf = torch.ones(1, device="cuda")
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation in the step raises
    try:
        optimizer.step()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    del optimizer.grad_scale, optimizer.found_inf
    after = {key: value for key, value in state.items() if torch.is_tensor(value)}
    after["param"] = params[0].detach()
    for key in before:
        assert torch.equal(after[key], before[key]), key


def test_a_step_that_rebuilds_its_tables_does_not_sync():
    """Grads at new addresses miss the table cache: the rebuilt tables reach the device through
    pinned memory, without a host synchronisation."""
    params = [torch.nn.Parameter(torch.randn(4097, device="cuda")), torch.nn.Parameter(torch.randn(300, device="cuda"))]
    optimizer = MaskedAdamW(params, backend="triton", density=0.5)
    kept = []  # old grads stay alive: the next ones get new addresses
    for step in range(4):
        for p in params:
            p.grad = torch.randn_like(p)
            kept.append(p.grad)
        if step < 2:
            optimizer.step()
            continue
        torch.cuda.set_sync_debug_mode("error")  # any host synchronisation in the step raises
        try:
            optimizer.step()
        finally:
            torch.cuda.set_sync_debug_mode("default")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_params_on_a_device_that_is_not_current():
    """The kernels run on the params' device, not the current one: params on cuda:1 while
    cuda:0 is current step as on cuda:0."""
    torch.cuda.set_device(0)
    start = torch.randn(4097)
    results = []
    for device in ("cuda:0", "cuda:1"):
        param = torch.nn.Parameter(start.to(device))
        optimizer = MaskedAdamW([param], backend="triton", density=0.5, lr=1e-2)
        for step in range(3):
            param.grad = torch.sin(torch.arange(4097, device=device) * (step + 1.0))
            optimizer.step()
        torch.cuda.synchronize(device)
        results.append(param.detach().cpu())
    assert torch.equal(results[0], results[1])


def test_steps_on_another_stream_match_steps_on_one():
    """Tables copied on one stream and reused by a step on another: the step waits for them on
    the device; the trajectory is the one of steps on a single stream."""
    start = torch.randn(4097, device="cuda")
    results = []
    for switch in (False, True):
        param = torch.nn.Parameter(start.clone())
        optimizer = MaskedAdamW([param], backend="triton", density=0.5, lr=1e-2)
        grad = torch.sin(torch.arange(4097, device="cuda", dtype=torch.float32))
        side = torch.cuda.Stream()
        for step in range(4):
            param.grad = grad * (step + 1)
            if switch and step % 2:
                side.wait_stream(torch.cuda.current_stream())
                with torch.cuda.stream(side):
                    optimizer.step()
                torch.cuda.current_stream().wait_stream(side)
            else:
                optimizer.step()
        torch.cuda.synchronize()
        results.append(param.detach().clone())
    assert torch.equal(results[0], results[1])


@pytest.mark.parametrize("name", ["select-gate-block-taylor-anchor-usermask", "select-magnitude-nonfinite-scaler"])
def test_steps_launch_only_kernels_compiled_ahead(name, monkeypatch):
    """``launch.compile_ahead`` compiles and loads (Triton's warmup, stand-ins for the per-step
    tensors) the very variants the launches then use: no launch compiles or loads anything, so
    a compile or load error comes while the optimizer prepares its groups, before any group
    steps."""
    from masked_optim.kernels import launch

    kernels = (launch._masked_adamw_kernel, launch._score_histogram_kernel, launch._finish_step_kernel)

    def compiled() -> list:
        return [k for kernel in kernels for cache in kernel.device_caches.values() for k in cache[0].values()]

    counts, original = [], launch._launch

    def counting(*args, **kwargs):
        before = compiled()
        assert all(k.module is not None for k in before)  # loaded too (load errors come ahead)
        result = original(*args, **kwargs)
        counts.append((len(before), len(compiled())))
        return result

    monkeypatch.setattr(launch, "_launch", counting)
    run("triton", name, "cuda")
    assert counts and all(before == after for before, after in counts), counts
