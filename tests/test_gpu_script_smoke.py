"""CI smoke test of the one-call GPU session (benchmarks/gpu_session.sh -> gpu_run.py and the GPU
tests): a tiny run on the CPU, Triton in its interpreter."""
import json
import os
import subprocess
import sys


def test_gpu_script_runs_end_to_end_on_cpu(tmp_path):
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {**os.environ, "PYTHONPATH": root, "TRITON_INTERPRET": "1"}
    env["PYTHON"] = sys.executable  # the session script, as a lent GPU machine runs it
    # every case runs however slow the machine (~100 s on 2 idle cores): the time budgets guard a
    # GPU session's lease, and a case skipped for time here would leave the smoke test flaky
    env["GPU_RUN_TIMEOUT"] = "1500"
    done = subprocess.run(
        ["bash", "benchmarks/gpu_session.sh", str(tmp_path), "--tiny", "--device", "cpu", "--repeats", "1",
         "--budget-s", "1400"],
        cwd=root, env=env, capture_output=True, text=True, timeout=1600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "results.json").read_text())
    assert result["complete"] and result["failures"] == [], result["failures"]  # the script reports a failing impl and goes on
    assert "skipped_cases" not in result, result["skipped_cases"]
    for dtype, check in result["correctness"].items():
        # params and state within tests/tolerances.py's table, the same gates (every dtype)
        assert "error" not in check and check["outside_tolerance"] == 0, (dtype, check)
        assert check["gate_mismatches"] == 0 and check["count_mismatches"] == 0, (dtype, check)
    impls = {row["impl"] for row in result["rows"]}
    assert {"torch_adamw_fused", "masked_triton", "masked_triton_compiled", "masked_torch", "masked_compile",
            "masked_triton_blocks"} <= impls
    assert {"torch.float32 torch.compile", "torch.float32 gate_block=32"} <= set(result["correctness"])
    assert all(row["seconds"] > 0 and row["host_seconds"] > 0 and row["bytes_per_element"] > 0 for row in result["rows"])
    variants = result["launch_variants"]  # each (num_warps, block) of the Triton step, at both densities
    assert len(variants) == 6 and all(row["seconds"] > 0 and row["same_params_as_first"] for row in variants), variants
    log = (tmp_path / "gpu_run.log").read_text()
    assert "copy bandwidth" in log and "wrote" in log and "gpu_run.py exit status 0" in log
    assert "gpu tests exit status 0" in (tmp_path / "gpu_tests.log").read_text()
    assert (tmp_path / "versions.txt").read_text().strip()


def test_bytes_model_matches_perf_table():
    """The modelled bytes behind every GB/s figure: docs/PERF.md's table, and torch's AdamW
    keeping its moments in the param's dtype (a bf16 step moves 14 B, not 22)."""
    import torch

    from benchmarks.common import bytes_per_element

    assert bytes_per_element("torch_adamw_fused", torch.float32) == 28
    assert bytes_per_element("torch_adamw_foreach", torch.bfloat16) == 14
    assert bytes_per_element("masked_triton", torch.float32) == 36
    assert bytes_per_element("masked_triton", torch.float32, anchor=True) == 40
    assert bytes_per_element("masked_triton", torch.float32, anchor=True, pull=True) == 44
    assert bytes_per_element("masked_triton", torch.float32, importance_bytes=2) == 32
    assert bytes_per_element("masked_compile", torch.bfloat16, importance_bytes=2) == 26
    assert bytes_per_element("masked_triton_blocks", torch.float32, density=0.1) == 12 + 24 * 0.1
