"""Test configuration: Triton runs CPU tensors in interpreter mode; seeds are fixed per test."""
import os

# Must be set before triton is imported anywhere (the interpreter is chosen at import).
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
