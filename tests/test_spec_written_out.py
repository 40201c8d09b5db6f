"""Every backend against SPEC.md's "One step" and ``consolidate`` written out in plain torch.

``backend="torch"`` is the executable specification the other backends are compared with, so a
slip in it (a wrong delta, a missing bias correction, c left out of the weight decay, lr*c in
the restoring force) would pass every backend-against-reference test. Here one tensor (scope
"tensor", element gates) steps through SPEC's formulas, transcribed line by line from SPEC.md
without importing the package's arithmetic: the threshold is ``tests/test_threshold.py``'s scan
of the rule, the bins the float32 bits' top 16 (sign dropped). Params, both moments,
importance and anchor are compared after every step (``tests/tolerances.py``), and which
elements moved, exactly.
"""
from __future__ import annotations

import math

import pytest
import torch

from masked_optim import MaskedAdamW
from tests.test_threshold import _threshold_bin_by_scan
from tests.tolerances import assert_close

NUM_BINS = 1 << 15
DELTA = 1e-3  # SPEC step 3


def _bins(score: torch.Tensor) -> torch.Tensor:
    """SPEC's histogram bin: a non-negative float32's bit pattern without the sign, top 16 bits."""
    score = score.float()
    return torch.where(score != score, 0x7FC0, (score.contiguous().view(torch.int32) >> 16) & (NUM_BINS - 1))


class WrittenOut:
    """One tensor's state, stepped by SPEC's text in float32 (as the reference computes)."""

    def __init__(self, param: torch.Tensor, lr=1e-2, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.1, density=1.0,
                 mask="select", importance="fisher", importance_beta=0.9, protect_strength=0.0, anchor_decay=0.0,
                 maximize=False, nonfinite="skip"):
        self.theta = param.detach().clone()
        self.lr, (self.b1, self.b2), self.eps, self.wd = lr, betas, eps, weight_decay
        self.density, self.mask, self.kind, self.beta_s = density, mask, importance, importance_beta
        self.lam, self.mu, self.maximize, self.nonfinite = protect_strength, anchor_decay, maximize, nonfinite
        self.m, self.v, self.s = (torch.zeros_like(self.theta) for _ in range(3))
        self.t = self.t_s = 0
        self.a = self.theta_star = self.tau = None
        self.redo = False

    def _rule(self, r: torch.Tensor) -> int:
        hist = torch.bincount(_bins(r).reshape(-1), minlength=NUM_BINS)
        return int(_threshold_bin_by_scan(hist, self.density, self.mask == "protect"))

    def step(self, grad: torch.Tensor) -> torch.Tensor:
        g = -grad if self.maximize else grad.clone()
        self.t += 1
        self.t_s += 1
        # 1. non-finite
        live = g.isfinite() if self.nonfinite == "skip" else torch.ones_like(g, dtype=torch.bool)
        # 2. importance
        x = {"fisher": g * g, "taylor": (g * self.theta).abs(), "magnitude": g.abs()}[self.kind]
        self.s = torch.where(live, self.beta_s * self.s + (1 - self.beta_s) * x, self.s)
        # 3. score and gate against the unit's threshold (taken from the previous step's
        # histogram; derived from the current scores when none is known)
        protect = self.mask == "protect"
        if self.density >= 1 or (protect and self.a is None):
            k = torch.ones_like(g, dtype=torch.bool)
        else:
            if protect:
                r = self.a
            else:
                r = self.s / (1 - self.beta_s ** self.t_s)  # bias-corrected (step 6)
                if self.a is not None:
                    r = r / (self.a + DELTA)
            if protect:
                if self.tau is None:
                    self.tau = self._rule(r)
                k = _bins(r) < self.tau
            else:
                own = self._rule(r)  # from this step's scores
                k = _bins(r) >= (own if self.tau is None or self.redo else self.tau)
                # 6. this step's scores give the next step's threshold. The package's addition
                # (README, "Density threshold"): the next step derives its own instead where
                # the threshold this step had from the last would have missed this step's target
                # by more than half SPEC's bound and more than its own threshold does, and
                # after a step that had none
                n, target = r.numel(), self.density * r.numel()
                if self.tau is None:
                    self.redo = True
                else:
                    missed = abs(int((_bins(r) >= self.tau).sum()) - target)
                    self.redo = missed > 0.5 * max(0.1 * self.density, 0.002) * n \
                        and missed > abs(int((_bins(r) >= own).sum()) - target)
                self.tau = own
        # 4. soft scale
        c = torch.ones_like(g) if self.a is None or self.lam == 0 else 1 / (1 + self.lam * self.a)
        # 5. restoring force, then AdamW with lr*c
        theta = self.theta
        if self.a is not None and self.mu > 0:
            theta = theta - torch.clamp(self.lr * self.mu * self.a, max=1.0) * (theta - self.theta_star)
        theta = theta * (1 - self.lr * c * self.wd)
        m = self.b1 * self.m + (1 - self.b1) * g
        v = self.b2 * self.v + (1 - self.b2) * g * g
        bc1, bc2 = 1 - self.b1 ** self.t, 1 - self.b2 ** self.t
        theta = theta - (self.lr * c / bc1) * m / (v.sqrt() / math.sqrt(bc2) + self.eps)
        moving = k & live
        self.theta = torch.where(moving, theta, self.theta)
        self.m, self.v = torch.where(moving, m, self.m), torch.where(moving, v, self.v)
        return moving

    def consolidate(self, how: str) -> None:
        s_hat = self.s / (1 - self.beta_s ** self.t_s) if self.t_s else self.s
        fresh = s_hat / s_hat.mean() if s_hat.mean() > 0 else s_hat
        a = fresh if self.a is None else (torch.maximum(self.a, fresh) if how == "max" else self.a + fresh)
        self.a = a / a.mean() if a.mean() > 0 else a
        self.s, self.t_s, self.tau = torch.zeros_like(self.s), 0, None
        self.theta_star = self.theta.clone() if self.mu > 0 else None


CASES = {
    "adamw": dict(),
    "select": dict(density=0.3),
    "select-anchor-soft-restore": dict(density=0.3, anchor_decay=5.0, protect_strength=3.0),
    "select-magnitude-maximize-soft": dict(density=0.2, importance="magnitude", maximize=True, protect_strength=10.0),
    "protect-taylor-restore": dict(density=0.5, mask="protect", anchor_decay=20.0, importance="taylor"),
    "dense-strong-restore": dict(density=1.0, anchor_decay=50.0, protect_strength=1.0, lr=0.1),
}


@pytest.mark.parametrize("backend", ["torch", "compile", "triton"])
@pytest.mark.parametrize("how", ["max", "sum"])
@pytest.mark.parametrize("name", list(CASES))
def test_backend_follows_the_spec_written_out(name, how, backend):
    if backend == "triton":
        pytest.importorskip("triton")
    options = CASES[name]
    gen = torch.Generator().manual_seed(0)
    param = torch.nn.Parameter(torch.randn(40, 30, generator=gen))
    spec = WrittenOut(param, **options)
    opt = MaskedAdamW([param], lr=options.get("lr", 1e-2), weight_decay=0.1, importance_beta=0.9, backend=backend,
                      **{k: v for k, v in options.items() if k != "lr"})
    for step in range(14):
        if step == 6:
            spec.consolidate(how)
            opt.consolidate(how)
        grad = torch.randn(param.shape, generator=gen).exp() * (torch.randint(0, 2, param.shape, generator=gen) * 2 - 1)
        if step in (2, 9):
            grad[0, :5] = float("nan")
        param.grad = grad
        before = opt.state[param]["exp_avg"].clone() if param in opt.state else torch.zeros_like(param)
        moved = spec.step(grad)
        opt.step()
        where = f"{name}, step {step}"
        state = opt.state[param]
        assert torch.equal(state["exp_avg"] != before, moved & (spec.m != before)), f"{where}: gates"
        assert_close(param.detach(), spec.theta, f"{where}: param")
        assert_close(state["exp_avg"], spec.m, f"{where}: exp_avg")
        assert_close(state["exp_avg_sq"], spec.v, f"{where}: exp_avg_sq")
        assert_close(state["importance"], spec.s, f"{where}: importance")
        if spec.a is not None:
            assert_close(state["anchor"], spec.a, f"{where}: anchor")
