#!/usr/bin/env bash
# The packages `tessera serve` needs that the H200 image lacks (gpu/2026-11-28: fastapi, starlette, pydantic,
# pydantic-core, uvicorn and their needs; the image's typing-extensions is too old for pydantic), as wheels for
# the image's Python 3.12 into .whl/ (git-ignored), for benchmarks/gpu_suite.sh to install there. Run here, on a
# machine with the package index; the versions are the ones CI tests with.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
    fastapi==0.165.0 starlette==1.10.0 pydantic==2.14.4 pydantic-core==2.50.5 uvicorn==0.54.0 \
    annotated-types==0.8.0 typing-inspection==0.4.5 opentelemetry-api==1.45.2 typing-extensions==4.16.0
ls .whl
