"""Which backend runs a param group's step on a given device (no silent fallback by name)."""
from __future__ import annotations

import importlib.util
import os

import torch

from masked_optim import cpu_histogram


#: looked up once: ``find_spec`` inside a ``torch.compile``-traced step is only understood by
#: Dynamo from torch 2.13 on (a traced ``opt.step`` with the triton backend reaches this check)
_TRITON_INSTALLED = importlib.util.find_spec("triton") is not None


def triton_runs_on(device: torch.device) -> tuple[bool, str]:
    """Whether the Triton kernels can run on ``device``, and why not."""
    if not _TRITON_INSTALLED:
        return False, "triton is not installed"
    if device.type == "cuda":
        return (True, "") if torch.cuda.is_available() else (False, "CUDA is not available")
    if device.type == "cpu":
        if os.environ.get("TRITON_INTERPRET") == "1":
            return True, ""
        return False, "Triton runs CPU tensors only under TRITON_INTERPRET=1"
    return False, f"Triton has no backend for device type {device.type!r}"


#: on the CPU, ``"auto"`` compiles groups at least this large: below it the one-off compile
#: (seconds per variant) costs more than the eager reference's extra passes save
AUTO_COMPILE_MIN_NUMEL = 1 << 22


def resolve(name: str, device: torch.device, numel: int = 0) -> str:
    """Map a group's ``backend`` option to the implementation that runs on ``device``.

    ``"auto"`` takes the Triton kernel on CUDA when it can run there (triton installed); on the
    CPU it takes the ``compile`` backend for groups of at least ``AUTO_COMPILE_MIN_NUMEL``
    elements when a C++ compiler is present (``$CXX``, else c++ or g++: Inductor needs one),
    else the reference (the optimizer also takes the reference for a group with a param that
    is not dense, which the compile backend cannot step). ``"triton"`` raises RuntimeError,
    naming the device, where Triton cannot run.
    """
    if name in ("torch", "compile"):
        return name
    runs, why = triton_runs_on(device)
    if name == "triton":
        if not runs:
            raise RuntimeError(f"backend='triton' cannot run on device {device}: {why}")
        return "triton"
    if runs and device.type == "cuda":
        return "triton"
    if device.type == "cpu" and numel >= AUTO_COMPILE_MIN_NUMEL \
            and cpu_histogram.find_compiler(os.environ.get("CXX")) is not None:
        return "compile"
    return "torch"
