"""Continual learning on permuted digits: MaskedAdamW against AdamW, the grad-mask workaround and EWC.

    python -m masked_optim.demo                 # default: 3 seeds, 10 epochs/task, under a minute on 2 cores
    python -m masked_optim.demo --full          # the published table: 8 seeds, every method in it
    python -m masked_optim.demo --tune          # redo the validation sweep first, then use its choice
    python -m masked_optim.demo --tune-only --methods masked-anchor+eps   # the sweep alone, no test runs
    python -m masked_optim.demo --methods adamw,masked-anchor --seeds 1 --epochs 2

Writes ``results.json``, ``results.md`` and ``cl_digits.png`` under ``--out`` (default runs/demo).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

from masked_optim.demo.harness import BATCH, run_many
from masked_optim.demo.methods import DEFAULT_METHODS, FULL_METHODS, LR, METHODS, SGD_LR, SGD_MOMENTUM, Method
from masked_optim.demo.metrics import cl_metrics, summarise

# ----------------------------------------------------------------------------- configuration
SEEDS, FULL_SEEDS = 3, 8
EPOCHS = 10
TASKS = 5
OUT = "runs/demo"


def settings(method: Method) -> str:
    """A method's settings in a few words: its optimizer, the options it changes from the lr
    and weight decay (0) every method shares, EWC's lambda and the consolidate rule."""
    optimizer = {"adamw": "AdamW", "gradmask": "AdamW + grad *= mask", "masked": "MaskedAdamW",
                 "ewc": "EWC, " + (f"SGD lr {SGD_LR:g} momentum {SGD_MOMENTUM:g}" if method.sgd else "AdamW")}[method.kind]
    words = [optimizer] + [f"{k} {v:g}" if isinstance(v, float) else f"{k} {v}" for k, v in method.optim.items()]
    if method.kind == "ewc":
        words.append(f"λ {method.ewc_lambda:g}")
    if method.how != "max" and method.kind in ("masked", "gradmask"):
        words.append(f"consolidate {method.how}")
    return ", ".join(words)


def results_table(results: dict[str, list[np.ndarray]], methods: dict[str, Method] = METHODS) -> str:
    """Markdown table, mean ± std over seeds, of ACC, BWT, forgetting and NEW per method, with
    each method's settings (forgetting: the mean drop from each old task's best accuracy)."""
    lines = ["| method | settings | ACC | BWT | forgetting | NEW |", "|---|---|---|---|---|---|"]
    for name, matrices in results.items():
        s = summarise(matrices)
        cells = [f"{s[k][0]:+.3f} ± {s[k][1]:.3f}" if k == "bwt" else f"{s[k][0]:.3f} ± {s[k][1]:.3f}"
                 for k in ("acc", "bwt", "forgetting", "new")]
        lines.append(f"| {name} | {settings(methods[name]) if name in methods else ''} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def describe(method: Method) -> dict:
    """JSON-friendly description of a method's configuration."""
    return dict(kind=method.kind, optim=method.optim, ewc_lambda=method.ewc_lambda, sgd=method.sgd,
                how=method.how, calibrate=method.calibrate)


def _at_least(low: int):
    def parse(text: str) -> int:
        value = int(text)
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value
    parse.__name__ = "int"  # argparse names the type in its errors
    return parse


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="masked-optim-demo", description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=_at_least(1), help=f"number of seeds (default {SEEDS}; {FULL_SEEDS} with --full)")
    parser.add_argument("--epochs", type=_at_least(0), default=EPOCHS, help=f"epochs per task (default {EPOCHS})")
    parser.add_argument("--tasks", type=_at_least(1), default=TASKS, help=f"number of permuted tasks (default {TASKS})")
    parser.add_argument("--methods", help=f"comma-separated subset of: {','.join(METHODS)}")
    parser.add_argument("--full", action="store_true", help="every method, 8 seeds (the published table)")
    parser.add_argument("--tune", action="store_true", help="redo the validation sweep and use its choice")
    parser.add_argument("--tune-only", action="store_true", help="the validation sweep alone (no test runs)")
    parser.add_argument("--workers", type=_at_least(1), help="processes (default: one per CPU core)")
    parser.add_argument("--out", default=OUT, help="output directory")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table, write JSON, markdown and PNG."""
    args = parse_args(argv)
    seeds = list(range(args.seeds or (FULL_SEEDS if args.full else SEEDS)))
    names = args.methods.split(",") if args.methods else list(FULL_METHODS if args.full else DEFAULT_METHODS)
    unknown = [n for n in names if n not in METHODS]
    if unknown:
        print(f"unknown method(s) {unknown}; choose from {list(METHODS)}", file=sys.stderr)
        return 2
    methods = [METHODS[n] for n in names]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    if args.tune or args.tune_only:
        from masked_optim.demo.tuning import TUNE_SEEDS, tune, tuning_table

        chosen, rows = tune(methods, args.epochs, workers=args.workers)
        methods = [m.with_options(**chosen[m.name]) if m.name in chosen else m for m in methods]
        table = tuning_table(rows)
        (out / "tuning.md").write_text(f"Validation sweep, seeds {TUNE_SEEDS}, {args.epochs} epochs/task\n\n{table}\n")
        (out / "tuning.json").write_text(json.dumps(dict(chosen=chosen, rows=rows), indent=1))
        print(table, "\n")
        if args.tune_only:
            print(f"wrote {out / 'tuning.md'}, {out / 'tuning.json'}")
            return 0
    results = run_many(methods, seeds, args.epochs, args.tasks, split="test", workers=args.workers)
    seconds = time.perf_counter() - start
    header = (f"Permuted digits, {args.tasks} tasks, MLP 64-256-256-10, {args.epochs} epochs/task, batch {BATCH}, "
              f"lr {LR:g} (\"+eps\" methods: lr 1e-2, eps 2e-2), {len(seeds)} seeds, test accuracy (mean ± std "
              f"over seeds); {seconds:.0f} s{' including the validation sweep' if args.tune else ''} on "
              f"{os.cpu_count()} CPU cores, torch {torch.__version__}")
    table = results_table(results, {m.name: m for m in methods})
    print(f"\n{header}\n\n{table}\n")
    (out / "results.md").write_text(f"{header}\n\n{table}\n")
    (out / "results.json").write_text(json.dumps(dict(
        seeds=seeds, epochs=args.epochs, tasks=args.tasks, batch=BATCH, lr=LR, seconds=seconds,
        torch=torch.__version__, python=platform.python_version(), cpus=os.cpu_count(),
        methods={m.name: describe(m) for m in methods},
        summary={n: summarise(r) for n, r in results.items()},
        runs={n: [dict(seed=s, R=R.tolist(), **cl_metrics(R)) for s, R in zip(seeds, r)] for n, r in results.items()},
    ), indent=1))
    from masked_optim.demo.plot import plot_results

    png = plot_results(results, out / "cl_digits.png", f"Permuted digits, {len(seeds)} seeds, {args.epochs} epochs/task")
    print(f"wrote {out / 'results.md'}, {out / 'results.json'}, {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
