"""The one per-dtype tolerance table every numerical test uses.

float32/float64: SPEC's equivalence bound (relative 1e-6 after 100 steps), with an absolute
floor of a few units in the last place at 1.0 for values that cancel toward zero (moments whose
sign flips) when two backends round differently. bfloat16/float16: a few units in the last place
of the stored value (the math is fp32, the store rounds).
"""
import torch

TOLERANCES = {
    torch.float64: dict(rtol=1e-6, atol=1e-12),
    torch.float32: dict(rtol=1e-6, atol=5e-7),
    torch.bfloat16: dict(rtol=1.6e-2, atol=1e-5),
    torch.float16: dict(rtol=2e-3, atol=1e-6),
    torch.complex64: dict(rtol=1e-6, atol=5e-7),
    torch.complex128: dict(rtol=1e-6, atol=1e-12),
}


def assert_close(actual: torch.Tensor, expected: torch.Tensor, msg: str = "", *, equal_nan: bool = False) -> None:
    """``torch.testing.assert_close`` with the table's tolerance for ``expected``'s dtype."""
    torch.testing.assert_close(
        actual, expected, **TOLERANCES[expected.dtype], equal_nan=equal_nan, msg=lambda m: f"{msg}: {m}"
    )
