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


def test_scaler_unscaling_itself_when_the_optimizer_declines_to():
    """README's Lightning note: with ``opt._step_supports_amp_scaling = False`` the GradScaler
    unscales the grads and skips inf steps itself (Lightning then allows gradient clipping
    under ``precision="16-mixed"``); the trajectory is the one the step's own unscaling gives."""
    model = mlp()
    twin = copy.deepcopy(model)
    ours = MaskedAdamW(model.parameters(), lr=1e-2, density=0.5, anchor_decay=1.0)
    declining = MaskedAdamW(twin.parameters(), lr=1e-2, density=0.5, anchor_decay=1.0)
    declining._step_supports_amp_scaling = False
    scalers = [torch.amp.GradScaler("cpu", init_scale=2.0**8, growth_interval=2) for _ in range(2)]
    gen = torch.Generator().manual_seed(4)
    for step in range(8):
        if step == 3:
            ours.consolidate()
            declining.consolidate()
        x = torch.randn(8, 12, generator=gen)
        for net, opt, scaler in ((model, ours, scalers[0]), (twin, declining, scalers[1])):
            opt.zero_grad()
            _scaled_backward(net, scaler, x, poison=step == 5)
            scaler.step(opt)
            scaler.update()
    assert scalers[0].get_scale() == scalers[1].get_scale() < 2.0**8 * 2**4  # the inf step halved it
    assert_bitwise_equal(snapshot(ours), snapshot(declining), ignore=("threshold_for",))
