"""Small shared pieces of the tests: models, random grads, state comparison."""
from __future__ import annotations

import copy

import torch

from masked_optim import MaskedAdamW


def mlp(dtype=torch.float32, sizes=(12, 20, 7)) -> torch.nn.Module:
    layers = []
    for fan_in, fan_out in zip(sizes[:-1], sizes[1:]):
        layers += [torch.nn.Linear(fan_in, fan_out), torch.nn.Tanh()]
    return torch.nn.Sequential(*layers[:-1]).to(dtype)


def loss_step(model: torch.nn.Module, optimizer, generator: torch.Generator, batch: int = 16) -> None:
    """One forward/backward on random data drawn from ``generator`` (same data for twin runs)."""
    first = next(model.parameters())
    x = torch.randn(batch, first.shape[1], generator=generator).to(first.dtype)
    optimizer.zero_grad()
    model(x).float().pow(2).mean().backward()
    optimizer.step()


def set_random_grads(params, generator: torch.Generator, scale: float = 1.0) -> None:
    for p in params:
        p.grad = (torch.randn(p.shape, generator=generator, dtype=torch.float64) * scale).to(p.dtype)


def lognormal_grads(params, generator: torch.Generator, sigma: float = 1.0) -> None:
    """Grads whose squares spread over orders of magnitude, like real ones."""
    for p in params:
        sign = torch.randint(0, 2, p.shape, generator=generator) * 2 - 1
        mag = torch.exp(torch.randn(p.shape, generator=generator) * sigma)
        p.grad = (sign * mag).to(p.dtype)


def snapshot(optimizer: MaskedAdamW) -> dict:
    """A deep copy of every param and state tensor, keyed by (param index, key)."""
    out = {}
    params = [p for g in optimizer.param_groups for p in g["params"]]
    for index, p in enumerate(params):
        out[(index, "param")] = p.detach().clone()
        for key, value in optimizer.state.get(p, {}).items():
            out[(index, key)] = value.clone() if torch.is_tensor(value) else copy.deepcopy(value)
    return out


def assert_bitwise_equal(a: dict, b: dict, ignore: tuple = ()) -> None:
    """Every tensor and number equal bit for bit (NaNs in the same places), except keys named in ``ignore``."""
    assert a.keys() == b.keys()
    for key in a:
        if key[1] in ignore:
            continue
        if torch.is_tensor(a[key]):
            assert a[key].dtype == b[key].dtype, key
            assert torch.equal(a[key], b[key]) or (a[key].isnan() == b[key].isnan()).all() and torch.equal(a[key].nan_to_num(), b[key].nan_to_num()), key
        else:
            assert a[key] == b[key], key
