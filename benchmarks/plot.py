"""Plot achieved GB/s against size for each implementation from a gpu_run.py results.json.

    .venv/bin/python benchmarks/plot.py benchmarks/results/cpu-2core/results.json
writes results.png beside the JSON: one panel per (dtype, density), single-tensor cases.
"""
from __future__ import annotations

import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot(path: str) -> str:
    with open(path) as handle:
        result = json.load(handle)
    rows = [r for r in result["rows"] if r["tensors"] == 1]
    panels = sorted({(r["dtype"], r["density"]) for r in rows})
    impls = sorted({r["impl"] for r in rows})
    colours = {impl: f"C{k % 10}" for k, impl in enumerate(impls)}  # one colour per implementation in every panel
    figure, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.6), squeeze=False)
    for axis, (dtype, density) in zip(axes[0], panels):
        for impl in impls:
            points = sorted((r["numel"], r["gbps"]) for r in rows if (r["dtype"], r["density"], r["impl"]) == (dtype, density, impl))
            if points:
                axis.plot(*zip(*points), marker="o", label=impl, color=colours[impl])
        axis.axhline(result["copy_gbps"], color="grey", linestyle="--", label="copy")
        axis.set(xscale="log", yscale="log", xlabel="elements", ylabel="modelled GB/s", title=f"{dtype}, density {density}")
    axes[0][0].legend(fontsize=7)
    figure.suptitle(f"{result['device']} · torch {result['torch']} · {result['date'][:10]}", fontsize=9)
    figure.tight_layout()
    out = os.path.join(os.path.dirname(path), "results.png")
    figure.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("results", help="a results.json written by benchmarks/gpu_run.py (results.png goes beside it)")
    print(plot(parser.parse_args().results))
