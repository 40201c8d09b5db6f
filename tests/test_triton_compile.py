"""The Triton step as a ``torch.library`` op: torch.compile traces the optimizer step through it.

On the CPU under ``TRITON_INTERPRET=1``; ``tests/test_triton_gpu.py`` repeats the comparison
with compiled kernels on CUDA.
"""
from __future__ import annotations

import copy

import pytest
import torch
from torch._dynamo.utils import counters

from masked_optim import MaskedAdamW
from masked_optim.kernels import tables
from tests.test_triton_backend import compare_backends
from tests.tolerances import assert_close


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    counters.clear()
    yield
    torch._dynamo.reset()


@pytest.mark.parametrize("name", [
    "adamw-tensor-lr-schedule", "select-group-scope-anchor-soft-restore-usermask", "select-magnitude-nonfinite-scaler",
])
def test_compiled_step_matches_reference(name):
    """``torch.compile(opt.step, fullgraph=True)``: params, every state tensor, gates and
    mask_stats agree with the eager reference after every step (fullgraph: no graph break)."""
    compare_backends(name, "cpu", compiled=True)


def _model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 4))


def test_lr_schedule_does_not_recompile_and_steps_in_place():
    """After the first two steps (state creation, then the steady state) a Tensor lr that
    changes every step adds no graph, and the op writes the real params and state (the launch
    tables, cached by tensor addresses, are not rebuilt)."""
    model = _model()
    opt = MaskedAdamW(model.parameters(), lr=torch.tensor(1e-2), backend="triton", density=0.5, anchor_decay=1.0)
    step = torch.compile(opt.step, fullgraph=True)
    x = torch.randn(8, 16)
    for index in range(6):
        if index == 3:
            opt.consolidate()
        opt.zero_grad(set_to_none=False)
        model(x).square().mean().backward()
        before = [p.detach().clone() for p in model.parameters()]
        step()
        assert all(not torch.equal(b, p) for b, p in zip(before, model.parameters())), index
        if index == 4:  # steady state after consolidate: remember the graphs and the tables
            graphs, cached = counters["stats"]["unique_graphs"], dict(tables._cache)
        opt.param_groups[0]["lr"].mul_(0.5)
    assert counters["stats"]["unique_graphs"] == graphs
    assert dict(tables._cache).keys() == cached.keys()
    assert not counters["graph_break"]
    stats = opt.mask_stats()[0]
    assert 0.4 < stats["realised_density"] < 0.6 and stats["elements"] == sum(p.numel() for p in model.parameters())


def test_compiled_training_step_matches_eager():
    """torch.compile around forward, backward and the Triton step gives the eager trajectory."""
    model, twin = _model(), _model()
    opt = MaskedAdamW(model.parameters(), lr=torch.tensor(1e-2), backend="triton", density=0.5)
    twin_opt = MaskedAdamW(twin.parameters(), lr=torch.tensor(1e-2), backend="triton", density=0.5)

    def train_step(net, optimizer, x, y):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(net(x), y)
        loss.backward()
        optimizer.step()
        return loss

    compiled = torch.compile(train_step)
    for _ in range(4):
        x, y = torch.randn(8, 16), torch.randn(8, 4)
        compiled(model, opt, x, y)
        train_step(twin, twin_opt, x, y)
        for optimizer in (opt, twin_opt):
            optimizer.param_groups[0]["lr"].mul_(0.7)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert_close(p.detach(), q.detach(), "compiled training step")
    assert opt.mask_stats() == twin_opt.mask_stats()


def test_opcheck():
    """torch.library's own checks of the op: schema (declared mutations), fake tensors, and
    AOTAutograd tracing."""
    model = _model()
    opt = MaskedAdamW(model.parameters(), lr=torch.tensor(1e-2), backend="triton", density=0.5, anchor_decay=1.0)
    model(torch.randn(8, 16)).square().mean().backward()
    opt.step()
    opt.consolidate()
    states = [opt.state[p] for p in model.parameters()]
    params = list(model.parameters())
    args = (
        [p.detach() for p in params], [p.grad for p in params], [s["exp_avg"] for s in states],
        [s["exp_avg_sq"] for s in states], [s["importance"] for s in states], [s["step"] for s in states],
        [s["importance_step"] for s in states], [s["threshold"] for s in states], [s["anchor"] for s in states],
        [s["anchor_param"] for s in states], [None] * len(params), [False] * len(params), "",
        torch.tensor(1e-2), [0.0, 0.9, 0.999, 1e-8, 0.01, 0.5, 0.99, 0.0, 1.0, 0.0, 1.0],
        "select", "fisher", "tensor", "skip", None, None,
    )
    torch.library.opcheck(torch.ops.masked_optim.fused_step.default, copy.deepcopy(args))


def test_optimizers_with_different_options_share_the_compiled_step():
    """Several optimizers compiled through the one ``MaskedAdamW.step`` code object: Dynamo turns
    options that differ between them into symbolic floats; the step still traces (no
    ``math.isfinite`` on them) and each matches its eager reference twin. Every optimizer and
    state phase (state creation, steady, after consolidate) is a variant of that code object,
    hence the raised recompile limit (Dynamo's default is 8)."""
    configs = [dict(density=0.3, anchor_decay=5.0), dict(density=1.0), dict(density=0.6, mask="protect", weight_decay=0.1)]
    generator = torch.Generator().manual_seed(0)
    runs = []
    for options in configs:
        param = torch.nn.Parameter(torch.randn(300, generator=generator))
        twin = torch.nn.Parameter(param.detach().clone())
        opt = MaskedAdamW([param], lr=torch.tensor(1e-2), backend="triton", **options)
        ref = MaskedAdamW([twin], lr=torch.tensor(1e-2), backend="torch", **options)
        runs.append((param, twin, opt, ref, torch.compile(opt.step, fullgraph=True)))
    with torch._dynamo.config.patch(recompile_limit=32):
        _steps(runs, generator)
    for param, twin, opt, ref, _ in runs:
        assert_close(param.detach(), twin.detach(), "compiled step of one of several optimizers")
        assert opt.mask_stats() == ref.mask_stats()


def _steps(runs, generator):
    for step in range(4):
        for param, twin, opt, ref, compiled_step in runs:
            if step == 2:
                opt.consolidate()
                ref.consolidate()
            param.grad = torch.randn(300, generator=generator)
            twin.grad = param.grad.clone()
            compiled_step()
            ref.step()


def test_step_under_fake_tensor_mode_goes_through_the_op():
    """Tracing tools (FakeTensorMode, export, memory estimators) run the step on fake tensors:
    the step must reach the op's fake implementation, not the launcher's raw addresses."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        param = torch.nn.Parameter(torch.randn(64, 32))
        optimizer = MaskedAdamW([param], backend="triton", lr=1e-2, density=0.5)
        param.grad = torch.randn(64, 32)
        optimizer.step()
        state = optimizer.state[param]
        assert state["exp_avg"].shape == (64, 32) and state["importance"].shape == (64, 32)


@pytest.mark.parametrize("mask", ["protect", "select"])
def test_a_density_staircase_back_and_forth_compiles(mask):
    """Densities changed between compiled steps and back (a staircase schedule) recompile and
    step as eagerly: Dynamo had failed its own value-range check on the threshold key (protect,
    0.5 -> 0.3 -> 0.7 -> 0.7)."""
    torch.manual_seed(0)
    start = torch.randn(30)
    params = [torch.nn.Parameter(start.clone()) for _ in range(2)]
    opts = [MaskedAdamW([p], lr=torch.tensor(1e-3), backend="triton", density=0.5, mask=mask, importance_beta=0.9)
            for p in params]
    step = torch.compile(opts[0].step, fullgraph=True)
    for density in (0.5, 0.3, 0.3, 0.7, 0.7, 0.3):
        grad = torch.randn(30)
        for p, opt in zip(params, opts):
            opt.param_groups[0]["density"] = density
            p.grad = grad.clone()
        step()
        opts[1].step()
        assert torch.equal(params[0], params[1]) and opts[0].mask_stats() == opts[1].mask_stats(), density


def test_mask_stats_gives_the_warnings_a_compiled_step_cannot():
    """A traced Triton step cannot warn (Dynamo refuses ``warnings.warn``): ``mask_stats()``
    gives, once, what the eager step would have said — a misspelt option set between steps, a
    restoring force asked for after ``consolidate()`` made no targets, unused anchors."""
    import warnings

    params = [torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(8))]
    opt = MaskedAdamW(params, lr=torch.tensor(1e-2), density=0.5, backend="triton")
    step = torch.compile(opt.step, fullgraph=True)

    def stepped(count: int = 1) -> None:
        for _ in range(count):
            for p in params:
                p.grad = torch.randn_like(p)
            step()

    stepped()
    opt.consolidate()  # no anchor_param: anchor_decay is 0
    opt.param_groups[0]["anchor_decay"] = 5.0
    opt.param_groups[0]["densty"] = 0.2
    stepped(2)
    with pytest.warns(UserWarning) as record:
        opt.mask_stats()
    ours = [w for w in record if str(w.message).startswith("param group")]
    messages = sorted(str(w.message)[:38] for w in ours)
    assert messages == ["param group 0 has anchor_decay > 0 but", "param group key 'densty' is not a Mask"], messages
    assert {w.filename for w in ours} == {__file__}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.mask_stats()  # once per stretch of compiled steps
