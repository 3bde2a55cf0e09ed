#!/usr/bin/env bash
# One GPU check, on a bare lent GPU machine (torch 2.11, triton 3.6, Python 3.12, no package registry):
# install, build pfedmoap._C with CUDA, run the CUDA tests and the kernel benchmarks, write everything to OUT.
#
#   here:   bash profiling/fetch_wheels.sh          # once: wheels the machine lacks, into .whl/
#   there:  bash profiling/gpu_check.sh "$OUT"      # from the repo root, with .whl carried
#
# Every step is logged to OUT/<step>.log and summarised in OUT/summary.txt; a failing step does not stop the
# later ones. Each step has its own time limit; together they stay under 9.5 minutes (570 s), so a device
# call with timeout_s=600 always returns OUT, and a normal run should take about 5 minutes.
set -uo pipefail
OUT=${1:?usage: profiling/gpu_check.sh OUT_DIR}
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PFEDMOAP_CACHE=/tmp/pfedmoap-cache
PY=${PYTHON:-python3}
START=$(date +%s)

step() {  # step NAME LIMIT_SECONDS COMMAND...: run, log, record status and seconds
    local name=$1 limit=$2
    shift 2
    local t0=$(date +%s)
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    printf '%-14s rc=%-3s %4ss  (%s)\n' "$name" "$rc" "$(($(date +%s) - t0))" "$*" | tee -a "$OUT/summary.txt"
    return $rc
}

{
    date -u
    nvidia-smi
    command -v nvcc && nvcc --version
    "$PY" - <<'EOF'
import sys, torch
print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda)
try:
    import triton; print("triton", triton.__version__)
except ImportError as exc:
    print("triton missing:", exc)
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "SMs", p.multi_processor_count, "memory GiB", round(p.total_memory / 2**30, 1))
EOF
    git log -1 --format='commit %H %s' 2>/dev/null
} >"$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

# the pure-Python packages the image lacks (open_clip_torch, ftfy, wcwidth, nvtx), carried as wheels
if ls .whl/*.whl >/dev/null 2>&1; then
    step wheels 30 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site .whl/*.whl
    export PYTHONPATH=/tmp/site${PYTHONPATH:+:$PYTHONPATH}
else
    echo "no .whl/ carried: run profiling/fetch_wheels.sh here and carry .whl" | tee -a "$OUT/summary.txt"
fi

# the extension, built in place (the tests import the source tree), CUDA required, for this GPU only
export PFEDMOAP_CUDA=1 MAX_JOBS=${MAX_JOBS:-16}
export TORCH_CUDA_ARCH_LIST=${TORCH_CUDA_ARCH_LIST:-$("$PY" -c \
    'import torch; print("%d.%d" % torch.cuda.get_device_capability())' 2>/dev/null || echo 9.0)}
step build 150 "$PY" setup.py build_ext --inplace
"$PY" -c 'import pfedmoap._C as c; print("pfedmoap._C cuda_built =", c.cuda_built())' 2>&1 | tee -a "$OUT/summary.txt"

# the CUDA tests, then the op equivalence tests (fused vs reference) and an end-to-end --fused run
step test-cuda 90 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/ --junitxml="$OUT/test-cuda.xml"
step test-ops 90 "$PY" -m pytest -q -p no:cacheprovider tests/test_fused_gate.py tests/test_extension.py \
    tests/test_fused_run.py --junitxml="$OUT/test-ops.xml"
tail -n 3 "$OUT/test-cuda.log" "$OUT/test-ops.log" | tee -a "$OUT/summary.txt"

# benchmarks: the ops first (cheap), then the client round at paper shapes and the efficiency ratio
step bench-ops 90 "$PY" profiling/bench.py gate knn bytes --size full --json "$OUT/bench-ops.json" \
    --markdown "$OUT/bench-ops.md"
step bench-round 120 "$PY" profiling/bench.py round efficiency --size full --json "$OUT/bench-round.json" \
    --markdown "$OUT/bench-round.md"
cat "$OUT"/bench-*.md 2>/dev/null

echo "total $(($(date +%s) - START)) s" | tee -a "$OUT/summary.txt"
