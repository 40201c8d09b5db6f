"""Mean and spread over seeds of the language-model retention runs (``lm_retention.py``).

    python -m masked_optim.demo.lm_summary results/lm results/lm/seed1 results/lm/seed2 \\
        --out results/lm/seeds.json

Reads each directory's ``results.json`` and prints the README's table: relative forgetting
(mean ± std), its ratio to AdamW's in the same run (mean and range), fact recall (mean ± std)
and recall relative to AdamW's. Writes the per-seed values to ``--out``.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics


def _ratio(value: float, adamw: float) -> float:
    """``value / adamw``; NaN where AdamW's is 0 (e.g. no fact recalled at toy sizes)."""
    return value / adamw if adamw else float("nan")


def summarise(runs: list[dict]) -> dict:
    """Per method: the per-run values and their ratios to AdamW in the same run (NaN where
    AdamW's value is 0)."""
    methods = {}
    for name in runs[0]["methods"]:
        forgetting = [run["methods"][name]["relative_forgetting"] for run in runs]
        recall = [run["methods"][name]["recall"] for run in runs]
        methods[name] = dict(
            relative_forgetting=forgetting, recall=recall,
            forgetting_vs_adamw=[_ratio(f, run["methods"]["adamw"]["relative_forgetting"]) for f, run in zip(forgetting, runs)],
            recall_vs_adamw=[_ratio(r, run["methods"]["adamw"]["recall"]) for r, run in zip(recall, runs)],
        )
    return dict(seeds=[run["config"]["seed"] for run in runs], methods=methods)


def _spread(values: list[float]) -> float:
    return statistics.stdev(values) if len(values) > 1 else 0.0


def table(summary: dict) -> str:
    lines = [
        "| method | relative forgetting | vs AdamW (range) | fact recall | recall vs AdamW |",
        "|---|---|---|---|---|",
    ]
    for name, m in summary["methods"].items():
        f, ratio, recall = m["relative_forgetting"], m["forgetting_vs_adamw"], m["recall"]
        lines.append(
            f"| {name} | {100 * statistics.mean(f):.1f}% ± {100 * _spread(f):.1f} | {statistics.mean(ratio):.2f} "
            f"({min(ratio):.2f}–{max(ratio):.2f}) | {statistics.mean(recall):.3f} ± {_spread(recall):.3f} "
            f"| {statistics.mean(m['recall_vs_adamw']):.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("dirs", nargs="+", help="output directories of lm_retention runs (one per seed)")
    parser.add_argument("--out", help="write the per-seed values here (JSON)")
    args = parser.parse_args()
    runs = []
    for directory in args.dirs:
        with open(os.path.join(directory, "results.json")) as handle:
            runs.append(json.load(handle))
    summary = summarise(runs)
    print(f"seeds {summary['seeds']}")
    print(table(summary))
    if args.out:
        with open(args.out, "w") as handle:
            json.dump(summary, handle, indent=1)


if __name__ == "__main__":
    main()
