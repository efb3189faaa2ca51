#!/usr/bin/env bash
# GPU check for a session lent one CUDA device (sized for an H200; ends within 8 minutes):
# the CUDA tests, then `calm bench` on presets M and XL with compile off and on, batch 1
# and 32, T = 1, bf16, one JSON report per run.
#
# Usage: scripts/gpu-check.sh [OUT_DIR]     (default: $OUT, else ./gpu-check-out)
# Needs a Python ($PYTHON, default python3) with CUDA torch and calm's dependencies; the
# repository root goes on PYTHONPATH, so calm need not be installed. Each step has its own
# time limit (the sum stays under 8 minutes); a failed or timed-out step (rc 124) is noted in
# OUT_DIR/summary.txt and the others still run. Rerun a timed-out compile step alone with
# a larger limit: compiling XL dominates.
set -uo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-${OUT:-$repo_root/gpu-check-out}}"
python="${PYTHON:-python3}"
mkdir -p "$out"
out="$(cd "$out" && pwd)"
cd "$repo_root"
export PYTHONPATH="$repo_root${PYTHONPATH:+:$PYTHONPATH}"
export TORCHINDUCTOR_CACHE_DIR="$(mktemp -d "${TMPDIR:-/tmp}/calm-inductor.XXXXXX")"
trap 'rm -rf "$TORCHINDUCTOR_CACHE_DIR"' EXIT
summary="$out/summary.txt"
: >"$summary"
failed=0

# step NAME LIMIT_S STDOUT_FILE CMD...: stdout to STDOUT_FILE, stderr to NAME.log, one line in the summary.
step() {
    local name=$1 limit=$2 stdout=$3
    shift 3
    local start=$SECONDS rc
    timeout "$limit" "$@" >"$stdout" 2>"$out/$name.log"
    rc=$?
    echo "$name rc=$rc $((SECONDS - start))s" | tee -a "$summary"
    [[ $rc -eq 0 ]] || failed=1
}

if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu-check: $python has no CUDA device (torch.cuda.is_available() is false)" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv >"$out/nvidia-smi.csv" 2>&1 || true
"$python" -c 'import torch; print(torch.__version__, torch.version.cuda, torch.cuda.get_device_name())' >"$out/torch.txt" 2>&1

# The CUDA tests: compiled against eager decoding (skipped on CPU), and bench end to end.
step tests 90 "$out/tests.txt" "$python" -m pytest -q tests/test_bench.py -rs
step generate-cuda 20 "$out/generate-cuda.json" "$python" -m calm_cli generate "Hello" \
    -m tests/fixtures/official-tiny/calm -n 16 --temp 1 --seed 0 --device cuda --no-compile --json

bench=(-m calm_cli bench --K 4 -b 1,32 -p 128 -n 128 -r 3 --temp 1 --device cuda --dtype bf16 --peak-gbs 4800 --json)
step bench-M-eager 40 "$out/bench-M-eager.json" "$python" "${bench[@]}" --preset M --no-compile
step bench-XL-eager 50 "$out/bench-XL-eager.json" "$python" "${bench[@]}" --preset XL --no-compile
step bench-M-compile 130 "$out/bench-M-compile.json" "$python" "${bench[@]}" --preset M --compile
step bench-XL-compile 140 "$out/bench-XL-compile.json" "$python" "${bench[@]}" --preset XL --compile

echo "reports in $out" | tee -a "$summary"
exit $failed
