"""Histogram of score bins on the CPU: a small C++ loop, built once with the system compiler.

``torch.bincount`` is the largest cost of a ``compile``-backend step at density < 1: a min and
a max pass, then a serial loop at ~0.75 ns an element (~18 ms of a ~39 ms step at 16M fp32
elements on 2 cores). This loop counts into two interleaved 32-bit tables (consecutive
elements in the same bin do not wait on each other's increment; reused per thread) and needs no
min/max pass (bins are below ``NUM_BINS`` by construction, and masked to it): ~7 ms inside that
step on one thread. Fewer elements than bins are counted straight into the output.
From ``MIN_PARALLEL`` elements on, torch's own OpenMP threads count a range each into tables of
their own (~4 ms there on 2 cores): the library is built with ``-fopenmp`` and so shares the
OpenMP runtime torch loaded (the same ``libgomp.so.1``, as Inductor's kernels do), whose
threads are still awake from the step's compiled loop; threads of another pool would contend
with them for the cores.

The library is compiled on first use with the C++ compiler Inductor uses (``$CXX``, else
``c++``/``g++``: the ``compile`` backend needs one anyway), cached by content hash in the
temporary directory, and loaded with ``ctypes`` (which releases the GIL during the call).
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shlex
import shutil
import stat
import subprocess
import tempfile
import threading
from typing import Optional

import torch
from torch import Tensor

from masked_optim.threshold import NUM_BINS

_SOURCE = r"""
#include <algorithm>
#include <cstdint>
#include <vector>
#include <omp.h>

// counts bins[begin:end] (where allowed) into two interleaved tables: consecutive elements in
// the same bin do not wait on each other's increment
static void count_range(const int32_t* bins, const uint8_t* allowed, int64_t begin, int64_t end, uint32_t mask,
                        uint32_t* even, uint32_t* odd) {
    int64_t i = begin;
    if (allowed == nullptr) {
        for (; i + 1 < end; i += 2) {
            even[static_cast<uint32_t>(bins[i]) & mask]++;
            odd[static_cast<uint32_t>(bins[i + 1]) & mask]++;
        }
        for (; i < end; ++i) even[static_cast<uint32_t>(bins[i]) & mask]++;
    } else {
        for (; i + 1 < end; i += 2) {
            even[static_cast<uint32_t>(bins[i]) & mask] += allowed[i] != 0;
            odd[static_cast<uint32_t>(bins[i + 1]) & mask] += allowed[i + 1] != 0;
        }
        for (; i < end; ++i) even[static_cast<uint32_t>(bins[i]) & mask] += allowed[i] != 0;
    }
}

// returns how many threads counted
extern "C" int64_t masked_optim_histogram(const int32_t* bins, const uint8_t* allowed, int64_t n,
                                          int64_t num_bins, int64_t min_parallel, int64_t* out) {
    const uint32_t mask = static_cast<uint32_t>(num_bins - 1);  // num_bins is a power of two
    std::fill(out, out + num_bins, 0);
    if (n < num_bins) {  // few elements: straight into out (two tables to zero and merge cost more)
        for (int64_t i = 0; i < n; ++i)
            out[static_cast<uint32_t>(bins[i]) & mask] += allowed == nullptr || allowed[i] != 0;
        return 1;
    }
    // torch's OpenMP threads (this library shares torch's OpenMP runtime, as Inductor's kernels
    // do), as many as torch.set_num_threads allows this thread: each counts a contiguous range
    // into tables of its own (reused: no allocation, no page faults), then adds them to out
    const int threads = n >= min_parallel ? omp_get_max_threads() : 1;
    int64_t counted = 1;
#pragma omp parallel num_threads(threads) if (threads > 1)
    {
        static thread_local std::vector<uint32_t> tables;
        tables.assign(2 * num_bins, 0);
        const int64_t thread = omp_get_thread_num(), count = omp_get_num_threads();
        if (thread == 0) counted = count;
        const int64_t chunk = n / count & ~int64_t(63);  // (whole cache lines of bins)
        const int64_t begin = thread * chunk, end = thread + 1 == count ? n : begin + chunk;
        count_range(bins, allowed, begin, end, mask, tables.data(), tables.data() + num_bins);
#pragma omp critical(masked_optim_histogram)
        for (int64_t b = 0; b < num_bins; ++b) out[b] += static_cast<int64_t>(tables[b]) + tables[num_bins + b];
    }
    return counted;
}
"""

#: a 32-bit table counts at most this many elements per call
MAX_NUMEL = 2**32 - 1
#: fewer elements are counted on one thread: below ~512K, waking the others and merging their
#: tables cost about what they save (measured after a compiled step, 2 cores)
MIN_PARALLEL = 1 << 19


@functools.lru_cache(maxsize=None)
def find_compiler(cxx: Optional[str]) -> Optional[tuple[str, ...]]:
    """The C++ compiler command Inductor uses too: ``cxx`` (``$CXX``; may carry a launcher,
    e.g. ``ccache g++``) if it names a program, else c++ or g++; None where there is none
    (looked up once per ``cxx``)."""
    if cxx:
        command = tuple(shlex.split(cxx))
        return command if command and shutil.which(command[0]) is not None else None
    found = shutil.which("c++") or shutil.which("g++")
    return (found,) if found else None


def _compiler() -> list[str]:
    """The compiler command (``find_compiler``), or a RuntimeError saying what is missing."""
    cxx = os.environ.get("CXX")
    command = find_compiler(cxx)
    if command is None and cxx:
        raise RuntimeError(f"CXX={cxx!r} names no executable (the compile backend builds its histogram with it)")
    if command is None:
        raise RuntimeError("backend='compile' needs a C++ compiler: set CXX, or install c++/g++")
    return list(command)


def _private_directory() -> str:
    """``$TMPDIR/masked_optim_<uid>``, refused unless it is a real directory of this user that no
    one else can write: a library loaded from it runs in this process."""
    directory = os.path.join(tempfile.gettempdir(), f"masked_optim_{os.getuid()}")
    os.makedirs(directory, mode=0o700, exist_ok=True)
    status = os.lstat(directory)  # lstat: a link someone else owns could be repointed later
    if not stat.S_ISDIR(status.st_mode) or status.st_uid != os.getuid() or status.st_mode & 0o022:
        raise RuntimeError(f"{directory} must be a directory (not a link) of this user, writable by no one else")
    return directory


_BUILD_LOCK = threading.Lock()


@functools.lru_cache(maxsize=None)
def _library() -> ctypes.CDLL:
    with _BUILD_LOCK:  # threads of one process build once; processes each build a whole file
        return _load_or_build()


def _load_or_build() -> ctypes.CDLL:
    compiler = _compiler()
    flags = ["-O3", "-shared", "-fPIC", "-std=c++17", "-fopenmp"]
    key = hashlib.sha256("\0".join([_SOURCE, *compiler, *flags]).encode()).hexdigest()[:20]
    directory = _private_directory()
    path = os.path.join(directory, f"histogram_{key}.so")
    if not os.path.exists(path):
        handle, source = tempfile.mkstemp(suffix=".cpp", dir=directory)
        building = source[: -len(".cpp")] + ".so.tmp"
        try:
            with os.fdopen(handle, "w") as file:
                file.write(_SOURCE)
            done = subprocess.run([*compiler, *flags, source, "-o", building], capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"building the CPU histogram with {' '.join(compiler)} failed:\n{done.stderr[-2000:]}")
            os.replace(building, path)  # atomic: a concurrent process finds a whole file or none
        finally:
            for leftover in (source, building):
                if os.path.exists(leftover):
                    os.remove(leftover)
    library = ctypes.CDLL(path)
    function = library.masked_optim_histogram
    function.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    function.restype = ctypes.c_int64
    return library


def histogram_of_bins(bins: Tensor, where: Optional[Tensor] = None, out: Optional[Tensor] = None) -> Tensor:
    """int64 counts over ``NUM_BINS`` of contiguous int32 CPU ``bins`` (those where ``where``,
    a bool tensor of as many elements, is true): ``threshold.histogram_of_bins``, faster.

    ``out`` (contiguous int64, ``NUM_BINS`` elements, on the CPU) receives the counts instead of
    a new tensor: a reused buffer spares a fresh 256 KB allocation's page faults each call.
    """
    if bins.device.type != "cpu" or bins.dtype != torch.int32 or not bins.is_contiguous():
        raise ValueError(
            f"bins must be a contiguous int32 CPU tensor, got {bins.dtype} on {bins.device}"
            f" (contiguous: {bins.is_contiguous()})"
        )
    if bins.numel() > MAX_NUMEL:
        raise ValueError(f"bins: at most {MAX_NUMEL} elements a call, got {bins.numel()}")
    allowed = None
    if where is not None:
        if where.dtype != torch.bool or where.numel() != bins.numel() or where.device != bins.device:
            raise ValueError(
                f"where must be a bool tensor on {bins.device} with {bins.numel()} elements (as bins), "
                f"got {where.dtype} on {where.device} with {where.numel()}"
            )
        allowed = where.reshape(-1).contiguous()  # kept alive through the call
    if out is None:
        out = torch.empty(NUM_BINS, dtype=torch.int64)
    elif out.device.type != "cpu" or out.dtype != torch.int64 or out.numel() != NUM_BINS or not out.is_contiguous():
        raise ValueError(
            f"out must be a contiguous int64 CPU tensor of {NUM_BINS} elements, got {out.dtype} on "
            f"{out.device} with {out.numel()} (contiguous: {out.is_contiguous()})"
        )
    _count(bins, allowed, out)
    return out


def _count(bins: Tensor, allowed: Optional[Tensor], out: Tensor) -> int:
    """The library call on checked tensors: counts into ``out``; returns how many threads counted."""
    return int(_library().masked_optim_histogram(
        bins.data_ptr(), None if allowed is None else allowed.data_ptr(), bins.numel(), NUM_BINS, MIN_PARALLEL,
        out.data_ptr(),
    ))
