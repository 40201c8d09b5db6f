"""Train one method on a sequence of tasks and record its accuracy matrix; run many in parallel."""
from __future__ import annotations

import os
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context

import numpy as np
import torch
from torch import Tensor, nn

from masked_optim.demo.data import Task, permuted_digits
from masked_optim.demo.methods import Method, make_learner

HIDDEN = 256
BATCH = 32


def mlp(hidden: int = HIDDEN) -> nn.Module:
    """The 64-256-256-10 MLP."""
    return nn.Sequential(nn.Linear(64, hidden), nn.ReLU(), nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 10))


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    """Full-batch accuracy."""
    return (model(x).argmax(1) == y).float().mean().item()


def run(method: Method, seed: int, epochs: int, n_tasks: int = 5, split: str = "test") -> np.ndarray:
    """Train ``method`` on ``n_tasks`` permuted-digits tasks; return R (n_tasks x n_tasks).

    ``split`` is what R measures: ``"val"`` (tuning) or ``"test"`` (published numbers). Training
    always uses the training part only, so the two never leak into each other.
    """
    tasks: list[Task] = permuted_digits(n_tasks, seed)
    torch.manual_seed(seed)
    model = mlp()
    learner = make_learner(model, method)
    gen = torch.Generator().manual_seed(seed)
    R = np.zeros((n_tasks, n_tasks))
    for i, task in enumerate(tasks):
        x, y = task.x_train, task.y_train
        for _ in range(epochs):
            order = torch.randperm(len(y), generator=gen)
            for start in range(0, len(y), BATCH):
                idx = order[start:start + BATCH]
                loss = learner.loss(model(x[idx]), y[idx])
                learner.opt.zero_grad()
                loss.backward()
                learner.before_step()
                learner.opt.step()
        for j, other in enumerate(tasks):
            xe, ye = (other.x_val, other.y_val) if split == "val" else (other.x_test, other.y_test)
            R[i, j] = accuracy(model, xe, ye)
        if i < n_tasks - 1:
            learner.end_task(x, y)
    return R


def _job(args: tuple) -> tuple:
    torch.set_num_threads(1)
    method, seed, epochs, n_tasks, split = args
    start = time.perf_counter()
    R = run(method, seed, epochs, n_tasks, split)
    return method.name, seed, R, time.perf_counter() - start


def run_many(methods: list[Method], seeds: list[int], epochs: int, n_tasks: int = 5,
             split: str = "test", workers: int | None = None, progress: bool = True) -> dict[str, list[np.ndarray]]:
    """Every method on every seed, in ``workers`` single-threaded processes (default: one per
    core); returns ``{name: [R per seed, in seed order]}`` and shows a tqdm bar."""
    from tqdm import tqdm

    workers = workers or min(os.cpu_count() or 1, len(methods) * len(seeds))
    # the slowest methods first, so the last worker does not start a long job alone
    jobs = [(m, s, epochs, n_tasks, split) for m in methods for s in seeds]
    jobs.sort(key=lambda job: job[0].kind != "masked")
    results: dict[str, dict[int, np.ndarray]] = {m.name: {} for m in methods}
    bar = tqdm(total=len(jobs), desc=f"{split} runs", unit="run", disable=not progress)
    if workers <= 1:
        outputs = (_job(job) for job in jobs)
        for name, seed, R, _ in outputs:
            results[name][seed] = R
            bar.update()
    else:
        with ProcessPoolExecutor(workers, mp_context=get_context("spawn")) as pool:
            for future in as_completed([pool.submit(_job, job) for job in jobs]):
                name, seed, R, _ = future.result()
                results[name][seed] = R
                bar.update()
    bar.close()
    return {name: [by_seed[s] for s in seeds] for name, by_seed in results.items()}
