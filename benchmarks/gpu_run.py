"""One-call GPU check and benchmark: correctness on the device, copy bandwidth, the peer matrix.

    PYTHONPATH=. python benchmarks/gpu_run.py OUTDIR            # a CUDA machine, a few minutes
    PYTHONPATH=. python benchmarks/gpu_run.py OUTDIR --tiny --device cpu   # CI smoke test

Installs nothing, needs no network. Writes OUTDIR/results.json (device, versions, date,
correctness, copy bandwidth, every timing with its host time (host-bound or not), modelled
bytes, GB/s and ratios to the peers) and prints a short table last. On the CPU the Triton kernels run under TRITON_INTERPRET=1.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import sys
import time


def _parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("outdir", help="directory for results.json")
    parser.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    parser.add_argument("--tiny", action="store_true", help="tiny sizes: a smoke test of the whole script")
    parser.add_argument("--repeats", type=int, default=None, help="timed repeats per implementation")
    parser.add_argument("--budget-s", type=float, default=270.0, help="stop starting new cases after this many seconds")
    return parser.parse_args()


ARGS = _parse() if __name__ == "__main__" else None
if ARGS is not None and ARGS.device == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")  # before triton is imported

import torch  # noqa: E402

from benchmarks.common import (  # noqa: E402
    GPT2_SMALL_SHAPES, Case, bytes_per_element, copy_bandwidth, host_seconds, interleaved_medians, make_optimizer,
    make_params, synchronize,
)
from masked_optim import MaskedAdamW  # noqa: E402
from tests.tolerances import TOLERANCES  # noqa: E402 - the tests' one per-dtype table


def cases(tiny: bool, device: str) -> list[Case]:
    if tiny:  # a few thousand elements per tensor: the interpreter's Triton kernels stay quick
        sizes = [3000]
        gpt = [(s[0] // 256 + 1,) + s[1:] for s in GPT2_SMALL_SHAPES[:6]]
    elif device == "cpu":  # 2 cores, 24 GiB: PERF.md's CPU point is 16M fp32
        sizes = [1 << 20, 1 << 24]
        gpt = GPT2_SMALL_SHAPES[2:]  # the 12 transformer blocks (85M), without the embeddings
    else:
        sizes = [1 << 20, 1 << 24, 1 << 26, 1 << 28]
        gpt = GPT2_SMALL_SHAPES
    out = []
    for dtype in (torch.float32, torch.bfloat16):
        for density in (1.0, 0.1):
            out += [Case(f"one tensor {n}", [(n,)], dtype, density) for n in sizes]
            out.append(Case("gpt2-small shapes", gpt, dtype, density))
    return out


def implementations(device: str, case: Case, tiny: bool) -> list[str]:
    impls = ["torch_adamw_fused", "torch_adamw_foreach", "masked_compile"]
    if device != "cpu" or tiny:  # on the CPU Triton only runs in its (slow) interpreter
        impls.append("masked_triton")
        if len(case.shapes) > 1 and case.dtype == torch.float32:  # many tensors: what tracing the host side saves
            impls.append("masked_triton_compiled")
        if case.density < 1.0:  # block gates: fewer bytes than dense torch fused AdamW?
            impls.append("masked_triton_blocks")
    if device == "cpu" and case.density < 1.0:  # the CPU path's block gates (no bytes saved there)
        impls.append("masked_compile_blocks")
    if case.numel <= (1 << 26 if device != "cpu" else 1 << 24):  # the eager reference is many passes
        impls.append("masked_torch")
    return impls


def correctness(device: str, tiny: bool) -> dict:
    """Triton vs the reference on the device: several steps on a multi-tensor set, eagerly and
    (fp32) through ``torch.compile(opt.step, fullgraph=True)``, i.e. the ``torch.library`` op.
    A configuration that raises is reported with its error; the run goes on."""
    gen = torch.Generator().manual_seed(0)
    shapes = [(1,), (4097,), (123, 431), (0,), (1000, 100)] if not tiny else [(1,), (513,), (37, 11)]
    report = {}
    for dtype, compiled, gate_block in ((torch.float32, False, 1), (torch.bfloat16, False, 1), (torch.float32, True, 1), (torch.float32, False, 32)):
        name = str(dtype) + (" torch.compile" if compiled else "") + (f" gate_block={gate_block}" if gate_block > 1 else "")
        try:
            report[name] = _check(device, dtype, compiled, gate_block, shapes, gen)
        except Exception as error:  # noqa: BLE001 - recorded, and the smoke test fails on it
            print(f"  correctness {name} FAILED: {_describe(error)}", file=sys.stderr)
            report[name] = dict(error=_describe(error))
    return report


def _check(device, dtype, compiled, gate_block, shapes, gen) -> dict:
    ours = [torch.randn(s, generator=gen).to(device=device, dtype=dtype).requires_grad_() for s in shapes]
    ref = [p.detach().clone().requires_grad_() for p in ours]
    opts = dict(lr=1e-2, density=0.3, anchor_decay=5.0, protect_strength=1.0, gate_block=gate_block)
    if compiled:
        opts["lr"] = torch.tensor(1e-2, device=device)
    a, b = MaskedAdamW(ours, backend="triton", **opts), MaskedAdamW(ref, backend="torch", **{**opts, "lr": 1e-2})
    step_a = torch.compile(a.step, fullgraph=True) if compiled else a.step
    gate_mismatch = count_mismatch = 0
    for step in range(6):
        mine, theirs = [p.detach().clone() for p in ours], [q.detach().clone() for q in ref]
        for p, q in zip(ours, ref):
            g = torch.randn(p.shape, generator=gen).to(device=device, dtype=dtype)
            p.grad, q.grad = g, g.clone()
        step_a()
        b.step()
        # the gates of every dtype, by the step's counts (bf16 rounds some updates to no change)
        count_mismatch += sum(abs(x[key] - y[key]) for x, y in zip(a.mask_stats(), b.mask_stats()) for key in ("updated", "frozen"))
        if step == 2:
            a.consolidate()
            b.consolidate()
        if dtype == torch.float32:  # element by element: fp32 updates never round to no change here
            moved = [(p.detach() != x, q.detach() != y) for p, q, x, y in zip(ours, ref, mine, theirs)]
            gate_mismatch += sum(int((x != y).sum()) for x, y in moved)
    tolerance = TOLERANCES[dtype]
    outside, error = 0, 0.0
    for p, q in zip(ours, ref):
        pairs = [(p.detach(), q.detach())] + [(a.state[p][key], b.state[q][key]) for key in ("exp_avg", "exp_avg_sq", "importance")]
        for x, y in pairs:
            x, y = x.double(), y.double()
            outside += int(((x - y).abs() > tolerance["atol"] + tolerance["rtol"] * y.abs()).sum())
        if p.numel():
            error = max(error, float(((p.detach().float() - q.detach().float()).abs() / (q.detach().float().abs() + 1e-6)).max()))
    return dict(outside_tolerance=outside, gate_mismatches=gate_mismatch, count_mismatches=count_mismatch,
                max_relative_param_error=error)


def _describe(error: Exception) -> str:
    return f"{type(error).__name__}: {error}"[:2000]


def _failed(failures: list[dict], case: Case, impl: str, error: Exception) -> None:
    print(f"  FAILED {impl}: {_describe(error)}", file=sys.stderr)
    failures.append(dict(case=case.name, dtype=str(case.dtype), density=case.density, impl=impl, error=_describe(error)))


def run_case(case: Case, device: str, repeats: int, tiny: bool, failures: list[dict]) -> list[dict]:
    impls = implementations(device, case, tiny)
    optimizers, params = {}, {}
    fns = {}
    for impl in impls:
        params[impl] = make_params(case, device)
        try:
            optimizers[impl] = make_optimizer(impl, params[impl], case.density)
        except (RuntimeError, ValueError) as error:  # e.g. fused AdamW without bf16 support
            print(f"  skip {impl}: {error}", file=sys.stderr)
            continue
        fns[impl] = optimizers[impl].step
        if impl == "masked_triton_compiled":
            torch._dynamo.reset()  # each optimizer is a new variant of the one step code object
            fns[impl] = torch.compile(optimizers[impl].step, fullgraph=True)
        try:  # three steps first (steps 2 and 3 build variants step 1 does not): an implementation
            for _ in range(3):  # that fails is reported, not the end of the run
                fns[impl]()
            synchronize(device)
        except Exception as error:  # noqa: BLE001 - any failure of one impl is data, not a crash
            _failed(failures, case, impl, error)
            del fns[impl]
    try:
        medians = interleaved_medians(fns, device, repeats)
    except Exception:  # noqa: BLE001 - time them one by one to find the one that fails
        medians = {}
        for impl, fn in fns.items():
            try:
                medians.update(interleaved_medians({impl: fn}, device, repeats))
            except Exception as error:  # noqa: BLE001
                _failed(failures, case, impl, error)
    hosts = {}
    for impl in medians:  # what issuing one step costs the host (after the timed runs)
        try:
            hosts[impl] = host_seconds(fns[impl], device)
        except Exception as error:  # noqa: BLE001
            _failed(failures, case, impl, error)
    rows = []
    for impl, seconds in medians.items():
        model = bytes_per_element(impl, case.dtype, density=case.density)
        rows.append(dict(
            case=case.name, dtype=str(case.dtype).removeprefix("torch."), density=case.density, numel=case.numel,
            tensors=len(case.shapes), impl=impl, seconds=seconds, host_seconds=hosts.get(impl), bytes_per_element=model,
            gbps=model * case.numel / seconds / 1e9,
        ))
    for row in rows:
        for peer in ("torch_adamw_fused", "masked_torch", "masked_compile"):
            if peer in medians:
                row[f"ratio_to_{peer}"] = row["seconds"] / medians[peer]
    del optimizers, params
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    return rows


def host_blocking(device: str) -> dict:
    """Whether a Triton step waits for the device: with ~0.5 s of work queued ahead of it
    (``torch.cuda._sleep``), the host time of a steady step, of a step whose tables are rebuilt
    (a new grad tensor) and of a step under a fused GradScaler, against the queued time. A step
    that returns in a small fraction of it runs ahead of the device, as it should (a pageable
    host-to-device copy may wait: the launcher copies through pinned memory). CUDA only."""
    if not device.startswith("cuda"):
        return {}
    params = make_params(Case("one tensor", [(1 << 20,)], torch.float32, 0.1), device)
    optimizer = MaskedAdamW(params, lr=1e-3, density=0.1, backend="triton", fused=True)
    for _ in range(3):
        optimizer.step()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    torch.cuda._sleep(10**8)
    end.record()
    torch.cuda.synchronize()
    cycles = int(10**8 * 500.0 / max(start.elapsed_time(end), 1e-3))  # ~0.5 s of sleep

    def grad_rebuilt():
        params[0].grad = params[0].grad.clone()
        optimizer.step()

    def scaled():
        optimizer.grad_scale = torch.ones(1, device=device)
        optimizer.found_inf = torch.zeros(1, device=device)
        try:
            optimizer.step()
        finally:
            del optimizer.grad_scale, optimizer.found_inf

    out = {}
    for name, fn in (("steady", optimizer.step), ("tables rebuilt", grad_rebuilt), ("fused scaler", scaled)):
        torch.cuda.synchronize()
        queued = time.perf_counter()
        torch.cuda._sleep(cycles)
        issued = time.perf_counter()
        fn()
        returned = time.perf_counter()
        torch.cuda.synchronize()
        done = time.perf_counter()
        out[name] = dict(step_host_seconds=returned - issued, queued_seconds=done - queued,
                         ran_ahead=(returned - issued) < 0.1 * (done - queued))
    return out


#: (num_warps, elements per program) of the Triton step on CUDA: the first is the default;
#: the others were suggested by reading ptxas' report (164-168 registers a thread at 4 warps,
#: ~114 at 8, fewer layout conversions through shared memory) but never timed
LAUNCH_VARIANTS = [(4, 1024), (8, 1024), (8, 2048)]


def launch_variants(device: str, tiny: bool, repeats: int, failures: list[dict]) -> list[dict]:
    """The Triton step at 64M fp32 elements (tiny: 3000), density 1 and 0.1, under each of
    ``LAUNCH_VARIANTS``, timed round-robin; each row has its ratio to the default variant and
    whether its params ended bit for bit equal to the first variant's (they must: the
    arithmetic is element-wise and the histogram a count)."""
    from masked_optim.kernels import launch

    key = "cpu" if device == "cpu" else "cuda"
    default = (launch._NUM_WARPS, launch._BLOCK[key])
    rows = []
    for density in (1.0, 0.1):
        case = Case(f"one tensor {3000 if tiny else 1 << 26}", [(3000 if tiny else 1 << 26,)], torch.float32, density)
        fns, params = {}, {}
        for warps, block in LAUNCH_VARIANTS:
            name = f"warps {warps} block {block}"
            params[name] = make_params(case, device)
            optimizer = make_optimizer("masked_triton", params[name], density)

            def step(optimizer=optimizer, warps=warps, block=block):
                launch._NUM_WARPS, launch._BLOCK[key] = warps, block
                try:
                    optimizer.step()
                finally:
                    launch._NUM_WARPS, launch._BLOCK[key] = default
            fns[name] = step
        try:
            for fn in fns.values():  # steps 2 and 3 build variants step 1 does not
                for _ in range(3):
                    fn()
            synchronize(device)
            medians = interleaved_medians(fns, device, repeats)
        except Exception as error:  # noqa: BLE001 - a variant that fails is data
            _failed(failures, case, "masked_triton launch variants", error)
            continue
        baseline = medians[f"warps {default[0]} block {default[1]}"] if (default in LAUNCH_VARIANTS) else None
        first = params[next(iter(params))][0]
        for name, seconds in medians.items():  # every variant took as many steps from the same start
            rows.append(dict(case=case.name, density=density, variant=name, seconds=seconds,
                             ratio_to_default=None if baseline is None else seconds / baseline,
                             same_params_as_first=bool(torch.equal(params[name][0], first))))
        del fns, params
        if device.startswith("cuda"):
            torch.cuda.empty_cache()
    return rows


def main() -> None:
    args = ARGS or _parse()
    device = args.device
    repeats = args.repeats or (2 if args.tiny else 10)
    os.makedirs(args.outdir, exist_ok=True)
    started = time.monotonic()
    import triton

    result = dict(
        date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        device=torch.cuda.get_device_name() if device.startswith("cuda") else _cpu_name(),
        torch=torch.__version__, triton=triton.__version__, python=platform.python_version(),
        tiny=args.tiny, repeats=repeats, complete=False,
    )
    path = os.path.join(args.outdir, "results.json")
    result["correctness"] = correctness(device, args.tiny)
    _write(result, path)
    torch._dynamo.reset()
    try:
        result["host_blocking"] = host_blocking(device)
    except Exception as error:  # noqa: BLE001 - a failed check is data
        result["host_blocking"] = dict(error=_describe(error))
    _write(result, path)
    result["copy_gbps"] = copy_bandwidth(device, 1 << 12 if args.tiny else (1 << 24 if device == "cpu" else 1 << 28))
    result["rows"] = []
    result["failures"] = []
    for case in cases(args.tiny, device):
        if time.monotonic() - started > args.budget_s:
            result.setdefault("skipped_cases", []).append(f"{case.name} {case.dtype} {case.density}")
            continue
        print(f"{case.name} {case.dtype} density {case.density} ...", file=sys.stderr, flush=True)
        for row in run_case(case, device, repeats, args.tiny, result["failures"]):
            row["fraction_of_copy"] = row["gbps"] / result["copy_gbps"]
            result["rows"].append(row)
        _write(result, path)  # after every case: a run cut short keeps what it measured
    if time.monotonic() - started <= args.budget_s:
        result["launch_variants"] = launch_variants(device, args.tiny, repeats, result["failures"])
    else:
        result.setdefault("skipped_cases", []).append("launch variants")
    result["complete"] = True
    _write(result, path)
    print_table(result)
    print(f"wrote {path}")


def _write(result: dict, path: str) -> None:
    with open(path + ".tmp", "w") as handle:
        json.dump(result, handle, indent=1)
    os.replace(path + ".tmp", path)


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as handle:
            model = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or "cpu"
    return f"{model}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}"


def print_table(result: dict) -> None:
    print(f"\n{result['device']}  torch {result['torch']}  triton {result['triton']}  {result['date']}")
    print(f"correctness: {json.dumps(result['correctness'])}")
    print(f"copy bandwidth: {result['copy_gbps']:.1f} GB/s")
    if result.get("host_blocking"):
        print(f"host blocking: {json.dumps(result['host_blocking'])}")
    header = f"{'case':<22} {'dtype':<8} {'dens':>4} {'impl':<20} {'ms':>9} {'host ms':>8} {'GB/s':>8} {'%copy':>6} {'x fused':>8}"
    print(header)
    for row in result["rows"]:
        print(
            f"{row['case']:<22} {row['dtype']:<8} {row['density']:>4} {row['impl']:<20} {row['seconds'] * 1e3:>9.3f}"
            f" {(row['host_seconds'] or float('nan')) * 1e3:>8.3f}"
            f" {row['gbps']:>8.1f} {100 * row['fraction_of_copy']:>6.1f} {row.get('ratio_to_torch_adamw_fused', float('nan')):>8.2f}"
        )
    for row in result.get("launch_variants", []):
        ratio = row["ratio_to_default"]
        print(f"launch {row['case']:<22} {row['density']:>4} {row['variant']:<20} {row['seconds'] * 1e3:>9.3f} ms"
              f"  {'' if ratio is None else f'{ratio:.2f}x default'}{'' if row['same_params_as_first'] else '  PARAMS DIFFER'}")
    for failure in result.get("failures", []):
        print(f"FAILED {failure['case']} {failure['dtype']} {failure['density']} {failure['impl']}: {failure['error'][:200]}")


if __name__ == "__main__":
    main()
