"""state_dict round trips: resume is exact, dtypes survive, AdamW checkpoints load, pickling."""
import copy
import io
import pickle

import pytest
import torch

from masked_optim import MaskedAdamW
from tests.helpers import assert_bitwise_equal, lognormal_grads, snapshot
from tests.tolerances import assert_close

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
@pytest.mark.parametrize("options", [
    dict(), dict(mask="protect", scope="group"), dict(importance_dtype="bfloat16"),
    dict(gate_block=4, backend="compile"), dict(gate_block=8, mask="protect", backend="compile"),
])
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


def test_load_restores_the_optimizers_own_dtypes_from_a_converted_checkpoint():
    """A checkpoint whose tensors were converted (floating ones to float64, integer ones to
    int32, as a tool that casts a whole state dict does) loads with the optimizer's own dtypes:
    fp32 moments and importance for bf16 params, anchor_param the param's dtype, threshold
    int64 (SPEC)."""
    params, opt = _setup(torch.bfloat16)
    _run(params, opt, torch.Generator().manual_seed(2), 3, consolidate_at=1)
    before = snapshot(opt)
    saved = opt.state_dict()
    for entry in saved["state"].values():
        for key, value in entry.items():
            if torch.is_tensor(value):
                entry[key] = value.double() if value.is_floating_point() else value.int()
    opt.load_state_dict(saved)
    assert_bitwise_equal(snapshot(opt), before)  # every value representable: nothing rounded
    for p in params:
        state = opt.state[p]
        dtypes = {key: state[key].dtype for key in ("exp_avg", "exp_avg_sq", "importance", "anchor", "anchor_param", "threshold")}
        assert dtypes == dict(exp_avg=torch.float32, exp_avg_sq=torch.float32, importance=torch.float32,
                              anchor=torch.float32, anchor_param=torch.bfloat16, threshold=torch.int64), dtypes


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


def test_a_plain_adamw_checkpoint_keeps_each_groups_own_options():
    """Options a ``torch.optim.AdamW`` checkpoint lacks stay as each group has them, also where a
    group's own value is not the optimizer's default (not reset to ``defaults``)."""
    params, _ = _setup(torch.float32)
    adamw = torch.optim.AdamW([{"params": params[:1]}, {"params": params[1:]}], lr=1e-3)
    ours = MaskedAdamW([{"params": params[:1], "density": 0.3, "mask": "protect", "anchor_decay": 2.0},
                        {"params": params[1:], "scope": "group"}], lr=1e-3, density=0.5)
    ours.load_state_dict(adamw.state_dict())
    first, second = ours.param_groups
    assert (first["density"], first["mask"], first["anchor_decay"], first["scope"]) == (0.3, "protect", 2.0, "tensor")
    assert (second["density"], second["mask"], second["anchor_decay"], second["scope"]) == (0.5, "select", 0.0, "group")


def test_deepcopy_and_pickle_keep_everything():
    """A copy holds every param and state entry bit for bit, and steps on as the original does
    (the copy on its own params)."""
    params, opt = _setup(torch.float32)
    _run(params, opt, torch.Generator().manual_seed(4), 3, consolidate_at=1)
    expected = snapshot(opt)
    assert len(expected) > len(params) * 8  # moments, importance, anchors, thresholds, ...
    clones = (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt)))
    for clone in clones:
        assert clone.param_groups[0]["density"] == 0.3
        assert clone.state_dict()["param_groups"] == opt.state_dict()["param_groups"]
        assert_bitwise_equal(snapshot(clone), expected)
    for optimizer in (opt, *clones):
        own = [p for g in optimizer.param_groups for p in g["params"]]
        assert optimizer is opt or not any(c is p for c, p in zip(own, params))
        lognormal_grads(own, torch.Generator().manual_seed(5))
        optimizer.step()
    assert not torch.equal(params[0], expected[(0, "param")])
    for clone in clones:
        assert_bitwise_equal(snapshot(clone), snapshot(opt))
        clone.mask_stats()


def test_deepcopy_and_pickle_keep_fused():
    """``fused=True`` (the step unscales under a GradScaler: ``_step_supports_amp_scaling``)
    survives a deepcopy and a pickle round trip, as torch's fused AdamW's does; a copy of a
    default optimizer lets the scaler unscale."""
    for fused in (True, False):
        opt = MaskedAdamW([torch.randn(3, requires_grad=True)], fused=fused)
        for clone in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
            assert clone._step_supports_amp_scaling is fused


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
    """A checkpoint whose group holds an invalid option (edited, or from another version)
    would make an invalid group: refused, nothing changed."""
    param = torch.nn.Parameter(torch.randn(64))
    old = MaskedAdamW([param], backend="torch", gate_block=16, density=0.5)
    param.grad = torch.randn(64)
    old.step()
    saved = old.state_dict()
    saved["param_groups"][0]["gate_block"] = 24
    target = torch.nn.Parameter(torch.randn(64))
    opt = MaskedAdamW([target], backend="compile")
    before = copy.deepcopy(opt.state_dict())
    with pytest.raises(ValueError, match=r"Invalid checkpoint: param group 0: Invalid gate_block: 24 \(must be a power of two"):
        opt.load_state_dict(saved)
    after = opt.state_dict()
    assert after["param_groups"] == before["param_groups"] and after["state"] == before["state"] == {}


def _trained(dtype=torch.float32, steps=3, **options):
    params, opt = _setup(dtype, **options)
    _run(params, opt, torch.Generator().manual_seed(7), steps)
    return params, opt


@pytest.mark.parametrize("cls", [torch.optim.AdamW, MaskedAdamW])
def test_load_state_dict_hooks_take_effect(cls):
    """A pre-hook's edited state dict is what loads, and a post-hook's change stays (as with
    torch's optimizers): the dtype restoration runs between them."""
    params, _ = _setup(torch.bfloat16)
    source = cls(params, lr=1e-2)
    _run(params, source, torch.Generator().manual_seed(8), 2)
    target = cls(params, lr=1e-2)

    def pre(optimizer, state_dict):
        state = {pid: {**entry, "exp_avg": torch.full_like(entry["exp_avg"], 3.0)} for pid, entry in state_dict["state"].items()}
        return {**state_dict, "state": state}

    def post(optimizer):
        for entry in optimizer.state.values():
            entry["exp_avg_sq"] = torch.full_like(entry["exp_avg_sq"], 7.0)

    target.register_load_state_dict_pre_hook(pre)
    target.register_load_state_dict_post_hook(post)
    target.load_state_dict(source.state_dict())
    for p in params:
        state = target.state[p]
        assert (state["exp_avg"] == 3.0).all() and (state["exp_avg_sq"] == 7.0).all()
        if cls is MaskedAdamW:
            assert state["exp_avg"].dtype == torch.float32 and state["importance"].dtype == torch.float32


@pytest.mark.parametrize("backend", ["torch", "compile"])
def test_state_saved_in_another_memory_layout_loads_in_the_params_layout(backend):
    """State saved while a conv weight was channels_last, loaded for a contiguous one (and the
    reverse): every param-shaped state tensor comes back in its param's layout, and the resumed
    steps match the reference's."""
    gen = torch.Generator().manual_seed(9)
    weight = torch.randn(4, 3, 5, 5, generator=gen)
    for saved_format, loaded_format in ((torch.channels_last, torch.contiguous_format), (torch.contiguous_format, torch.channels_last)):
        source_param = torch.nn.Parameter(weight.clone().to(memory_format=saved_format))
        source = MaskedAdamW([source_param], lr=1e-2, density=0.5, anchor_decay=2.0)
        for step in range(3):
            source_param.grad = torch.randn(weight.shape, generator=gen).to(memory_format=saved_format)
            source.step()
            if step == 0:
                source.consolidate()
        saved = _roundtrip(source.state_dict())
        saved_param = source_param.detach().clone()
        param = torch.nn.Parameter(source_param.detach().clone().to(memory_format=loaded_format))
        opt = MaskedAdamW([param], lr=1e-2, density=0.5, anchor_decay=2.0, backend=backend)
        opt.load_state_dict(saved)
        for key in ("exp_avg", "exp_avg_sq", "importance", "anchor", "anchor_param"):
            assert opt.state[param][key].stride() == param.stride(), key
            assert torch.equal(opt.state[param][key], source.state[source_param][key]), key
        for step in range(2):  # the resumed run against the uninterrupted one, stepped alongside
            grad = torch.randn(weight.shape, generator=torch.Generator().manual_seed(10 + step))
            param.grad = grad.to(memory_format=loaded_format)
            source_param.grad = grad.to(memory_format=saved_format)
            opt.step()
            source.step()
        assert not torch.equal(param.detach(), saved_param)
        assert_close(param.detach(), source_param.detach(), f"{backend} after a load into another layout")
        for key in ("exp_avg", "exp_avg_sq", "importance"):
            assert_close(opt.state[param][key], source.state[source_param][key], f"{backend}: {key} after the load")


def test_each_group_keeps_the_backend_it_was_built_with():
    params, source = _trained(backend="compile")
    target = MaskedAdamW(params, **CONFIG, backend="torch")
    target.load_state_dict(source.state_dict())
    assert target.param_groups[0]["backend"] == "torch"
    assert target.param_groups[0]["density"] == CONFIG["density"]
    saved = source.state_dict()  # the saved backend is neither taken nor checked: the machine's choice
    saved["param_groups"][0]["backend"] = "a backend this machine lacks"
    target.load_state_dict(saved)
    assert target.param_groups[0]["backend"] == "torch"


@pytest.mark.parametrize("foreign, message", [
    (lambda params: torch.optim.AdamW(params, amsgrad=True), r"param group 0: Invalid amsgrad: True"),
    (lambda params: torch.optim.Adam(params, weight_decay=0.1),
     r"param group 0: Invalid decoupled_weight_decay: False with weight_decay=0.1 \(Adam's L2"),
])
def test_foreign_checkpoint_whose_options_masked_adamw_would_ignore_is_refused(foreign, message):
    params, ours = _trained()
    other = foreign(params)
    _run(params, other, torch.Generator().manual_seed(11), 2)
    before = snapshot(ours)
    with pytest.raises(ValueError, match=message):
        ours.load_state_dict(other.state_dict())
    assert_bitwise_equal(snapshot(ours), before)


@pytest.mark.parametrize("momentum", [0.0, 0.9])
def test_sgd_checkpoint_is_refused(momentum):
    """An SGD (momentum) checkpoint would load its lr and step with no moments; torch's AdamW
    fails at its first step, MaskedAdamW refuses it at the load, changing nothing."""
    params, ours = _trained()
    sgd = torch.optim.SGD(params, lr=0.1, momentum=momentum)  # momentum 0: no state, only its options
    _run(params, sgd, torch.Generator().manual_seed(12), 2)
    before = snapshot(ours)
    with pytest.raises(ValueError, match="param group 0 has 'momentum', 'dampening', 'nesterov', which MaskedAdamW does not have"):
        ours.load_state_dict(sgd.state_dict())
    assert_bitwise_equal(snapshot(ours), before)


def test_adam_without_weight_decay_loads():
    params, _ = _setup(torch.float32)
    adam = torch.optim.Adam(params, lr=1e-3)
    _run(params, adam, torch.Generator().manual_seed(12), 2)
    ours = MaskedAdamW(params, lr=1e-3)
    ours.load_state_dict(adam.state_dict())
    assert all(ours.state[p]["step"] == 2 for p in params)
    assert ours.param_groups[0]["decoupled_weight_decay"] is True  # Adam without decay is AdamW without it
    ours.param_groups[0]["weight_decay"] = 0.01  # so decay set after the load is AdamW's, not refused as L2
    _run(params, ours, torch.Generator().manual_seed(13), 1)


@pytest.mark.parametrize("edit, message", [
    (lambda entry: entry.pop("step"), r"moments but no 'step'"),
    (lambda entry: entry.update(exp_avg=entry["exp_avg"][:1]), r"\['exp_avg'\] has shape \(1, 20\), its param \(30, 20\)"),
    (lambda entry: entry.update(importance=entry["importance"].t()), r"\['importance'\] has shape \(20, 30\)"),
    (lambda entry: entry.update(user_mask=torch.ones(1, dtype=torch.bool)), r"\['user_mask'\] has shape \(1,\), its param \(30, 20\)"),
    (lambda entry: entry.update(user_mask=torch.ones(30, 20)), r"\['user_mask'\] must be a bool Tensor, got torch.float32"),
    (lambda entry: entry.pop("exp_avg_sq"), r"has 'step', 'exp_avg' but no 'exp_avg_sq'"),
    (lambda entry: entry.pop("importance_step"), r"has 'importance' but no 'importance_step'"),
    (lambda entry: entry.pop("importance"), r"has 'importance_step' but no 'importance'"),
    (lambda entry: entry.pop("threshold_for"), r"has 'threshold' but no 'threshold_for'"),
    (lambda entry: entry.update(momentum_buffer=torch.zeros(30, 20)), r"has 'momentum_buffer', which MaskedAdamW does not keep"),
    (lambda entry: entry.update(threshold=torch.zeros(4, dtype=torch.int64)), r"\['threshold'\] is a torch.int64 tensor of shape \(4,\), a unit's threshold is one integer"),
    (lambda entry: entry.update(threshold=torch.tensor(1.5)), r"\['threshold'\] is a torch.float32 tensor of shape \(\), a unit's threshold is one integer"),
    (lambda entry: entry.update(threshold=torch.tensor(40000)), r"\['threshold'\] is 40000, outside \[-32770, 32768\]"),
    (lambda entry: entry.update(threshold=torch.tensor(-40000)), r"\['threshold'\] is -40000, outside"),
    (lambda entry: entry.update(threshold=torch.tensor(32769)), r"\['threshold'\] is 32769, outside \[-32770, 32768\]"),
    (lambda entry: entry.update(threshold=torch.tensor(-32771)), r"\['threshold'\] is -32771, outside \[-32770, 32768\]"),
    (lambda entry: entry.update(threshold_for="x"), r"Invalid checkpoint: state\[0\]\['threshold_for'\] must be a number, got 'x'"),
    (lambda entry: entry.update(threshold_for=float("inf")), r"\['threshold_for'\] is inf \(a finite number\)"),
    (lambda entry: entry.update(step=torch.tensor(-1.0)), r"\['step'\] is -1.0 \(a step count is finite and >= 0\)"),
    (lambda entry: entry.update(importance_step=torch.tensor(float("nan"))), r"\['importance_step'\] is nan"),
    (lambda entry: entry.update(step=torch.tensor(float("inf"))), r"\['step'\] is inf \(a step count is finite and >= 0\)"),
    (lambda entry: entry.update(exp_avg=[0.0]), r"\['exp_avg'\] must be a Tensor, got list"),
    (lambda entry: entry.update(exp_avg={"x": 1}), r"\['exp_avg'\] must be a Tensor, got dict"),  # (only {} is DCP's "absent")
    (lambda entry: entry.update(anchor_param=torch.zeros(30, 20)), r"has 'anchor_param' but no 'anchor'"),
])
def test_malformed_state_is_refused_before_any_change(edit, message):
    params, opt = _trained()
    saved = opt.state_dict()
    edit(saved["state"][0])
    before = snapshot(opt)
    with pytest.raises(ValueError, match=message):
        opt.load_state_dict(saved)
    assert_bitwise_equal(snapshot(opt), before)


def test_a_complex_params_checkpoint_round_trips():
    """A complex param's importance and anchor are laid out like its real view ([..., 2]): its
    checkpoint loads (shapes checked against the real view) and steps on bit-identically."""
    param = torch.nn.Parameter(torch.randn(5, 3, dtype=torch.complex64))
    opt = MaskedAdamW([param], lr=1e-2, density=0.5, anchor_decay=1.0)
    gen = torch.Generator().manual_seed(0)
    for step in range(3):
        param.grad = torch.randn(5, 3, dtype=torch.complex64, generator=gen)
        opt.step()
        if step == 1:
            opt.consolidate()
    twin = MaskedAdamW([param], lr=1e-2, density=0.5, anchor_decay=1.0)
    twin.load_state_dict(opt.state_dict())
    assert twin.state[param]["importance"].shape == (5, 3, 2) == twin.state[param]["anchor"].shape
    assert_bitwise_equal(snapshot(twin), snapshot(opt))


def test_step_counts_of_zero_load():
    """A step count of 0 (the moments restarted: ``consolidate(reset_moments=True)``; importance
    since a consolidation) is a count, not refused."""
    params, opt = _trained()
    opt.consolidate(reset_moments=True)
    saved = opt.state_dict()
    assert saved["state"][0]["step"] == 0 and saved["state"][0]["importance_step"] == 0
    opt.load_state_dict(saved)
    assert all(opt.state[p]["step"] == 0 for p in params)


@pytest.mark.parametrize("threshold", [-32770, -2, -1, 0, 32768])
def test_a_threshold_anywhere_in_its_closed_range_loads(threshold):
    """A stored threshold in [flagged(NUM_BINS), NUM_BINS] = [-32770, 32768] (flagged bins,
    UNKNOWN, bins) loads as it was saved, both ends included."""
    params, opt = _trained()
    saved = opt.state_dict()
    saved["state"][0]["threshold"] = torch.tensor(threshold)
    opt.load_state_dict(saved)
    assert int(opt.state[params[0]]["threshold"]) == threshold


@pytest.mark.parametrize("backend", ["torch", "compile", "triton"])
def test_a_one_element_threshold_of_any_shape_loads_as_the_step_keeps_it(backend):
    """A threshold saved as a 1-element vector (an edited or converted checkpoint) loads 0-dim:
    the run goes on as from the checkpoint as saved."""
    params, opt = _trained(backend=backend)
    saved = opt.state_dict()
    reshaped = copy.deepcopy(saved)
    for entry in reshaped["state"].values():
        entry["threshold"] = entry["threshold"].reshape(1)
    runs = []
    for checkpoint in (saved, reshaped):
        fresh_params, fresh = _setup(torch.float32, backend=backend)
        with torch.no_grad():
            for p, q in zip(fresh_params, params):
                p.copy_(q)
        fresh.load_state_dict(checkpoint)
        assert all(fresh.state[p]["threshold"].shape == () for p in fresh_params)
        _run(fresh_params, fresh, torch.Generator().manual_seed(14), 2)
        runs.append(snapshot(fresh))
    assert_bitwise_equal(runs[1], runs[0])


@pytest.mark.parametrize("backend", ["torch", "compile"])
def test_a_wrappers_state_entries_load_and_ride_along(backend):
    """Per-param entries MaskedAdamW does not keep and no torch optimizer has (timm's Lookahead
    keeps its slow weights in its base optimizer's state) load, are saved again as they were,
    and change no step, as with torch's optimizers; torch's other optimizers' entries are
    refused (test_malformed_state_is_refused_before_any_change)."""
    params, source = _trained(backend=backend)
    saved = source.state_dict()
    plain = copy.deepcopy(saved)
    for pid, entry in saved["state"].items():
        entry["lookahead_slow_buff"] = torch.full(params[pid].shape, float(pid), dtype=torch.float64)
        entry["lookahead_count"] = 7
    with_extras, without = MaskedAdamW(params, backend=backend, **CONFIG), MaskedAdamW(
        [torch.nn.Parameter(p.detach().clone()) for p in params], backend=backend, **CONFIG)
    with_extras.load_state_dict(saved)
    without.load_state_dict(plain)
    for pid, p in enumerate(params):
        slow = with_extras.state[p]["lookahead_slow_buff"]
        assert slow.dtype == torch.float64 and torch.equal(slow, saved["state"][pid]["lookahead_slow_buff"])
        assert slow is not saved["state"][pid]["lookahead_slow_buff"] and with_extras.state[p]["lookahead_count"] == 7
    resaved = with_extras.state_dict()
    assert all(torch.equal(resaved["state"][pid]["lookahead_slow_buff"], entry["lookahead_slow_buff"])
               for pid, entry in saved["state"].items())
    twins = without.param_groups[0]["params"]
    for opt, ps in ((with_extras, params), (without, twins)):
        _run(ps, opt, torch.Generator().manual_seed(21), 2)
    extras = ("lookahead_slow_buff", "lookahead_count")
    stepped = {key: value for key, value in snapshot(with_extras).items() if key[1] not in extras}
    assert_bitwise_equal(stepped, snapshot(without))


def test_counters_are_the_optimizers_own_float32_tensors():
    """Loaded step counters are copies (two optimizers loaded from one dict count apart), and a
    checkpoint's plain-number step (old torch versions) becomes a float32 tensor."""
    params, source = _trained()
    saved = source.state_dict()
    first, second = MaskedAdamW(params, **CONFIG), MaskedAdamW(params, **CONFIG)
    first.load_state_dict(saved)
    second.load_state_dict(saved)
    lognormal_grads(params, torch.Generator().manual_seed(13))
    first.step()
    assert first.state[params[0]]["step"] == 4 and second.state[params[0]]["step"] == 3
    old = copy.deepcopy(saved)
    for entry in old["state"].values():
        entry["step"] = 3
    second.load_state_dict(old)
    assert second.state[params[0]]["step"].dtype == torch.float32 and second.state[params[0]]["step"] == 3


def test_mask_stats_after_a_load_wait_for_the_next_step():
    params, opt = _trained()
    assert opt.mask_stats()[0] is not None
    opt.load_state_dict(opt.state_dict())
    assert opt.mask_stats() == [None]
    lognormal_grads(params, torch.Generator().manual_seed(14))
    opt.step()
    assert opt.mask_stats()[0]["target_density"] == CONFIG["density"]


@pytest.mark.parametrize("dtype", ["bfloat16", torch.bfloat16])
@pytest.mark.parametrize("consolidate_first", [False, True])
def test_importance_dtype_changed_mid_run_takes_effect_at_the_next_step(consolidate_first, dtype):
    """The stored importance and anchor take a changed ``importance_dtype`` at the next step
    (or ``consolidate()``, which reads them), as a save and load would: the run continues as
    one resumed from a checkpoint there."""
    runs = []
    for reload in (False, True):
        params, opt = _setup(torch.float32, scope="group")
        gen = torch.Generator().manual_seed(13)
        _run(params, opt, gen, 4, consolidate_at=1)
        opt.param_groups[0]["importance_dtype"] = dtype  # a name or a torch dtype, as the constructor takes
        if reload:
            opt.load_state_dict(_roundtrip(opt.state_dict()))
        if consolidate_first:
            opt.consolidate()
        _run(params, opt, gen, 3)
        assert all(opt.state[p][k].dtype == torch.bfloat16 for p in params for k in ("importance", "anchor"))
        runs.append(snapshot(opt))
    assert_bitwise_equal(runs[0], runs[1])
