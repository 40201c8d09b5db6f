"""backend="compile" (the CPU fast path) against the reference, and no recompiles on lr changes."""
import pytest
import torch

from masked_optim import MaskedAdamW, compiled
from tests.tolerances import assert_close

SHAPES = ((1,), (4097,), (123, 431), (0,), (33, 7))


def _twin(dtype, groups, backend="compile", **options):
    gen = torch.Generator().manual_seed(0)
    ours = [torch.randn(s, generator=gen).to(dtype).requires_grad_() for s in SHAPES]
    ref = [p.detach().clone().requires_grad_() for p in ours]

    def build(params, backend):
        split = [{"params": params[:2], **groups[0]}, {"params": params[2:], **groups[1]}]
        return MaskedAdamW(split, lr=1e-2, backend=backend, **options)

    return ours, ref, build(ours, backend), build(ref, "torch")


def _grads(params, twins, gen, nonfinite=False):
    for p, q in zip(params, twins):
        g = (torch.randn(p.shape, generator=gen) * torch.exp(torch.randn(p.shape, generator=gen))).to(p.dtype)
        if nonfinite and g.numel() > 10:
            g.view(-1)[3] = float("nan")
            g.view(-1)[7] = float("inf")
        p.grad, q.grad = g, g.clone()


def _compare(ours, ref, opt, ref_opt, ignore=()):
    for p, q in zip(ours, ref):
        assert_close(p.detach(), q.detach(), "param")
        for key, value in ref_opt.state[q].items():
            if key in ignore:
                continue
            mine = opt.state[p][key]
            if key in ("threshold", "step", "importance_step", "user_mask") or not torch.is_tensor(value):
                assert torch.equal(torch.as_tensor(mine), torch.as_tensor(value)), key
            else:
                assert_close(mine, value, key)
    for mine, theirs in zip(opt.mask_stats(), ref_opt.mask_stats()):
        assert mine == theirs


def _touched(param, opt):
    state = opt.state.get(param, {})
    fresh = torch.zeros(param.shape, dtype=torch.float32)  # moments before the first step
    return [param.detach().clone()] + [state[k].clone() if k in state else fresh for k in ("exp_avg", "exp_avg_sq")]


def _changed(param, opt, before):
    """Elements whose param or moments changed: the gated-on ones (a bf16 param alone may not
    show an update smaller than half its last place)."""
    now = _touched(param, opt)
    changed = now[0] != before[0]
    for new, old in zip(now[1:], before[1:]):
        changed |= new != old
    return changed


CASES = {
    "select_soft_pull__protect_group": (
        torch.float32,
        [dict(density=0.3, anchor_decay=5.0, protect_strength=2.0), dict(mask="protect", density=0.6, scope="group", importance="taylor", maximize=True)],
        dict(),
    ),
    "bf16_magnitude_nonfinite": (
        torch.bfloat16,
        [dict(density=0.5, importance="magnitude", importance_dtype="bfloat16"), dict(density=1.0, anchor_decay=2.0)],
        dict(nonfinite="skip"),
    ),
    # block gates: blocks of 32 (with short last blocks: 4097 and 33 x 7 elements), protect's
    # anchor-0 elements moving inside frozen blocks, a group-scope unit of blocks of 2
    "blocks_select_soft_pull__protect_group": (
        torch.float32,
        [dict(density=0.3, gate_block=32, anchor_decay=5.0, protect_strength=2.0),
         dict(mask="protect", density=0.6, scope="group", gate_block=2)],
        dict(),
    ),
    "blocks_bf16_nonfinite": (
        torch.bfloat16,
        [dict(density=0.5, gate_block=1024, importance_dtype="bfloat16"), dict(density=0.2, gate_block=8, importance="taylor")],
        dict(nonfinite="skip"),
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_compile_matches_reference(case):
    _matches_reference(case)


def test_bf16_importance_widened_by_its_bits_matches_the_reference(monkeypatch):
    """Before torch 2.13 Inductor's C++ code folds the step's fp32 -> bf16 -> fp32 round trip of
    a bf16 importance away (pytorch#185337): wrong score bins, so wrong gates. There the scores
    widen the bf16 importance by its bit pattern; that path is exercised here on any torch."""
    monkeypatch.setattr(compiled, "_FOLDS_BF16_ROUND_TRIP", True)
    _matches_reference("blocks_bf16_nonfinite")


def _matches_reference(case):
    dtype, groups, options = CASES[case]
    ours, ref, opt, ref_opt = _twin(dtype, groups, **options)
    gen = torch.Generator().manual_seed(1)
    for step in range(6):
        mine, theirs = [_touched(p, opt) for p in ours], [_touched(q, ref_opt) for q in ref]
        _grads(ours, ref, gen, nonfinite="nonfinite" in case)
        opt.step()
        ref_opt.step()
        for p, q, a, b in zip(ours, ref, mine, theirs):  # identical gates: the same elements moved
            assert torch.equal(_changed(p, opt, a), _changed(q, ref_opt, b))
        if step == 2:
            opt.consolidate()
            ref_opt.consolidate()
    _compare(ours, ref, opt, ref_opt)


def test_compile_under_grad_scaler():
    ours, ref, opt, ref_opt = _twin(torch.float32, [dict(density=0.4), dict()])
    model_scale = 2.0**7
    gen = torch.Generator().manual_seed(2)
    for _ in range(3):
        _grads(ours, ref, gen)
        for p in ours:
            p.grad = p.grad * model_scale
        opt.grad_scale, opt.found_inf = torch.tensor(model_scale), torch.tensor(0.0)
        opt.step()
        ref_opt.step()
    opt.found_inf = torch.tensor(1.0)
    opt.step()  # skipped: nothing may change
    del opt.grad_scale, opt.found_inf
    _compare(ours, ref, opt, ref_opt, ignore=("threshold_for",))  # the host's hint: conservative under a scaler


def test_lr_changes_do_not_recompile():
    from torch._dynamo.utils import counters

    param = torch.randn(1000, requires_grad=True)
    opt = MaskedAdamW([param], lr=1e-2, backend="compile", density=0.5)
    scheduler = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    # one grad throughout: the scores hold still, so the first two steps derive their thresholds
    # from their own scores and the third compiles the variant that takes the stored one
    grad = torch.randn(1000)
    for _ in range(3):
        param.grad = grad.clone()
        opt.step()
        scheduler.step()
    frames = counters["stats"]["unique_graphs"]
    for _ in range(5):
        param.grad = grad.clone()
        opt.step()
        scheduler.step()
        opt.param_groups[0]["weight_decay"] *= 1.5
    assert counters["stats"]["unique_graphs"] == frames


@pytest.mark.parametrize("backend", ["torch", "compile"])
def test_compiled_training_step_with_optimizer_inside(backend):
    """torch.compile around forward, backward and opt.step(): same trajectory as eager, and a
    changing lr causes no recompile (the step runs outside the compiled graph)."""
    import copy

    from torch._dynamo.utils import counters

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(10, 20), torch.nn.Tanh(), torch.nn.Linear(20, 1))
    twin = copy.deepcopy(model)
    opt = MaskedAdamW(model.parameters(), lr=1e-2, density=0.5, backend=backend)
    twin_opt = MaskedAdamW(twin.parameters(), lr=1e-2, density=0.5, backend=backend)

    def train_step(net, optimizer, x, y):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(net(x), y)
        loss.backward()
        optimizer.step()
        return loss

    compiled = torch.compile(train_step)
    # one batch throughout: the scores hold nearly still, so after the first steps (which derive
    # their thresholds from their own scores, another variant of the compile backend's kernels)
    # every step takes the stored threshold, and only lr changes
    x, y = torch.randn(8, 10), torch.randn(8, 1)
    for step in range(8):
        if step == 4:
            graphs = counters["stats"]["unique_graphs"]
        for optimizer in (opt, twin_opt):
            optimizer.param_groups[0]["lr"] = 1e-2 / (step + 1)
        compiled(model, opt, x, y)
        train_step(twin, twin_opt, x, y)
    assert counters["stats"]["unique_graphs"] == graphs
    for p, q in zip(model.parameters(), twin.parameters()):
        assert_close(p.detach(), q.detach(), "compiled training step")


@pytest.mark.parametrize("gate_block", [1, 16])
def test_compile_with_user_masks_matches_reference(gate_block):
    """Masked elements stay out of the histogram (with block gates: out of their block's
    maximum and count); tensors of several sizes share one bins buffer."""
    ours, ref, opt, ref_opt = _twin(torch.float32, [dict(density=0.3), dict(density=0.5, mask="protect")], gate_block=gate_block)
    gen = torch.Generator().manual_seed(3)
    for p, q in zip(ours, ref):
        mask = torch.rand(p.shape, generator=gen) < 0.7
        opt.set_mask(p, mask)
        ref_opt.set_mask(q, mask.clone())
    for step in range(5):
        mine, theirs = [_touched(p, opt) for p in ours], [_touched(q, ref_opt) for q in ref]
        _grads(ours, ref, gen, nonfinite=step == 3)
        opt.step()
        ref_opt.step()
        for p, q, a, b in zip(ours, ref, mine, theirs):
            assert torch.equal(_changed(p, opt, a), _changed(q, ref_opt, b))
        if step == 1:
            opt.consolidate()
            ref_opt.consolidate()
    _compare(ours, ref, opt, ref_opt)


@pytest.mark.parametrize("beta1", [0.0, 0.3, 0.9])
def test_compile_first_moment_matches_reference_for_every_beta1(beta1):
    """torch's lerp changes formula at weight 0.5 (beta1 0.5): with beta1 = 0, m must be g
    exactly, even after a step whose grads were 1e8 times larger."""
    ours, ref, opt, ref_opt = _twin(torch.float32, [dict(), dict(density=0.5)], betas=(beta1, 0.999))
    gen = torch.Generator().manual_seed(4)
    for scale in (1e3, 1e-5, 1.0):
        for p, q in zip(ours, ref):
            g = torch.randn(p.shape, generator=gen) * scale
            p.grad, q.grad = g, g.clone()
        opt.step()
        ref_opt.step()
    _compare(ours, ref, opt, ref_opt)


@pytest.mark.parametrize("backend", ["compile", "triton"])
@pytest.mark.parametrize("mask", ["select", "protect"])
def test_group_scope_with_tensors_joining_late(mask, backend):
    """A unit (scope="group") whose tensors disagree on having a known threshold: one param's
    grad appears only at the third step, another gets a user mask mid-run (the Triton kernel
    under the interpreter here)."""
    if backend == "triton":
        pytest.importorskip("triton")
    ours, ref, opt, ref_opt = _twin(torch.float32, [dict(density=0.5, scope="group", mask=mask)] * 2, backend=backend)
    gen = torch.Generator().manual_seed(5)
    for step in range(7):
        _grads(ours, ref, gen)
        if step < 2:
            ours[2].grad = ref[2].grad = None
        if step in (1, 3):  # the second time every param has state (and so an anchor)
            opt.consolidate()
            ref_opt.consolidate()
        if step == 4:
            mask_ = torch.rand(ours[4].shape, generator=gen) < 0.6
            opt.set_mask(ours[4], mask_)
            ref_opt.set_mask(ref[4], mask_.clone())
        opt.step()
        ref_opt.step()
    _compare(ours, ref, opt, ref_opt)


def test_compiled_loops_stay_parallel_after_a_small_first_tensor():
    """Inductor picks a loop's threads from the size it first compiles for (a hint, and the
    on-disk cache ignores hints): the step's loops, its counting reduction included, must keep
    an OpenMP scope when the first tensor is small, or a 16M-element step runs serially."""
    from torch._inductor.utils import run_and_get_code

    from masked_optim import compiled
    from masked_optim.functional import GroupHyper

    n = 64  # below Inductor's 512 elements a thread
    tensors = [torch.randn(n) for _ in range(5)]
    param, grad, exp_avg, exp_avg_sq, importance = tensors
    exp_avg_sq.abs_()
    group = MaskedAdamW([torch.zeros(1)]).param_groups[0]
    scalars = compiled._scalars(1.0, 1.0, GroupHyper.from_group(group), None, param.device)
    step = compiled._compiled_function.__wrapped__("fused_step")  # a fresh compiled function
    with torch._inductor.config.patch(force_disable_caches=True):
        _, sources = run_and_get_code(
            step, param, grad, exp_avg, exp_avg_sq, importance, None, None, None, None, scalars, None,
            kind="fisher", skip=True, scaled=False, maximize=False, gate=None, soft=False, pull=False,
            update_importance=True, high_weight=False,
        )
    kernels = [part for source in sources for part in source.split('extern "C"')[1:]]
    assert kernels, "no C++ kernel generated"
    for kernel in kernels:
        assert "#pragma omp parallel" in kernel, kernel[:400]


def test_any_dense_layout_steps_like_the_reference():
    """Channels-last and transposed params (state created in their layout), a grad and a user
    mask in another layout than their param: the compile backend walks memory order and
    matches the reference."""
    gen = torch.Generator().manual_seed(3)
    base = [torch.randn(4, 3, 5, 5, generator=gen).to(memory_format=torch.channels_last), torch.randn(40, 30, generator=gen).t(), torch.randn(64, generator=gen)]
    ours = [p.clone().requires_grad_() for p in base]
    ref = [p.clone().requires_grad_() for p in base]
    assert ours[0].stride() == base[0].stride() and not ours[1].is_contiguous()
    opt = MaskedAdamW(ours, lr=1e-2, backend="compile", density=0.4, anchor_decay=3.0)
    ref_opt = MaskedAdamW(ref, lr=1e-2, backend="torch", density=0.4, anchor_decay=3.0)
    mask = torch.rand(30, 40, generator=gen) > 0.3  # contiguous: the other dimension order than its param
    assert mask.stride() != ours[1].stride()
    opt.set_mask(ours[1], mask)
    ref_opt.set_mask(ref[1], mask)
    for step in range(4):
        for p, q in zip(ours, ref):
            g = torch.randn(p.shape, generator=gen)  # contiguous: another layout than params 0 and 1
            p.grad, q.grad = g, g.clone()
        opt.step()
        ref_opt.step()
        if step == 1:
            opt.consolidate()
            ref_opt.consolidate()
    assert ours[0].stride() == base[0].stride()
    _compare(ours, ref, opt, ref_opt)


def test_a_param_that_is_not_dense_is_refused_when_added():
    gapped = torch.randn(10, 8)[:, :4].detach().requires_grad_()
    with pytest.raises(ValueError, match=r"backend='compile' needs dense params .*strides \(8, 1\) for shape \(10, 4\)"):
        MaskedAdamW([torch.randn(3, requires_grad=True), gapped], backend="compile")
    opt = MaskedAdamW([torch.randn(3, requires_grad=True)], backend="compile")
    with pytest.raises(ValueError, match=r"backend='compile' needs dense params"):
        opt.add_param_group({"params": [gapped]})
    assert len(opt.param_groups) == 1


def test_a_param_that_became_not_dense_is_refused_before_any_change():
    storage = torch.randn(10, 8)
    good, gapped = torch.randn(16, requires_grad=True), torch.randn(10, 4, requires_grad=True)
    opt = MaskedAdamW([good, gapped], backend="compile")
    gapped.data = storage[:, :4]  # laid out anew after the optimizer took it
    good.grad, gapped.grad = torch.randn(16), torch.randn(10, 4)
    before = good.detach().clone()
    with pytest.raises(ValueError, match=r"backend='compile' needs dense params .*strides \(8, 1\) for shape \(10, 4\)"):
        opt.step()
    assert torch.equal(good.detach(), before)
    assert not opt.state  # not even state for the first step is kept


def test_auto_takes_the_reference_for_a_group_with_a_param_that_is_not_dense(monkeypatch):
    from masked_optim import backends, functional

    monkeypatch.setattr(backends, "AUTO_COMPILE_MIN_NUMEL", 8)
    taken = []
    original = functional.masked_adamw

    def spy(tensors, hyper, *, backend, **kwargs):
        taken.append(backend)
        return original(tensors, hyper, backend=backend, **kwargs)

    monkeypatch.setattr(functional, "masked_adamw", spy)
    dense, gapped = torch.randn(16, requires_grad=True), torch.randn(10, 8)[:, :4].detach().requires_grad_()
    opt = MaskedAdamW([{"params": [dense]}, {"params": [gapped]}])
    dense.grad, gapped.grad = torch.randn(16), torch.randn(10, 4)
    opt.step()
    assert taken == ["compile", "torch"]


def test_many_variants_in_one_process_do_not_hit_dynamos_recompile_limit(monkeypatch):
    """A sweep builds a variant per configuration; Dynamo's limits (lowered to 1 here, 8 by
    default) would make the next one a hard failure under fullgraph."""
    from masked_optim import compiled

    torch._dynamo.reset()
    monkeypatch.setattr(compiled, "_READY", set())
    with torch._dynamo.config.patch(recompile_limit=1, accumulated_recompile_limit=1):
        _step_three_variants()


def _step_three_variants():
    for importance in ("fisher", "taylor", "magnitude"):
        ours = [torch.randn(64, requires_grad=True)]
        ref = [ours[0].detach().clone().requires_grad_()]
        opt = MaskedAdamW(ours, lr=1e-2, backend="compile", importance=importance)
        ref_opt = MaskedAdamW(ref, lr=1e-2, backend="torch", importance=importance)
        _grads(ours, ref, torch.Generator().manual_seed(5))
        opt.step()
        ref_opt.step()
        _compare(ours, ref, opt, ref_opt)


def test_a_variant_that_fails_to_compile_fails_the_step_before_any_change(monkeypatch):
    """Every variant a step needs is compiled before the step changes anything: a compiler
    error on the second tensor's variant leaves the first tensor and every counter as they were."""
    from masked_optim import compiled

    real = compiled._compiled_function

    def failing(name):
        function = real(name)

        def call(*args, **kwargs):
            if args[0].dtype == torch.bfloat16:
                raise RuntimeError("compiler failure (simulated)")
            return function(*args, **kwargs)

        return call

    monkeypatch.setattr(compiled, "_compiled_function", failing)
    monkeypatch.setattr(compiled, "_READY", set())
    first, second = torch.randn(64, requires_grad=True), torch.randn(64, dtype=torch.bfloat16, requires_grad=True)
    opt = MaskedAdamW([first, second], lr=1e-2, backend="compile", density=0.5)
    first.grad, second.grad = torch.randn(64), torch.randn(64, dtype=torch.bfloat16)
    before = [first.detach().clone(), second.detach().clone()]
    with pytest.raises(RuntimeError, match="simulated"):
        opt.step()
    assert torch.equal(first.detach(), before[0]) and torch.equal(second.detach(), before[1])
    assert not opt.state  # not even state for the first step is kept


def test_the_step_compiles_nothing_itself(monkeypatch):
    """The variants compiled while the step is checked are the ones it runs: a Parameter passed
    as itself failed Dynamo's guards on the plain stand-ins (type, requires_grad, a static
    shape) and compiled a variant of its own mid-step, after other tensors had changed; so did
    every variant after ``torch._dynamo.reset()``."""
    from torch._dynamo.utils import counters

    from masked_optim import compiled

    torch._dynamo.reset()
    monkeypatch.setattr(compiled, "_READY", set())
    real = compiled._step_group
    compiled_in_step = []

    def step_group(*args, **kwargs):
        before = counters["stats"]["unique_graphs"]
        try:
            return real(*args, **kwargs)
        finally:
            compiled_in_step.append(counters["stats"]["unique_graphs"] - before)

    monkeypatch.setattr(compiled, "_step_group", step_group)
    gen = torch.Generator().manual_seed(9)
    params = [torch.nn.Parameter(torch.randn(shape, generator=gen)) for shape in ((20000,), (300, 70), (9,), (33,))]
    opt = MaskedAdamW(params, lr=1e-2, backend="compile", density=0.5)
    for step in range(5):
        if step == 3:  # Dynamo drops every compiled variant: the check compiles them again
            torch._dynamo.reset()
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen)
        opt.step()
    assert compiled_in_step == [0, 0, 0, 0, 0]
    assert counters["stats"]["unique_graphs"] > 0  # (the counter does count this torch's compiles)


def test_a_param_listed_twice_is_refused():
    """torch warns about a param listed twice in a group, steps it twice and says it will
    refuse it; the backends would not agree on what to do (a fresh state made twice, a kernel
    that steps each address once), so MaskedAdamW refuses it, naming both positions."""
    p, q = torch.nn.Parameter(torch.zeros(10)), torch.nn.Parameter(torch.zeros(3))
    with pytest.raises(ValueError, match=r"lists one param twice \(positions 0 and 2\)"):
        MaskedAdamW([p, q, p])
    opt = MaskedAdamW([q])
    with pytest.raises(ValueError, match=r"positions 0 and 1"):
        opt.add_param_group({"params": [p, p]})
    assert len(opt.param_groups) == 1


@pytest.mark.parametrize("options", [
    dict(density=0.4, anchor_decay=2.0, protect_strength=1.0, importance_dtype="bfloat16"),
    dict(density=0.6, mask="protect", scope="group", nonfinite="skip"),
], ids=["select_bf16_importance", "protect_group"])
def test_tensors_stepped_in_rows_match_the_reference(options, monkeypatch):
    """Tensors of a multiple of ROW elements (two rows or more) step as [n / ROW, ROW] views
    (any dense layout: their memory order), their bins counted from the flat buffer."""
    from masked_optim import compiled

    rows = []
    real = compiled._in_rows

    def recording(inputs):
        shaped = real(inputs)
        rows.append(shaped[0].dim() == 2)
        return shaped

    monkeypatch.setattr(compiled, "_in_rows", recording)
    gen = torch.Generator().manual_seed(10)
    shapes = [(compiled.ROW * 1250,), (200, 96), (50, 2 * compiled.ROW + 1)]  # the last: not in rows
    ours = [torch.randn(s, generator=gen).requires_grad_() for s in shapes]
    ours[1] = ours[1].detach().t().contiguous().t().requires_grad_()  # column-major
    ref = [p.detach().clone().requires_grad_() for p in ours]
    opt = MaskedAdamW(ours, lr=1e-2, backend="compile", **options)
    ref_opt = MaskedAdamW(ref, lr=1e-2, backend="torch", **options)
    mask = torch.rand(shapes[0], generator=gen) < 0.7
    opt.set_mask(ours[0], mask)
    ref_opt.set_mask(ref[0], mask.clone())
    for step in range(5):
        _grads(ours, ref, gen, nonfinite=step == 3)
        opt.step()
        ref_opt.step()
        if step == 1:
            opt.consolidate()
            ref_opt.consolidate()
    _compare(ours, ref, opt, ref_opt)
    assert True in rows and False in rows


def test_a_grad_in_another_dtype_than_its_param():
    """A bf16 param whose grad_dtype lets autograd keep fp32 grads: the compile backend steps
    it as the reference does (Dynamo once refused the param for its grad's dtype)."""
    gen = torch.Generator().manual_seed(6)
    ours = torch.nn.Parameter(torch.randn(8, 8, generator=gen).to(torch.bfloat16))
    ref = torch.nn.Parameter(ours.detach().clone())
    try:
        ours.grad_dtype = ref.grad_dtype = torch.float32
    except (AttributeError, RuntimeError, TypeError):
        pytest.skip("this torch has no Tensor.grad_dtype")
    opt = MaskedAdamW([ours], lr=1e-2, backend="compile", density=0.5)
    ref_opt = MaskedAdamW([ref], lr=1e-2, backend="torch", density=0.5)
    for _ in range(3):
        g = torch.randn(8, 8, generator=gen)
        ours.grad, ref.grad = g, g.clone()
        opt.step()
        ref_opt.step()
    _compare([ours], [ref], opt, ref_opt)
