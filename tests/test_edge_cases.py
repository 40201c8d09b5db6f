"""Awkward inputs: zero-size params, params without grads, frozen layers, non-finite grads."""
import copy

import pytest
import torch

from masked_optim import MaskedAdamW
from tests.tolerances import assert_close


def test_zero_size_params_and_params_without_grads_match_adamw():
    """PyTorch's optimizer-test pattern: a zero-size param in the mix, one param's grad set to
    None on one step and a layer frozen for two, beside torch AdamW."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen, requires_grad=True) for s in ((0,), (7, 3), (5,), (0, 4))]
    twins = [p.detach().clone().requires_grad_() for p in params]
    ours = MaskedAdamW(params, lr=1e-2)
    theirs = torch.optim.AdamW(twins, lr=1e-2, foreach=False)
    for step in range(8):
        for index, (p, q) in enumerate(zip(params, twins)):
            grad = torch.randn(p.shape, generator=gen)
            frozen = (index == 1 and step in (3, 4)) or (index == 2 and step == 6)
            p.grad = None if frozen else grad
            q.grad = None if frozen else grad.clone()
        ours.step()
        theirs.step()
    for p, q in zip(params, twins):
        assert_close(p, q, "param")
        assert ours.state[p]["step"] == theirs.state[q]["step"]
        assert_close(ours.state[p]["exp_avg_sq"], theirs.state[q]["exp_avg_sq"], "exp_avg_sq")
    assert ours.state[params[1]]["step"] == 6


def test_zero_size_params_with_gates_and_anchor():
    params = [torch.zeros(0, requires_grad=True), torch.randn(50, requires_grad=True)]
    opt = MaskedAdamW(params, lr=1e-2, density=0.3, anchor_decay=1.0, scope="group")
    for _ in range(3):
        for p in params:
            p.grad = torch.randn_like(p)
        opt.step()
    opt.consolidate()
    opt.step()
    assert opt.mask_stats()[0]["elements"] == 50


def test_nonfinite_skip_leaves_elements_untouched_and_counts_them():
    param = torch.randn(6, 5, requires_grad=True)
    opt = MaskedAdamW([param], lr=1e-2, weight_decay=0.1)
    param.grad = torch.randn(6, 5)
    opt.step()
    state = opt.state[param]
    before = [param.detach().clone(), *(state[k].clone() for k in ("exp_avg", "exp_avg_sq", "importance"))]
    grad = torch.randn(6, 5)
    grad[0, 0], grad[2, 3], grad[5, 4] = float("nan"), float("inf"), -float("inf")
    bad = ~torch.isfinite(grad)
    param.grad = grad
    opt.step()
    after = [param.detach(), *(state[k] for k in ("exp_avg", "exp_avg_sq", "importance"))]
    for b, a in zip(before, after):
        assert torch.equal(a[bad], b[bad]) and (a[~bad] != b[~bad]).all()
        assert torch.isfinite(a).all()
    assert opt.mask_stats()[0]["nonfinite_skipped"] == 3


@pytest.mark.parametrize("backend", ["torch", "compile", "triton"])
def test_nonfinite_skipped_elements_are_not_counted_frozen(backend):
    """mask_stats: ``frozen`` counts gated-off elements; an element skipped for its non-finite
    grad was gated on (density 1), so it is ``nonfinite_skipped``, not frozen, and the realised
    density stays the target."""
    if backend == "triton":
        pytest.importorskip("triton")
    param = torch.randn(6, 5, requires_grad=True)
    opt = MaskedAdamW([param], lr=1e-2, backend=backend)
    grad = torch.randn(6, 5)
    grad[0, 0], grad[2, 3], grad[5, 4] = float("nan"), float("inf"), -float("inf")
    param.grad = grad
    opt.step()
    stats = opt.mask_stats()[0]
    assert (stats["nonfinite_skipped"], stats["frozen"], stats["updated"]) == (3, 0, 27)
    assert stats["realised_density"] == 1.0


def test_nonfinite_propagate_behaves_like_adamw():
    param = torch.randn(6, 5, requires_grad=True)
    twin = param.detach().clone().requires_grad_()
    ours = MaskedAdamW([param], lr=1e-2, nonfinite="propagate")
    theirs = torch.optim.AdamW([twin], lr=1e-2, foreach=False)
    grad = torch.randn(6, 5)
    grad[1, 1] = float("nan")
    param.grad, twin.grad = grad, grad.clone()
    ours.step()
    theirs.step()
    assert_close(param, twin, "param", equal_nan=True)
    assert param[1, 1].isnan() and ours.mask_stats()[0]["nonfinite_skipped"] == 0


@pytest.mark.parametrize("kind", ["fisher", "taylor", "magnitude"])
def test_importance_kinds_and_bf16_importance(kind):
    param = torch.randn(40, 40, requires_grad=True)
    opt = MaskedAdamW([param], lr=1e-3, importance=kind, importance_dtype=torch.bfloat16, density=0.5)
    for _ in range(3):
        param.grad = torch.randn_like(param)
        opt.step()
    state = opt.state[param]
    assert state["importance"].dtype == torch.bfloat16 and (state["importance"] > 0).all()
    assert opt.param_groups[0]["importance_dtype"] == "bfloat16"
    bytes_ = opt.state_bytes()
    assert bytes_["importance"] == 40 * 40 * 2 and bytes_["exp_avg"] == 40 * 40 * 4
    assert bytes_["total"] == sum(v for k, v in bytes_.items() if k != "total")


def test_mask_stats_before_any_step_and_per_group():
    a, b = torch.randn(10, requires_grad=True), torch.randn(10, requires_grad=True)
    opt = MaskedAdamW([{"params": [a]}, {"params": [b], "density": 0.5}])
    assert opt.mask_stats() == [None, None]
    b.grad = torch.randn(10)
    opt.step()
    stats = opt.mask_stats()
    assert stats[0] is None and stats[1]["target_density"] == 0.5 and len(stats[1]["threshold"]) == 1


def test_soft_scale_slows_important_elements():
    param = (torch.randn(100) * 0.01).requires_grad_()  # small values: fine float32 spacing
    opt = MaskedAdamW([param], lr=1e-2, weight_decay=0.0, protect_strength=100.0)
    param.grad = torch.linspace(0.01, 3, 100)
    opt.observe()
    opt.consolidate()
    twin = copy.deepcopy(param.detach())
    param.grad = torch.ones(100)
    before = param.detach().clone()
    opt.step()
    moved = (param.detach() - before).abs()
    anchor = opt.state[param]["anchor"].double()
    step = 1e-2 / (1 + 100.0 * anchor) / (1 + 1e-8)  # Adam's first step: lr*c * g/(|g| + eps), g = 1
    assert_close(param.detach(), (before.double() - step).float(), "param after one soft-scaled step")
    assert moved[-1] < moved[0] / 10 and twin is not param


def test_mask_stats_label_each_threshold_with_its_units_params():
    """``units`` names, per threshold, the group's params it gates: one each per tensor, all
    gated ones at group scope; params without a grad (or without a gate) are left out."""
    params = [torch.nn.Parameter(torch.randn(20)) for _ in range(6)]
    opt = MaskedAdamW([{"params": params[:3]}, {"params": params[3:], "scope": "group"}], density=0.5)
    for p in (params[0], params[2], params[3], params[5]):
        p.grad = torch.randn(20)
    opt.step()
    first, second = opt.mask_stats()
    assert first["units"] == [[0], [2]] and len(first["threshold"]) == 2
    assert second["units"] == [[0, 2]] and len(second["threshold"]) == 1
