#!/usr/bin/env bash
# Run here, before a GPU check: download into .whl/ the wheels that calm needs on the device image
# beyond what that image has (its KINDS.md: Python 3.12 with CUDA torch 2.11, typer, rich,
# safetensors, tokenizers, httpx, prometheus-client, pytest, hypothesis, scipy, no server stack).
# What is carried: the server, chat and test packages the image lacks, with everything they
# require, in the versions installed in this Python (so the set is one that pip resolved here),
# as CPython 3.12 manylinux x86-64 wheels. .whl/ is git-ignored; the device call names it in
# `carry`, and scripts/gpu-check.sh installs it there with --no-deps --no-index.
set -euo pipefail
repo_root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python="${PYTHON:-python3}"
pins=$("$python" - fastapi uvicorn sse-starlette prompt-toolkit pexpect openai <<'PY'
import re
import sys
from importlib import metadata

from packaging.requirements import Requirement

# The device's interpreter, for the markers of conditional requirements.
marker_env = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux", "os_name": "posix",
              "platform_system": "Linux", "platform_machine": "x86_64", "implementation_name": "cpython",
              "platform_python_implementation": "CPython", "extra": ""}
pins, todo = {}, list(sys.argv[1:])
while todo:
    name = re.sub(r"[-_.]+", "-", todo.pop()).lower()
    if name not in pins:
        pins[name] = metadata.version(name)
        todo += [r.name for r in map(Requirement, metadata.requires(name) or []) if r.marker is None or r.marker.evaluate(marker_env)]
print(" ".join(f"{name}=={version}" for name, version in sorted(pins.items())))
PY
)
rm -rf "$repo_root/.whl.tmp"
# shellcheck disable=SC2086
"$python" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$repo_root/.whl.tmp" $pins
rm -rf "$repo_root/.whl" && mv "$repo_root/.whl.tmp" "$repo_root/.whl"
ls "$repo_root/.whl"
du -sh "$repo_root/.whl"
