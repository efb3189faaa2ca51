"""A compiled step off the request path: warm-up, the recompile bound, shutdown mid-compile, the worker's device, device failures.

Compiles use dynamo with the aot_eager backend (or a fake slow compile built on it), so
they trace the real step without inductor's C++ build, which takes minutes on 2 cores.
"""

from __future__ import annotations

import inspect
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import httpx
import pytest
import torch
from fastapi.testclient import TestClient
from helpers import calm_command, decode_all

from calm_cli import load_model
from calm_cli.runtime import device as device_module
from calm_cli.runtime.device import bind_thread, device_failure
from calm_cli.runtime.engine import SPAN_QUANTUM, CompileWatch, Engine
from calm_cli.runtime.settings import GenerationSettings
from calm_cli.serve import worker as worker_module
from calm_cli.serve.app import ServeConfig, create_app
from calm_cli.serve.worker import EngineWorker

MODEL = "tests/fixtures/official-tiny/calm"
NAME = "calm"
# `calm` with inductor's compile replaced by aot_eager after FAKE_COMPILE_S seconds: a slow compile that does no work.
SHIM = (
    "import os, sys, time\n"
    "import torch._inductor.compile_fx as fx\n"
    "from torch._dynamo import lookup_backend\n"
    "def fake(gm, example_inputs, **kw):\n"
    "    time.sleep(float(os.environ['FAKE_COMPILE_S']))\n"
    "    return lookup_backend('aot_eager')(gm, example_inputs)\n"
    "fx.compile_fx = fake\n"
    "from calm_cli.cli.main import main\n"
    "main()\n"
)


@pytest.fixture(autouse=True)
def fresh_dynamo() -> Iterator[None]:
    """Each test starts with no compiled graphs, so counts and recompile limits are its own."""
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def model():
    return load_model(MODEL)


# ---- the engine ----------------------------------------------------------------------------


def test_compile_watch_compiles_up_to_the_limit_after_seal_then_stays_eager() -> None:
    compiled = []

    def inner(graph, example_inputs):
        compiled.append(example_inputs[0].shape[0])
        return graph.forward

    def affine(x: torch.Tensor) -> torch.Tensor:
        return x * 2 + 1

    watch = CompileWatch(inner, limit=2)
    step = torch.compile(affine, fullgraph=True, dynamic=False, backend=watch)
    step(torch.ones(1))
    assert (watch.graphs, watch.recompiles) == (1, 0)
    watch.seal()
    for n in (2, 3, 4, 5):
        assert torch.equal(step(torch.ones(n)), torch.full((n,), 3.0))
    assert compiled == [1, 2, 3]  # the 4th and 5th shapes were traced but not handed to the backend
    assert (watch.graphs, watch.recompiles, watch.eager_graphs) == (3, 4, 2)
    step(torch.ones(5))
    assert watch.recompiles == 4  # a traced eager graph is cached like a compiled one


def test_warm_up_compiles_every_graph_a_run_needs(model) -> None:
    """After warm-up no batch size or span recompiles, through the grid and through real requests."""
    engine = Engine(model, max_batch=3, compile=True, compile_backend="aot_eager")
    assert engine.warm_up()
    watch = engine.compile_watch
    # Steps run on ROW_QUANTUM rows here (3 slots): one static span, the symbolic spans, the whole cache.
    assert watch.sealed and watch.graphs == 3 and watch.recompiles == 0
    spans = sorted({min(engine.context, SPAN_QUANTUM * j) for j in range(1, engine.context // SPAN_QUANTUM + 2)})
    with torch.inference_mode():
        for used in range(1, engine.max_batch + 1):
            for span in spans:
                engine._forward(torch.ones((engine._step_rows(used), engine.k), dtype=torch.long), span)
    assert watch.recompiles == 0
    # Prompts of 2, 100 and 230 steps: the span runs from 64 to the whole context while rows finish.
    prompts = [[3 + i % 400 for i in range(4 * n)] for n in (2, 100, 230)]
    settings = [GenerationSettings(max_tokens=m, temperature=0.5, num_samples=8, seed=9, ignore_eos=True) for m in (8, 120, 80)]
    eager = decode_all(Engine(model, max_batch=3), prompts, settings)
    assert decode_all(engine, prompts, settings) == eager
    assert watch.recompiles == 0


def test_every_engine_in_a_process_gets_its_own_graphs(model) -> None:
    """Engines share `Runner.step`'s code, whose graphs dynamo caps at 8: without a raise the fourth fails (fullgraph).

    The later engines need 2 graphs, not 3: dynamo already marked the span dynamic for this code.
    """
    watches = []
    for _ in range(5):
        engine = Engine(model, max_batch=3, compile=True, compile_backend="aot_eager")
        assert engine.warm_up()
        watches.append(engine.compile_watch)
    assert [w.graphs for w in watches] == [3, 2, 2, 2, 2] and not any(w.recompiles for w in watches)


def test_warm_up_shapes_cover_one_slot_and_short_contexts(model) -> None:
    assert Engine(model, max_batch=1).warm_up_shapes() == [(4, 64), (4, 128), (4, 256)]  # steps run on ROW_QUANTUM rows
    engine = Engine(model, max_batch=8)
    assert {rows for rows, _ in engine.warm_up_shapes()} == {4, 8}
    assert {rows for rows, _ in Engine(model, max_batch=30).warm_up_shapes()} == {4, 8, 32}
    engine.context = 40  # a context shorter than one span quantum: one span, the whole cache
    assert engine.warm_up_shapes() == [(4, 40), (8, 40)]


def test_generate_compiles_only_when_asked() -> None:
    from calm_cli.cli.generate import generate

    assert inspect.signature(generate).parameters["compile"].default.default is False
    from helpers import run_calm

    help_text = run_calm("generate", "--help").stdout
    assert "--compile" in help_text and "Off by default" in help_text


# ---- the worker's thread -----------------------------------------------------------------------


def test_bind_thread_sets_the_cuda_device_and_nothing_else(monkeypatch) -> None:
    calls = []
    monkeypatch.setattr(device_module.torch.cuda, "set_device", calls.append)
    bind_thread(torch.device("cpu"))
    assert calls == []
    bind_thread(torch.device("cuda", 1))
    assert calls == [torch.device("cuda", 1)]


def test_the_worker_thread_binds_the_engine_device(model, monkeypatch) -> None:
    bound = []
    monkeypatch.setattr(worker_module, "bind_thread", lambda device: bound.append((device, threading.current_thread().name)))
    engine = Engine(model, max_batch=1)
    worker = EngineWorker(engine)
    worker.start()
    assert worker.wait_settled(10) and worker.state == "ready"
    assert bound == [(engine.device, "calm-engine")]
    assert worker.stop()


def test_stop_does_not_wait_for_a_compile_in_progress(model) -> None:
    gate = threading.Event()

    def blocked(graph, example_inputs):
        gate.wait(60)
        return graph.forward

    engine = Engine(model, max_batch=2, compile=True, compile_backend=blocked)
    worker = EngineWorker(engine)
    worker.start()
    deadline = time.time() + 60
    while not engine.compiling and time.time() < deadline:
        time.sleep(0.02)
    assert engine.compiling and worker.state == "warming"
    started = time.perf_counter()
    assert worker.stop(timeout=5) is False
    assert time.perf_counter() - started < 1
    gate.set()  # the compile ends; the warm-up sees the stop before its next shape
    worker._thread.join(60)
    assert not worker._thread.is_alive() and worker.state == "stopped"
    assert engine.compile_watch.graphs == 1


# ---- device failures ---------------------------------------------------------------------------


@pytest.mark.parametrize(("error", "sticky"), [
    (torch.AcceleratorError("CUDA error: device-side assert triggered"), True),
    (RuntimeError("CUDA error: an illegal memory access was encountered\nCUDA kernel errors might be ..."), True),
    (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), False),
    (RuntimeError("CUDA error: out of memory"), False),
    (RuntimeError("shape '[2, 3]' is invalid for input of size 5"), False),
    (ValueError("CUDA error: device-side assert triggered"), False),
])
def test_device_failure_tells_sticky_cuda_errors(error: Exception, sticky: bool) -> None:
    reason = device_failure(error)
    assert (reason is not None) == sticky
    if sticky:
        assert reason.startswith(type(error).__name__) and "\n" not in reason


@pytest.mark.parametrize("sticky", [True, False])
def test_a_sticky_cuda_error_makes_the_server_unhealthy(model, sticky: bool) -> None:
    engine = Engine(model, max_batch=2)
    worker = EngineWorker(engine)
    app = create_app(worker, model.tokenizer, ServeConfig(model_name=NAME, defaults=GenerationSettings(max_tokens=8)))
    real_step = engine._step
    message = "CUDA error: an illegal memory access was encountered"

    def broken(*args):
        raise (torch.AcceleratorError(message) if sticky else RuntimeError("a bug in one step"))

    body = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 8, "seed": 1}
    with TestClient(app) as client:
        assert client.get("/health").status_code == 200
        engine._step = broken
        failed = client.post("/v1/completions", json=body)
        engine._step = real_step
        health = client.get("/health")
        after = client.post("/v1/completions", json=body)
    if sticky:
        assert failed.status_code == 500 and failed.json()["error"]["code"] == "engine_failed"
        assert health.status_code == 503
        assert health.json()["status"] == "failed" and message in health.json()["reason"]
        assert after.status_code == 503 and message in after.json()["error"]["message"]
    else:  # any other error ends the step's requests and the server goes on
        assert failed.status_code == 200 and failed.json()["choices"][0]["finish_reason"] == "error"
        assert health.status_code == 200 and "reason" not in health.json()
        assert after.status_code == 200 and after.json()["choices"][0]["finish_reason"] in ("length", "stop")


def test_a_sticky_error_ends_streams_with_an_error_event(model) -> None:
    engine = Engine(model, max_batch=2)
    worker = EngineWorker(engine)
    app = create_app(worker, model.tokenizer, ServeConfig(model_name=NAME, defaults=GenerationSettings(max_tokens=8)))

    def broken(*args):
        raise torch.AcceleratorError("CUDA error: device-side assert triggered")

    engine._step = broken
    with TestClient(app) as client:
        lines = client.post("/v1/completions", json={"model": NAME, "prompt": "Hi", "max_tokens": 8, "stream": True}).text
    events = [line[5:].strip() for line in lines.splitlines() if line.startswith("data:")]
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert chunks[-2]["choices"][0]["finish_reason"] == "error"
    assert chunks[-1]["error"]["code"] == "engine_failed" and "device-side assert" in chunks[-1]["error"]["message"]


# ---- `calm serve --compile` in a subprocess ------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def shimmed_server(compile_s: float, *args: str) -> Iterator[tuple[str, subprocess.Popen]]:
    """`calm serve --compile` whose every compile sleeps `compile_s` seconds, then traces with aot_eager."""
    port = _free_port()
    env = {**os.environ, "NO_COLOR": "1", "FAKE_COMPILE_S": str(compile_s), "TORCHINDUCTOR_COMPILE_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-c", SHIM, "serve", "-m", MODEL, "--port", str(port), "--device", "cpu", "--compile", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
    )
    try:
        yield f"http://127.0.0.1:{port}", proc
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def _first_answer(base: str, proc: subprocess.Popen, limit: float) -> httpx.Response:
    deadline = time.time() + limit
    while time.time() < deadline and proc.poll() is None:
        try:
            return httpx.get(f"{base}/health", timeout=1)
        except httpx.HTTPError:
            time.sleep(0.05)
    raise AssertionError(f"no answer: {proc.stderr.read() if proc.poll() is not None else 'timeout'}")


def test_serve_warms_up_before_listening_and_reports_compiles() -> None:
    with shimmed_server(0.5, "--max-batch", "2") as (base, proc):
        first = _first_answer(base, proc, 120)
        # The port opened only once warm: its very first answer is healthy, with every graph compiled.
        assert first.status_code == 200, first.text
        compiled = first.json()["compile"]
        assert compiled["graphs"] == 3 and compiled["recompiles"] == 0 and compiled["warmup_s"] >= 3 * 0.5
        for prompt, n in (("Hi", 4), ("A longer prompt " * 40, 40)):
            r = httpx.post(f"{base}/v1/completions", timeout=60,
                           json={"model": NAME, "prompt": prompt, "max_tokens": n, "ignore_eos": True, "seed": 2})
            assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == n
        assert httpx.get(f"{base}/health").json()["compile"]["recompiles"] == 0
        metrics = httpx.get(f"{base}/metrics").text
        assert "calm_compiled_graphs 3.0" in metrics and "calm_recompiles 0.0" in metrics
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        log = proc.stderr.read()
    assert "warm-up" in log and "3 graphs" in log and "Traceback" not in log, log


@pytest.mark.parametrize(("sig", "after"), [(signal.SIGTERM, 1.5), (signal.SIGINT, 0.2)])
def test_a_signal_during_warm_up_exits_at_once_and_cleanly(sig: int, after: float) -> None:
    """Whether the signal lands in dynamo's trace (0.2 s in) or in the compile (1.5 s), the exit is quick and 0.

    Without care the first case aborted the process ("terminate called without an active
    exception"): the interpreter was finalised under a thread in torch's C++ code.
    """
    with shimmed_server(120) as (base, proc):
        line = ""
        while "compiling the decode step" not in line:
            line = proc.stderr.readline()
            assert line or proc.poll() is None, "the server ended before warm-up"
        time.sleep(after)  # into the first trace, or its (fake, two-minute) compile
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"{base}/health", timeout=1)
        started = time.perf_counter()
        proc.send_signal(sig)
        assert proc.wait(timeout=20) == 0
        elapsed = time.perf_counter() - started
        rest = proc.stderr.read()
    assert elapsed < 5, elapsed
    assert "stopped during warm-up" in rest and "Traceback" not in rest, rest


@pytest.mark.cuda
def test_cuda_served_compiled_completion_equals_eager() -> None:
    """On the GPU: the port opens warm, and a seeded completion is the eager server's, in float32."""
    body = {"model": NAME, "prompt": "Once upon a time", "max_tokens": 32, "temperature": 0.5, "seed": 3,
            "ignore_eos": True}
    texts = {}
    for flag in ("--compile", "--no-compile"):
        port = _free_port()
        proc = subprocess.Popen(
            calm_command() + ["serve", "-m", MODEL, "--port", str(port), "--device", "cuda", "--dtype", "fp32", flag],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env={**os.environ, "NO_COLOR": "1"},
        )
        base = f"http://127.0.0.1:{port}"
        try:
            first = _first_answer(base, proc, 300)
            assert first.status_code == 200, first.text
            if flag == "--compile":
                compiled = first.json()["compile"]
                assert compiled["graphs"] >= 1 and compiled["warmup_s"] > 0
            r = httpx.post(f"{base}/v1/completions", json=body, timeout=60)
            assert r.status_code == 200, r.text
            texts[flag] = r.json()["choices"][0]["text"]
            if flag == "--compile":
                assert httpx.get(f"{base}/health").json()["compile"]["recompiles"] == 0
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=20) == 0
            assert "Traceback" not in proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
    assert texts["--compile"] == texts["--no-compile"] and texts["--compile"]
