"""The engine on a thread of its own, fed by the server's request handlers.

Handlers run on the asyncio loop; decoding must not block it, and the engine wants one
thread to call `step`. The worker steps while there is work and sleeps on an event
otherwise; `submit` and `cancel` wake it. Each request's updates go back to its handler
through the callback the handler gave (which hops onto the loop).
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable

from ..runtime.engine import Engine, Request, Update
from ..runtime.settings import GenerationSettings

log = logging.getLogger("calm.serve")


class EngineWorker:
    def __init__(self, engine: Engine, on_step: Callable[[float], None] | None = None) -> None:
        self.engine = engine
        self.on_step = on_step
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="calm-engine", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def submit(self, prompt: list[int], settings: GenerationSettings, on_update: Callable[[Update], None]) -> Request:
        request = self.engine.submit(prompt, settings, on_update)
        self._wake.set()
        return request

    def cancel(self, request: Request, reason: str = "cancelled") -> None:
        self.engine.cancel(request, reason)
        self._wake.set()

    def cancel_all(self, reason: str = "cancelled") -> None:
        self.engine.cancel_all(reason)
        self._wake.set()

    def stop(self, timeout: float = 5.0) -> None:
        """End every request in flight (their streams close with what they have), then the thread."""
        self.cancel_all()
        deadline = time.perf_counter() + timeout
        while self.engine.has_work() and self._thread.is_alive() and time.perf_counter() < deadline:
            time.sleep(0.01)
        self._stopping.set()
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        """Whether the thread still runs: after `stop`, only while a step that outlasted its timeout finishes."""
        return self._thread.is_alive()

    def _loop(self) -> None:
        while not self._stopping.is_set():
            self._wake.clear()
            if not self.engine.has_work():
                self._wake.wait()
                continue
            t0 = time.perf_counter()
            try:
                self.engine.step()
            except Exception:  # a failed step must not take the server down: end its requests, keep serving
                log.exception("decode step failed; ending the requests in flight")
                self.engine.cancel_all("error")
                continue
            if self.on_step is not None:
                self.on_step(time.perf_counter() - t0)
