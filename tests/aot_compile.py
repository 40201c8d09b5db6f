"""Compile a representative set of the Triton kernel variants the launcher can ask for (67:
every dtype, element and block gates, anchors, GradScaler; not every combination of flags),
for an H100/H200 (sm_90), to a cubin, without a GPU: ``triton.compile`` runs Triton's whole pipeline (TTIR, TTGIR, LLVM IR,
PTX) and the ``ptxas`` that ships in the triton wheel.

Run by ``tests/test_triton_aot.py`` in a fresh process: under ``TRITON_INTERPRET=1`` (the test
suite's setting) ``@triton.jit`` builds interpreter objects instead. Prints one line per
compiled variant and exits non-zero on the first failure. The argument types mirror
``kernels/launch.py``: the grad-scale and found-inf slots get the float64 hyper table when no
GradScaler is active. The ALIGNED variants of the step kernel must use vector (64/128-bit)
global loads or stores in their full-block path: the PTX is checked for them.
"""
from __future__ import annotations

import itertools
import os
import re
import sys

os.environ.pop("TRITON_INTERPRET", None)

import triton  # noqa: E402
import triton.language as tl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from masked_optim.kernels.finish_kernel import _finish_step_kernel  # noqa: E402
from masked_optim.kernels.launch import _FINISH_BLOCK, _NUM_WARPS  # noqa: E402
from masked_optim.kernels.launch import _BLOCK as BLOCKS  # noqa: E402
from masked_optim.kernels.step_kernel import _masked_adamw_kernel, _score_histogram_kernel  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)
OPTIONS = dict(num_warps=_NUM_WARPS, enable_fp_fusion=False)
#: (param, importance) dtype pairs: every param dtype, and bf16 importance
DTYPES = [(tl.float32, tl.float32), (tl.bfloat16, tl.float32), (tl.float16, tl.float32), (tl.float64, tl.float32), (tl.bfloat16, tl.bfloat16)]


def compile_kernel(kernel, pointers: dict, constants: dict, options: dict = OPTIONS):
    """Compile one variant: ``pointers`` (argument name -> Triton type) and ``constants``
    (constexpr name -> value) together name every argument of ``kernel``. Both go to Triton in
    the kernel's own argument order and the constants by name: Triton numbers constants by the
    kernel's parameter positions, so numbering them by this call's dict order compiled flags
    onto the wrong parameters wherever the two orders differ."""
    kinds = {**pointers, **dict.fromkeys(constants, "constexpr")}
    missing, unknown = set(kernel.arg_names) - set(kinds), set(kinds) - set(kernel.arg_names)
    assert not missing and not unknown, f"{kernel.__name__}: missing {sorted(missing)}, unknown {sorted(unknown)}"
    signature = {name: kinds[name] for name in kernel.arg_names}
    source = ASTSource(fn=kernel, signature=signature, constexprs=dict(constants))
    return triton.compile(source, target=TARGET, options=options)


def scale_slots(scaled: bool) -> dict:
    kind = "*fp32" if scaled else "*fp64"
    return dict(grad_scale_pointer=kind, found_inf_pointer=kind)


def main() -> int:
    count = 0
    block = BLOCKS["cuda"]
    for (param, importance), (gated, anchor, scaled) in itertools.product(
        DTYPES, [(False, False, False), (True, True, True), (True, False, False)],
    ):
        math = tl.float64 if param == tl.float64 else tl.float32
        common = dict(PARAM_DTYPE=param, GRAD_DTYPE=param, MATH_DTYPE=math, IMPORTANCE_DTYPE=importance, ANCHOR_DTYPE=importance)
        flags = dict(HAS_ANCHOR=anchor, HAS_USER_MASK=anchor, HAS_GRAD_SCALE=scaled, HAS_FOUND_INF=scaled)
        # element gates, aligned or not; and (gated only) block gates of 32 elements
        blocks = [32] + ([2, 1024] if gated and anchor and param == tl.float32 and importance == tl.float32 else [])
        for aligned, gate_block in [(True, 1), (False, 1)] + ([(True, g) for g in blocks] if gated else []):
            compiled = compile_kernel(_masked_adamw_kernel, dict(
                tensor_table_pointer="*i64", block_table_pointer="*i32", unit_table_pointer="*i64", hyper_pointer="*fp64",
                **scale_slots(scaled), prepass_threshold_pointer="*i64", histogram_pointer="*i64", counts_pointer="*i64",
            ), dict(
                **common, ANCHOR_PARAM_DTYPE=param, **flags, HAS_ANCHOR_PARAM=anchor, GATED=gated, HISTOGRAM=gated,
                PREPASS_RAN=gated, EMULATE_FMA=False, ALIGNED=aligned, GATE_BLOCK=gate_block, BLOCK=block,
            ))
            count += 1
            wide = len(re.findall(r"\b(?:ld|st)\.global(?:\.\w+)*\.v[24]\.", compiled.asm["ptx"]))
            if aligned and not wide:
                print(f"step kernel {param}: aligned variant has no 128-bit accesses", file=sys.stderr)
                return 1
            print(f"step kernel {param} importance {importance} gated={gated} anchor={anchor} scaled={scaled} "
                  f"aligned={aligned} gate_block={gate_block}: ok, {wide} vector accesses", flush=True)
        for gate_block in [1] + blocks if gated else ():
            compile_kernel(_score_histogram_kernel, dict(
                tensor_table_pointer="*i64", block_table_pointer="*i32", unit_table_pointer="*i64", hyper_pointer="*fp64",
                **scale_slots(scaled), histogram_pointer="*i64",
            ), dict(**common, **flags, GATE_BLOCK=gate_block, BLOCK=block))
            count += 1
            print(f"histogram kernel {param} importance {importance} anchor={anchor} scaled={scaled} "
                  f"gate_block={gate_block}: ok", flush=True)
    for scaled, has_next, keep_known in [(False, False, False), (True, True, False), (True, True, True)]:
        compile_kernel(_finish_step_kernel, dict(
            tensor_table_pointer="*i64", tensor_count="i32", unit_table_pointer="*i64", unit_count="i32",
            prepass_threshold_pointer="*i64", next_threshold_pointer="*i64", scratch_pointer="*i64",
            found_inf_pointer="*fp32" if scaled else "*fp64", counts_pointer="*i64", stats_counts_pointer="*i64",
            stats_thresholds_pointer="*i64",
        ), dict(HAS_FOUND_INF=scaled, HAS_NEXT=has_next, KEEP_KNOWN=keep_known, BLOCK=_FINISH_BLOCK), dict(num_warps=_NUM_WARPS))
        count += 1
        print(f"finish kernel scaled={scaled} next={has_next} keep_known={keep_known}: ok", flush=True)
    print(f"compiled {count} variants for sm_90")
    return 0


if __name__ == "__main__":
    sys.exit(main())
