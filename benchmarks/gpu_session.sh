#!/usr/bin/env bash
# The one prepared call for a lent GPU machine (torch and triton preinstalled, no network,
# install nothing), from the repository root:
#
#   bash benchmarks/gpu_session.sh OUTDIR [extra gpu_run.py arguments]
#
# Writes into OUTDIR: versions.txt, nvidia-smi.txt, results.json + gpu_run.log (the correctness
# check and the benchmark matrix; results.json is rewritten after every case) and
# gpu_tests.log (tests/test_triton_gpu.py compiled for the device, when pytest is installed).
# Each part has its own timeout so that the whole call stays under ~10 minutes.
set -u
out=${1:?usage: bash benchmarks/gpu_session.sh OUTDIR [gpu_run.py arguments]}
shift
py=${PYTHON:-python3}
mkdir -p "$out"
export PYTHONPATH=. TRITON_INTERPRET=${TRITON_INTERPRET:-0}
(nvidia-smi || true) > "$out/nvidia-smi.txt" 2>&1
"$py" -c "import platform, torch, triton; print(platform.python_version(), torch.__version__, triton.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA')" 2>&1 | tee "$out/versions.txt"
timeout "${GPU_RUN_TIMEOUT:-420}" "$py" benchmarks/gpu_run.py "$out" "$@" > "$out/gpu_run.log" 2>&1
echo "gpu_run.py exit status $?" | tee -a "$out/gpu_run.log"
tail -n 60 "$out/gpu_run.log"
if "$py" -c "import pytest" 2>/dev/null; then
    timeout "${GPU_TESTS_TIMEOUT:-120}" "$py" -m pytest -q -m gpu -p no:cacheprovider tests/test_triton_gpu.py > "$out/gpu_tests.log" 2>&1
    echo "gpu tests exit status $?" | tee -a "$out/gpu_tests.log"
    tail -n 15 "$out/gpu_tests.log"
else
    echo "pytest is not installed here: tests/test_triton_gpu.py not run" | tee "$out/gpu_tests.log"
fi
