"""GradScaler: with ``fused=True`` grads are unscaled inside the step and found_inf leaves
everything unchanged; by default (as torch's AdamW) the scaler unscales and skips itself."""
import copy

import pytest
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
    opt = MaskedAdamW(model.parameters(), lr=1e-2, density=0.5, anchor_decay=1.0, fused=True)
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
    ours = MaskedAdamW(model.parameters(), lr=1e-2, density=0.5, fused=True)
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
    # threshold_for, the host's hint, too: the reference reads found_inf, so it knows the step was taken
    assert_bitwise_equal(snapshot(ours), snapshot(plain))


def test_unscale_by_user_first():
    model = mlp()
    twin = copy.deepcopy(model)
    ours = MaskedAdamW(model.parameters(), lr=1e-2, fused=True)
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
    assert_bitwise_equal(snapshot(ours), snapshot(plain))


def test_scaler_unscaling_itself_matches_the_fused_step():
    """Default (as torch's AdamW): the GradScaler unscales the grads and skips inf steps itself,
    and Lightning allows gradient clipping under mixed precision; ``fused=True``: the step does
    both (``_step_supports_amp_scaling``). The two trajectories are the same."""
    model = mlp()
    twin = copy.deepcopy(model)
    ours = MaskedAdamW(model.parameters(), lr=1e-2, density=0.5, anchor_decay=1.0, fused=True)
    declining = MaskedAdamW(twin.parameters(), lr=1e-2, density=0.5, anchor_decay=1.0)
    assert ours._step_supports_amp_scaling and not declining._step_supports_amp_scaling
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
    assert_bitwise_equal(snapshot(ours), snapshot(declining))


def test_fused_flag_is_kept_by_deepcopy_and_pickle():
    import pickle

    for fused in (None, False, True):
        opt = MaskedAdamW(mlp().parameters(), fused=fused)
        assert opt._step_supports_amp_scaling is bool(fused)
        assert copy.deepcopy(opt)._step_supports_amp_scaling is bool(fused)
        assert pickle.loads(pickle.dumps(opt))._step_supports_amp_scaling is bool(fused)


@pytest.mark.parametrize("backend", ["torch", "compile", "triton"])
def test_scalar_param_under_a_fused_grad_scaler(backend):
    """A 0-d param (e.g. a logit scale) with the GradScaler's [1]-shaped scale unscaled in the
    step: the same step as without the scaler (the reference broadcast the grad to [1] and
    raised after the first tensors had stepped)."""
    if backend == "triton":
        pytest.importorskip("triton")
    runs = []
    for scaled in (False, True):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(4, generator=gen)), torch.nn.Parameter(torch.tensor(0.5))]
        opt = MaskedAdamW(params, lr=1e-2, density=0.5, backend=backend, fused=True)
        for _ in range(3):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen) * (8.0 if scaled else 1.0)
            if scaled:
                opt.grad_scale, opt.found_inf = torch.full((1,), 8.0), torch.zeros(1)
            opt.step()
            opt.__dict__.pop("grad_scale", None)
            opt.__dict__.pop("found_inf", None)
        runs.append(snapshot(opt))
    assert_bitwise_equal(runs[0], runs[1], ignore=("threshold_for",))


@pytest.mark.parametrize("backend", ["torch", "compile"])
def test_skipped_step_without_a_grad_changes_nothing_in_group_scope(backend):
    """fused=True, scope="group": a param without a grad at a step the scaler skips is not
    marked as having missed its unit's step (the host backends read found_inf), so the run is
    the run without that step. (The Triton kernel reads found_inf on the device: there the
    unit re-derives its threshold when the param returns, README's limitations.)"""
    runs = []
    for with_skipped in (False, True):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(500, generator=gen)) for _ in range(2)]
        opt = MaskedAdamW(params, lr=1e-2, density=0.3, scope="group", importance_beta=0.5, backend=backend, fused=True)
        for step in range(6):
            for p in params:
                p.grad = torch.randn(p.shape, generator=gen)
            if step == 2:  # the skipped step: the second param has no grad
                if not with_skipped:
                    continue
                params[1].grad = None
            opt.grad_scale, opt.found_inf = torch.ones(1), torch.full((1,), float(step == 2))
            opt.step()
            del opt.grad_scale, opt.found_inf
        runs.append(snapshot(opt))
    assert_bitwise_equal(runs[0], runs[1], ignore=("threshold_for",))


@pytest.mark.parametrize("backend", ["torch", "compile"])
def test_a_member_returning_at_a_skipped_step_changes_nothing_in_group_scope(backend):
    """fused=True, scope="group": a param that left its unit at a taken step and has a grad again
    at a step the scaler skips: the skipped step leaves the unit's thresholds (and everything
    else) as they were, so the run is the run without that step, as under a GradScaler that skips
    the step itself. (Triton keeps found_inf on the device: README's limitations.)"""
    runs = []
    for with_skipped in (False, True):
        gen = torch.Generator().manual_seed(0)
        params = [torch.nn.Parameter(torch.randn(n, generator=gen)) for n in (400, 300)]
        opt = MaskedAdamW(params, lr=1e-2, density=0.2, scope="group", backend=backend, fused=True)
        for step in range(12):
            grads = [torch.randn(p.shape, generator=gen) for p in params]
            if step == 9 and not with_skipped:
                continue
            for p, g in zip(params, grads):
                p.grad = None if 6 <= step < 12 and step != 9 and p is params[0] else g
            opt.grad_scale, opt.found_inf = torch.ones(1), torch.full((1,), float(step == 9))
            if step == 9:
                before = [opt.state[p]["threshold"].clone() for p in params]
            opt.step()
            if step == 9:
                assert all(torch.equal(opt.state[p]["threshold"], b) for p, b in zip(params, before))
            del opt.grad_scale, opt.found_inf
        runs.append(snapshot(opt))
    assert_bitwise_equal(runs[0], runs[1])


@pytest.mark.parametrize("backend", ["torch", "compile"])
def test_an_option_changed_across_a_skipped_step_keeps_the_threshold(backend):
    """fused=True: density changed for a step the scaler skips and changed back: the stored
    threshold survives (it is not forgotten for a step that was not taken), as without that
    step. (Triton: README's limitations.)"""
    runs = []
    for with_skipped in (False, True):
        gen = torch.Generator().manual_seed(1)
        param = torch.nn.Parameter(torch.randn(2000, generator=gen))
        opt = MaskedAdamW([param], lr=1e-2, density=0.3, backend=backend, fused=True)
        for step in range(8):
            grad = torch.randn(param.shape, generator=gen)
            if step == 4 and not with_skipped:
                continue
            param.grad = grad
            opt.param_groups[0]["density"] = 0.5 if step == 4 else 0.3
            opt.grad_scale, opt.found_inf = torch.ones(1), torch.full((1,), float(step == 4))
            opt.step()
            del opt.grad_scale, opt.found_inf
        runs.append(snapshot(opt))
    assert_bitwise_equal(runs[0], runs[1])
