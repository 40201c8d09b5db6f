"""GradScaler: grads are unscaled inside the step; found_inf leaves everything unchanged."""
import copy

import torch

from masked_optim import MaskedAdamW
from tests.helpers import assert_bitwise_equal, mlp, snapshot


def _scaled_backward(model, scaler, x, poison=False):
    loss = model(x).pow(2).mean()
    scaler.scale(loss).backward()
    if poison:
        next(model.parameters()).grad[0, 0] = float("inf")


def test_found_inf_changes_nothing():
    model = mlp()
    opt = MaskedAdamW(model.parameters(), lr=1e-2, density=0.5, anchor_decay=1.0)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x = torch.randn(8, 12)
    for _ in range(3):
        opt.zero_grad()
        _scaled_backward(model, scaler, x)
        scaler.step(opt)
        scaler.update()
    opt.consolidate()
    before = snapshot(opt)
    stats = opt.mask_stats()
    opt.zero_grad()
    _scaled_backward(model, scaler, x, poison=True)
    scaler.step(opt)
    scaler.update()
    assert_bitwise_equal(snapshot(opt), before)
    assert opt.mask_stats() == stats
    assert scaler.get_scale() == 2.0**9


def test_scaled_step_equals_unscaled_step():
    """With a power-of-two scale, unscaling is exact: same trajectory as without a scaler."""
    model = mlp()
    twin = copy.deepcopy(model)
    ours = MaskedAdamW(model.parameters(), lr=1e-2, density=0.5)
    plain = MaskedAdamW(twin.parameters(), lr=1e-2, density=0.5)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=3)
    for step in range(10):
        if step == 5:
            ours.consolidate()
            plain.consolidate()
        x = torch.randn(8, 12)
        ours.zero_grad()
        _scaled_backward(model, scaler, x)
        scaler.step(ours)
        scaler.update()
        plain.zero_grad()
        twin(x).pow(2).mean().backward()
        plain.step()
    # threshold_for is the host's hint, conservative under a scaler (it never reads found_inf)
    assert_bitwise_equal(snapshot(ours), snapshot(plain), ignore=("threshold_for",))


def test_unscale_by_user_first():
    model = mlp()
    twin = copy.deepcopy(model)
    ours = MaskedAdamW(model.parameters(), lr=1e-2)
    plain = MaskedAdamW(twin.parameters(), lr=1e-2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**8)
    x = torch.randn(8, 12)
    _scaled_backward(model, scaler, x)
    scaler.unscale_(ours)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1e9)
    scaler.step(ours)
    scaler.update()
    twin(x).pow(2).mean().backward()
    plain.step()
    assert_bitwise_equal(snapshot(ours), snapshot(plain), ignore=("threshold_for",))
