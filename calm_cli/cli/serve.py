"""`calm serve`: the OpenAI-compatible server on uvicorn."""

from __future__ import annotations

import logging
import os
import signal
import socket
import sys
import threading
from typing import TYPE_CHECKING, Optional

import typer

from ..errors import CalmError, UsageError
from ..runtime.settings import DEFAULT_MAX_BODY_BYTES
from .common import (
    CandidateDecoderOpt,
    CandidateDtypeOpt,
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    SamplerOpt,
    SamplesOpt,
    TempOpt,
    ThreadsOpt,
    err,
    load_for_cli,
    model_path,
    set_threads,
    typed_engine_options,
    typed_settings,
)
from .typer_setup import with_examples

if TYPE_CHECKING:
    import uvicorn

    from ..serve.worker import EngineWorker


@with_examples(
    "calm serve                          # the bundled model on 127.0.0.1:8000/v1",
    "calm serve -m baseline --port 8080 --api-key s3cret",
    "calm serve --max-batch 16 --max-queue 256",
)
def serve(
    model: Optional[str] = ModelOpt,
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on (0.0.0.0 for every interface)."),
    port: int = typer.Option(8000, "--port", help="TCP port."),
    max_batch: Optional[int] = typer.Option(None, "--max-batch", help="Requests decoded at once (default 8 on CPU, 64 on CUDA)."),
    max_queue: int = typer.Option(64, "--max-queue", help="Requests allowed to wait for a slot; more get HTTP 429."),
    api_key: Optional[str] = typer.Option(
        None, "--api-key", envvar="CALM_API_KEY", help="Require 'Authorization: Bearer KEY' on /v1 (or set CALM_API_KEY).",
    ),
    name: Optional[str] = typer.Option(None, "--name", help="Model id clients send as 'model' (default: the model folder's name; org/name for a hub model)."),
    temp: float = TempOpt,
    samples: int = SamplesOpt,
    sampler: str = SamplerOpt,
    candidate_decoder: str = CandidateDecoderOpt,
    candidate_dtype: str = CandidateDtypeOpt,
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", help="Reply length when a chat request gives no max_tokens."),
    template: Optional[str] = typer.Option(None, "--template", help="Chat turn template, as for `calm chat` (default 'User: {message}\\nAssistant:')."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    compile: Optional[bool] = typer.Option(
        None, "--compile/--no-compile",
        help="torch.compile the decode step (default: on for CUDA). It is compiled for every batch and span shape "
        "before the port opens, so no request waits for a compile.",
    ),
    threads: Optional[int] = ThreadsOpt,
    max_request_logits: Optional[int] = typer.Option(
        None, "--max-request-logits", metavar="N",
        help="Most logits one request may score per step (rows x candidates x K x vocabulary); more is a 400. "
        "Default: what 16 rows at --samples cost.",
    ),
    max_body_bytes: int = typer.Option(DEFAULT_MAX_BODY_BYTES, "--max-body-bytes", metavar="N", help="Largest request body; more is a 413."),
) -> None:
    """Serve a model over an OpenAI-compatible HTTP API (completions, chat, streaming, /metrics).

    With a compiled step (CUDA's default) the port opens only after warm-up, as in vLLM.
    Stop with Ctrl-C or SIGTERM, also during warm-up: requests in flight end at once with
    what they have.
    """
    from ..runtime.chat import DEFAULT_TEMPLATE, Template

    if not 0 < port < 65536:
        raise UsageError(f"--port must be in 1..65535, got {port}")
    if max_queue < 0:
        raise UsageError("--max-queue must be at least 0")
    if (max_request_logits is not None and max_request_logits < 1) or max_body_bytes < 1:
        raise UsageError("--max-request-logits and --max-body-bytes must be at least 1")
    defaults = typed_settings(max_tokens=max_tokens, temperature=temp, num_samples=samples, sampler=sampler)
    options = typed_engine_options(max_batch=max_batch, candidate_decoder=candidate_decoder,
                                   candidate_dtype=candidate_dtype, compile=compile)
    Template.parse(template or DEFAULT_TEMPLATE)
    path = model_path(model)
    listener = _bind(host, port)  # before anything loads: a busy port is one line, not a banner and then a crash
    threads_used = set_threads(threads)  # once, for the server's life
    loaded = load_for_cli(str(path), device, dtype)
    import uvicorn  # the server's packages and torch load only once the arguments are good

    from ..io.registry import model_label
    from ..runtime.engine import build_engine
    from ..serve.app import ServeConfig, create_app
    from ..serve.worker import EngineWorker

    if loaded.tokenizer is None:
        raise CalmError("the model has no tokenizer.json: the server needs one")
    engine = build_engine(loaded, options)
    worker = EngineWorker(engine)
    config = ServeConfig(
        model_name=name or model_label(path), defaults=defaults, max_queue=max_queue, api_key=api_key,
        template=template or DEFAULT_TEMPLATE, threads=threads_used, max_request_logits=max_request_logits,
        max_body_bytes=max_body_bytes,
    )
    app = create_app(worker, loaded.tokenizer, config)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(asctime)s %(name)s %(message)s")

    class Server(uvicorn.Server):
        """On SIGINT or SIGTERM, first end the requests in flight, so their streams close at once."""

        def handle_exit(self, sig: int, frame: object) -> None:
            # On its own thread: this handler can interrupt the main thread while it holds the engine's or
            # the worker's lock (submitting a request), and taking that lock here would deadlock.
            threading.Thread(target=worker.cancel_all, daemon=True).start()
            super().handle_exit(sig, frame)

    server = Server(uvicorn.Config(app, host=host, port=port, log_level="warning", access_log=False, timeout_graceful_shutdown=5))
    warm = ""
    if engine.compile_watch is not None:
        shapes = len(engine.warm_up_shapes())
        err.print(f"calm serve: compiling the decode step for {shapes} batch and span shapes before listening…")
        if not _warm_up(worker):
            err.print("calm serve: stopped during warm-up")
            _exit_if_busy(worker)
            return
        warm = f", compiled: warm-up {worker.warmup_s:.1f} s, {engine.compile_watch.graphs} graphs"
    err.print(f"calm serve: '{config.model_name}' (K={engine.k}, {engine.max_batch} slots{warm}) on http://{host}:{port}/v1 · "
              f"{threads_used}, chosen once at start", soft_wrap=True)
    _run_until_stopped(server, listener, f"{host}:{port}")
    _exit_if_busy(worker)


def _run_until_stopped(server: uvicorn.Server, listener: socket.socket, address: str) -> None:
    """Serve on `listener` until SIGINT or SIGTERM; a server that never started is a one-line error."""
    # uvicorn raises the stop signal again once it has shut down; it lands here, so the exit code is 0.
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        server.run(sockets=[listener])
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if not server.started:
        raise CalmError(f"could not listen on {address}")


def _bind(host: str, port: int) -> socket.socket:
    """The server's socket, bound but not listening: connections are refused until uvicorn listens after warm-up."""
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except socket.gaierror as exc:
        raise CalmError(f"cannot listen on {host}:{port}: {exc.strerror}") from None
    listener = socket.socket(family, kind, proto)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        listener.bind(address)
    except OSError as exc:
        listener.close()
        raise CalmError(f"cannot listen on {host}:{port}: {exc.strerror or exc}") from None
    return listener


def _exit_if_busy(worker: EngineWorker) -> None:
    """End the process at once, with exit code 0, if the engine thread is still in a compile or a step.

    Neither can be interrupted, and finalising the interpreter while that thread runs inside
    torch's C++ code can abort the process ("terminate called without an active
    exception"), so it skips finalisation, after flushing what was printed.
    """
    if worker.running:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)


def _warm_up(worker: EngineWorker) -> bool:
    """Start the worker and wait for its warm-up; False if SIGINT or SIGTERM came first.

    The wait is in short slices so the signal handlers run; a compile in progress is left
    to the daemon thread, which dies with the process (a compile cannot be interrupted).
    """
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        worker.start()
        while not worker.wait_settled(0.1):
            if stop.is_set():
                break
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    if stop.is_set() or worker.state != "ready":
        worker.stop()
    if worker.failure is not None:
        raise CalmError(worker.failure)
    return worker.state == "ready" and not stop.is_set()
