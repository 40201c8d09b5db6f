"""observe() touches only importance; consolidate() builds the anchor as SPEC says."""
import warnings

import pytest
import torch

from masked_optim import MaskedAdamW
from tests.helpers import assert_bitwise_equal, set_random_grads, snapshot
from tests.tolerances import assert_close


def _params():
    return [torch.randn(30, 20, requires_grad=True), torch.randn(50, requires_grad=True)]


@pytest.mark.parametrize("kind", ["fisher", "taylor", "magnitude"])
def test_observe_changes_only_importance(kind):
    params = _params()
    opt = MaskedAdamW(params, lr=1e-2, importance=kind, importance_beta=0.8)
    gen = torch.Generator().manual_seed(0)
    set_random_grads(params, gen)
    opt.step()
    before = snapshot(opt)
    set_random_grads(params, gen)
    expected = []
    for p in params:
        g, s = p.grad, opt.state[p]["importance"]
        x = {"fisher": g * g, "taylor": (g * p.detach()).abs(), "magnitude": g.abs()}[kind]
        expected.append(0.8 * s + 0.2 * x)
    opt.observe()
    after = snapshot(opt)
    for index, p in enumerate(params):
        assert_close(opt.state[p]["importance"], expected[index], "importance")
        assert after[(index, "importance_step")] == before[(index, "importance_step")] + 1
        for key in ("param", "exp_avg", "exp_avg_sq", "step", "threshold"):
            assert torch.equal(after[(index, key)], before[(index, key)]), key


@pytest.mark.parametrize("how", ["max", "sum"])
def test_consolidate_tensor_scope(how):
    params = _params()
    opt = MaskedAdamW(params, lr=1e-2, anchor_decay=1.0, importance_beta=0.5)
    gen = torch.Generator().manual_seed(1)
    set_random_grads(params, gen)
    opt.observe()
    first = [opt.state[p]["importance"] / opt.state[p]["importance"].mean() for p in params]
    opt.consolidate(how)
    for p, a in zip(params, first):
        assert_close(opt.state[p]["anchor"], a, "first anchor")
    set_random_grads(params, gen, scale=3.0)
    opt.observe()
    opt.observe()
    second = [opt.state[p]["importance"] / opt.state[p]["importance"].mean() for p in params]
    with torch.no_grad():
        params[0].add_(1.0)
    opt.consolidate(how)
    for p, a, b in zip(params, first, second):
        combined = torch.maximum(a, b) if how == "max" else a + b
        state = opt.state[p]
        assert_close(state["anchor"], combined / combined.mean(), "combined anchor")
        assert state["anchor"].double().mean().item() == pytest.approx(1.0, rel=1e-6)
        assert not state["importance"].any() and state["importance_step"] == 0
        assert torch.equal(state["anchor_param"], p.detach()) and state["anchor_param"] is not p
        assert state["threshold"] == -1


def test_consolidate_group_scope_normalises_over_the_group():
    params = _params()
    opt = MaskedAdamW(params, lr=1e-2, scope="group")
    set_random_grads(params, torch.Generator().manual_seed(2))
    params[1].grad *= 10
    opt.observe()
    flat = torch.cat([opt.state[p]["importance"].reshape(-1) for p in params])
    expected = flat / flat.mean()
    opt.consolidate()
    got = torch.cat([opt.state[p]["anchor"].reshape(-1) for p in params])
    assert_close(got, expected, "group anchor")
    assert opt.state[params[1]]["anchor"].mean() > 10 * opt.state[params[0]]["anchor"].mean()
    assert "anchor_param" not in opt.state[params[0]]  # anchor_decay 0: no copy kept


def test_consolidate_rejects_unknown_how():
    opt = MaskedAdamW(_params())
    with pytest.raises(ValueError, match="how.*'mean'"):
        opt.consolidate("mean")


def test_consolidate_before_any_importance_warns_and_changes_nothing():
    """Nothing measured yet (no step, no observe): no anchor can be made; a user who expected
    the pretrained weights to be protected is told so."""
    params = _params()
    opt = MaskedAdamW(params, anchor_decay=1.0)
    with pytest.warns(UserWarning, match=r"consolidate\(\) before any step\(\) or observe\(\)"):
        opt.consolidate()
    assert not opt.state


def test_consolidate_after_only_set_mask_warns_and_makes_no_anchor():
    """``set_mask`` makes state, with an importance never measured: still nothing to anchor."""
    params = _params()
    opt = MaskedAdamW(params, anchor_decay=1.0)
    opt.set_mask(params[0], torch.ones(params[0].shape, dtype=torch.bool))
    with pytest.warns(UserWarning, match=r"consolidate\(\) before any step\(\) or observe\(\)"):
        opt.consolidate()
    assert all("anchor" not in state for state in opt.state.values())


def test_consolidate_checks_every_group_before_changing_any():
    params = _params()
    opt = MaskedAdamW([{"params": params[:1]}, {"params": params[1:]}], anchor_decay=1.0)
    set_random_grads(params, torch.Generator().manual_seed(0))
    opt.step()
    opt.param_groups[1]["importance_beta"] = 1.0
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"consolidate\(\): param group 1: Invalid importance_beta: 1.0"):
        opt.consolidate()
    assert_bitwise_equal(snapshot(opt), before)


def test_consolidate_with_zero_importance_keeps_zero_anchor():
    params = _params()
    opt = MaskedAdamW(params)
    for p in params:
        p.grad = torch.zeros_like(p)
    opt.observe()
    opt.consolidate()
    for p in params:
        assert not opt.state[p]["anchor"].any() and opt.state[p]["anchor"].isfinite().all()


def test_observe_under_a_grad_scaler_divides_by_its_scale():
    """Grads from ``scaler.scale(loss).backward()`` observed with ``grad_scale=scaler.get_scale()``
    give the importance of the unscaled grads (bit for bit: the scale is a power of two), a
    0-dim param included; without it they would come out scale**2 too large."""
    torch.manual_seed(1)
    model = torch.nn.Sequential(torch.nn.Linear(6, 5), torch.nn.Tanh(), torch.nn.Linear(5, 1))
    model.register_parameter("gain", torch.nn.Parameter(torch.tensor(1.5)))
    twin = [p.detach().clone().requires_grad_() for p in model.parameters()]
    scaled, plain = MaskedAdamW(model.parameters()), MaskedAdamW(twin)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    x = torch.randn(8, 6)
    for _ in range(2):
        model.zero_grad()
        loss = (model(x) * model.gain).pow(2).mean()
        scaler.scale(loss).backward()
        for p, q in zip(model.parameters(), twin):
            q.grad = p.grad / scaler.get_scale()
        scaled.observe(grad_scale=scaler.get_scale())
        plain.observe()
    for p, q in zip(model.parameters(), twin):
        assert torch.equal(scaled.state[p]["importance"], plain.state[q]["importance"])
        assert scaled.state[p]["importance"].any()


@pytest.mark.parametrize("bad", [0.0, -2.0, float("nan"), float("inf"), "x"])
def test_observe_rejects_a_bad_grad_scale_before_any_change(bad):
    params = _params()
    opt = MaskedAdamW(params)
    set_random_grads(params, torch.Generator().manual_seed(2))
    before = snapshot(opt)
    with pytest.raises(ValueError, match="grad_scale"):
        opt.observe(grad_scale=bad)
    assert_bitwise_equal(snapshot(opt), before)


def test_consolidate_weighs_a_tensor_that_started_late_alike():
    """Importance is bias-corrected per tensor before a unit is normalised (as the step's
    scores are): in a group-scope unit, a tensor whose grads arrived 5 steps before the
    boundary, from the same distribution as one that had them for 100, gets an anchor of the
    same scale (per-tensor units are each normalised to mean 1 whatever the correction)."""
    early, late = torch.nn.Parameter(torch.randn(4000)), torch.nn.Parameter(torch.randn(4000))
    opt = MaskedAdamW([early, late], scope="group", importance_beta=0.99)
    gen = torch.Generator().manual_seed(5)
    for step in range(100):
        early.grad = torch.randn(4000, generator=gen)
        late.grad = torch.randn(4000, generator=gen) if step >= 95 else None
        opt.step()
    opt.consolidate()
    means = [opt.state[p]["anchor"].double().mean().item() for p in (early, late)]
    assert means == pytest.approx([1.0, 1.0], rel=0.1), means


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_consolidate_reads_the_step_counts_in_one_copy(backend, monkeypatch):
    """consolidate() reads every param's importance step count on the host (the bias correction
    and whether it takes part): with the Triton backend they live on the params' device, so one
    read each would be a sync per param. One copy per device; the anchors are the ones a
    per-param read makes (each tensor's own bias correction, set apart by its own step count)."""
    from masked_optim import consolidation

    params = [torch.nn.Parameter(torch.randn(300)) for _ in range(4)]
    opt = MaskedAdamW(params, scope="group", importance_beta=0.9, backend=backend)
    gen = torch.Generator().manual_seed(6)
    for step in range(6):
        for i, p in enumerate(params):  # param i has its grads from step i on (i steps fewer)
            p.grad = torch.randn(300, generator=gen) if step >= i else None
        opt.step()
    counts = [float(opt.state[p]["importance_step"]) for p in params]
    assert counts == [6.0, 5.0, 4.0, 3.0]
    expected = consolidation.combine(
        [consolidation.bias_corrected(opt.state[p]["importance"], c, 0.9) for p, c in zip(params, counts)],
        [None] * 4, "max",
    )
    reads = []
    original_float, original_tolist = torch.Tensor.__float__, torch.Tensor.tolist
    monkeypatch.setattr(torch.Tensor, "__float__", lambda self: reads.append("float") or original_float(self))
    monkeypatch.setattr(torch.Tensor, "tolist", lambda self: reads.append("tolist") or original_tolist(self))
    opt.consolidate()
    monkeypatch.undo()
    assert reads == ["tolist"]
    for p, anchor in zip(params, expected):
        assert_close(opt.state[p]["anchor"], anchor, "anchor")


def test_anchor_decay_set_after_the_boundary_warns():
    """anchor_param is copied at consolidate() only where anchor_decay > 0 then: a restoring
    force asked for later has no target, which is said, not silently skipped."""
    param = torch.nn.Parameter(torch.zeros(10))
    opt = MaskedAdamW([param], lr=0.1)
    param.grad = torch.randn(10)
    opt.step()
    opt.consolidate()
    opt.param_groups[0]["anchor_decay"] = 100.0
    param.grad = torch.ones(10)
    with pytest.warns(UserWarning, match="param group 0 has anchor_decay > 0 but tensors without anchor_param"):
        opt.step()
    opt.consolidate()  # now with anchor_decay > 0: the params are kept, no warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()


@pytest.mark.parametrize("backend", ["torch", "compile", "triton"])
def test_consolidate_can_restart_the_moments(backend):
    """``reset_moments=True``: the next task starts as a fresh AdamW would (moments and step
    counts from zero, so bias corrections restart), the anchor kept."""
    if backend == "triton":
        pytest.importorskip("triton")
    params = _params()
    opt = MaskedAdamW(params, lr=1e-2, backend=backend)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        set_random_grads(params, gen)
        opt.step()
    with pytest.raises(ValueError, match="Invalid reset_moments: 1"):
        opt.consolidate(reset_moments=1)
    opt.consolidate(reset_moments=True)
    twin = [p.detach().clone().requires_grad_() for p in params]
    fresh = torch.optim.AdamW(twin, lr=1e-2, foreach=False)
    for _ in range(3):
        set_random_grads(params, gen)
        for p, q in zip(params, twin):
            q.grad = p.grad.clone()
        opt.step()
        fresh.step()
    for p, q in zip(params, twin):
        assert "anchor" in opt.state[p] and float(opt.state[p]["step"]) == 3
        assert_close(p.detach(), q.detach(), "param")
        assert_close(opt.state[p]["exp_avg"], fresh.state[q]["exp_avg"], "exp_avg")


def test_reset_moments_reaches_params_without_importance():
    """Moments loaded from a torch AdamW checkpoint, with no importance measured for some
    params (or none at all): ``reset_moments`` restarts every param's moments and step."""
    params = _params()
    adamw = torch.optim.AdamW(params, lr=1e-2)
    set_random_grads(params, torch.Generator().manual_seed(0))
    adamw.step()
    for observed in ([], params[:1]):
        opt = MaskedAdamW(params, lr=1e-2)
        opt.load_state_dict(adamw.state_dict())
        for p in params:
            p.grad = torch.ones_like(p) if any(p is q for q in observed) else None
        if observed:
            opt.observe()
            opt.consolidate(reset_moments=True)
        else:
            with pytest.warns(UserWarning, match="no importance has been measured"):
                opt.consolidate(reset_moments=True)
        for p in params:
            state = opt.state[p]
            assert float(state["step"]) == 0 and not state["exp_avg"].any() and not state["exp_avg_sq"].any()


@pytest.mark.parametrize("backend", ["torch", "compile"])
def test_an_all_true_set_mask_on_an_unused_param_changes_no_anchor(backend):
    """scope="group": a param that never had a grad takes no part in consolidate(), with or without
    an (all-True) set_mask, which makes its state; it used to join the unit with zero importance,
    doubling the other tensors' anchors and getting an anchor of zeros (found by the fuzzer)."""
    def run(call_set_mask):
        gen = torch.Generator().manual_seed(0)
        a, b = torch.randn(1000, requires_grad=True), torch.randn(1000, requires_grad=True)
        opt = MaskedAdamW([a, b], lr=1e-2, scope="group", density=0.5, backend=backend)
        if call_set_mask:
            opt.set_mask(b, torch.ones(1000, dtype=torch.bool))
        a.grad = torch.randn(1000, generator=gen)
        opt.step()
        opt.consolidate()
        return opt.state[a]["anchor"].clone(), "anchor" in opt.state.get(b, {})
    plain, masked = run(False), run(True)
    assert torch.equal(plain[0], masked[0]) and not plain[1] and not masked[1]


@pytest.mark.parametrize("backend", ["torch", "compile", "triton"])
def test_consolidate_takes_complex_params(backend):
    """A complex param steps as its real view, and so does its importance: consolidate() makes
    its anchor (the resized-param check compares the real view's shape)."""
    param = torch.nn.Parameter(torch.randn(3, 2, dtype=torch.complex64))
    other = torch.nn.Parameter(torch.randn(5))
    opt = MaskedAdamW([param, other], anchor_decay=1.0, backend=backend)
    for _ in range(2):
        param.grad, other.grad = torch.randn_like(param), torch.randn_like(other)
        opt.step()
    opt.consolidate()
    assert opt.state[param]["anchor"].shape == (3, 2, 2) and opt.state[param]["anchor"].mean().item() == pytest.approx(1.0)
    assert opt.state[param]["anchor_param"].dtype == torch.complex64


@pytest.mark.parametrize("how", ["max", "sum"])
@pytest.mark.parametrize("scope", ["tensor", "group"])
def test_a_boundary_repeated_on_the_same_batches_gives_the_same_anchors(how, scope):
    """Observing the same old batches and consolidating again, with no step between (a trainer
    callback run twice: Lightning resumed from a checkpoint saved before its first step),
    leaves the anchors as one boundary made them: they are normalised to mean 1 per unit."""
    params = _params()
    grads = [[torch.randn_like(p) for p in params] for _ in range(3)]
    once = MaskedAdamW(params, lr=1e-2, anchor_decay=1.0, importance_beta=0.7, scope=scope)
    twice = MaskedAdamW(params, lr=1e-2, anchor_decay=1.0, importance_beta=0.7, scope=scope)

    def boundary(opt):
        for batch in grads:
            for p, g in zip(params, batch):
                p.grad = g.clone()
            opt.observe()
        opt.consolidate(how)

    boundary(once)
    boundary(twice)
    first = [twice.state[p]["anchor"].clone() for p in params]
    boundary(twice)
    for p, a in zip(params, first):
        assert_close(twice.state[p]["anchor"], once.state[p]["anchor"], "anchor of a repeated boundary")
        assert_close(twice.state[p]["anchor"], a, "anchor of a repeated boundary")
        assert torch.equal(twice.state[p]["anchor_param"], once.state[p]["anchor_param"])


def test_observe_skips_nonfinite_grads_as_the_step_does():
    """SPEC: observe() performs steps 1-2, so with nonfinite="skip" an element whose grad is
    NaN/Inf keeps its importance (finite), and the others take the usual update."""
    param = torch.randn(6, 5, requires_grad=True)
    opt = MaskedAdamW([param], lr=1e-2, importance_beta=0.8)
    param.grad = torch.randn(6, 5)
    opt.observe()
    before = opt.state[param]["importance"].clone()
    grad = torch.randn(6, 5)
    grad[0, 0], grad[2, 3], grad[5, 4] = float("nan"), float("inf"), -float("inf")
    bad = ~torch.isfinite(grad)
    param.grad = grad
    opt.observe()
    importance = opt.state[param]["importance"]
    assert torch.isfinite(importance).all()
    assert torch.equal(importance[bad], before[bad])
    assert_close(importance[~bad], 0.8 * before[~bad] + 0.2 * grad[~bad] ** 2, "observe, finite elements")


@pytest.mark.parametrize("how", ["max", "sum"])
def test_consolidate_again_with_no_importance_since_keeps_the_anchors(how):
    """A second consolidate() with no step or observe() since: the params with an anchor take
    part with importance 0 (no update: no bias correction to divide by zero), which folds
    nothing in, so the anchors stay as the first boundary made them."""
    params = _params()
    opt = MaskedAdamW(params, lr=1e-2, anchor_decay=1.0)
    set_random_grads(params, torch.Generator().manual_seed(4))
    opt.observe()
    opt.consolidate(how)
    first = [opt.state[p]["anchor"].clone() for p in params]
    opt.consolidate(how)
    for p, a in zip(params, first):
        assert_close(opt.state[p]["anchor"], a, f"anchor after a repeated consolidate({how!r})")


def test_consolidate_without_anchor_decay_drops_an_older_anchor_param():
    """``anchor_param`` is the params at the last ``consolidate()`` of a group with
    ``anchor_decay > 0``: a later boundary without it drops the older copy, so a restoring force
    asked for afterwards warns (no targets) instead of pulling toward the params of an older task."""
    param = torch.nn.Parameter(torch.randn(50))
    opt = MaskedAdamW([param], lr=1e-2, anchor_decay=1.0)
    param.grad = torch.randn(50)
    opt.step()
    opt.consolidate()
    assert "anchor_param" in opt.state[param]
    opt.param_groups[0]["anchor_decay"] = 0.0
    param.grad = torch.randn(50)
    opt.step()
    opt.consolidate()
    assert "anchor_param" not in opt.state[param] and "anchor" in opt.state[param]
