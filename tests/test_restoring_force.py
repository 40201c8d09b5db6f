"""The restoring force pulls gated-on elements toward theta* by min(1, lr*mu*a) of the gap."""
import pytest
import torch

from masked_optim import MaskedAdamW
from tests.helpers import set_random_grads
from tests.tolerances import assert_close


@pytest.mark.parametrize("backend", ["torch", "compile", "triton"])
@pytest.mark.parametrize("mu", [0.5, 50.0, 5000.0])
def test_pull_is_exact_fraction_of_gap_and_never_overshoots(mu, backend):
    lr = 1e-2
    param = torch.randn(40, 30, requires_grad=True)
    opt = MaskedAdamW([param], lr=lr, weight_decay=0.0, anchor_decay=mu, backend=backend)
    set_random_grads([param], torch.Generator().manual_seed(0))
    opt.observe()  # importance only: moments stay zero
    opt.consolidate()
    state = opt.state[param]
    anchor, star = state["anchor"].clone(), state["anchor_param"].clone()
    with torch.no_grad():
        param.add_(torch.randn_like(param))
    before = param.detach().clone()
    param.grad = torch.zeros_like(param)  # Adam's own update is exactly zero
    opt.step()
    pull = (lr * mu * anchor).clamp(max=1.0)
    expected = before.lerp(star, pull)  # = before - pull*(before - star), rounded safely
    if backend == "compile":  # Inductor's lerp: within an ulp of torch's
        assert_close(param.detach(), expected, "param vs torch.lerp")
    else:
        assert torch.equal(param.detach(), expected)
    assert_close(param.detach(), before - pull * (before - star), "param vs the pull formula")
    gap_before, gap_after = (before - star).abs(), (param.detach() - star).abs()
    assert (gap_after <= gap_before).all()
    assert torch.equal(torch.sign(param.detach() - star)[gap_after > 0], torch.sign(before - star)[gap_after > 0])
    if mu == 5000.0:
        clipped = lr * mu * anchor >= 1
        assert clipped.any() and torch.equal(param.detach()[clipped], star[clipped])


def test_pull_applies_only_to_gated_on_elements():
    param = torch.randn(200, 100, requires_grad=True)
    opt = MaskedAdamW([param], lr=1e-2, anchor_decay=10.0, density=0.3, mask="protect")
    gen = torch.Generator().manual_seed(1)
    set_random_grads([param], gen)
    opt.observe()
    opt.consolidate()
    with torch.no_grad():
        param.add_(1.0)
    before = param.detach().clone()
    set_random_grads([param], gen)
    opt.step()
    frozen = param.detach() == before
    assert abs(frozen.double().mean().item() - 0.7) < 0.07
    anchor = opt.state[param]["anchor"]
    assert anchor[frozen].min() >= anchor[~frozen].max()  # the frozen ones are the important ones


def test_no_pull_without_anchor_decay():
    param = torch.randn(10, requires_grad=True)
    ours = MaskedAdamW([param], lr=1e-2, anchor_decay=0.0)
    set_random_grads([param], torch.Generator().manual_seed(2))
    ours.observe()
    ours.consolidate()
    assert "anchor_param" not in ours.state[param]
