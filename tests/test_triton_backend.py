"""The fused Triton backend against the reference backend, under TRITON_INTERPRET=1 on CPU.

Every configuration runs the same params, grads and hyper-parameter changes through
``backend="torch"`` and ``backend="triton"`` for a few steps and compares, after every step,
each param and state tensor (tolerances from ``tests/tolerances.py``), the step counters and
thresholds exactly, which elements moved (exactly), and ``mask_stats()``. Two param groups
with mixed dtypes (fp32, bf16, fp16, fp64), awkward sizes (1, 4097, 123x431, empty) and a
transposed (dense, non-contiguous) param. ``tests/test_triton_gpu.py`` runs the same on CUDA.
"""
from __future__ import annotations

import os
from typing import Optional

import pytest
import torch

from masked_optim import MaskedAdamW
from masked_optim.backends import resolve
from tests.tolerances import TOLERANCES

STEPS = 4
CONSOLIDATE_AFTER = 2  # with anchor=True: consolidate() after this many steps
SKIPPED_STEP = 1  # with scaler=True: found_inf is set on this step
SHAPES_A = [((1,), torch.float32), ((4097,), torch.bfloat16), ((123, 431), torch.float32), ((0,), torch.float32)]
SHAPES_B = [((64,), torch.float64), ((33,), torch.float16), ((9, 5), torch.float32)]  # (9, 5): transposed

#: name -> (optimizer options for both groups, group-B overrides, harness flags)
CONFIGS = {
    "adamw-tensor-lr-schedule": (
        dict(lr=1e-2, weight_decay=0.1), dict(lr=torch.tensor(3e-3), weight_decay=0.0), dict(),
    ),
    "select-group-scope-anchor-soft-restore-usermask": (
        dict(lr=1e-2, density=0.3, importance="fisher", importance_beta=0.9, scope="group",
             protect_strength=0.5, anchor_decay=2.0),
        dict(density=0.5, scope="tensor"), dict(anchor=True, user_mask=True, dead=True),
    ),
    "protect-taylor-maximize-bf16-importance": (
        dict(lr=1e-2, density=0.6, mask="protect", importance="taylor", maximize=True,
             importance_dtype="bfloat16"),
        dict(density=1.0), dict(anchor=True),
    ),
    "select-magnitude-nonfinite-scaler": (
        dict(lr=1e-2, density=0.5, importance="magnitude", nonfinite="skip", anchor_decay=1.0),
        dict(mask="protect", density=0.7), dict(anchor=True, nonfinite=True, scaler=True),
    ),
    "select-gate-block-taylor-anchor-usermask": (
        dict(lr=1e-2, density=0.3, gate_block=16, importance="taylor", anchor_decay=1.0, protect_strength=0.5),
        dict(gate_block=4, density=0.6), dict(anchor=True, user_mask=True, dead=True),
    ),
    "protect-gate-block-group-scope-nonfinite-scaler": (
        dict(lr=1e-2, density=0.5, mask="protect", gate_block=64, scope="group", anchor_decay=2.0),
        dict(mask="select", gate_block=1024, scope="tensor"), dict(anchor=True, nonfinite=True, scaler=True, dead=True),
    ),
    # NaN anchor entries (a checkpoint's, or importance made NaN by propagated grads): the pull
    # is NaN, as the reference's clamp gives (compiled, a plain minimum would give 1)
    "select-nan-anchor-restore": (
        dict(lr=1e-2, density=0.5, importance="fisher", anchor_decay=2.0),
        dict(mask="protect", density=0.7), dict(anchor=True, nan_anchor=True),
    ),
    "protect-without-anchor-propagate": (
        dict(lr=1e-2, density=0.4, mask="protect", nonfinite="propagate"), dict(mask="select"), dict(),
    ),
}


def make_params(device: str) -> tuple[list[torch.nn.Parameter], list[torch.nn.Parameter]]:
    """The two groups' params, drawn from a fixed generator (fp64, then cast)."""
    generator = torch.Generator().manual_seed(0)

    def draw(shape, dtype):
        return torch.randn(shape, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)

    group_a = [torch.nn.Parameter(draw(shape, dtype)) for shape, dtype in SHAPES_A]
    group_b = [torch.nn.Parameter(draw(shape, dtype)) for shape, dtype in SHAPES_B[:2]]
    shape, dtype = SHAPES_B[2]
    group_b.append(torch.nn.Parameter(draw(shape, dtype).t()))  # dense, not contiguous
    return group_a, group_b


def set_grads(params: list[torch.nn.Parameter], generator: torch.Generator, step: int, flags: dict, scale: float) -> None:
    """Random grads (times the scaler's scale); with ``dead`` the first third of each tensor's
    grads are always 0 (score 0: histogram bin 0, as unused embedding rows); with
    ``nonfinite`` a few NaN/Inf entries."""
    for index, p in enumerate(params):
        grad = torch.randn(p.shape, generator=generator, dtype=torch.float64) * scale
        if flags.get("dead"):
            grad.view(-1)[: grad.numel() // 3] = 0
        if flags.get("nonfinite") and grad.numel() > 3:
            flat = grad.view(-1)
            flat[(step * 7 + index) % flat.numel()] = float("nan")
            flat[(step * 13 + 2 * index) % flat.numel()] = float("inf")
        p.grad = grad.to(device=p.device, dtype=p.dtype)


def snapshot(optimizer: MaskedAdamW, params: list[torch.nn.Parameter]) -> dict:
    """Clones of every param and tensor state, keyed by (param index, key)."""
    out = {}
    for index, p in enumerate(params):
        out[(index, "param")] = p.detach().clone()
        for key, value in optimizer.state.get(p, {}).items():
            if torch.is_tensor(value):
                out[(index, key)] = value.detach().clone()
    return out


def run(backend: str, name: str, device: str, compiled: bool = False, tensor_lr: bool = False) -> list[dict]:
    """Run one configuration; per step: the snapshot and mask_stats.

    ``compiled``: the steps go through ``torch.compile(optimizer.step, fullgraph=True)``.
    ``tensor_lr``: every lr is a Tensor (as torch.optim advises under compile: a float lr is a
    guarded constant, so a schedule would recompile every step).
    """
    options, overrides_b, flags = CONFIGS[name]
    group_a, group_b = make_params(device)
    params = group_a + group_b
    overrides_b = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in overrides_b.items()}
    if tensor_lr:
        options = {**options, "lr": torch.tensor(options["lr"])}
        overrides_b = {k: (torch.tensor(v) if k == "lr" and not torch.is_tensor(v) else v) for k, v in overrides_b.items()}
    optimizer = MaskedAdamW(
        [{"params": group_a}, {"params": group_b, **overrides_b}], backend=backend, **options,
    )
    if flags.get("user_mask"):
        mask = torch.rand(group_a[1].shape, generator=torch.Generator().manual_seed(3)) < 0.7
        optimizer.set_mask(group_a[1], mask.to(device))
    generator = torch.Generator().manual_seed(1)
    step_fn = torch.compile(optimizer.step, fullgraph=True) if compiled else optimizer.step
    history = []
    for step in range(STEPS):
        if flags.get("anchor") and step == CONSOLIDATE_AFTER:
            optimizer.consolidate()
            if flags.get("nan_anchor"):
                for p in params:
                    anchor = optimizer.state[p].get("anchor")
                    if anchor is not None and anchor.numel() > 3:
                        every_third = torch.arange(anchor.numel(), device=device).reshape(anchor.shape) % 3 == 1
                        anchor.masked_fill_(every_third, float("nan"))
        scale = 2.0 ** (step + 3) if flags.get("scaler") else 1.0
        set_grads(params, generator, step, flags, scale)
        if flags.get("scaler"):
            optimizer.grad_scale = torch.full((1,), scale, device=device)
            optimizer.found_inf = torch.full((1,), float(step == SKIPPED_STEP), device=device)
        step_fn()
        for key in ("grad_scale", "found_inf"):
            optimizer.__dict__.pop(key, None)
        for group in optimizer.param_groups:  # a schedule: a new lr (float or Tensor) every step
            if torch.is_tensor(group["lr"]):
                group["lr"].mul_(0.7)
            else:
                group["lr"] *= 0.7
        history.append((snapshot(optimizer, params), optimizer.mask_stats()))
    return history


def _moved(now: dict, before: dict, index: int) -> torch.Tensor:
    """Which elements took a step: their moments changed."""
    changed = torch.zeros_like(now[(index, "exp_avg")], dtype=torch.bool)
    for key in ("exp_avg", "exp_avg_sq"):
        if (index, key) in before:
            changed |= ~((now[(index, key)] == before[(index, key)]) | (now[(index, key)].isnan() & before[(index, key)].isnan()))
        else:
            changed |= now[(index, key)] != 0
    return changed


def compare_backends(name: str, device: str, compiled: bool = False, reference_device: Optional[str] = None) -> None:
    """Run ``name`` on both backends and assert they agree after every step (``compiled``: the
    Triton run's steps are compiled, both runs use Tensor lrs; ``reference_device``: where the
    reference runs, if not on ``device``: results are compared on the CPU)."""
    expected_history = run("torch", name, reference_device or device, tensor_lr=compiled)
    actual_history = run("triton", name, device, compiled=compiled, tensor_lr=compiled)
    if reference_device is not None:
        expected_history = [({k: v.cpu() for k, v in snap.items()}, stats) for snap, stats in expected_history]
        actual_history = [({k: v.cpu() for k, v in snap.items()}, stats) for snap, stats in actual_history]
    previous: dict = {}
    previous_actual: dict = {}
    for step, ((expected, expected_stats), (actual, actual_stats)) in enumerate(zip(expected_history, actual_history)):
        assert expected.keys() == actual.keys(), step
        for key in expected:
            want, got = expected[key], actual[key]
            where = f"step {step}, param {key[0]}, {key[1]}"
            assert got.dtype == want.dtype and got.shape == want.shape and got.stride() == want.stride(), where
            if key[1] in ("step", "importance_step", "threshold") or not want.is_floating_point():
                assert torch.equal(got, want), f"{where}: {got} != {want}"
            else:
                torch.testing.assert_close(got, want, **TOLERANCES[want.dtype], equal_nan=True, msg=lambda m: f"{where}: {m}")
        for index in {key[0] for key in expected if key[1] == "exp_avg"}:
            moved = _moved(actual, previous_actual, index)
            assert torch.equal(moved, _moved(expected, previous, index)), f"step {step}, param {index}: gates differ"
        assert actual_stats == expected_stats, f"step {step}: mask_stats differ"
        previous, previous_actual = expected, actual


@pytest.mark.parametrize("name", list(CONFIGS))
def test_triton_matches_reference(name):
    compare_backends(name, "cpu")


@pytest.mark.parametrize("name", list(CONFIGS))
def test_triton_matches_reference_with_gpu_sized_blocks(name, monkeypatch):
    """The interpreter's 32768-element programs leave most tensors of CONFIGS in partial blocks;
    with the CUDA block size (1024) the full-block path (vector accesses, dense write-back) runs
    for every dtype, and a gate block of 1024 equals the program's block."""
    from masked_optim.kernels import launch

    monkeypatch.setitem(launch._BLOCK, "cpu", launch._BLOCK["cuda"])
    compare_backends(name, "cpu")


class _Recorder:
    """Wraps a kernel: logs every launch's and every warmup's variant (constants and argument
    types, as Triton's cache key sees them), optionally failing some warmups."""

    def __init__(self, kernel, log: dict, fail=lambda constants: False):
        self.kernel, self.log, self.fail = kernel, log, fail

    def _variant(self, args, constants) -> tuple:
        def kind(arg):
            if isinstance(arg, int):
                return ("int", arg == 1, arg % 16 == 0)
            return arg.dtype if torch.is_tensor(arg) else arg
        return (self.kernel.fn.__name__, tuple(map(kind, args)), tuple(sorted(constants.items())))

    def __getitem__(self, grid):
        def launch(*args, **constants):
            self.log["launched"].add(self._variant(args, constants))
            return self.kernel[grid](*args, **constants)
        return launch

    def warmup(self, *args, grid, **constants):
        if self.fail(constants):
            raise RuntimeError("compile error (test)")
        self.log["warmed"].add(self._variant(args, constants))
        return self.kernel.warmup(*args, grid=grid, **constants)


def _record_kernels(monkeypatch, fail=lambda constants: False) -> dict:
    from masked_optim.kernels import launch, tables

    monkeypatch.setattr(tables, "_cache", type(tables._cache)())  # no tables compiled ahead already
    monkeypatch.setattr(tables, "_checked", {})
    log = {"launched": set(), "warmed": set()}
    for name in ("_masked_adamw_kernel", "_score_histogram_kernel", "_finish_step_kernel"):
        monkeypatch.setattr(launch, name, _Recorder(getattr(launch, name), log, fail))
    return log


@pytest.mark.parametrize("name", list(CONFIGS))
def test_every_kernel_a_step_launches_was_compiled_ahead(name, monkeypatch):
    """``launch.compile_ahead`` (run while the optimizer prepares its groups) warms exactly the
    variants the steps then launch: pre-pass, step kernel per bucket, finish kernel, with
    GradScaler, consolidate and user masks as in CONFIGS."""
    log = _record_kernels(monkeypatch)
    run("triton", name, "cpu")
    assert log["launched"] and log["launched"] == log["warmed"]


def test_a_kernel_that_fails_to_compile_leaves_every_group_as_it_was(monkeypatch):
    """A compile error in the second group's kernels (here: its float64 params) is raised
    before the first group steps: nothing is half-applied, and the next step goes on."""
    group_a, group_b = make_params("cpu")
    params = group_a + group_b
    optimizer = MaskedAdamW([{"params": group_a}, {"params": group_b}], backend="triton", density=0.5)
    generator = torch.Generator().manual_seed(1)
    set_grads(params, generator, 0, {}, 1.0)
    optimizer.step()
    set_grads(params, generator, 1, {}, 1.0)
    before, stats = snapshot(optimizer, params), optimizer.mask_stats()
    import triton.language as tl

    log = _record_kernels(monkeypatch, fail=lambda constants: constants.get("PARAM_DTYPE") == tl.float64)
    with pytest.raises(RuntimeError, match="compile error"):
        optimizer.step()
    after = snapshot(optimizer, params)
    assert after.keys() == before.keys()
    for key in before:
        assert torch.equal(after[key].nan_to_num(), before[key].nan_to_num()), key
    assert optimizer.mask_stats() == stats and not log["launched"]
    monkeypatch.undo()
    optimizer.step()
    assert not torch.equal(params[0].detach(), before[(0, "param")])


def test_skipped_step_changes_nothing():
    """found_inf: params, state, counters, thresholds and mask_stats stay bit-identical."""
    group_a, group_b = make_params("cpu")
    params = group_a + group_b
    optimizer = MaskedAdamW([{"params": group_a}, {"params": group_b}], backend="triton", density=0.5, anchor_decay=1.0)
    generator = torch.Generator().manual_seed(1)
    for step in range(2):
        set_grads(params, generator, step, {}, 1.0)
        optimizer.step()
    optimizer.consolidate()
    set_grads(params, generator, 2, {}, 1.0)
    optimizer.step()
    before, stats = snapshot(optimizer, params), optimizer.mask_stats()
    set_grads(params, generator, 3, {}, 4.0)
    optimizer.grad_scale, optimizer.found_inf = torch.full((1,), 4.0), torch.ones(1)
    optimizer.step()
    after = snapshot(optimizer, params)
    for key in before:
        assert torch.equal(after[key].nan_to_num(), before[key].nan_to_num()), key
    assert optimizer.mask_stats() == stats


def test_named_triton_backend_raises_naming_the_device(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(RuntimeError, match="device cpu"):
        resolve("triton", torch.device("cpu"))


def test_non_dense_param_is_a_clear_error():
    base = torch.randn(10, 8)
    param = torch.nn.Parameter(base[:, ::2])  # every other column: not dense
    param.grad = torch.randn(param.shape)
    optimizer = MaskedAdamW([param], backend="triton")
    with pytest.raises(ValueError, match="dense params"):
        optimizer.step()


@pytest.mark.parametrize("threshold", [torch.tensor(-1, dtype=torch.int32), torch.full((2,), -1)], ids=["int32", "two-elements"])
def test_a_threshold_the_kernel_cannot_address_is_a_clear_error(threshold):
    """The kernel reads and writes state['threshold'] through an int64 address: one replaced by
    another dtype or size is refused before anything changes (it was read out of bounds)."""
    param = torch.nn.Parameter(torch.randn(30, 20))
    optimizer = MaskedAdamW([param], lr=1e-2, density=0.5, backend="triton")
    param.grad = torch.randn(30, 20)
    optimizer.step()
    optimizer.state[param]["threshold"] = threshold
    before = param.detach().clone()
    with pytest.raises(ValueError, match=r"state\['threshold'\] as a one-element int64 tensor, got torch\.int"):
        optimizer.step()
    assert torch.equal(param, before)


def test_counters_a_scaled_step_cannot_read_on_the_device_are_named():
    param = torch.nn.Parameter(torch.randn(6))
    optimizer = MaskedAdamW([param], backend="triton")
    param.grad = torch.randn(6)
    optimizer.step()
    optimizer.state[param]["step"] = optimizer.state[param]["step"].double()
    optimizer.grad_scale, optimizer.found_inf = torch.ones(()), torch.zeros(1)
    before = param.detach().clone()
    with pytest.raises(RuntimeError, match=r"one-element float32 step counters on cpu \(found torch\.float64 of 1 elements on cpu\)"):
        optimizer.step()
    assert torch.equal(param, before)


def test_interpreter_is_active():
    """The comparisons above run the kernels, not a fallback: the interpreter is on."""
    assert os.environ.get("TRITON_INTERPRET") == "1"
    assert resolve("triton", torch.device("cpu")) == "triton"


def test_cached_tables_follow_grad_layout_and_mask_changes():
    """The launcher skips its per-tensor checks when a step's tensors match an earlier checked
    step (same addresses, grad layouts, gating); a grad in another layout, a reused grad buffer
    and a new user mask must each still step exactly like the reference."""
    generator = torch.Generator().manual_seed(5)
    start = torch.randn(50, 40, generator=generator)
    ours, ref = torch.nn.Parameter(start.clone()), torch.nn.Parameter(start.clone())
    options = dict(lr=1e-2, density=0.5)
    optimizer, reference = MaskedAdamW([ours], backend="triton", **options), MaskedAdamW([ref], backend="torch", **options)
    buffer = torch.empty(50, 40)
    for step in range(7):
        grad = torch.randn(50, 40, generator=generator)
        if step in (3, 4):  # the same values in a column-major grad: another layout, a copy
            ours.grad = grad.t().contiguous().t()
        else:  # a persistent grad buffer: the same address every step
            ours.grad = buffer.copy_(grad)
        ref.grad = grad.clone()
        if step == 5:
            mask = torch.rand(50, 40, generator=generator) < 0.6
            optimizer.set_mask(ours, mask)
            reference.set_mask(ref, mask.clone())
        optimizer.step()
        reference.step()
        for key in ("exp_avg", "exp_avg_sq", "importance"):
            torch.testing.assert_close(optimizer.state[ours][key], reference.state[ref][key], **TOLERANCES[torch.float32])
        torch.testing.assert_close(ours.detach(), ref.detach(), **TOLERANCES[torch.float32], msg=lambda m: f"step {step}: {m}")
        assert optimizer.mask_stats() == reference.mask_stats(), step


def test_step_bumps_param_versions_like_torch_optim():
    """The kernel writes params through raw addresses; the step still bumps their version
    counters, so backward through a graph that saved a param before the step raises, as it does
    after torch.optim.AdamW's in-place update."""
    param = torch.nn.Parameter(torch.randn(100))
    x = torch.randn(100, requires_grad=True)
    loss = (param * x).sum()  # saves param for x's gradient
    param.grad = torch.randn(100)
    before = param._version
    MaskedAdamW([param], backend="triton").step()
    assert param._version > before
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        loss.backward()


def test_reused_mask_memory_in_another_layout_is_not_mistaken_for_the_old_mask():
    """A freed mask's memory is reused by the next mask of the same size: a transposed mask at
    the same address must not step through the tables checked for the contiguous one."""
    generator = torch.Generator().manual_seed(11)
    param = torch.nn.Parameter(torch.randn(64, 1024, generator=generator))
    optimizer = MaskedAdamW([param], backend="triton", lr=1e-2)
    moved_frozen = []
    for step in range(6):
        mask = torch.rand(64, 1024, generator=generator) < 0.5
        if step % 2:  # the same values, stored column-major
            mask = mask.t().contiguous().t()
        optimizer.set_mask(param, mask)
        before = param.detach().clone()
        param.grad = torch.randn(64, 1024, generator=generator)
        optimizer.step()
        moved = param.detach() != before
        moved_frozen.append(int((moved & ~mask).sum()))
        assert bool(moved[mask].all()), f"step {step}: an allowed element did not move"
        optimizer.set_mask(param, None)
    assert moved_frozen == [0] * 6, f"frozen elements that moved, per step: {moved_frozen}"


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors under the interpreter")
@pytest.mark.parametrize("importance, dtype", [("taylor", torch.bfloat16), ("fisher", torch.float32)])
def test_select_scores_of_round_importances_bin_like_the_reference(importance, dtype):
    """Quantised grads (multiples of 1/4) give importances whose bias-corrected score sits on a
    bin edge: the kernel must form it as the reference does (a product with the rounded
    reciprocal, not a quotient, which differs by an ulp in ~20% of elements), or bins, the
    next threshold and the gate differ."""
    gen = torch.Generator().manual_seed(4)
    base = (torch.randint(-8, 9, (2049,), generator=gen) / 4).to(dtype)
    params = {name: base.clone().requires_grad_() for name in ("torch", "triton")}
    opts = {name: MaskedAdamW([p], lr=1e-2, density=0.1, importance=importance, backend=name) for name, p in params.items()}
    for _ in range(3):
        grad = (torch.randint(-8, 9, base.shape, generator=gen) / 4).to(dtype)
        for name, p in params.items():
            before = p.detach().clone()
            p.grad = grad.clone()
            opts[name].step()
            params[name].moved = p.detach() != before
        assert opts["triton"].state[params["triton"]]["threshold"] == opts["torch"].state[params["torch"]]["threshold"]
        assert torch.equal(params["triton"].moved, params["torch"].moved)


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors under the interpreter")
def test_nan_scores_gate_like_the_reference_whatever_their_bits():
    """A bf16 param made NaN by a step (eps=0, a zero grad: 0/0) holds torch's NaN bits (0xFFFF)
    under the reference and Triton's (0x7FC0) under the kernel; its taylor importance is NaN,
    as are the propagated NaN grads' of an fp32 param in the same unit. Every NaN score must
    bin alike, so the threshold, the gate and the counts agree."""
    gen = torch.Generator().manual_seed(0)
    a0, b0 = torch.randn(100, generator=gen).to(torch.bfloat16), torch.randn(100, generator=gen)
    first_a, second_a = torch.randn(100, generator=gen), torch.randn(100, generator=gen)
    first_a[:4] = 0
    first_b = torch.randn(100, generator=gen)
    second_b = first_b.clone()
    second_b[:4] = float("nan")
    seen = {}
    for backend in ("torch", "triton"):
        a, b = torch.nn.Parameter(a0.clone()), torch.nn.Parameter(b0.clone())
        opt = MaskedAdamW([a, b], lr=0.1, eps=0.0, density=1.0, importance="taylor", importance_beta=0.0,
                          nonfinite="propagate", scope="group", backend=backend)
        a.grad, b.grad = first_a.to(torch.bfloat16), first_b.clone()
        opt.step()
        opt.param_groups[0]["density"] = 0.02
        record = []
        for _ in range(2):
            before = b.detach().clone()
            a.grad, b.grad = second_a.to(torch.bfloat16), second_b.clone()
            opt.step()
            moved = (b.detach() != before) & ~(b.detach().isnan() & before.isnan())
            record.append((int(opt.state[a]["threshold"]), opt.mask_stats()[0]["updated"], moved.tolist()))
        assert a.detach()[:4].isnan().all()
        seen[backend] = record
    assert seen["triton"] == seen["torch"]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors under the interpreter")
def test_mask_stats_after_a_skipped_step_report_the_last_step_taken():
    """A GradScaler-skipped step (found_inf) whose first param has no grad leaves mask_stats'
    counts at the last step taken, as the reference's; a group whose only step was skipped
    reports None."""
    seen = {}
    for backend in ("torch", "triton"):
        gen = torch.Generator().manual_seed(0)
        a, b = torch.nn.Parameter(torch.randn(10, generator=gen)), torch.nn.Parameter(torch.randn(7, generator=gen))
        opt = MaskedAdamW([a, b], lr=1e-2, density=0.5, backend=backend)
        a.grad, b.grad = torch.randn(10, generator=gen), torch.randn(7, generator=gen)
        opt.step()
        taken = opt.mask_stats()[0]
        a.grad, b.grad = None, torch.randn(7, generator=gen)
        opt.grad_scale, opt.found_inf = torch.full((1,), 2.0), torch.full((1,), 1.0)
        opt.step()
        after = opt.mask_stats()[0]
        assert {k: after[k] for k in ("elements", "updated", "frozen", "nonfinite_skipped")} == \
            {k: taken[k] for k in ("elements", "updated", "frozen", "nonfinite_skipped")}, backend
        fresh = torch.nn.Parameter(torch.randn(5, generator=gen))
        fresh.grad = torch.randn(5, generator=gen)
        never = MaskedAdamW([fresh], backend=backend)
        never.grad_scale, never.found_inf = torch.full((1,), 2.0), torch.full((1,), 1.0)
        never.step()
        assert never.mask_stats() == [None], backend
        never.found_inf = torch.zeros(1)
        never.step()
        seen[backend] = (taken, never.mask_stats())
    assert seen["triton"] == seen["torch"]


@pytest.mark.skipif(os.environ.get("TRITON_INTERPRET") != "1", reason="CPU tensors under the interpreter")
def test_a_skipped_step_with_another_unit_count_reports_unknown_thresholds_not_stale_ones():
    """Steps with grads for (a, b), then b only, then (a, b) again but skipped by the scaler:
    the counts are the last step taken's (as the reference's), and the skipped step's two
    thresholds, which the host cannot know without a sync, are NaN, not an older step's."""
    results = {}
    for backend in ("torch", "triton"):
        a, b = torch.nn.Parameter(torch.randn(64)), torch.nn.Parameter(torch.randn(100))
        opt = MaskedAdamW([a, b], lr=0.1, density=0.3, backend=backend)
        for k, (with_a, skipped) in enumerate([(True, False), (False, False), (True, True)]):
            gen = torch.Generator().manual_seed(k)
            a.grad = torch.randn(64, generator=gen) if with_a else None
            b.grad = torch.randn(100, generator=gen)
            opt.grad_scale, opt.found_inf = torch.ones(1), torch.full((1,), float(skipped))
            opt.step()
        results[backend] = opt.mask_stats()[0]
    counts = ("elements", "updated", "frozen", "nonfinite_skipped")
    assert {k: results["triton"][k] for k in counts} == {k: results["torch"][k] for k in counts}
    assert results["torch"]["elements"] == 100
    thresholds = results["triton"]["threshold"]
    assert len(thresholds) == 2 and all(value != value for value in thresholds)
