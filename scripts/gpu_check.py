"""The GPU check's steps, run one by one under a time budget, with the report rewritten after each.

Called by scripts/gpu-check.sh, which puts the carried wheels and the repository on
PYTHONPATH first. Each step is one subprocess under `timeout -k`, its stdout and stderr in
OUT/<step>.out and OUT/<step>.log; OUT/gpu-check.json is rewritten (atomically) after every
step and on SIGTERM/SIGINT, so whatever ends the run, the steps done so far are on disk with
their exit code, status, seconds and the tail of their logs. Steps run in order of value:
when the budget runs short the later ones are recorded as skipped, never lost silently.

`--dry-run` runs the same steps and writes the same report on the CPU with the tiny preset,
torch.compile tracing without code generation ($CALM_COMPILE_BACKEND=aot_eager) and the CUDA tests collected but skipped:
CI runs it (tests/test_gpu_check.py) so the orchestration cannot rot between GPU sessions.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TAIL_CHARS = 3000
KILL_AFTER_S = 10  # timeout -k: SIGKILL this long after the SIGTERM of a step that ran past its limit
MIN_STEP_S = 15  # a step is skipped rather than started with less than this left in the budget

VERSIONS = r"""
import json, platform, shutil, subprocess, sys
from importlib import metadata
out = {"python": sys.version.split()[0], "platform": platform.platform()}
for name in ("torch", "triton", "typer", "rich", "safetensors", "tokenizers", "fastapi", "starlette", "pydantic",
             "uvicorn", "sse-starlette", "prompt-toolkit", "pexpect", "httpx", "openai", "pytest", "hypothesis", "scipy"):
    try:
        out[name] = metadata.version(name)
    except metadata.PackageNotFoundError:
        out[name] = None
out["c_compiler"] = {cc: shutil.which(cc) for cc in ("cc", "gcc", "clang")}
try:
    out["nvidia_smi"] = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm,clocks.max.mem", "--format=csv,noheader"],
        capture_output=True, text=True, timeout=20).stdout.strip()
except (OSError, subprocess.SubprocessError) as exc:
    out["nvidia_smi"] = f"unavailable: {exc}"
import torch
out["torch_cuda"] = torch.version.cuda
out["cuda_available"] = torch.cuda.is_available()
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    out["device"] = {"name": p.name, "capability": list(torch.cuda.get_device_capability(0)),
                     "memory_gib": round(p.total_memory / 2**30, 1), "multiprocessors": p.multi_processor_count}
import calm_cli
out["calm_cli"] = calm_cli.__file__
print(json.dumps(out))
"""


@dataclass
class Step:
    name: str
    argv: list[str]
    limit_s: int
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Result:
    name: str
    status: str  # ok, failed, timeout, skipped, interrupted
    rc: int | None
    seconds: float
    limit_s: int
    command: str
    stdout_tail: str = ""
    stderr_tail: str = ""
    json: object = None  # the step's stdout, parsed, where it is JSON


def steps(dry_run: bool, python: str) -> list[Step]:
    """What the check runs, most valuable first: versions, smoke runs, the CUDA tests, memory, then each preset eager and compiled."""
    calm = [python, "-m", "calm_cli", "--debug"]
    device = "cpu" if dry_run else "cuda"
    tiny = str(REPO / "tests" / "fixtures" / "official-tiny" / "calm")
    shapes = ["-p", "16", "-n", "8", "-r", "1", "-c", "1,2"] if dry_run else ["-p", "128", "-n", "64", "-r", "2", "-c", "1,64"]
    bench = calm + ["bench", "--K", "4", "-t", "1,0.5", *shapes, "--device", device, "--peak-gbs", "4800", "--json"]
    if not dry_run:
        bench += ["--dtype", "bf16"]
    presets = ["tiny"] if dry_run else ["M", "XL"]
    traced = {"CALM_COMPILE_BACKEND": "aot_eager"} if dry_run else {}  # inductor's C++ build takes minutes on a CPU
    tests = [python, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "-m", "cuda", str(REPO / "tests")]
    out = [
        Step("versions", [python, "-c", VERSIONS], 60),
        Step("generate", calm + ["generate", "Hello", "-m", tiny, "-n", "16", "--temp", "1", "--seed", "0",
                                 "--device", device, "--json"], 60),
        Step("generate-float32-T0.5", calm + ["generate", "Hello", "-m", tiny, "-n", "16", "--temp", "0.5", "--seed", "0",
                                              "--device", device, "--dtype", "float32", "--json"], 60),
        Step("cuda-tests", tests + ([] if dry_run else ["--cuda"]), 300),
        Step("candidate-memory", [python, str(REPO / "benchmarks" / "candidate_memory.py"), "--device", device]
             + (["--preset", "tiny", "--slots", "2", "--samples", "16"] if dry_run else []), 90),
    ]
    for preset in presets:
        out.append(Step(f"bench-{preset}-eager", bench + ["--preset", preset, "--no-compile"], 120))
        out.append(Step(f"bench-{preset}-compiled", bench + ["--preset", preset, "--compile"], 240, traced))
    return out


def tail(path: Path) -> str:
    if not path.exists():
        return ""
    data = path.read_bytes()[-TAIL_CHARS:]
    return data.decode("utf-8", "replace")


def parse_json(path: Path) -> object:
    """A step's stdout as one JSON value, or as a list of JSON lines; None where it is neither."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError:
        return None
    try:
        return json.loads(text)
    except ValueError:
        pass
    try:
        return [json.loads(line) for line in text.splitlines() if line.strip()] or None
    except ValueError:
        return None


RUNNING: list[subprocess.Popen] = []  # the step in flight, for the signal handler to pass its signal on


def run_step(step: Step, out: Path, limit_s: int) -> Result:
    """One step under `timeout -k`; rc 124 (or 137 after the kill) is a timeout."""
    stdout, stderr = out / f"{step.name}.out", out / f"{step.name}.log"
    argv = ["timeout", "-k", str(KILL_AFTER_S), str(limit_s), *step.argv]
    start = time.monotonic()
    with stdout.open("wb") as so, stderr.open("wb") as se:
        child = subprocess.Popen(argv, stdout=so, stderr=se, env={**os.environ, **step.env}, cwd=REPO)
        RUNNING.append(child)
        try:
            rc = child.wait()
        finally:
            RUNNING.remove(child)
    seconds = round(time.monotonic() - start, 1)
    status = "ok" if rc == 0 else "timeout" if rc in (124, 137) else "failed"
    return Result(step.name, status, rc, seconds, limit_s, " ".join(step.argv), tail(stdout), tail(stderr), parse_json(stdout))


def write_report(out: Path, report: dict) -> None:
    """Write gpu-check.json under a temporary name, then rename: a reader never sees half a report."""
    path = out / "gpu-check.json"
    temp = path.with_suffix(".json.tmp")
    temp.write_text(json.dumps(report, indent=1), encoding="utf-8")
    os.replace(temp, path)


def run_plan(plan: list[Step], out: Path, budget_s: int, dry_run: bool = False) -> dict:
    """Run the steps in order within budget_s seconds; the report, also written to out/gpu-check.json after each step."""
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {
        "dry_run": dry_run, "budget_s": budget_s, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "finished": None, "interrupted": None, "timeout_cmd": shutil.which("timeout"),
        "steps": [asdict(Result(s.name, "pending", None, 0.0, s.limit_s, " ".join(s.argv))) for s in plan],
    }
    write_report(out, report)

    def interrupted(signum: int, _frame: object) -> None:
        for child in RUNNING:  # timeout(1) passes it on to its command
            child.send_signal(signal.SIGTERM)
        report["interrupted"] = signal.Signals(signum).name
        write_report(out, report)
        sys.exit(128 + signum)

    previous = {sig: signal.signal(sig, interrupted) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        deadline = time.monotonic() + budget_s
        for i, step in enumerate(plan):
            left = int(deadline - time.monotonic())
            if left < MIN_STEP_S:
                result = Result(step.name, "skipped", None, 0.0, step.limit_s, " ".join(step.argv), stderr_tail=f"budget: {left} s left")
            else:
                report["steps"][i]["status"] = "running"
                write_report(out, report)
                result = run_step(step, out, min(step.limit_s, left))
            report["steps"][i] = asdict(result)
            write_report(out, report)
            print(f"{result.name:24} {result.status:8} rc={result.rc} {result.seconds:6.1f}s", file=sys.stderr, flush=True)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    report["finished"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    write_report(out, report)
    return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("out", type=Path, help="folder for gpu-check.json and the step logs")
    parser.add_argument("--dry-run", action="store_true", help="the same steps on the CPU, tiny preset, no code generation")
    parser.add_argument("--budget", type=int, default=420, help="seconds for all steps together (default 420)")
    parser.add_argument("--only", default="", help="comma-separated step names to run (default: all)")
    parser.add_argument("--python", default=sys.executable, help="the Python that runs calm and the tests")
    args = parser.parse_args(argv)
    plan = steps(args.dry_run, args.python)
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {s.name for s in plan}
        if unknown:
            parser.error(f"unknown step(s): {', '.join(sorted(unknown))} (steps: {', '.join(s.name for s in plan)})")
        plan = [s for s in plan if s.name in wanted]
    report = run_plan(plan, args.out, args.budget, args.dry_run)
    return 0 if all(s["status"] == "ok" for s in report["steps"]) else 1


if __name__ == "__main__":
    sys.exit(main())
