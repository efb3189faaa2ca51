#!/usr/bin/env bash
# GPU check for a session lent one CUDA device (sized for one H200; ends within 8 minutes,
# compiling included): the CUDA tests, a generate smoke test, then `calm bench` on presets M
# and XL, bf16, K = 4, concurrency 1 and 32, T = 1 and 0.5, compiled and eager side by side
# in one run per preset (--compile --eager-too: the rows alternate A B A B). Everything lands
# in one JSON file, OUT_DIR/gpu-check.json (steps with exit codes and seconds, the bench
# reports, the test summary, GPU and torch versions); the raw logs stay beside it.
#
# Usage: scripts/gpu-check.sh [OUT_DIR]     (default: $OUT, else ./gpu-check-out)
# Needs a Python ($PYTHON, default python3) with CUDA torch and calm's dependencies; the
# repository root goes on PYTHONPATH, so calm need not be installed. Each step has its own
# time limit (they sum to 460 s); a failed or timed-out step (rc 124) is recorded and the
# others still run. The inductor cache starts empty, so `warmup_s` of the compiled rows is
# the cold compile time; rerun a bench step with TORCHINDUCTOR_CACHE_DIR kept for the warm one.
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
steps="$out/steps.tsv"
: >"$steps"
failed=0

# step NAME LIMIT_S STDOUT_FILE CMD...: stdout to STDOUT_FILE, stderr to NAME.log, one line in steps.tsv.
step() {
    local name=$1 limit=$2 stdout=$3
    shift 3
    local start=$SECONDS rc
    timeout "$limit" "$@" >"$stdout" 2>"$out/$name.log"
    rc=$?
    printf '%s\t%s\t%s\n' "$name" "$rc" "$((SECONDS - start))" | tee -a "$steps"
    [[ $rc -eq 0 ]] || failed=1
}

if ! "$python" -c 'import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)'; then
    echo "gpu-check: $python has no CUDA device (torch.cuda.is_available() is false)" >&2
    exit 2
fi
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader >"$out/nvidia-smi.csv" 2>&1 || true

# The test that needs CUDA (or CALM_TEST_COMPILE=1) to run: the engine compiled with inductor gives
# the eager tokens at T = 1 and 0.5 (float32 tiny model, so T = 0.5 pools take the bf16 candidate
# path and its certificate on CUDA); and the decode step traced as one graph.
step tests 120 "$out/tests.txt" "$python" -m pytest -q -rs tests/test_bench.py::test_compiled_decode_gives_the_eager_tokens \
    tests/test_engine.py::test_the_decode_step_compiles_as_one_graph
step generate-cuda 20 "$out/generate-cuda.json" "$python" -m calm_cli generate "Hello" \
    -m tests/fixtures/official-tiny/calm -n 16 --temp 1 --seed 0 --device cuda --no-compile --json

bench=(-m calm_cli bench --K 4 --concurrency 1,32 --temp 1,0.5 -p 128 -n 64 -r 2 --device cuda --dtype bf16
       --peak-gbs 4800 --compile --eager-too --json)
step bench-M 150 "$out/bench-M.json" "$python" "${bench[@]}" --preset M
step bench-XL 170 "$out/bench-XL.json" "$python" "${bench[@]}" --preset XL

"$python" - "$out" <<'EOF'
import json, pathlib, sys

import torch

out = pathlib.Path(sys.argv[1])

def read(name):
    path = out / name
    if not path.exists() or not path.stat().st_size:
        return None
    text = path.read_text()
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text[-4000:]


steps = [dict(zip(("name", "rc", "seconds"), line.split("\t"))) for line in (out / "steps.tsv").read_text().splitlines()]
report = {
    "gpu": read("nvidia-smi.csv"), "torch": torch.__version__, "cuda": torch.version.cuda,
    "steps": [{"name": s["name"], "rc": int(s["rc"]), "seconds": int(s["seconds"])} for s in steps],
    "tests": read("tests.txt"), "generate": read("generate-cuda.json"),
    "bench": {"M": read("bench-M.json"), "XL": read("bench-XL.json")},
}
(out / "gpu-check.json").write_text(json.dumps(report, indent=1))
EOF
echo "report: $out/gpu-check.json" >&2
exit $failed
