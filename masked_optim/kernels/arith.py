"""Element arithmetic the kernels share, written to round exactly as the reference's torch ops do.

The reference (``masked_optim.reference``) is plain PyTorch; on CPU its ``lerp`` and
``addcmul`` evaluate with one fused multiply-add, its divisions are IEEE (round to nearest),
its square roots are IEEE on CUDA and with torch's AVX2 CPU kernels (the AVX512 ones round
~17% of fp32 square roots to a neighbouring float: measured with torch 2.13; the tolerance
table absorbs it), and every other op rounds on its own. These helpers reproduce that:
``fma`` is a true fused multiply-add when compiled (launch with ``enable_fp_fusion=False`` so
nothing else gets fused) and, under ``TRITON_INTERPRET=1`` (whose ``tl.fma`` rounds twice), an
fp64 evaluation of ``a*b + c`` rounded once to fp32 (exact but for double-rounding ties, which
practically never occur); ``divide``/``square_root`` use the ``_rn`` forms for fp32 (Triton's
plain ``/`` and ``sqrt`` are approximate on NVIDIA GPUs). ``round_for_store`` rounds fp32 to
nearest-even for a bfloat16 store by bit arithmetic (the interpreter truncates).
"""
import triton
import triton.language as tl


@triton.jit
def fma(a, b, c, MATH_DTYPE: tl.constexpr, EMULATE_FMA: tl.constexpr):
    """a*b + c rounded once (fp64 math under the interpreter: rounded twice, documented)."""
    if EMULATE_FMA:
        if MATH_DTYPE == tl.float32:
            return (a.to(tl.float64) * b.to(tl.float64) + c.to(tl.float64)).to(tl.float32)
        else:
            return a * b + c
    else:
        return tl.fma(a, b, c)


@triton.jit
def lerp(start, end, weight, MATH_DTYPE: tl.constexpr, EMULATE_FMA: tl.constexpr):
    """torch.lerp: start + w*(end-start) for |w| < 0.5, else end + (w-1)*(end-start), one fma."""
    small = tl.abs(weight) < 0.5
    coefficient = tl.where(small, weight, weight - 1.0)
    base = tl.where(small, start, end)
    return fma(coefficient, end - start, base, MATH_DTYPE, EMULATE_FMA)


@triton.jit
def divide(a, b, MATH_DTYPE: tl.constexpr):
    """IEEE a / b in the math dtype."""
    if MATH_DTYPE == tl.float32:
        return tl.div_rn(a, b)
    else:
        return a / b


@triton.jit
def square_root(a, MATH_DTYPE: tl.constexpr):
    """IEEE sqrt(a) in the math dtype."""
    if MATH_DTYPE == tl.float32:
        return tl.sqrt_rn(a)
    else:
        return tl.sqrt(a)


@triton.jit
def power(base, exponent):
    """base ** exponent for a float64 base and a whole, non-negative float64 exponent.

    Binary exponentiation: within a few float64 ulps of Python's ``**`` (the reference), which
    the fp32 rounding of the bias corrections hides.
    """
    remaining = exponent.to(tl.int64)
    result = base * 0.0 + 1.0
    square = base
    while remaining > 0:
        result = tl.where((remaining & 1) != 0, result * square, result)
        square = square * square
        remaining = remaining >> 1
    return result


@triton.jit
def round_for_store(x, DTYPE: tl.constexpr):
    """x (fp32, or fp64 for fp64 stores) converted to DTYPE, rounding to nearest even."""
    if DTYPE == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        rounded = tl.where(x != x, 0x7FC0, rounded)  # torch's canonical bfloat16 NaN
        return rounded.to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(DTYPE)


@triton.jit
def score_bin(score):
    """threshold.score_bins: the fp32 bit pattern's top 16 bits without the sign, every NaN
    in threshold.NAN_BIN."""
    return tl.where(score != score, 0x7FC0, (score.to(tl.int32, bitcast=True) >> 16) & 0x7FFF)
