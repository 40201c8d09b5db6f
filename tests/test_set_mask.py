"""User-supplied fixed masks: masked elements never move; density applies within the mask."""
import io

import pytest
import torch

from masked_optim import MaskedAdamW
from tests.helpers import lognormal_grads


def _setup(density=1.0, **options):
    param = torch.randn(100, 80, requires_grad=True)
    opt = MaskedAdamW([param], lr=1e-2, weight_decay=0.1, density=density, **options)
    mask = torch.rand(100, 80, generator=torch.Generator().manual_seed(0)) < 0.4
    return param, opt, mask


@pytest.mark.parametrize("density", [1.0, 0.5])
def test_masked_elements_stay_bit_identical(density):
    param, opt, mask = _setup(density, importance_beta=0.0)  # stationary scores: no stale threshold
    gen = torch.Generator().manual_seed(1)
    lognormal_grads([param], gen)
    opt.step()  # some history before the mask arrives
    opt.set_mask(param, mask)
    state = opt.state[param]
    frozen = [param.detach()[~mask].clone(), state["exp_avg"][~mask].clone(), state["exp_avg_sq"][~mask].clone()]
    for _ in range(10):
        allowed_before = param.detach()[mask].clone()
        lognormal_grads([param], gen)
        opt.step()
        stats = opt.mask_stats()[0]
        # the allowed elements that moved are the ones the step counts, at SPEC's bound of the target
        assert int((param.detach()[mask] != allowed_before).sum()) == stats["updated"]
        allowed_updated = stats["updated"] / int(mask.sum())
        assert abs(allowed_updated - density) <= max(0.1 * density, 0.002)
    for before, after in zip(frozen, (param.detach()[~mask], state["exp_avg"][~mask], state["exp_avg_sq"][~mask])):
        assert torch.equal(before, after)
    assert state["importance"][~mask].any()  # masked elements still measure their importance


def test_mask_survives_state_dict_and_can_be_removed():
    param, opt, mask = _setup(0.5)
    opt.set_mask(param, mask)
    buffer = io.BytesIO()
    torch.save(opt.state_dict(), buffer)
    buffer.seek(0)
    param.data = param.data.to(torch.bfloat16)
    fresh = MaskedAdamW([param], lr=1e-2, density=0.5)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.state[param]["user_mask"].dtype == torch.bool
    assert torch.equal(fresh.state[param]["user_mask"], mask)
    fresh.set_mask(param, None)
    assert "user_mask" not in fresh.state[param]


def test_bad_masks_are_rejected():
    param, opt, mask = _setup()
    with pytest.raises(ValueError, match=r"mask shape \(80, 100\) does not match param shape \(100, 80\)"):
        opt.set_mask(param, mask.T)
    with pytest.raises(ValueError, match="mask must be a bool Tensor, got torch.float32"):
        opt.set_mask(param, mask.float())
    with pytest.raises(ValueError, match="param is not managed by this optimizer"):
        opt.set_mask(torch.zeros(3), torch.ones(3, dtype=torch.bool))
    assert param not in opt.state  # a refused mask makes no state either


@pytest.mark.parametrize("backend", ["torch", "compile", "triton"])
@pytest.mark.parametrize("mask_kind,density", [("select", 0.3), ("protect", 0.3), ("select", 1.0)])
def test_realised_density_is_a_fraction_of_the_allowed_elements(backend, mask_kind, density):
    """``density`` is the fraction of the elements a user mask allows that a step updates, and
    ``mask_stats`` reports it so: ``masked`` counts the held elements, ``frozen`` includes them."""
    gen = torch.Generator().manual_seed(2)
    params = [torch.randn(64, 64, requires_grad=True), torch.randn(500, requires_grad=True)]
    opt = MaskedAdamW(params, lr=1e-2, density=density, mask=mask_kind, backend=backend)
    allowed = torch.rand(64, 64, generator=gen) < 0.5
    opt.set_mask(params[0], allowed)
    for _ in range(3):
        lognormal_grads(params, gen)
        opt.step()
        if mask_kind == "protect":
            opt.consolidate()
    stats = opt.mask_stats()[0]
    held = int((~allowed).sum())
    assert stats["masked"] == held and stats["elements"] == 64 * 64 + 500
    assert stats["frozen"] >= held
    assert stats["realised_density"] == (stats["elements"] - stats["frozen"]) / (stats["elements"] - held)
    assert abs(stats["realised_density"] - density) <= max(0.1 * density, 0.002), stats


def test_held_elements_are_counted_once_and_again_after_an_in_place_change(monkeypatch):
    """``mask_stats()["masked"]`` of a steady run comes from one count per mask (a step does not
    count them again), and a mask changed in place through the state is counted afresh."""
    gen = torch.Generator().manual_seed(3)
    params = [torch.randn(40, 30, requires_grad=True), torch.randn(200, requires_grad=True)]
    opt = MaskedAdamW(params, lr=1e-2, density=0.5)
    first, second = torch.rand(40, 30, generator=gen) < 0.5, torch.rand(200, generator=gen) < 0.25
    opt.set_mask(params[0], first)
    opt.set_mask(params[1], second)
    counted = []
    count_nonzero = torch.count_nonzero
    monkeypatch.setattr(torch, "count_nonzero", lambda mask: counted.append(mask.numel()) or count_nonzero(mask))
    for _ in range(3):
        lognormal_grads(params, gen)
        opt.step()
        assert opt.mask_stats()[0]["masked"] == int((~first).sum() + (~second).sum())
    assert sorted(counted) == [200, 1200]  # each mask once, over three steps
    opt.state[params[1]]["user_mask"][:50] = False  # in place: the version counter moves
    lognormal_grads(params, gen)
    opt.step()
    second[:50] = False
    assert opt.mask_stats()[0]["masked"] == int((~first).sum() + (~second).sum())
    assert sorted(counted) == [200, 200, 1200]


def test_set_mask_keeps_the_mask_as_it_was_given():
    """``set_mask`` fixes the mask it is given: changing the caller's tensor afterwards changes
    neither the stored mask nor which elements move."""
    param = torch.randn(100, requires_grad=True)
    opt = MaskedAdamW([param], lr=1e-2)
    mask = torch.rand(100, generator=torch.Generator().manual_seed(0)) < 0.5
    given = mask.clone()
    opt.set_mask(param, mask)
    mask.fill_(True)
    param.grad = torch.randn(100)
    before = param.detach().clone()
    opt.step()
    assert torch.equal(opt.state[param]["user_mask"], given)
    assert torch.equal(param.detach()[~given], before[~given]) and not torch.equal(param.detach(), before)
