"""Histogram of score bins on the CPU: a small C++ loop, built once with the system compiler.

``torch.bincount`` is the largest cost of a ``compile``-backend step at density < 1: a min and
a max pass, then a serial loop at ~0.75 ns an element (~18 ms of a ~39 ms step at 16M fp32
elements on 2 cores). This loop counts into two interleaved 32-bit tables (consecutive
elements in the same bin do not wait on each other's increment) and needs no min/max pass
(bins are below ``NUM_BINS`` by construction, and masked to it): ~7 ms inside that step.
It runs on one thread: the step's OpenMP threads still hold the cores when it starts, and two
threads measured slower there.

The library is compiled on first use with the C++ compiler Inductor uses (``$CXX``, else
``c++``/``g++``: the ``compile`` backend needs one anyway), cached by content hash in the
temporary directory, and loaded with ``ctypes`` (which releases the GIL during the call).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from typing import Optional

import torch
from torch import Tensor

from masked_optim.threshold import NUM_BINS

_SOURCE = r"""
#include <cstdint>
#include <cstring>
#include <vector>

extern "C" void masked_optim_histogram(const int32_t* bins, const bool* allowed, int64_t n,
                                       int64_t num_bins, int64_t* out) {
    const uint32_t mask = static_cast<uint32_t>(num_bins - 1);  // num_bins is a power of two
    std::vector<uint32_t> tables(2 * num_bins, 0);
    uint32_t* even = tables.data();
    uint32_t* odd = even + num_bins;
    int64_t i = 0;
    if (allowed == nullptr) {
        for (; i + 1 < n; i += 2) {
            even[static_cast<uint32_t>(bins[i]) & mask]++;
            odd[static_cast<uint32_t>(bins[i + 1]) & mask]++;
        }
        for (; i < n; ++i) even[static_cast<uint32_t>(bins[i]) & mask]++;
    } else {
        for (; i + 1 < n; i += 2) {
            even[static_cast<uint32_t>(bins[i]) & mask] += allowed[i];
            odd[static_cast<uint32_t>(bins[i + 1]) & mask] += allowed[i + 1];
        }
        for (; i < n; ++i) even[static_cast<uint32_t>(bins[i]) & mask] += allowed[i];
    }
    for (int64_t b = 0; b < num_bins; ++b) out[b] = static_cast<int64_t>(even[b]) + odd[b];
}
"""

#: a 32-bit table counts at most this many elements per call
MAX_NUMEL = 2**32 - 1


def _compiler() -> str:
    compiler = os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")
    if not compiler:
        raise RuntimeError("backend='compile' needs a C++ compiler (set CXX, or install c++/g++)")
    return compiler


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL:
    compiler = _compiler()
    flags = ["-O3", "-shared", "-fPIC", "-std=c++17"]
    key = hashlib.sha256("\0".join([_SOURCE, compiler, *flags]).encode()).hexdigest()[:20]
    directory = os.path.join(tempfile.gettempdir(), f"masked_optim_{os.getuid()}")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    status = os.stat(directory)
    if status.st_uid != os.getuid() or status.st_mode & 0o022:  # never load a library others could plant
        raise RuntimeError(f"{directory} must belong to this user and be writable by no one else")
    path = os.path.join(directory, f"histogram_{key}.so")
    if not os.path.exists(path):
        source = os.path.join(directory, f"histogram_{key}.{os.getpid()}.cpp")
        building = f"{path}.{os.getpid()}.tmp"
        with open(source, "w") as handle:
            handle.write(_SOURCE)
        done = subprocess.run([compiler, *flags, source, "-o", building], capture_output=True, text=True)
        os.remove(source)
        if done.returncode != 0:
            raise RuntimeError(f"building the CPU histogram with {compiler} failed:\n{done.stderr[-2000:]}")
        os.replace(building, path)  # atomic: processes building at once each finish a whole file
    library = ctypes.CDLL(path)
    function = library.masked_optim_histogram
    function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    function.restype = None
    return library


def histogram_of_bins(bins: Tensor, where: Optional[Tensor] = None) -> Tensor:
    """int64 counts over ``NUM_BINS`` of contiguous int32 CPU ``bins`` (those where ``where``,
    a bool tensor of as many elements, is true): ``threshold.histogram_of_bins``, faster."""
    if bins.device.type != "cpu" or bins.dtype != torch.int32 or not bins.is_contiguous():
        raise ValueError(f"cpu_histogram needs contiguous int32 CPU bins, got {bins.dtype} on {bins.device}")
    if bins.numel() > MAX_NUMEL:
        raise ValueError(f"cpu_histogram counts at most {MAX_NUMEL} elements a call, got {bins.numel()}")
    allowed = None
    if where is not None:
        allowed = where.reshape(-1)
        if allowed.dtype != torch.bool or allowed.numel() != bins.numel() or allowed.device != bins.device:
            raise ValueError("cpu_histogram: where must be a bool CPU tensor with as many elements as bins")
        allowed = allowed.contiguous()
    out = torch.empty(NUM_BINS, dtype=torch.int64)
    _library().masked_optim_histogram(
        bins.data_ptr(), None if allowed is None else allowed.data_ptr(), bins.numel(), NUM_BINS, out.data_ptr(),
    )
    return out
