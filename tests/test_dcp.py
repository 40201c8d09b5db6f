"""torch.distributed.checkpoint in one process, in the nested and the flattened
(``flatten_optimizer_state_dict=True``, torchtitan's) formats: anchors and masks survive a load
into a fresh optimizer, and a rollback to a checkpoint saved before ``consolidate()`` returns
to it. (FSDP2 with 2 ranks, full state dicts and broadcast_from_rank0: tests/dist_worker.py.)"""
from __future__ import annotations

import copy

import pytest
import torch

from masked_optim import MaskedAdamW
from tests.helpers import assert_bitwise_equal, loss_step, mlp, snapshot

dcp = pytest.importorskip("torch.distributed.checkpoint")
from torch.distributed.checkpoint.state_dict import (  # noqa: E402
    StateDictOptions, get_optimizer_state_dict,
)
from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict as torch_set  # noqa: E402

from masked_optim.distributed import load_optimizer_checkpoint, set_optimizer_state_dict  # noqa: E402

OPTIONS = dict(lr=1e-2, density=0.5, anchor_decay=1.0, importance_beta=0.9)
FORMATS = {"nested": None, "flattened": StateDictOptions(flatten_optimizer_state_dict=True)}


def trained(consolidate: bool = True):
    """A model and optimizer with a user mask, 3 steps, a consolidation and 2 more steps."""
    model = mlp()
    opt = MaskedAdamW(model.parameters(), **OPTIONS)
    opt.set_mask(model[0].weight, torch.rand(model[0].weight.shape, generator=torch.Generator().manual_seed(5)) > 0.3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(3):
        loss_step(model, opt, gen)
    if consolidate:
        opt.consolidate()
        for _ in range(2):
            loss_step(model, opt, gen)
    return model, opt


def fresh_like(model):
    twin = copy.deepcopy(model)
    return twin, MaskedAdamW(twin.parameters(), **OPTIONS)


def continue_both(a, opt_a, b, opt_b, steps: int = 3) -> None:
    for seed in range(steps):
        loss_step(a, opt_a, torch.Generator().manual_seed(50 + seed))
        loss_step(b, opt_b, torch.Generator().manual_seed(50 + seed))
    assert_bitwise_equal(snapshot(opt_a), snapshot(opt_b))


@pytest.mark.parametrize("form", list(FORMATS))
def test_set_optimizer_state_dict_keeps_anchors_and_masks(form):
    options = FORMATS[form]
    model, opt = trained()
    saved = copy.deepcopy(get_optimizer_state_dict(model, opt, options=options))
    twin, twin_opt = fresh_like(model)
    set_optimizer_state_dict(twin, twin_opt, saved, options=options)
    assert {"anchor", "anchor_param", "user_mask"} <= set(twin_opt.state[twin[0].weight])
    continue_both(model, opt, twin, twin_opt)


@pytest.mark.parametrize("form", list(FORMATS))
def test_load_optimizer_checkpoint_both_formats(form, tmp_path):
    options = FORMATS[form]
    model, opt = trained()
    dcp.save({"optim": get_optimizer_state_dict(model, opt, options=options)}, checkpoint_id=str(tmp_path))
    twin, twin_opt = fresh_like(model)
    load_optimizer_checkpoint(twin, twin_opt, str(tmp_path), options=options)
    assert {"anchor", "anchor_param", "user_mask"} <= set(twin_opt.state[twin[0].weight])
    continue_both(model, opt, twin, twin_opt)


@pytest.mark.parametrize("form", list(FORMATS))
def test_rollback_to_a_checkpoint_before_consolidate(form, tmp_path):
    """A checkpoint saved before ``consolidate()`` loaded into the consolidated optimizer: the
    anchors go (torch fills a flattened state dict's missing entries with ``{}``)."""
    options = FORMATS[form]
    model, opt = trained(consolidate=False)
    before = copy.deepcopy(get_optimizer_state_dict(model, opt, options=options))
    dcp.save({"optim": get_optimizer_state_dict(model, opt, options=options)}, checkpoint_id=str(tmp_path))
    reference, reference_opt = fresh_like(model)
    reference_opt.load_state_dict(opt.state_dict())
    params = [p.detach().clone() for p in model.parameters()]
    opt.consolidate()
    for load in ("in memory", "from files"):
        with torch.no_grad():
            for p, saved in zip(model.parameters(), params):
                p.copy_(saved)
        opt.consolidate()  # anchors again before each load
        if load == "in memory":
            torch_set(model, opt, copy.deepcopy(before), options=options)
        else:
            load_optimizer_checkpoint(model, opt, str(tmp_path), options=options)
        assert not {"anchor", "anchor_param"} & set(opt.state[model[0].weight]), load
        assert_bitwise_equal(snapshot(opt), snapshot(reference_opt))
