#!/usr/bin/env bash
# One GPU check, on a bare lent GPU machine (torch 2.11, triton 3.6, Python 3.12, no package registry):
# install, build pfedmoap._C with CUDA, run the CUDA tests, a smoke matrix of real runs, the paper's Flowers102 run
# at full shape, and the kernel benchmarks; write everything to OUT.
#
#   here:   bash profiling/fetch_wheels.sh          # once: wheels the machine lacks, into .whl/
#   there:  bash profiling/gpu_check.sh "$OUT"      # from the repo root, with .whl carried
#   CI:     bash profiling/gpu_check.sh OUT --dry-run   # the same steps on CPU at smoke size (no build, no GPU)
#
# OUT must be new or empty (a non-empty OUT is refused, exit 2). Every step is logged to OUT/<step>.log and
# summarised in OUT/summary.txt; a failing step does not stop the later ones. Steps run in priority order under one
# deadline (DEADLINE_S, default 570 s, so a device call with timeout_s=600 always returns OUT): each gets its own
# limit or what is left, whichever is less, and a step with under 15 s left is skipped and said so. The exit status
# is 1 if any step failed.
set -uo pipefail
OUT=${1:?usage: profiling/gpu_check.sh OUT_DIR [--dry-run]}
DRY=0 SCALE=1
# the dry run (CI, 2 CPU cores): every limit 4x and a 30-minute deadline; the GPU run keeps 570 s
[ "${2:-}" = "--dry-run" ] && DRY=1 SCALE=4 DEADLINE_S=${DEADLINE_S:-1800}
# a second check into one OUT would mix two machines' results and every smoke run would refuse its directory
if [ -n "$(ls -A "$OUT" 2>/dev/null)" ]; then
    echo "gpu_check: error: OUT='$OUT' is not empty (it holds an earlier check); choose a new OUT directory" >&2
    exit 2
fi
mkdir -p "$OUT"
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 PFEDMOAP_CACHE=/tmp/pfedmoap-cache
PY=${PYTHON:-python3}
START=$(date +%s)
DEADLINE=$((START + ${DEADLINE_S:-570}))
FAILED=0

step() {  # step NAME LIMIT_SECONDS COMMAND...: run under min(limit, time left), log, record status and seconds
    local name=$1 limit=$2
    shift 2
    local left=$((DEADLINE - $(date +%s)))
    if [ "$left" -lt 15 ]; then
        printf '%-14s skipped: %ss left before the deadline  (%s)\n' "$name" "$left" "$*" | tee -a "$OUT/summary.txt"
        FAILED=1
        return 124
    fi
    limit=$((limit * SCALE))
    [ "$limit" -gt "$left" ] && limit=$left
    local t0=$(date +%s)
    timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
    local rc=$?
    [ "$rc" -ne 0 ] && FAILED=1
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

if [ "$DRY" = 1 ]; then
    echo "dry run: CPU, smoke sizes, the installed pfedmoap (no wheels, no build)" | tee -a "$OUT/summary.txt"
    DEVICE=cpu SIZE=smoke JOBS=1
else
    DEVICE=cuda SIZE=full JOBS=6
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
fi

# the CUDA tests first (CUDA graphs replay = eager, the kernels at paper shapes, the extension): they skip on CPU
step test-cuda 120 "$PY" -m pytest -q -p no:cacheprovider -m cuda tests/ --junitxml="$OUT/test-cuda.xml"
tail -n 3 "$OUT/test-cuda.log" | tee -a "$OUT/summary.txt"

# real CLI runs on the tiny model, every method and switch, each checked for exit 0 and finite accuracy
step smoke 150 "$PY" profiling/cuda_smoke.py --device "$DEVICE" --out "$OUT/smoke" --jobs "$JOBS"
tail -n 1 "$OUT/smoke.log" | tee -a "$OUT/summary.txt"

# the paper's Flowers102 run at full shape: sequential / parallel, fp32 / bf16, CUDA graphs; wall time and phases
step paper-run 200 "$PY" profiling/paper_run.py --size "$SIZE" --device "$DEVICE" --json "$OUT/paper-run.json" \
    --markdown "$OUT/paper-run.md"

# per training step at the same shape, path by path (sequential, lock step, + --fused: the client-axis kernels,
# + bf16, + CUDA graphs, + --compile): dispatched ops, GPU kernels, wall time
step step-profile 150 "$PY" profiling/step_profile.py --size "$SIZE" --device "$DEVICE" \
    --json "$OUT/step-profile.json" --markdown "$OUT/step-profile.md"

# the op equivalence tests (fused vs reference, the client axis, the fused lock step) and an end-to-end --fused run
# (CI runs them on CPU already)
[ "$DRY" = 0 ] && step test-ops 60 "$PY" -m pytest -q -p no:cacheprovider tests/test_fused_gate.py tests/test_extension.py \
    tests/test_fused_run.py tests/test_graphs.py tests/test_precision.py tests/test_parallel.py tests/test_compile.py \
    --junitxml="$OUT/test-ops.xml"
[ "$DRY" = 0 ] && tail -n 3 "$OUT/test-ops.log" | tee -a "$OUT/summary.txt"

# benchmarks: the ops first (cheap), then client-parallel training and the client round at paper shapes
BENCH_SIZE=$SIZE
[ "$DRY" = 1 ] && BENCH_SIZE=smoke
step bench-ops 60 "$PY" -m profiling.bench gate knn bytes --size "$BENCH_SIZE" --device "$DEVICE" \
    --json "$OUT/bench-ops.json" --markdown "$OUT/bench-ops.md"
step bench-round 90 "$PY" -m profiling.bench parallel round --fused --size "$BENCH_SIZE" --device "$DEVICE" \
    --no-accuracy-round --json "$OUT/bench-round.json" --markdown "$OUT/bench-round.md"
cat "$OUT"/paper-run.md "$OUT"/step-profile.md "$OUT"/smoke/smoke.md "$OUT"/bench-*.md 2>/dev/null

echo "total $(($(date +%s) - START)) s" | tee -a "$OUT/summary.txt"
exit $FAILED
