"""The wheel a user installs: every subpackage, the PEP 561 marker, no tests or benchmarks."""
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_wheel_holds_the_package_and_its_type_marker(tmp_path):
    pytest.importorskip("setuptools")
    done = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--quiet", "-w", str(tmp_path), str(ROOT)],
        capture_output=True, text=True, timeout=300,
    )
    if done.returncode != 0 and "No module named pip" in done.stderr:
        pytest.skip("pip is not installed")
    assert done.returncode == 0, done.stderr[-2000:]
    (wheel,) = tmp_path.glob("masked_optim-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for required in ("masked_optim/__init__.py", "masked_optim/py.typed", "masked_optim/kernels/step_kernel.py",
                     "masked_optim/demo/__main__.py", "masked_optim/scratch.py"):
        assert required in names, required
    assert not any(name.startswith(("tests/", "benchmarks/", "examples/")) for name in names)
