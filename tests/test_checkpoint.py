"""state_dict round trips: resume is exact, dtypes survive, AdamW checkpoints load, pickling."""
import copy
import io
import pickle

import pytest
import torch

from masked_optim import MaskedAdamW
from tests.helpers import assert_bitwise_equal, lognormal_grads, snapshot

CONFIG = dict(lr=1e-2, weight_decay=0.05, density=0.3, anchor_decay=5.0, protect_strength=2.0)


def _setup(dtype, **options):
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in ((30, 20), (64,), (5, 5))]
    return params, MaskedAdamW(params, **{**CONFIG, **options})


def _run(params, opt, gen, steps, consolidate_at=None):
    for step in range(steps):
        lognormal_grads(params, gen)
        opt.step()
        if step == consolidate_at:
            opt.consolidate()


def _roundtrip(state_dict):
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("options", [dict(), dict(mask="protect", scope="group"), dict(importance_dtype="bfloat16")])
def test_resume_reproduces_uninterrupted_run(dtype, options):
    params, opt = _setup(dtype, **options)
    gen = torch.Generator().manual_seed(1)
    _run(params, opt, gen, 8, consolidate_at=4)
    saved_params = [p.detach().clone() for p in params]
    saved = _roundtrip(opt.state_dict())
    gen_state = gen.get_state()
    _run(params, opt, gen, 8)
    uninterrupted = snapshot(opt)

    resumed_params, resumed = _setup(dtype, **options)
    with torch.no_grad():
        for p, q in zip(resumed_params, saved_params):
            p.copy_(q)
    resumed.load_state_dict(saved)
    gen.set_state(gen_state)
    _run(resumed_params, resumed, gen, 8)
    assert_bitwise_equal(snapshot(resumed), uninterrupted)


def test_load_keeps_fp32_state_of_bf16_params():
    params, opt = _setup(torch.bfloat16)
    gen = torch.Generator().manual_seed(2)
    _run(params, opt, gen, 3, consolidate_at=1)
    before = snapshot(opt)
    opt.load_state_dict(_roundtrip(opt.state_dict()))
    after = snapshot(opt)
    assert_bitwise_equal(after, before)
    state = opt.state[params[0]]
    assert state["importance"].dtype == torch.float32 and state["exp_avg"].dtype == torch.float32
    assert state["anchor_param"].dtype == torch.bfloat16 and state["threshold"].dtype == torch.int64


def test_loads_plain_adamw_state_dict():
    params, _ = _setup(torch.bfloat16)
    adamw = torch.optim.AdamW(params, lr=1e-3, foreach=False)
    gen = torch.Generator().manual_seed(3)
    for _ in range(3):
        lognormal_grads(params, gen)
        adamw.step()
    ours = MaskedAdamW(params, lr=1e-3, density=0.5)
    ours.load_state_dict(adamw.state_dict())
    for p in params:
        state = ours.state[p]
        assert state["exp_avg"].dtype == torch.float32
        assert torch.equal(state["exp_avg"], adamw.state[p]["exp_avg"].float())
        assert state["step"] == 3
    assert ours.param_groups[0]["density"] == 0.5 and ours.param_groups[0]["mask"] == "select"
    lognormal_grads(params, gen)
    ours.step()
    for p in params:
        assert ours.state[p]["importance"].dtype == torch.float32 and ours.state[p]["importance"].any()
        assert ours.state[p]["step"] == 4


def test_deepcopy_and_pickle_keep_everything():
    params, opt = _setup(torch.float32)
    _run(params, opt, torch.Generator().manual_seed(4), 3, consolidate_at=1)
    for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert clone.param_groups[0]["density"] == 0.3
        assert clone.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
        lognormal_grads([p for g in clone.param_groups for p in g["params"]], torch.Generator().manual_seed(5))
        clone.step()
        clone.mask_stats()


def test_setstate_fills_options_missing_from_old_checkpoints():
    params, opt = _setup(torch.float32)
    state = opt.__getstate__()
    for group in state["param_groups"]:
        del group["density"], group["anchor_decay"]
    del state["defaults"]["scope"], state["defaults"]["density"]
    restored = MaskedAdamW.__new__(MaskedAdamW)
    restored.__setstate__(state)
    assert restored.param_groups[0]["density"] == 1.0 and restored.defaults["scope"] == "tensor"
    lognormal_grads(params, torch.Generator().manual_seed(6))
    restored.step()


def test_checkpoint_whose_options_clash_with_the_optimizer_is_refused_before_any_change():
    """An older checkpoint (no gate_block) of a backend="compile" group, loaded into an
    optimizer with block gates, would make an invalid group: refused, nothing changed."""
    param = torch.nn.Parameter(torch.randn(64))
    old = MaskedAdamW([param], backend="compile")
    param.grad = torch.randn(64)
    old.step()
    saved = old.state_dict()
    del saved["param_groups"][0]["gate_block"]
    target = torch.nn.Parameter(torch.randn(64))
    opt = MaskedAdamW([target], gate_block=16, density=0.5)
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"Invalid gate_block: 16 \(backend='compile'"):
        opt.load_state_dict(saved)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"] and after["state"] == before["state"] == {}
