"""The demo's figure: final accuracy vs plasticity per method, and how task 1 is forgotten."""
from __future__ import annotations

from pathlib import Path

import numpy as np


def plot_results(results: dict[str, list[np.ndarray]], path: str | Path, title: str = "") -> Path:
    """Write a PNG with two panels and return its path.

    Left: ACC and NEW per method (mean over seeds, error bar = std). Right: accuracy on the first
    task after each task is trained (mean over seeds), the usual picture of forgetting.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from masked_optim.demo.metrics import summarise

    names = list(results)
    stats = [summarise(results[n]) for n in names]
    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5), gridspec_kw=dict(width_ratios=[3, 2]))
    x = np.arange(len(names))
    for offset, key, label in ((-0.2, "acc", "ACC (final, all tasks)"), (0.2, "new", "NEW (task just trained)")):
        left.bar(x + offset, [s[key][0] for s in stats], 0.4, yerr=[s[key][1] for s in stats], label=label, capsize=3)
    left.set_xticks(x, names, rotation=30, ha="right")
    left.set_ylim(0, 1.15)  # headroom for the legend above the bars
    left.set_yticks(np.linspace(0, 1, 6))
    left.set_ylabel("test accuracy")
    left.legend(loc="upper center", ncol=2, fontsize=8, frameon=False)
    left.grid(axis="y", alpha=0.3)
    colours = plt.cm.tab20(np.linspace(0, 1, 20))
    for index, name in enumerate(names):
        first_task = np.mean([R[:, 0] for R in results[name]], axis=0)
        steps = np.arange(1, len(first_task) + 1)
        right.plot(steps, first_task, marker="o", label=name, color=colours[(2 * index) % 20 + (2 * index) // 20 % 2])
    right.set_xticks(steps)
    right.set_xlabel("tasks trained")
    right.set_ylabel("accuracy on task 1")
    right.set_ylim(0, 1)
    right.grid(alpha=0.3)
    right.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path
