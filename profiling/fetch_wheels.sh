#!/usr/bin/env bash
# Download, on a machine with a package registry, the wheels the lent GPU machine lacks (it has torch 2.11,
# triton 3.6, numpy, pytest, timm, huggingface_hub, regex, safetensors on Python 3.12 and no registry).
# They go to .whl/ (git-ignored); the device call carries .whl and profiling/gpu_check.sh installs them.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
rm -f .whl/*.whl
python3 -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl \
    'open_clip_torch==3.3.0' 'ftfy==6.3.1' 'wcwidth==0.2.13' 'nvtx==0.2.17'
ls -la .whl
du -sh .whl
