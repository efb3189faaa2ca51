#!/usr/bin/env bash
# The GPU check, for a session lent one CUDA device (sized for one H200: about 7 minutes with the
# default budget of 420 s for the steps). It runs on the device image as it is: that image's
# python3 and CUDA torch, with calm's missing pure-Python dependencies carried as wheels in .whl/
# (made here, beforehand, by scripts/gpu-wheels.sh) and installed into /tmp/site without pip
# resolving anything; the repository goes on PYTHONPATH, so calm is not installed either.
#
# Usage:  scripts/gpu-check.sh [--dry-run] [--budget S] [--only STEP,...] [OUT_DIR]
#         (OUT_DIR default: $OUT, else ./gpu-check-out)
# Steps and report: scripts/gpu_check.py. OUT_DIR/gpu-check.json is rewritten after every step,
# so it exists whatever ends the run. --dry-run: the same steps on the CPU (CI runs it).
set -uo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
args=() out=""
while [[ $# -gt 0 ]]; do
    case $1 in
        --dry-run) args+=("$1"); shift ;;
        --budget|--only) args+=("$1" "$2"); shift 2 ;;
        -*) echo "gpu-check: unknown option $1" >&2; exit 2 ;;
        *) out=$1; shift ;;
    esac
done
out="${out:-${OUT:-$repo_root/gpu-check-out}}"
mkdir -p "$out"

# Carried wheels, if any: installed into a folder of their own that comes first on PYTHONPATH, so a carried
# package (anyio, httpx2, typing-extensions...) wins over the image's copy; the image's own folders stay untouched.
shopt -s nullglob
wheels=("$repo_root"/.whl/*.whl)
if [[ ${#wheels[@]} -gt 0 && " ${args[*]-} " != *" --dry-run "* ]]; then
    site="${TMPDIR:-/tmp}/calm-site"
    "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" "${wheels[@]}" \
        >"$out/wheels.log" 2>&1 || { echo "gpu-check: installing the carried wheels failed (see $out/wheels.log)" >&2; }
    export PYTHONPATH="$site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$repo_root${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
# A cold inductor cache, so the compiled rows' warmup_s is the cold compile time.
export TORCHINDUCTOR_CACHE_DIR="$(mktemp -d "${TMPDIR:-/tmp}/calm-inductor.XXXXXX")"
trap 'rm -rf "$TORCHINDUCTOR_CACHE_DIR"' EXIT
"$python" "$repo_root/scripts/gpu_check.py" --python "$python" "${args[@]}" "$out"
