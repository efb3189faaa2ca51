"""The engine on a thread of its own, fed by the server's request handlers.

Handlers run on the asyncio loop; decoding must not block it, and the engine wants one
thread to call `step`. The thread first makes the engine's device its current one and, if
the step is compiled, warms it up (every graph compiled before the first request); then it
steps while there is work and sleeps on an event otherwise; `submit` and `cancel` wake it.
Each request's updates go back to its handler through the callback the handler gave
(which hops onto the loop).

A sticky CUDA error in a step (device-side assert, illegal address) fails the worker for
good: every request ends with an error, /health reports the reason and new requests are
refused, so an orchestrator restarts the process instead of routing to a dead one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from ..errors import CalmError
from ..runtime.device import bind_thread, device_failure
from ..runtime.engine import Engine, Request, Update
from ..runtime.settings import GenerationSettings

log = logging.getLogger("calm.serve")


class EngineFailed(CalmError):
    """The engine's device failed; the server cannot decode again until it restarts."""


class EngineWorker:
    def __init__(self, engine: Engine, on_step: Callable[[float], None] | None = None) -> None:
        self.engine = engine
        self.on_step = on_step
        self.state = "starting"  # then "warming" (compiled step only), "ready"; or "failed", or "stopped" during warm-up
        self.failure: str | None = None
        self.warmup_s: float | None = None
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._settled = threading.Event()  # warm-up ended: ready, failed or stopped
        self._thread = threading.Thread(target=self._run, name="calm-engine", daemon=True)

    def start(self) -> None:
        """Start the thread; a second call does nothing (the CLI starts it early to warm up before listening)."""
        if self._thread.ident is None:
            self._thread.start()

    @property
    def running(self) -> bool:
        """Whether the thread is still alive (after `stop`: in a compile, or a step that outlasted its timeout)."""
        return self._thread.is_alive()

    def wait_settled(self, timeout: float) -> bool:
        """Wait until warm-up has ended (ready, failed or stopped); False on timeout."""
        return self._settled.wait(timeout)

    def compile_report(self) -> dict[str, Any] | None:
        """Warm-up time and compile counts for /health; None when the step is not compiled."""
        watch = self.engine.compile_watch
        if watch is None:
            return None
        return {"warmup_s": None if self.warmup_s is None else round(self.warmup_s, 3), "graphs": watch.graphs,
                "recompiles": watch.recompiles, "recompile_limit": watch.limit, "eager_graphs": watch.eager_graphs}

    def submit(self, prompt: list[int], settings: GenerationSettings, on_update: Callable[[Update], None]) -> Request:
        if self.failure is not None:
            raise EngineFailed(self.failure)
        request = self.engine.submit(prompt, settings, on_update)
        self._wake.set()
        if self.failure is not None:  # the device failed while this was being queued: nothing will step it
            self.engine.abandon("error")
        return request

    def cancel(self, request: Request, reason: str = "cancelled") -> None:
        self.engine.cancel(request, reason)
        self._wake.set()

    def cancel_all(self, reason: str = "cancelled") -> None:
        self.engine.cancel_all(reason)
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> bool:
        """End every request in flight (their streams close with what they have), then the thread.

        True if the thread ended. A thread that is warming up or compiling is not waited
        for: a compile cannot be interrupted and may take minutes, and the process can exit
        without it (it is a daemon thread); warm-up stops at its next shape if the process
        lives on.
        """
        self._stopping.set()
        self.cancel_all()
        deadline = time.perf_counter() + timeout
        while self._thread.is_alive() and time.perf_counter() < deadline:
            if self.state == "warming" or self.engine.compiling:
                return False
            self._thread.join(0.01)
        return not self._thread.is_alive()

    def _run(self) -> None:
        bind_thread(self.engine.device)
        if self.engine.compile_watch is not None and not self._warm_up():
            self._settled.set()
            return
        self.state = "ready"
        self._settled.set()
        self._loop()

    def _warm_up(self) -> bool:
        self.state = "warming"
        started = time.perf_counter()
        try:
            done = self.engine.warm_up(stop=self._stopping.is_set)
        except Exception as exc:
            lines = str(exc).strip().splitlines()
            self._fail(f"warm-up failed: {type(exc).__name__}" + (f": {lines[0]}" if lines else ""))
            log.debug("warm-up failed", exc_info=True)
            return False
        self.warmup_s = time.perf_counter() - started
        if not done:
            self.state = "stopped"
        return done

    def _loop(self) -> None:
        # On stop the cancelled requests still need one step to be retired with their last update.
        while not (self._stopping.is_set() and not self.engine.has_work()):
            self._wake.clear()
            if not self.engine.has_work():
                if not self._stopping.is_set():  # `stop` sets it before it wakes us, so no wake-up is lost
                    self._wake.wait()
                continue
            t0 = time.perf_counter()
            try:
                self.engine.step()
            except Exception as exc:
                reason = device_failure(exc)
                if reason is not None:
                    self._fail(reason)
                    return
                # Any other failed step must not take the server down: end its requests, keep serving.
                log.exception("decode step failed; ending the requests in flight")
                self.engine.cancel_all("error")
                continue
            if self.on_step is not None:
                self.on_step(time.perf_counter() - t0)

    def _fail(self, reason: str) -> None:
        self.failure, self.state = reason, "failed"
        log.error("engine failed: %s; requests in flight end with an error, /health is 503: restart the server", reason)
        self.engine.abandon("error")
