#!/usr/bin/env bash
# Profile a preset under Nsight Systems with the library's NVTX ranges, then print a per-range time summary.
#
#   profiling/nsys_round.sh [PRESET] [train flags...]        # e.g. profiling/nsys_round.sh cifar10 --fused
#   profiling/nsys_round.sh --torch [PRESET] [train flags...] # torch.profiler instead: no nsys needed, works on CPU
#
# Environment: NSYS (the nsys binary, default: nsys on PATH), PYTHON (default: python), ROUNDS (default: 1),
# OUT (output folder, default: runs/profile-PRESET-TIME). The run itself goes to OUT/run; the report to
# OUT/profile.nsys-rep (open it in the Nsight Systems GUI) or OUT/trace.json (chrome://tracing, Perfetto).
set -euo pipefail

mode=nsys
if [[ "${1:-}" == "--torch" ]]; then
    mode=torch
    shift
fi
if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,9p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi
preset="synthetic"
if [[ $# -gt 0 && "${1:0:1}" != "-" ]]; then
    preset="$1"
    shift
fi
NSYS="${NSYS:-nsys}"
PYTHON="${PYTHON:-python}"
ROUNDS="${ROUNDS:-1}"

if [[ "$mode" == nsys ]] && ! command -v "$NSYS" >/dev/null 2>&1; then
    # builtins only: this must work on a bare PATH
    {
        printf '%s\n' "nsys_round.sh: error: '$NSYS' not found: Nsight Systems (nsys) is needed for NVTX profiling."
        printf '%s\n' "  Get it: the CUDA toolkit ships it (/usr/local/cuda/bin/nsys, /opt/nvidia/nsight-systems/*/bin/nsys),"
        printf '%s\n' "  or install NVIDIA Nsight Systems: https://developer.nvidia.com/nsight-systems (Debian/Ubuntu with"
        printf '%s\n' "  NVIDIA's CUDA repository: apt-get install nsight-systems-cli). Set NSYS=/path/to/nsys if not on PATH."
        printf '%s\n' "  Without nsys (or without a GPU) the torch profiler records the same ranges, on the CPU too:"
        printf '%s\n' "    profiling/nsys_round.sh --torch $preset"
        printf '%s\n' "    python -m pfedmoap.train --preset $preset --rounds 1 --profile trace.json"
    } >&2
    exit 3
fi

OUT="${OUT:-runs/profile-${preset}-$(date +%Y%m%d-%H%M%S)}"
mkdir -p "$OUT"
train=("$PYTHON" -m pfedmoap.train --preset "$preset" --rounds "$ROUNDS" --no-progress --out "$OUT/run" "$@")

if [[ "$mode" == torch ]]; then
    echo "torch.profiler: ${train[*]} --profile $OUT/trace.json" >&2
    "${train[@]}" --profile "$OUT/trace.json"
    exit $?
fi

traces="nvtx,osrt"
if "$PYTHON" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    traces="cuda,nvtx,osrt"
fi
echo "nsys: ${train[*]} --nvtx (trace: $traces)" >&2
PFEDMOAP_NVTX=1 "$NSYS" profile --trace="$traces" --sample=none --cpuctxsw=none --force-overwrite=true \
    --output "$OUT/profile" "${train[@]}" --nvtx
report="$OUT/profile.nsys-rep"
[[ -f "$report" ]] || report="$OUT/profile.qdrep"  # nsys before 2021.4

echo
echo "== time per NVTX range (CPU side; ranges nest: a range's time includes its children) =="
# the report is called nvtx_sum in current nsys, nvtxsum in older ones
"$NSYS" stats --report nvtx_sum --format table "$report" 2>/dev/null \
    || "$NSYS" stats --report nvtxsum --format table "$report"
if [[ "$traces" == cuda* ]]; then
    echo
    echo "== GPU time projected onto NVTX ranges =="
    "$NSYS" stats --report nvtx_gpu_proj_sum --format table "$report" 2>/dev/null \
        || echo "(this nsys has no nvtx_gpu_proj_sum report)"
fi
echo
echo "report: $report" >&2
