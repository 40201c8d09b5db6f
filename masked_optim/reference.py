"""The reference backend: SPEC.md's step in plain PyTorch, element by element as written there.

It is the executable specification and the yardstick of every other backend, so it is written
to be read: one function per SPEC step, no fusion. With ``density == 1`` and no anchor its
arithmetic is operation-for-operation ``torch.optim.AdamW(foreach=False)``.
Under a GradScaler, ``functional.masked_adamw`` reads ``found_inf`` on the host before calling it
(one sync per step; the Triton kernel reads it on the device).
"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor

from masked_optim import threshold as thr
from masked_optim.functional import (
    GroupHyper, GroupStats, TensorState, check_state, gate_thresholds, gated, math_dtype, next_thresholds,
)

#: select's score is s / (a + DELTA); the anchor has mean 1 per unit.
DELTA = 1e-3


def _value(x: float | Tensor) -> float:
    return float(x.item()) if isinstance(x, Tensor) else float(x)


def unscaled_grad(t: TensorState, hyper: GroupHyper, grad_scale: Optional[Tensor]) -> Tensor:
    """SPEC inputs: the gradient in math dtype, divided by the scaler's scale, negated if maximize."""
    g = t.grad.to(math_dtype(t.param.dtype))
    if grad_scale is not None:
        inv_scale = grad_scale.double().reciprocal().float().reshape(())  # GradScaler's is [1]: keep g's shape
        g = g * inv_scale.to(g.dtype)
    return -g if hyper.maximize else g


def live_elements(g: Tensor, hyper: GroupHyper) -> Optional[Tensor]:
    """SPEC step 1: elements that take part in the step (None: all of them)."""
    return torch.isfinite(g) if hyper.nonfinite == "skip" else None


def importance_signal(g: Tensor, theta: Tensor, kind: str) -> Tensor:
    """SPEC step 2: x = g^2 (fisher) | |g * theta| (taylor) | |g| (magnitude)."""
    if kind == "fisher":
        return g * g
    if kind == "taylor":
        return (g * theta).abs()
    return g.abs()


def update_importance(t: TensorState, g: Tensor, live: Optional[Tensor], hyper: GroupHyper) -> None:
    """SPEC step 2: s <- beta_s*s + (1-beta_s)*x on live elements; count the update."""
    theta = t.param.to(g.dtype)
    x = importance_signal(g, theta, hyper.importance).to(torch.float32)
    beta = hyper.importance_beta
    s_new = t.importance.float() * beta + x * (1.0 - beta)
    if live is not None:
        s_new = torch.where(live, s_new, t.importance.float())
    t.importance.copy_(s_new)
    t.importance_step += 1


def select_score(t: TensorState, importance_beta: float) -> Tensor:
    """select's score r = s_hat / (a + delta), s_hat = s / (1 - beta_s^t) (bias-corrected), fp32."""
    inverse_correction = 1.0 / (1.0 - importance_beta ** _value(t.importance_step))
    s_hat = t.importance.float() * inverse_correction  # a product, so every backend rounds alike
    return s_hat if t.anchor is None else s_hat / (t.anchor.float() + DELTA)


def soft_scale(t: TensorState, hyper: GroupHyper) -> Optional[Tensor]:
    """SPEC step 4: c = 1 / (1 + lambda*a), or None where it is 1 (no anchor or lambda 0)."""
    if t.anchor is None or hyper.protect_strength == 0.0:
        return None
    return 1.0 / (1.0 + hyper.protect_strength * t.anchor.float())


def restoring_force(theta: Tensor, t: TensorState, lr: float, hyper: GroupHyper) -> Tensor:
    """SPEC step 5a: theta - w*(theta - theta*), w = min(1, lr*mu*a), never past theta*.

    Computed as ``torch.lerp(theta, theta*, w)``, whose rounding cannot cross theta* (for
    w >= 0.5 it evaluates theta* - (theta* - theta)*(1 - w)); every backend uses that form.
    """
    if t.anchor is None or t.anchor_param is None or hyper.anchor_decay == 0.0:
        return theta
    pull = (t.anchor.to(theta.dtype) * (lr * hyper.anchor_decay)).clamp_(max=1.0)
    return theta.lerp(t.anchor_param.to(theta.dtype), pull)


def adamw_update(theta: Tensor, g: Tensor, t: TensorState, lr: float, scale: Optional[Tensor], hyper: GroupHyper):
    """SPEC step 5b, out of place: torch AdamW's single-tensor arithmetic, lr scaled by c."""
    step = _value(t.step)
    bias_correction1 = 1 - hyper.beta1**step
    bias_correction2_sqrt = (1 - hyper.beta2**step) ** 0.5
    m = t.exp_avg.lerp(g, 1 - hyper.beta1)
    v = t.exp_avg_sq.mul(hyper.beta2).addcmul_(g, g, value=1 - hyper.beta2)
    denom = (v.sqrt() / bias_correction2_sqrt).add_(hyper.eps)
    if scale is None:
        theta = theta.mul(1 - lr * hyper.weight_decay) if hyper.weight_decay != 0 else theta.clone()
        theta.addcdiv_(m, denom, value=-(lr / bias_correction1))
    else:
        lr_element = scale.to(theta.dtype) * lr
        theta = theta * (1 - lr_element * hyper.weight_decay)
        theta = theta - (lr_element / bias_correction1) * m / denom
    return theta, m, v


class GateBins:
    """SPEC step 3's comparison and step 6's histogram for one tensor's score bins: per element,
    or per block of ``gate_block`` elements in memory order (``threshold.block_bins``: a block
    is scored by its largest allowed bin and counted by its allowed elements; with protect,
    elements of anchor 0 move whatever their block's gate, as SPEC requires).

    ``bins``, ``user_mask`` and ``like`` (the param, for its memory order) share one shape. The
    ``compile`` backend builds one from its compiled pass's bins (1-D, in memory order); with
    block gates it keeps no reference to ``bins`` (a reused buffer)."""

    def __init__(self, bins: Tensor, user_mask: Optional[Tensor], like: Tensor, gate_block: int, protect: bool):
        self.user_mask, self.like, self.gate_block, self.protect, self._histogram = user_mask, like, gate_block, protect, None
        if gate_block > 1:
            self.bins = None
            self.block_bin, self.block_count, self.always = thr.block_bins(bins, user_mask, gate_block, like, protect)
            self.anchor_zero = bins == 0 if protect else None
        else:
            self.bins = bins

    @classmethod
    def of_scores(cls, score: Tensor, t: TensorState, gate_block: int, protect: bool) -> "GateBins":
        """The gate of a tensor's scores (``threshold.score_bins``)."""
        return cls(thr.score_bins(score).reshape(score.shape), t.user_mask, t.param, gate_block, protect)

    def histogram(self, out: Optional[Tensor] = None) -> Tensor:
        """The histogram of this step's scores (built once; into ``out`` if given)."""
        if self._histogram is None:
            if self.gate_block > 1:
                self._histogram = thr.block_histogram(self.block_bin, self.block_count, self.always, out=out)
            else:
                self._histogram = thr.histogram_of_bins(self.bins, self.user_mask)
        return self._histogram

    def gate(self, threshold: Tensor) -> Tensor:
        """Which elements the unit's threshold bin lets move (before the user mask)."""
        if self.gate_block > 1:
            gate = thr.expand_blocks(thr.gate(self.block_bin, threshold, self.protect), self.gate_block, self.like)
            return gate | self.anchor_zero if self.protect else gate
        return thr.gate(self.bins, threshold, self.protect)


def check_group(tensors: list[TensorState]) -> None:
    """What would make a step fail part-way, checked before it changes anything (ValueError;
    ``functional.check_state`` of every tensor)."""
    for t in tensors:
        check_state(t)


def prepare_group(tensors: list[TensorState], hyper: GroupHyper, *, grad_scale: Optional[Tensor] = None,
                  found_inf: Optional[Tensor] = None) -> None:
    """The step's checks (``check_group``), changing nothing; the reference needs no plan."""
    check_group(tensors)


def step_group(
    tensors: list[TensorState],
    hyper: GroupHyper,
    *,
    grad_scale: Optional[Tensor] = None,
    found_inf: Optional[Tensor] = None,
    plan: None = None,
) -> Optional[GroupStats]:
    """One MaskedAdamW step of one param group, in place. Returns device-side counts
    (``found_inf`` is read by the caller, ``functional.masked_adamw``; ``plan`` is unused)."""
    check_group(tensors)
    lr = _value(hyper.lr)
    protect = hyper.mask == "protect"
    grads, lives, scores = [], [], []
    for t, has_gate in zip(tensors, gated(tensors, hyper)):
        t.step += 1
        g = unscaled_grad(t, hyper, grad_scale)
        live = live_elements(g, hyper)
        update_importance(t, g, live, hyper)
        if not has_gate:
            score = None
        else:
            score = t.anchor.float() if protect else select_score(t, hyper.importance_beta)
        grads.append(g)
        lives.append(live)
        scores.append(score)

    gate_bins = [None if score is None else GateBins.of_scores(score, t, hyper.gate_block, protect) for score, t in zip(scores, tensors)]
    histograms = [None if bins is None else bins.histogram for bins in gate_bins]
    gates, unit_current = gate_thresholds(tensors, histograms, hyper)
    following_thresholds = next_thresholds(tensors, histograms, hyper)
    device = tensors[0].param.device if tensors else torch.device("cpu")
    stats = GroupStats(*(torch.zeros((), dtype=torch.int64, device=device) for _ in range(4)), thresholds=unit_current)
    for t, g, live, bins, current, following in zip(tensors, grads, lives, gate_bins, gates, following_thresholds):
        k = torch.ones_like(g, dtype=torch.bool) if current is None else bins.gate(current)
        if t.user_mask is not None:
            k = k & t.user_mask
        moving = k if live is None else k & live
        theta = t.param.to(g.dtype)
        pulled = restoring_force(theta, t, lr, hyper)
        new_theta, new_m, new_v = adamw_update(pulled, g, t, lr, soft_scale(t, hyper), hyper)
        t.param.copy_(torch.where(moving, new_theta, theta))
        t.exp_avg.copy_(torch.where(moving, new_m, t.exp_avg))
        t.exp_avg_sq.copy_(torch.where(moving, new_v, t.exp_avg_sq))
        if following is not None:
            t.threshold.copy_(following)
        stats.elements += g.numel()
        stats.updated += moving.sum()
        stats.frozen += (~k).sum()
        if live is not None:
            stats.skipped += (~live).sum()
    return stats


def observe_group(tensors: list[TensorState], hyper: GroupHyper, grad_scale: Optional[Tensor] = None) -> None:
    """Importance-only pass (SPEC steps 1-2): no parameter or moment changes."""
    for t in tensors:
        g = unscaled_grad(t, hyper, grad_scale)
        update_importance(t, g, live_elements(g, hyper), hyper)
