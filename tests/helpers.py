"""Running the real `calm` entry point in a subprocess."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path


def calm_command() -> list[str]:
    script = Path(sys.executable).parent / "calm"
    if script.exists():
        return [str(script)]
    found = shutil.which("calm")
    return [found] if found else [sys.executable, "-m", "calm_cli"]


def run_calm(*args: str, input: str | None = None, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "NO_COLOR": "1", "COLUMNS": "200", **(env or {})}
    return subprocess.run(
        calm_command() + list(args), input=input if input is not None else "", capture_output=True, text=True,
        env=full_env, timeout=timeout,
    )


def decode_all(engine, prompts: list[list[int]], settings) -> list[list[int]]:
    """Submit every prompt to `engine` (one settings, or one per prompt) and step it until all are done."""
    per_row = settings if isinstance(settings, list) else [settings] * len(prompts)
    requests = [engine.submit(p, s) for p, s in zip(prompts, per_row)]
    for _ in engine.run():
        pass
    return [r.tokens for r in requests]
