#!/usr/bin/env bash
# Everything that needs a GPU, in one command (a device session has 30 minutes of GPU time; one call).
# Runs on the H200 image's own Python (torch 2.11, triton 3.6, no network): installs tessera without
# dependencies, runs the kernel tests compiled for the GPU (slow ones too), then the kernel and whole-model
# benchmarks and the serving sweep. Results land in benchmarks/results/<gpu>_*.{json,md} and, when $OUT is set, are copied there.
set -euo pipefail
export PYTHONUNBUFFERED=1
python3 -m pip install -q --no-deps --no-build-isolation -e .
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.mem --format=csv
python3 -m pytest -q -p no:cacheprovider tests/test_kernels.py tests/test_attention_kernels.py \
    tests/test_kernel_dispatch.py tests/test_paged_attention.py
python3 -m pytest -q -p no:cacheprovider tests/test_engine.py -k cuda_graph
python3 -m tessera.cli bench kernels --device cuda
python3 -m tessera.cli bench model --device cuda
python3 -m tessera.cli bench fusion --device cuda
python3 -m tessera.cli bench serving --device cuda
if [[ -n "${OUT:-}" ]]; then  # $OUT returns at most 8 files: the GPU's results go back as one archive
    find benchmarks/results -type f ! -name 'cpu_*' -print0 | tar czf "$OUT/gpu_results.tar.gz" --null -T -
fi
