"""Smoke tests of examples/: the Hugging Face fine-tuning script at toy size, in-process."""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def load(name: str):
    spec = importlib.util.spec_from_file_location(f"examples_{name}", EXAMPLES / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_hf_finetune_toy(tmp_path):
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    example = load("hf_finetune")
    results = example.main([
        "--device", "cpu", "--pretrain-steps", "3", "--steps", "3", "--batch-size", "4", "--seq-len", "16",
        "--width", "32", "--examples", "32", "--calibration-batches", "2", "--eval-batches", "1",
        "--density", "0.1", "--output-dir", str(tmp_path),
    ])
    assert set(results) == {"old_before", "new_before", "old_after", "new_after", "realised_density"}
    assert all(math.isfinite(v) for v in results.values())
    assert abs(results["realised_density"] - 0.1) < 0.03  # the masked optimizer took the fine-tuning steps


@pytest.mark.slow
def test_fsdp2_example_two_ranks_and_dcp_resume(tmp_path):
    """torchrun, 2 CPU ranks on gloo: a run that saves after task A, and a second that resumes
    from the DCP checkpoint, end with the same losses (printed to 4 digits)."""
    import os
    import subprocess
    import sys

    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch built without distributed")
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
               str(EXAMPLES / "fsdp2_train.py"), "--steps", "6", "--log-every", "100",
               "--checkpoint-dir", str(tmp_path / "ckpt")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    lines = []
    for _ in range(2):
        done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
        assert done.returncode == 0, done.stderr[-3000:]
        lines.append(done.stdout.strip().splitlines()[-1])
    assert lines[1] == "(resumed) " + lines[0], lines
    realised = float(lines[0].split("realised_density ")[1])
    assert abs(realised - 0.3) < 0.05


def test_hf_finetune_resumes_its_own_fine_tuning_not_the_baselines(tmp_path):
    """Each run (pretrain, fine-tune, baseline) checkpoints into its own subdirectory, so a
    resume from the fine-tuning's checkpoint ends where the uninterrupted fine-tuning did."""
    pytest.importorskip("transformers")
    pytest.importorskip("accelerate")
    example = load("hf_finetune")
    common = ["--device", "cpu", "--pretrain-steps", "2", "--steps", "4", "--batch-size", "4", "--seq-len", "16",
              "--width", "32", "--examples", "32", "--calibration-batches", "2", "--eval-batches", "1",
              "--density", "0.1"]
    whole = example.main(common + ["--output-dir", str(tmp_path / "a"), "--save-steps", "2", "--baseline"])
    assert {p.name for p in (tmp_path / "a").iterdir()} == set(example.RUNS)
    resumed = example.main(common + ["--output-dir", str(tmp_path / "b"),
                                     "--resume", str(tmp_path / "a" / "fine-tune" / "checkpoint-2")])
    for key in ("old_after", "new_after", "realised_density"):
        assert resumed[key] == whole[key], key
