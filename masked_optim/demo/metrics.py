"""Continual-learning metrics from an accuracy matrix R, R[i, j] = accuracy on task j after training task i."""
from __future__ import annotations

import numpy as np


def cl_metrics(R: np.ndarray) -> dict[str, float]:
    """ACC, BWT, forgetting and NEW (plasticity) of one run.

    - ACC: mean final accuracy over all tasks, mean_j R[T-1, j].
    - BWT: backward transfer, mean_{j<T-1} R[T-1, j] - R[j, j] (negative = forgetting).
    - forgetting: mean_{j<T-1} max_{j<=i<T-1} R[i, j] - R[T-1, j] (max minus last).
    - NEW: mean accuracy on each task right after training it, mean_j R[j, j].
    """
    R = np.asarray(R, dtype=float)
    T = R.shape[0]
    if R.shape != (T, T):
        raise ValueError(f"accuracy matrix must be square, got shape {R.shape}")
    last = R[T - 1]
    old = range(T - 1)
    bwt = float(np.mean([last[j] - R[j, j] for j in old])) if T > 1 else 0.0
    forgetting = float(np.mean([R[j:T - 1, j].max() - last[j] for j in old])) if T > 1 else 0.0
    return dict(acc=float(last.mean()), bwt=bwt, forgetting=forgetting, new=float(np.diag(R).mean()))


def summarise(matrices: list[np.ndarray]) -> dict[str, tuple[float, float]]:
    """Mean and standard deviation over seeds of each metric of :func:`cl_metrics`."""
    per_seed = [cl_metrics(R) for R in matrices]
    return {k: (float(np.mean([m[k] for m in per_seed])), float(np.std([m[k] for m in per_seed])))
            for k in per_seed[0]}
