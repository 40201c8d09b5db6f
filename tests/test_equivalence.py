"""density=1 without an anchor is AdamW: compare with torch.optim.AdamW(foreach=False)."""
import copy

import pytest
import torch

from masked_optim import MaskedAdamW
from tests.helpers import loss_step, mlp, set_random_grads
from tests.tolerances import assert_close


def _twin_runs(model, make_ours, make_torch, steps, scheduler=None):
    twin = copy.deepcopy(model)
    ours, theirs = make_ours(model), make_torch(twin)
    schedulers = [scheduler(ours), scheduler(theirs)] if scheduler else []
    gen_a, gen_b = torch.Generator().manual_seed(1), torch.Generator().manual_seed(1)
    for _ in range(steps):
        loss_step(model, ours, gen_a)
        loss_step(twin, theirs, gen_b)
        for s in schedulers:
            s.step()
    return model, twin, ours, theirs


def _compare(model, twin, ours, theirs):
    for p, q in zip(model.parameters(), twin.parameters()):
        assert_close(p, q, "param")
        for key in ("exp_avg", "exp_avg_sq"):
            assert_close(ours.state[p][key], theirs.state[q][key], key)
        assert ours.state[p]["step"] == theirs.state[q]["step"]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_matches_adamw_100_steps(dtype):
    model = mlp(dtype)
    result = _twin_runs(
        model,
        lambda m: MaskedAdamW(m.parameters(), lr=1e-2, weight_decay=0.1),
        lambda m: torch.optim.AdamW(m.parameters(), lr=1e-2, weight_decay=0.1, foreach=False),
        steps=100,
    )
    _compare(*result)


def _two_groups(model, cls, **extra):
    layers = [m for m in model if isinstance(m, torch.nn.Linear)]
    return cls(
        [
            {"params": layers[0].parameters(), "lr": 3e-2, "weight_decay": 0.0},
            {"params": layers[1].parameters(), "weight_decay": 0.3},
        ],
        lr=1e-2,
        **extra,
    )


def test_two_groups_and_scheduler():
    scheduler = lambda opt: torch.optim.lr_scheduler.LambdaLR(opt, lambda step: 0.97**step)  # noqa: E731
    result = _twin_runs(
        mlp(),
        lambda m: _two_groups(m, MaskedAdamW),
        lambda m: _two_groups(m, torch.optim.AdamW, foreach=False),
        steps=60,
        scheduler=scheduler,
    )
    _compare(*result)


def test_tensor_lr_with_scheduler():
    scheduler = lambda opt: torch.optim.lr_scheduler.StepLR(opt, step_size=10, gamma=0.5)  # noqa: E731
    result = _twin_runs(
        mlp(),
        lambda m: MaskedAdamW(m.parameters(), lr=torch.tensor(1e-2)),
        lambda m: torch.optim.AdamW(m.parameters(), lr=torch.tensor(1e-2), foreach=False),
        steps=50,
        scheduler=scheduler,
    )
    _compare(*result)


def test_maximize_and_closure():
    model = mlp()
    twin = copy.deepcopy(model)
    ours = MaskedAdamW(model.parameters(), lr=1e-2, maximize=True)
    theirs = torch.optim.AdamW(twin.parameters(), lr=1e-2, maximize=True, foreach=False)
    x = torch.randn(8, 12)
    for _ in range(20):
        for net, opt in ((model, ours), (twin, theirs)):
            def closure(net=net, opt=opt):
                opt.zero_grad()
                loss = -net(x).pow(2).mean()
                loss.backward()
                return loss
            loss = opt.step(closure)
            assert torch.is_tensor(loss)
    _compare(model, twin, ours, theirs)


@pytest.mark.parametrize("dtype", [torch.complex64, torch.complex128])
def test_complex_params_are_stepped_as_real_views(dtype):
    param = torch.randn(5, 3, dtype=dtype, requires_grad=True)
    twin = param.detach().clone().requires_grad_()
    ours = MaskedAdamW([param], lr=1e-2)
    theirs = torch.optim.AdamW([twin], lr=1e-2, foreach=False)
    gen = torch.Generator().manual_seed(3)
    for _ in range(30):
        set_random_grads([param], gen)
        twin.grad = param.grad.clone()
        ours.step()
        theirs.step()
    assert_close(param, twin, "complex param")
    assert ours.state[param]["exp_avg"].dtype == dtype


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_params_use_fp32_math_and_moments(dtype):
    """Ours equals fp32 AdamW on a master copy rounded to the param dtype after every step, bit
    for bit. (torch's own bf16/fp16 AdamW is no yardstick: it keeps low-precision moments and
    rounds every intermediate, SPEC keeps fp32 moments.)"""
    model = mlp(dtype)
    master = copy.deepcopy(model).float()
    ours = MaskedAdamW(model.parameters(), lr=1e-3, weight_decay=0.1)
    reference = torch.optim.AdamW(master.parameters(), lr=1e-3, weight_decay=0.1, foreach=False)
    gen = torch.Generator().manual_seed(5)
    for _ in range(30):
        set_random_grads(model.parameters(), gen, scale=0.1)
        for p, q in zip(model.parameters(), master.parameters()):
            q.grad = p.grad.float()
        ours.step()
        reference.step()
        with torch.no_grad():
            for q in master.parameters():
                q.copy_(q.to(dtype).float())
    for p, q in zip(model.parameters(), master.parameters()):
        assert ours.state[p]["exp_avg"].dtype == torch.float32
        assert torch.equal(p, q.to(dtype))
        assert torch.equal(ours.state[p]["exp_avg"], reference.state[q]["exp_avg"])
        assert torch.equal(ours.state[p]["exp_avg_sq"], reference.state[q]["exp_avg_sq"])
