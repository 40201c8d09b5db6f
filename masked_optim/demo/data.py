"""Permuted digits: scikit-learn's bundled 8x8 digits as a sequence of pixel-permutation tasks."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

TEST_FRACTION = 0.3  # of all 1797 images, held out for the published numbers only
VAL_FRACTION = 0.2   # of the remaining training images, carved out for tuning


@dataclass
class Task:
    """One task: the same images under one pixel permutation, split train / val / test."""

    permutation: Tensor
    x_train: Tensor
    y_train: Tensor
    x_val: Tensor
    y_val: Tensor
    x_test: Tensor
    y_test: Tensor


def _split(n: int, labels: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Stratified train / val / test indices (one split per seed, shared by all tasks)."""
    from sklearn.model_selection import train_test_split

    index = np.arange(n)
    rest, test = train_test_split(index, test_size=TEST_FRACTION, stratify=labels, random_state=seed)
    train, val = train_test_split(rest, test_size=VAL_FRACTION, stratify=labels[rest], random_state=seed)
    return train, val, test


def permuted_digits(n_tasks: int = 5, seed: int = 0) -> list[Task]:
    """``n_tasks`` tasks of 64 pixels in [0, 1]; task 0 keeps the identity permutation.

    The split and the permutations depend on ``seed`` only, so every method sees the same data.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = torch.tensor(digits.data / 16.0, dtype=torch.float32)
    y = torch.tensor(digits.target, dtype=torch.long)
    train, val, test = (torch.from_numpy(i) for i in _split(len(y), digits.target, seed))
    gen = torch.Generator().manual_seed(10_000 + seed)
    tasks = []
    for t in range(n_tasks):
        perm = torch.arange(64) if t == 0 else torch.randperm(64, generator=gen)
        xp = x[:, perm]
        tasks.append(Task(perm, xp[train], y[train], xp[val], y[val], xp[test], y[test]))
    return tasks
