"""Validation-only tuning: each method's strength is chosen on a split carved from the training
data (``data.VAL_FRACTION``) and on seeds the published table never uses; test is never read.

Rule: per method, the candidate with the best validation ACC among those whose validation NEW is
within ``NEW_SLACK`` of AdamW fine-tuning's (the plasticity target); if none is, the best ACC.
"""
from __future__ import annotations

from typing import Any


from masked_optim.demo.harness import run_many
from masked_optim.demo.methods import Method
from masked_optim.demo.metrics import summarise

TUNE_SEEDS = [100, 101]
NEW_SLACK = 0.03

# candidate options per method name (method.with_options(**candidate))
GRIDS: dict[str, list[dict[str, Any]]] = {
    "grad-mask": [dict(density=d) for d in (0.3, 0.5, 0.7)],
    "ewc-adamw": [dict(ewc_lambda=v) for v in (10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0)],
    "ewc-sgd": [dict(ewc_lambda=v) for v in (10.0, 30.0, 100.0, 300.0, 1000.0, 3000.0)],
    "masked-select": [dict(density=d) for d in (0.05, 0.1, 0.3)],
    "masked-protect": [dict(density=d) for d in (0.3, 0.5, 0.7)],
    "masked-soft": [dict(protect_strength=v) for v in (10.0, 100.0, 1000.0)],
    "masked-anchor": [dict(anchor_decay=v) for v in (3.0, 10.0, 30.0)],
    "masked-anchor+eps": [dict(anchor_decay=v) for v in (1.0, 3.0, 10.0)],
    "ewc-adamw+eps": [dict(ewc_lambda=v) for v in (10.0, 30.0, 100.0, 300.0, 1000.0)],
    "masked-protect-anchor+eps": [dict(density=d, anchor_decay=v) for d in (0.5, 0.7, 0.9) for v in (1.0, 3.0, 10.0)],
}


def label(options: dict[str, Any]) -> str:
    """Short text for one candidate, e.g. ``anchor_decay=10``."""
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in options.items())


def tune(methods: list[Method], epochs: int, seeds: list[int] = TUNE_SEEDS,
         workers: int | None = None) -> tuple[dict[str, dict[str, Any]], list[dict[str, Any]]]:
    """Sweep ``GRIDS`` on the validation split; return the chosen options per method name and
    one row per candidate (method, options, validation metrics, chosen)."""
    baseline = Method("adamw", "adamw")
    candidates = {}
    for method in methods:
        for options in GRIDS.get(method.name, []):
            tag = f"{method.name} [{label(options)}]"
            candidates[tag] = (method.name, options, method.with_options(name=tag, **options))
    runs = [baseline] + [c[2] for c in candidates.values()]
    results = run_many(runs, seeds, epochs, split="val", workers=workers)
    floor = summarise(results["adamw"])["new"][0] - NEW_SLACK
    rows, chosen = [], {}
    for tag, (name, options, _) in candidates.items():
        stats = summarise(results[tag])
        rows.append(dict(method=name, options=options, **{k: v[0] for k, v in stats.items()}))
    for name in {r["method"] for r in rows}:
        mine = [r for r in rows if r["method"] == name]
        eligible = [r for r in mine if r["new"] >= floor] or mine
        best = max(eligible, key=lambda r: r["acc"])
        best["chosen"] = True
        chosen[name] = best["options"]
    rows.insert(0, dict(method="adamw", options={}, **{k: v[0] for k, v in summarise(results["adamw"]).items()}))
    return chosen, rows


def tuning_table(rows: list[dict[str, Any]]) -> str:
    """Markdown table of a sweep (validation metrics; chosen candidates in bold)."""
    lines = ["| method | options | val ACC | val BWT | val forgetting | val NEW |", "|---|---|---|---|---|---|"]
    for r in rows:
        mark = "**" if r.get("chosen") else ""
        lines.append(f"| {mark}{r['method']}{mark} | {label(r['options'])} | {r['acc']:.3f} | "
                     f"{r['bwt']:+.3f} | {r['forgetting']:.3f} | {r['new']:.3f} |")
    return "\n".join(lines)
