"""scripts/gpu-check.sh: its dry run on the CPU, and a report that survives failures, time-outs and signals."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("gpu_check", REPO / "scripts" / "gpu_check.py")
gpu_check = sys.modules["gpu_check"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_check)


def test_the_dry_run_runs_every_step_and_reports_each(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHON": sys.executable}
    r = subprocess.run(["bash", str(REPO / "scripts" / "gpu-check.sh"), "--dry-run", str(tmp_path)],
                       capture_output=True, text=True, env=env, timeout=600)
    report = json.loads((tmp_path / "gpu-check.json").read_text())
    failed = [(s["name"], s["status"], s["stderr_tail"][-800:]) for s in report["steps"] if s["status"] != "ok"]
    assert r.returncode == 0 and not failed, (r.stderr, failed)
    names = [s["name"] for s in report["steps"]]
    assert names[:5] == ["versions", "generate", "generate-float32-T0.5", "cuda-tests", "candidate-memory"]
    assert "bench-tiny-eager" in names and "bench-tiny-compiled" in names
    steps = {s["name"]: s for s in report["steps"]}
    assert steps["versions"]["json"]["torch"] and "c_compiler" in steps["versions"]["json"]
    assert all("--debug" in s["command"] for s in report["steps"] if "-m calm_cli" in s["command"])
    bench = steps["bench-tiny-compiled"]["json"]
    assert bench["rows"] and all(row["compile"] for row in bench["rows"])
    assert steps["generate"]["json"]["completion_tokens"] > 0
    memory = {line["mode"]: line for line in steps["candidate-memory"]["json"] if "mode" in line}
    assert set(memory) == {"whole", "sliced"} and all("peak_mb_above_start" in m for m in memory.values())
    assert report["finished"] and report["dry_run"] is True


def _step(name: str, code: str, limit: int = 30) -> gpu_check.Step:
    return gpu_check.Step(name, [sys.executable, "-c", code], limit)


def test_a_failed_or_timed_out_step_is_recorded_and_the_next_still_runs(tmp_path: Path) -> None:
    plan = [
        _step("fails", "import sys; print('boom', file=sys.stderr); sys.exit(3)"),
        _step("hangs", "import time; time.sleep(60)", limit=2),
        _step("works", "print('{\"x\": 1}')"),
    ]
    report = gpu_check.run_plan(plan, tmp_path, budget_s=60)
    status = {s["name"]: (s["status"], s["rc"]) for s in report["steps"]}
    assert status == {"fails": ("failed", 3), "hangs": ("timeout", 124), "works": ("ok", 0)}
    steps = {s["name"]: s for s in report["steps"]}
    assert "boom" in steps["fails"]["stderr_tail"] and steps["works"]["json"] == {"x": 1}
    assert json.loads((tmp_path / "gpu-check.json").read_text()) == report


def test_steps_past_the_budget_are_skipped_not_lost(tmp_path: Path) -> None:
    plan = [_step("long", "import time; time.sleep(60)", limit=60), _step("after", "print(1)")]
    report = gpu_check.run_plan(plan, tmp_path, budget_s=gpu_check.MIN_STEP_S + 3)
    assert [(s["name"], s["status"]) for s in report["steps"]] == [("long", "timeout"), ("after", "skipped")]


def test_a_signal_mid_step_leaves_a_report_of_what_ran(tmp_path: Path) -> None:
    script = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("g", {str(REPO / "scripts" / "gpu_check.py")!r})
g = sys.modules["g"] = importlib.util.module_from_spec(spec); spec.loader.exec_module(g)
plan = [g.Step("quick", [sys.executable, "-c", "print(1)"], 30), g.Step("slow", [sys.executable, "-c", "import time; time.sleep(120)"], 120)]
g.run_plan(plan, __import__("pathlib").Path({str(tmp_path)!r}), 300)
"""
    proc = subprocess.Popen([sys.executable, "-c", script])
    path = tmp_path / "gpu-check.json"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if path.exists() and json.loads(path.read_text())["steps"][1]["status"] == "running":
            break
        time.sleep(0.1)
    else:
        pytest.fail("the slow step never started")
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
    report = json.loads(path.read_text())
    assert report["interrupted"] == "SIGTERM" and report["finished"] is None
    assert [s["status"] for s in report["steps"]] == ["ok", "running"]
