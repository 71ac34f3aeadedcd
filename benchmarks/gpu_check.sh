#!/usr/bin/env bash
# The GPU check: one command on a CUDA machine with nothing installed, under 8 minutes.
#
#   bash benchmarks/gpu_check.sh            # writes benchmarks/results/gpu_check/*
#
# 1. installs ofstitch with the CUDA extra that matches the driver (cuda12 or cuda13)
#    into its own virtual environment (.venv-gpu);
# 2. runs the array tests with CuPy required (OFSTITCH_REQUIRE_CUPY=1: a CuPy that does
#    not work fails the run instead of skipping): every kernel, the streaming
#    correlation, the full-resolution refinement, the local search, the backends and
#    the registration core, on numpy, array-api-strict
#    and CuPy;
# 3. generates a MIST-sized scan (2,478 tiles of 1392x1040, 10% overlap) on this machine
#    and registers it with --device cuda: time, peak GPU memory (CuPy's pool) and
#    accuracy go to gpu_registration.json (MIST's anchor: 49.7 s; the target: 10 s).
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-benchmarks/results/gpu_check}
mkdir -p "$out"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader | tee "$out/gpu.txt"
cuda=$(nvidia-smi | sed -n 's/.*CUDA Version: *\([0-9]*\).*/\1/p' | head -n 1)
extra=cuda12
if [ "${cuda:-12}" -ge 13 ]; then extra=cuda13; fi
python3 -m venv .venv-gpu
. .venv-gpu/bin/activate
python -m pip install -q --upgrade pip
pip install -q -e ".[test,$extra]"
ofstitch devices | tee "$out/devices.txt"
OFSTITCH_REQUIRE_CUPY=1 python -m pytest -q -p no:cacheprovider \
    tests/test_kernels.py tests/test_stream.py tests/test_backends.py tests/test_registration.py \
    tests/test_refine.py tests/test_local_search.py \
    2>&1 | tee "$out/tests.txt" | tail -n 15
python benchmarks/gpu_registration.py --device cuda --work "${WORK:-/tmp/ofstitch-mist-grid}" \
    --out "$out/gpu_registration.json"
