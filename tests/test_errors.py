"""Bad input gets a clear error naming the argument and value, and nothing is half-applied."""
import copy
import warnings

import pytest
import torch

from masked_optim import MaskedAdamW
from tests.helpers import assert_bitwise_equal, set_random_grads, snapshot
from tests.tolerances import assert_close

BAD_OPTIONS = [
    (dict(lr=-1e-3), ValueError, r"Invalid lr: -0\.001"),
    (dict(lr=float("nan")), ValueError, r"Invalid lr: nan"),
    (dict(lr=float("inf")), ValueError, r"Invalid lr: inf"),
    (dict(lr=torch.tensor([1e-3, 2e-3])), ValueError, r"lr must be .*1-element Tensor.*\(2,\)"),
    (dict(betas=(1.0, 0.999)), ValueError, r"beta parameter at index 0: 1\.0"),
    (dict(betas=(0.9, -0.1)), ValueError, r"beta parameter at index 1: -0\.1"),
    (dict(betas=(0.9,)), ValueError, r"Invalid betas"),
    (dict(eps=-1e-8), ValueError, r"Invalid eps: -1e-08"),
    (dict(weight_decay=-0.1), ValueError, r"Invalid weight_decay: -0\.1"),
    (dict(weight_decay=float("nan")), ValueError, r"Invalid weight_decay: nan \(must be finite and >= 0"),
    (dict(eps=float("inf")), ValueError, r"Invalid eps: inf \(must be finite and >= 0"),
    (dict(protect_strength=float("inf")), ValueError, r"Invalid protect_strength: inf"),
    (dict(anchor_decay=float("nan")), ValueError, r"Invalid anchor_decay: nan"),
    (dict(density=0.0), ValueError, r"Invalid density: 0\.0"),
    (dict(density=1.5), ValueError, r"Invalid density: 1\.5"),
    (dict(density=torch.tensor(0.5)), ValueError, r"Invalid density: tensor\(0\.5000\) \(must be a number: density has no Tensor form\)"),
    (dict(importance_beta=torch.tensor(0.9)), ValueError, r"Invalid importance_beta: tensor\(0\.9000\) \(must be a number"),
    (dict(mask="freeze"), ValueError, r"Invalid mask: 'freeze'"),
    (dict(importance="hessian"), ValueError, r"Invalid importance: 'hessian'"),
    (dict(nonfinite="zero"), ValueError, r"Invalid nonfinite: 'zero'"),
    (dict(backend="cuda"), ValueError, r"Invalid backend: 'cuda'"),
    (dict(scope="layer"), ValueError, r"Invalid scope: 'layer'"),
    (dict(importance_beta=1.0), ValueError, r"Invalid importance_beta: 1\.0"),
    (dict(importance_beta=-0.5), ValueError, r"Invalid importance_beta: -0\.5"),
    (dict(protect_strength=-1.0), ValueError, r"Invalid protect_strength: -1\.0"),
    (dict(anchor_decay=-2.0), ValueError, r"Invalid anchor_decay: -2\.0"),
    (dict(importance_dtype="float16"), ValueError, r"Invalid importance_dtype: 'float16'"),
    (dict(maximize="yes"), ValueError, r"Invalid maximize: 'yes'"),
    (dict(gate_block=3), ValueError, r"Invalid gate_block: 3 \(must be a power of two in \[1, 1024\]\)"),
    (dict(gate_block=0), ValueError, r"Invalid gate_block: 0"),
    (dict(gate_block=2048), ValueError, r"Invalid gate_block: 2048"),
    (dict(gate_block=16.0), ValueError, r"Invalid gate_block: 16\.0"),
    (dict(gate_block=True), ValueError, r"Invalid gate_block: True"),
    (dict(decoupled_weight_decay=None), ValueError, r"Invalid decoupled_weight_decay: None \(must be a bool\)"),
]


@pytest.mark.parametrize("options, error, message", BAD_OPTIONS)
def test_bad_options_raise_at_construction(options, error, message):
    with pytest.raises(error, match=message):
        MaskedAdamW([torch.zeros(3, requires_grad=True)], **options)


@pytest.mark.parametrize("flags, message", [
    (dict(amsgrad=True), r"Invalid amsgrad: True \(MaskedAdamW has no amsgrad variant"),
    (dict(capturable=True), r"Invalid capturable: True"),
    (dict(differentiable=True), r"Invalid differentiable: True"),
    (dict(fused="yes"), r"Invalid fused: 'yes' \(must be a bool or None\)"),
    (dict(foreach=1), r"Invalid foreach: 1 \(must be a bool or None\)"),
    (dict(amsgrad=None), r"Invalid amsgrad: None \(must be a bool\)"),
])
def test_adamw_variants_masked_adamw_lacks_are_refused(flags, message):
    with pytest.raises(ValueError, match=message):
        MaskedAdamW([torch.zeros(3, requires_grad=True)], **flags)


def test_adamw_keyword_arguments_are_taken_as_written_for_adamw():
    """Code written for torch.optim.AdamW (nanoGPT's ``fused=True``, amsgrad positionally)
    runs unchanged, and steps as MaskedAdamW without those flags does."""
    params = [torch.randn(20, requires_grad=True) for _ in range(2)]
    plain = MaskedAdamW([params[0]], 1e-2, (0.9, 0.95), 1e-8, 0.1)
    flagged = MaskedAdamW([params[1]], 1e-2, (0.9, 0.95), 1e-8, 0.1, False, fused=True, foreach=False,
                          capturable=False, differentiable=False)
    with torch.no_grad():
        params[1].copy_(params[0])
    for _ in range(3):
        grad = torch.randn(20)
        params[0].grad, params[1].grad = grad, grad.clone()
        plain.step()
        flagged.step()
    assert torch.equal(params[0], params[1])
    assert flagged.param_groups[0].keys() == plain.param_groups[0].keys()


def test_groups_keep_adamws_flags_and_a_variant_set_later_is_refused_at_the_step():
    """Every key of torch.optim.AdamW's defaults is in each group, as AdamW keeps it (code
    written for it reads ``defaults["fused"]`` or ``group["foreach"]``); a variant switched on
    in a group later is refused by the next step before anything changes."""
    param = torch.nn.Parameter(torch.randn(5))
    adamw = torch.optim.AdamW([torch.nn.Parameter(torch.randn(5))], fused=False)
    opt = MaskedAdamW([param], fused=False)
    kept = set(adamw.defaults) - {"capturable"}  # which Dynamo sets when it traces a step (options.DEFAULTS)
    assert kept <= set(opt.defaults) and kept <= set(opt.param_groups[0]) and "capturable" not in opt.defaults
    assert opt.defaults["fused"] is False and opt.param_groups[0]["amsgrad"] is False
    assert opt.param_groups[0]["decoupled_weight_decay"] is True
    twin = MaskedAdamW([torch.nn.Parameter(torch.randn(5))], **opt.defaults)  # a twin from defaults
    assert twin.defaults == opt.defaults
    with pytest.raises(ValueError, match=r"Invalid decoupled_weight_decay: False with weight_decay=0.01"):
        MaskedAdamW([torch.nn.Parameter(torch.randn(5))], decoupled_weight_decay=False)
    param.grad = torch.randn(5)
    before = param.detach().clone()
    opt.param_groups[0]["amsgrad"] = True
    with pytest.raises(ValueError, match=r"Invalid amsgrad: True \(MaskedAdamW has no amsgrad variant"):
        opt.step()
    opt.param_groups[0].update(amsgrad=False, decoupled_weight_decay=False)
    with pytest.raises(ValueError, match=r"Invalid decoupled_weight_decay: False with weight_decay=0.01"):
        opt.step()
    assert torch.equal(param.detach(), before) and not opt.state
    opt.param_groups[0]["weight_decay"] = 0.0  # Adam without weight decay is AdamW without it
    opt.step()
    assert not torch.equal(param.detach(), before)


@pytest.mark.parametrize("options, error, message", BAD_OPTIONS)
def test_bad_group_is_not_added(options, error, message):
    opt = MaskedAdamW([torch.zeros(3, requires_grad=True)])
    with pytest.raises(error, match=message):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)], **options})
    assert len(opt.param_groups) == 1


def test_bad_group_edit_fails_step_before_any_change():
    params = [torch.randn(4, requires_grad=True), torch.randn(3, requires_grad=True)]
    opt = MaskedAdamW([{"params": [params[0]]}, {"params": [params[1]]}], lr=1e-2)
    set_random_grads(params, torch.Generator().manual_seed(0))
    opt.step()
    before = snapshot(opt)
    opt.param_groups[1]["density"] = 2.0
    with pytest.raises(ValueError, match=r"Invalid density: 2\.0"):
        opt.step()
    assert_bitwise_equal(snapshot(opt), before)


def _two_groups_stepped(first_backend: str, backend: str):
    gen = torch.Generator().manual_seed(3)
    a = torch.randn(8, generator=gen).requires_grad_()
    b = torch.randn(4, 6, generator=gen).requires_grad_()
    late = torch.randn(5, generator=gen).requires_grad_()  # its first grad comes with the failing step
    opt = MaskedAdamW([{"params": [a, late], "backend": first_backend}, {"params": [b], "backend": backend}], lr=0.1, density=0.5)
    set_random_grads([a, b], gen)
    opt.step()
    set_random_grads([a, late, b], gen)
    opt.param_groups[0]["density"] = 0.25  # the first group's stored threshold goes stale
    return opt, a, b


@pytest.mark.parametrize("first_backend", ["torch", "compile", "triton"])
@pytest.mark.parametrize("backend, cause", [
    ("compile", "layout"), ("triton", "layout"), ("torch", "shape"), ("compile", "shape"), ("triton", "shape"),
    ("torch", "dtype"), ("compile", "dtype"), ("triton", "dtype"),
])
def test_a_group_that_cannot_step_leaves_every_group_unchanged(first_backend, backend, cause):
    """Every group is checked (its compiles and tables made) before the first one steps: a later
    group whose state no longer fits its param raises, and the groups before it stay as they were
    (params, moments, importance, counters, thresholds, even one an option change made stale;
    no state for a param that had none)."""
    opt, a, b = _two_groups_stepped(first_backend, backend)
    if cause == "layout":
        b.data = b.data.t().contiguous().t()  # the param changes layout; its state does not
        message = f"backend='{backend}' needs exp_avg laid out like its param"
    elif cause == "dtype":  # model.double() after the optimizer was built
        b.data = b.data.double()
        b.grad = b.grad.double()
        message = (r"exp_avg is torch.float32 for a torch.float64 param \(expected torch.float64\): the param's dtype "
                   r"changed after its state was made; opt.load_state_dict\(opt.state_dict\(\)\) converts")
    else:
        opt.state[b]["exp_avg"] = torch.zeros(6, 4)
        message = r"exp_avg .*shape \(6, 4\)"
    before = snapshot(opt)
    with pytest.raises(ValueError, match=message):
        opt.step()
    assert_bitwise_equal(snapshot(opt), before)


@pytest.mark.parametrize("backend", ["torch", "compile", "triton"])
@pytest.mark.parametrize("cause", ["float user_mask", "integer anchor_param", "state on another device"])
def test_state_edited_into_a_bad_dtype_or_device_is_refused_before_any_change(cause, backend):
    """Every backend's checks (``functional.check_state``: a user mask bool, anchors floating,
    state on its param's device) run before anything changes: state edited by hand raises
    ValueError naming the entry, with no step count, importance or param half-updated. (The
    compile backend raised a Dynamo error for the mask and stepped an integer anchor_param.)"""
    gen = torch.Generator().manual_seed(5)
    param = torch.randn(4, 6, generator=gen).requires_grad_()
    opt = MaskedAdamW([param], lr=0.1, density=0.5, anchor_decay=1.0, backend=backend)
    set_random_grads([param], gen)
    opt.step()
    opt.consolidate()
    state = opt.state[param]
    if cause == "float user_mask":
        state["user_mask"] = torch.ones(4, 6)
        message = r"user_mask must be bool, got torch.float32"
    elif cause == "integer anchor_param":
        state["anchor_param"] = torch.zeros(4, 6, dtype=torch.int64)
        message = r"anchor_param must have a floating dtype, got torch.int64"
    else:
        state["exp_avg"] = torch.zeros(4, 6, device="meta")
        message = r"exp_avg (of shape \(4, 6\) on meta does not match its param \(shape \(4, 6\) on cpu\)|is on meta)"
    set_random_grads([param], gen)
    kept = {key: state[key].clone() for key in ("importance", "importance_step", "step", "exp_avg_sq")}
    theta = param.detach().clone()
    with pytest.raises(ValueError, match=message):
        opt.step()
    assert torch.equal(param.detach(), theta)
    for key, value in kept.items():
        assert torch.equal(state[key], value), key


@pytest.mark.parametrize("backend", ["torch", "compile", "triton"])
def test_after_a_param_dtype_change_a_state_dict_round_trip_converts_the_state(backend):
    """What the dtype error suggests works: the reload makes fp64 moments for the fp64 param,
    and the run goes on as a fresh optimizer loaded with the same checkpoint does."""
    gen = torch.Generator().manual_seed(4)
    param = torch.randn(40, generator=gen).requires_grad_()
    opt = MaskedAdamW([param], lr=1e-2, density=0.5, backend=backend)
    set_random_grads([param], gen)
    opt.step()
    param.data = param.data.double()
    opt.load_state_dict(opt.state_dict())
    assert opt.state[param]["exp_avg"].dtype == torch.float64 and opt.state[param]["importance"].dtype == torch.float32
    twin_param = param.detach().clone().requires_grad_()
    twin = MaskedAdamW([twin_param], lr=1e-2, density=0.5, backend="torch")
    twin.load_state_dict(opt.state_dict())
    for p in (param, twin_param):
        set_random_grads([p], torch.Generator().manual_seed(5))
    opt.step()
    twin.step()
    assert_close(param.detach(), twin_param.detach(), "after the reload")


@pytest.mark.parametrize("cause", ["shape", "dtype"])
def test_observe_checks_every_group_before_changing_any(cause):
    """observe() checks every group's state as a step does: a later group whose param was
    resized (or changed dtype) raises a named error, and earlier groups keep their importance."""
    opt, a, b = _two_groups_stepped("torch", "torch")
    opt.param_groups[0]["density"] = 0.5
    if cause == "shape":
        b.data = torch.randn(5)
        b.grad = torch.randn(5)
        message = r"exp_avg of shape \(4, 6\) on cpu does not match its param \(shape \(5,\) on cpu\)"
    else:
        b.data = b.data.double()
        b.grad = b.grad.double()
        message = r"exp_avg is torch.float32 for a torch.float64 param"
    before = snapshot(opt)
    with pytest.raises(ValueError, match=message):
        opt.observe()
    assert_bitwise_equal(snapshot(opt), before)


def test_consolidate_refuses_a_resized_param_before_changing_any():
    opt, a, b = _two_groups_stepped("torch", "torch")
    b.data = torch.randn(5)
    before = snapshot(opt)
    with pytest.raises(ValueError, match=r"consolidate\(\): param group 1: importance of shape \(4, 6\) does not "
                                         r"match its param \(shape \(5,\)\)"):
        opt.consolidate(reset_moments=True)
    assert_bitwise_equal(snapshot(opt), before)


def test_a_histogram_library_that_cannot_be_built_changes_nothing(monkeypatch):
    """The compile backend's C++ histogram is built (or loaded) while the step is checked."""
    from masked_optim import cpu_histogram

    opt, a, b = _two_groups_stepped("torch", "compile")

    def no_library():
        raise RuntimeError("backend='compile' needs a C++ compiler")

    monkeypatch.setattr(cpu_histogram, "_library", no_library)
    before = snapshot(opt)
    with pytest.raises(RuntimeError, match="needs a C\\+\\+ compiler"):
        opt.step()
    assert_bitwise_equal(snapshot(opt), before)


def test_integer_params_rejected():
    with pytest.raises(ValueError, match=r"Invalid param dtype: torch\.int64"):
        MaskedAdamW([torch.zeros(3, dtype=torch.int64)])


def test_sparse_grads_rejected_before_any_change():
    dense = torch.randn(4, requires_grad=True)
    embedding = torch.nn.Embedding(10, 3, sparse=True)
    opt = MaskedAdamW([dense, *embedding.parameters()])
    dense.grad = torch.ones(4)
    embedding(torch.tensor([1, 2])).sum().backward()
    before = dense.detach().clone()
    with pytest.raises(RuntimeError, match="sparse gradients"):
        opt.step()
    assert torch.equal(dense, before) and not opt.state


def test_triton_backend_where_it_cannot_run_names_the_device(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match=r"backend='triton' cannot run on device cpu"):
        MaskedAdamW([torch.zeros(3, requires_grad=True)], backend="triton")


def test_state_tensors_are_not_on_the_gpu_at_import():
    import masked_optim  # noqa: F401

    if torch.cuda.is_available():
        assert not torch.cuda.is_initialized()


def test_auto_backend_choice_on_cpu():
    from masked_optim import backends

    cpu = torch.device("cpu")
    assert backends.resolve("auto", cpu, 1000) == "torch"
    import shutil

    expected = "compile" if shutil.which("c++") or shutil.which("g++") else "torch"
    assert backends.resolve("auto", cpu, backends.AUTO_COMPILE_MIN_NUMEL) == expected
    assert backends.resolve("torch", cpu, 1 << 30) == "torch"


def test_auto_on_the_cpu_needs_the_compiler_cxx_names(monkeypatch):
    """``auto`` compiles only where Inductor finds a compiler: ``$CXX``'s program when set."""
    import sys

    from masked_optim import backends

    cpu, large = torch.device("cpu"), backends.AUTO_COMPILE_MIN_NUMEL
    monkeypatch.setenv("CXX", "no-such-compiler-4711 -O2")
    assert backends.resolve("auto", cpu, large) == "torch"
    monkeypatch.setenv("CXX", f"{sys.executable} --version")  # any existing program stands in
    assert backends.resolve("auto", cpu, large) == "compile"


def test_mask_stats_global_counts_must_be_a_bool():
    param = torch.randn(4, requires_grad=True)
    opt = MaskedAdamW([param])
    with pytest.raises(ValueError, match=r"Invalid global_counts: 'x' \(must be a bool\)"):
        opt.mask_stats(global_counts="x")


def test_a_misspelt_group_option_warns_at_the_users_line_and_extra_keys_stay_quiet():
    param = torch.randn(4, requires_grad=True)
    with pytest.warns(UserWarning, match=r"param group key 'densityy' is not a MaskedAdamW option \(did you mean "
                                         r"'density'\?\)") as record:
        opt = MaskedAdamW([{"params": [param], "densityy": 0.1}])
    assert [w.filename for w in record] == [__file__]  # the user's line, not Optimizer.__init__'s
    assert opt.param_groups[0]["densityy"] == 0.1 and opt.param_groups[0]["density"] == 1.0
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # names and schedulers' keys are no misspellings
        opt.add_param_group({"params": [torch.randn(3, requires_grad=True)], "name": "head", "initial_lr": 1e-3})
        param.grad = torch.ones_like(param)
        opt.step()  # the constructor's warning is not repeated at the step

    # a misspelt option set after the group was made warns at the next step (once), at the user's line
    opt.param_groups[1]["anchr_decay"] = 3.0
    opt.param_groups[1]["tag"] = "head"
    with pytest.warns(UserWarning, match=r"param group key 'anchr_decay' is not a MaskedAdamW option \(did you mean "
                                         r"'anchor_decay'\?\)") as record:
        opt.step()
    assert [w.filename for w in record] == [__file__]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
        opt.observe()


def test_a_used_up_generator_of_params_is_named():
    model = torch.nn.Linear(3, 2)
    params = model.parameters()
    MaskedAdamW(params)
    with pytest.raises(ValueError, match=r"empty parameter list \(params is an iterator that yielded nothing: "
                                         r"model.parameters\(\) is a generator"):
        MaskedAdamW(params)
    with pytest.raises(ValueError, match=r"^optimizer got an empty parameter list$"):
        MaskedAdamW([])


def test_a_checkpoint_without_state_or_param_groups_is_named():
    opt = MaskedAdamW([torch.randn(4, requires_grad=True)])
    with pytest.raises(ValueError, match=r"Invalid checkpoint: no 'state' or 'param_groups' .*got keys \['foo'\]"):
        opt.load_state_dict({"foo": 1})


def test_observe_without_grads_and_consolidate_before_any_importance_warn_at_the_users_line():
    param = torch.randn(4, requires_grad=True)
    opt = MaskedAdamW([param])
    with pytest.warns(UserWarning, match=r"observe\(\): no param has a grad, so nothing was observed") as record:
        opt.observe()
    with pytest.warns(UserWarning, match=r"consolidate\(\) before any step\(\) or observe\(\)") as more:
        opt.consolidate()
    assert [w.filename for w in [*record, *more]] == [__file__, __file__]
    assert "importance" not in opt.state[param]


def test_anchors_that_no_step_uses_warn_at_the_next_step():
    """With density 1, no anchor_decay and no protect_strength in every group, the anchors
    consolidate() makes change nothing the steps do (the usual cause: anchor_decay forgotten):
    the next step says so, once, at the user's line. A group that uses the anchor, a density
    below 1, or a DensityScheduler made after consolidate() (a callback's order) stays quiet."""
    from masked_optim import DensityScheduler

    def consolidated(**options):
        param = torch.randn(8, requires_grad=True)
        opt = MaskedAdamW([param], **options)
        param.grad = torch.randn(8)
        opt.step()
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt.consolidate()
        return opt

    opt = consolidated()
    with pytest.warns(UserWarning, match=r"the anchors consolidate\(\) made are unused") as record:
        opt.step()
    assert [w.filename for w in record] == [__file__]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()  # once
    for options in (dict(anchor_decay=1.0), dict(protect_strength=1.0), dict(density=0.5)):
        opt = consolidated(**options)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            opt.step()
    opt = consolidated(mask="protect")
    DensityScheduler(opt, start=1.0, end=0.2, steps=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    # mask_stats() checks too (a loop of compiled Triton steps reaches it eagerly); a load
    # of a state saved before consolidate() leaves no anchors to warn about
    opt = consolidated()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.mask_stats()  # no step since consolidate(): the options may still be set
    DensityScheduler(opt, start=1.0, end=0.2, steps=10)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()
    opt = consolidated()
    opt._last_stats[:] = [copy.copy(stats) for stats in opt._last_stats]  # new stats, as a compiled Triton step leaves
    with pytest.warns(UserWarning, match=r"the anchors consolidate\(\) made are unused"):
        opt.mask_stats()
    param = torch.randn(8, requires_grad=True)
    opt = MaskedAdamW([param])
    param.grad = torch.randn(8)
    opt.step()
    saved = copy.deepcopy(opt.state_dict())
    opt.consolidate()
    opt.load_state_dict(saved)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        opt.step()


def test_the_closed_ends_of_the_option_ranges_are_accepted():
    """SPEC's ranges include their closed ends: importance_beta 0 (the importance is the last
    signal), betas 0, eps, weight_decay, protect_strength, anchor_decay 0 and density 1."""
    param = torch.randn(3, 4, requires_grad=True)
    opt = MaskedAdamW([param], betas=(0.0, 0.0), eps=0.0, weight_decay=0.0, importance_beta=0.0, density=1.0,
                      protect_strength=0.0, anchor_decay=0.0)
    grad = torch.randn(3, 4)
    param.grad = grad
    opt.step()
    assert_close(opt.state[param]["importance"], grad * grad, "importance with importance_beta=0")


def test_defaults_table_matches_the_constructor():
    """``options.DEFAULTS`` fills the options an unpickled optimizer's groups lack
    (``__setstate__``): it must hold the constructor's own defaults."""
    import inspect

    from masked_optim.options import DEFAULTS

    signature = inspect.signature(MaskedAdamW.__init__).parameters
    for key, value in DEFAULTS.items():
        assert signature[key].default == value, key


def test_a_param_listed_twice_or_a_set_of_params_is_refused():
    param = torch.zeros(3, requires_grad=True)
    with pytest.raises(ValueError, match=r"lists one param twice \(positions 0 and 1\)"):
        MaskedAdamW([param, param])
    with pytest.raises(TypeError, match="ordered collections"):
        MaskedAdamW([{"params": {param}}])
