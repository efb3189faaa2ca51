"""`calm serve`: an OpenAI-compatible HTTP API over the engine.

Endpoints: GET /health, GET /v1/models, POST /v1/completions, POST /v1/chat/completions
(the conversation template of `calm chat`), GET /metrics (Prometheus text). Streaming is
server-sent events in OpenAI's chunk format, ending with `data: [DONE]`. Errors use
OpenAI's shape {"error": {"message", "type", "param", "code"}}.

Before a handler runs, `Guard` (serve/guard.py) checks the API key and the body's size.
Every request is priced before it runs (logits per step = rows x candidates x K x
vocabulary, runtime/budget.py) and refused with a 400 over the server's budget; fields
that would change the output and that CALM cannot honour are refused by name
(`UNSUPPORTED`). Tokenizing and template rendering run on a worker thread, so the event
loop only does I/O. Lone surrogates (valid JSON, not Unicode text) become U+FFFD.

What CALM changes: `temperature` is in [0, 1] (CALM samples T = 1/n by rejection from a
sampler with no likelihoods, so it cannot flatten beyond T = 1); `logprobs` are refused
for the same reason; `samples` and `sampler` are CALM's own extras, and `ignore_eos`
(as in vLLM) gives a fixed number of tokens for benchmarks. With `n` > 1 and a
`seed`, choice i uses seed + i, so choices differ and each is reproducible on its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, replace
from typing import Annotated, Any, Literal

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from sse_starlette.sse import EventSourceResponse
from starlette.exceptions import HTTPException
from tokenizers import Tokenizer

from ..errors import UsageError
from ..io.tokenizer import encode_released, replace_surrogates
from ..runtime.budget import default_request_logits
from ..runtime.chat import DEFAULT_TEMPLATE, Conversation, Template, Turn
from ..runtime.engine import Engine, PromptTooLong, Update
from ..runtime.engine import Request as EngineRequest
from ..runtime.settings import DEFAULT_MAX_BODY_BYTES, MAX_SEED, SAMPLES_LIMIT, GenerationSettings, SettingsError
from ..runtime.text import TextStream, text_delta
from ..runtime.threads import ThreadChoice
from .guard import Guard, error_body
from .worker import EngineFailed, EngineWorker

log = logging.getLogger("calm.serve")
FINISH = {"eos": "stop", "stop": "stop", "length": "length", "cancelled": "abort", "error": "error"}
# The request field each generation setting comes from, to word the settings gate's errors (runtime/settings.py)
FIELDS = {"num_samples": "samples"}
MAX_CHOICES = 16
MAX_STOPS = 4
DISCONNECT_CHECK_S = 0.1  # how often a non-streaming handler asks whether its client is still there
SHUTDOWN_GRACE_S = 3.0  # below uvicorn's graceful-shutdown limit (5 s) in cli/serve.py
STOP_WAIT_S = 1.0  # how long shutdown waits for a step in flight; `calm serve` then exits under it (cli/serve.py)
HTTP_CODES = {400: "invalid_json", 404: "not_found", 405: "method_not_allowed", 413: "body_too_large"}
# OpenAI fields that would change the output and that CALM cannot apply, with the values that change nothing.
UNSUPPORTED: dict[str, tuple[Any, ...]] = {
    "tools": ([],), "tool_choice": ("none",), "functions": ([],), "function_call": ("none",),
    "response_format": ({"type": "text"},), "top_p": (1,), "presence_penalty": (0,), "frequency_penalty": (0,),
    "repetition_penalty": (1,), "logit_bias": ({},), "top_logprobs": (0,), "best_of": (1,), "suffix": ("",),
    "top_k": (-1, 0), "min_p": (0,), "prediction": (), "audio": (), "modalities": (["text"],), "guided_json": (),
    "guided_regex": (), "guided_choice": (), "guided_grammar": (),
}

Text = Annotated[str, AfterValidator(replace_surrogates)]  # prompts, messages and stops: as most servers do


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None,
                 code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.param, self.code = status, message, kind, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    include_usage: bool = False


class Options(BaseModel):
    """Fields both endpoints take. Strict: a string where a number belongs is a 400, not a guess.

    Unknown fields are kept (`extra="allow"`) so that `refuse_unsupported` can name the
    ones CALM cannot honour; the others (`user`, `metadata`, ...) change nothing.
    """

    model_config = ConfigDict(extra="allow", strict=True)
    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float | None = None  # its range is the settings gate's (runtime/settings.py)
    seed: int | None = Field(None, ge=0, le=MAX_SEED)
    stop: Text | list[Text] | None = None
    n: int = Field(1, ge=1, le=MAX_CHOICES)
    stream: bool = False
    stream_options: StreamOptions | None = None
    logprobs: bool | int | None = None
    samples: int | None = Field(None, ge=1, le=SAMPLES_LIMIT)
    sampler: Literal["approx", "exact"] | None = None
    ignore_eos: bool = False  # as in vLLM: a fixed number of tokens, for benchmarks


class CompletionBody(Options):
    prompt: Text | list[Text]
    echo: bool = False


class ContentPart(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    type: Literal["text"]
    text: Text


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore", strict=True)
    role: Literal["system", "developer", "user", "assistant"]
    content: Text | list[ContentPart] | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatBody(Options):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


@dataclass
class ServeConfig:
    model_name: str
    defaults: GenerationSettings
    max_queue: int = 64
    api_key: str | None = None
    template: str = DEFAULT_TEMPLATE
    completion_max_tokens: int = 16  # OpenAI's default for /v1/completions
    threads: ThreadChoice | None = None  # decided once at start; /health says it
    max_request_logits: int | None = None  # the per-step cost a request may have; None: default_request_logits
    max_body_bytes: int = DEFAULT_MAX_BODY_BYTES


class Metrics:
    """Prometheus counters of one app (its own registry, so several apps can live in one process)."""

    def __init__(self, worker: EngineWorker) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("calm_requests", "Finished requests (choices)", ["endpoint", "finish_reason"], registry=r)
        self.prompt_tokens = Counter("calm_prompt_tokens", "Prompt tokens of finished requests", registry=r)
        self.completion_tokens = Counter("calm_completion_tokens", "Tokens generated", registry=r)
        self.errors = Counter("calm_request_errors", "Requests refused, by HTTP status", ["status"], registry=r)
        self.step_seconds = Histogram(
            "calm_step_seconds", "Duration of one decode step", registry=r,
            buckets=(0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0),
        )
        self.request_seconds = Histogram("calm_request_seconds", "Time from arrival to the last token", registry=r)
        queue = Gauge("calm_queue_depth", "Requests waiting for a slot", registry=r)
        queue.set_function(lambda: worker.engine.queued)
        active = Gauge("calm_active_requests", "Requests holding a slot", registry=r)
        active.set_function(lambda: worker.engine.active)
        slots = Gauge("calm_slots", "Slots of the engine (--max-batch)", registry=r)
        slots.set(worker.engine.max_batch)
        if worker.engine.compile_watch is not None:
            watch = worker.engine.compile_watch
            graphs = Gauge("calm_compiled_graphs", "Graphs of the decode step compiled, warm-up included", registry=r)
            graphs.set_function(lambda: watch.graphs)
            recompiles = Gauge("calm_recompiles", "Graphs of the decode step traced after warm-up", registry=r)
            recompiles.set_function(lambda: watch.recompiles)
            warmup = Gauge("calm_warmup_seconds", "Time the compiled decode step took to warm up", registry=r)
            warmup.set_function(lambda: worker.warmup_s or 0.0)


@dataclass
class Choice:
    """One choice of a response: its engine request, its text so far and how it ended."""

    request: EngineRequest
    stream: TextStream
    text: str = ""
    finish_reason: str | None = None

    @property
    def tokens(self) -> int:
        """Tokens the client got: a stop string freezes the count, though the engine may have drawn more."""
        return len(self.stream.ids)


class Service:
    """The server's state and its handlers, one method a step: what `create_app` routes requests to."""

    def __init__(self, worker: EngineWorker, tokenizer: Tokenizer, config: ServeConfig) -> None:
        self.worker = worker
        self.tokenizer = tokenizer
        self.config = config
        self.metrics = Metrics(worker)
        worker.on_step = self.metrics.step_seconds.observe
        self.engine = worker.engine
        self.template = Template.parse(config.template)
        self.created = int(time.time())
        self.budget = config.max_request_logits or default_request_logits(
            config.defaults.num_samples, self.engine.k, self.engine.config.vocab_size
        )

    @contextlib.asynccontextmanager
    async def lifespan(self, _: FastAPI) -> AsyncIterator[None]:
        self.worker.start()
        yield
        await asyncio.to_thread(self.worker.stop, STOP_WAIT_S)

    async def api_error(self, _: Request, exc: ApiError) -> JSONResponse:
        self.metrics.errors.labels(str(exc.status)).inc()
        return exc.response()

    async def http_error(self, request: Request, exc: HTTPException) -> Response:
        self.metrics.errors.labels(str(exc.status_code)).inc()
        return http_error_response(request, exc)

    async def invalid(self, _: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        where = [str(part) for part in first.get("loc", ()) if part != "body"]
        if first.get("type") == "json_invalid":
            error = ApiError(400, "the request body is not valid JSON", code="invalid_json")
        elif tuple(first.get("loc", ())) == ("body",):
            error = ApiError(400, "the request body must be a JSON object, sent with 'Content-Type: application/json'",
                             code="invalid_json")
        else:
            param = where[0] if where else None
            field = ".".join(where) or "body"
            error = ApiError(400, f"{field}: {first.get('msg', 'invalid value')}", param=param, code="invalid_value")
        self.metrics.errors.labels("400").inc()
        return error.response()

    async def health(self) -> JSONResponse:
        """200 once the server decodes; 503 while a compiled step warms up and after a device failure."""
        ready = self.worker.state == "ready"
        engine = self.engine
        body = {"status": "ok" if ready else self.worker.state, "model": self.config.model_name,
                "slots": engine.max_batch, "active": engine.active, "queued": engine.queued}
        if self.config.threads:
            body |= {"threads": self.config.threads.count, "threads_reason": self.config.threads.reason}
        if self.worker.failure is not None:
            body["reason"] = self.worker.failure
        if (compiled := self.worker.compile_report()) is not None:
            body["compile"] = compiled
        return JSONResponse(body, status_code=200 if ready else 503)

    def engine_failed(self, status: int) -> ApiError:
        return ApiError(status, f"the engine failed ({self.worker.failure}); the server must be restarted",
                        "server_error", code="engine_failed")

    def failed_in_flight(self, choices: list[Choice]) -> bool:
        return self.worker.failure is not None and any(c.finish_reason == "error" for c in choices)

    async def models(self) -> dict[str, Any]:
        return {"object": "list", "data": [
            {"id": self.config.model_name, "object": "model", "created": self.created, "owned_by": "calm",
             "patch_size": self.engine.k, "context_tokens": self.engine.context * self.engine.k},
        ]}

    async def metrics_text(self) -> Response:
        return Response(generate_latest(self.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    def settings_for(self, body: Options, max_tokens: int | None, prompts: int) -> list[GenerationSettings]:
        """Each choice's settings, once the request is known to be one this server can answer and afford."""
        if body.model != self.config.model_name:
            raise ApiError(404, f"model '{body.model}' does not exist; this server has '{self.config.model_name}'",
                           param="model", code="model_not_found")
        try:
            base = replace(
                self.config.defaults,
                max_tokens=max_tokens or self.config.defaults.max_tokens,
                temperature=self.config.defaults.temperature if body.temperature is None else float(body.temperature),
                num_samples=body.samples or self.config.defaults.num_samples,
                sampler=body.sampler or self.config.defaults.sampler,
                seed=body.seed,
                ignore_eos=body.ignore_eos,
            )
        except SettingsError as exc:
            field = FIELDS.get(exc.field, exc.field)
            raise ApiError(400, exc.named(FIELDS), param=field, code="invalid_value") from None
        if body.logprobs not in (None, False, 0):
            raise ApiError(400, "logprobs are not available: CALM has no token likelihoods", param="logprobs",
                           code="unsupported")
        refuse_unsupported(body)
        capacity = self.engine.max_batch + self.config.max_queue
        if prompts * body.n > capacity:
            raise ApiError(400, f"this request asks for {prompts * body.n} completions (prompts x n); this server "
                           f"takes at most {capacity} at once (--max-batch {self.engine.max_batch} + --max-queue "
                           f"{self.config.max_queue})",
                           param="n" if prompts == 1 else "prompt", code="too_many_completions")
        check_cost(self.engine, base, prompts * body.n, self.budget, "samples" if body.samples else "n")
        if body.seed is None:
            return [base] * body.n
        return [replace(base, seed=(body.seed + i) % (MAX_SEED + 1)) for i in range(body.n)]

    def stops_of(self, body: Options) -> list[str]:
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > MAX_STOPS:
            raise ApiError(400, f"stop takes at most {MAX_STOPS} strings", param="stop", code="invalid_value")
        return stops

    async def submit(
        self, endpoint: str, prompts: list[list[int]], settings: list[GenerationSettings], stops: list[str]
    ) -> tuple[list[Choice], asyncio.Queue[Update]]:
        """Submit one engine request per prompt and choice; updates arrive on the returned queue."""
        count = len(prompts) * len(settings)
        engine = self.engine
        if engine.active + engine.queued + count > engine.max_batch + self.config.max_queue:
            raise ApiError(429, f"the server is busy: {engine.active} requests decoding and {engine.queued} waiting, "
                           f"{count} more do not fit (--max-batch {engine.max_batch}, --max-queue "
                           f"{self.config.max_queue})", "rate_limit_error", code="queue_full")
        loop = asyncio.get_running_loop()
        updates: asyncio.Queue[Update] = asyncio.Queue()

        def deliver(update: Update) -> None:
            loop.call_soon_threadsafe(updates.put_nowait, update)

        choices = []
        try:
            for prompt in prompts:
                for s in settings:
                    request = self.worker.submit(prompt, s, deliver)
                    choices.append(Choice(request, TextStream(self.tokenizer, stops)))
        except EngineFailed:
            for choice in choices:
                self.worker.cancel(choice.request)
            raise self.engine_failed(503) from None
        except UsageError as exc:
            for choice in choices:
                self.worker.cancel(choice.request)
            code = "context_length_exceeded" if isinstance(exc, PromptTooLong) else "invalid_value"
            param = "prompt" if endpoint == "completions" else "messages"
            raise ApiError(400, str(exc), param=param, code=code) from None
        return choices, updates

    def advance(self, choices: list[Choice], update: Update, chat: bool) -> tuple[int, str] | None:
        """Apply one update: (choice index, new text) when there is text or an end to report."""
        index = next((i for i, c in enumerate(choices) if c.request is update.request), None)
        if index is None or choices[index].finish_reason is not None:
            return None
        choice = choices[index]
        delta = text_delta(choice.stream, update, self.worker.cancel)
        if delta is None:
            return None
        text, finish = delta
        if finish is not None:
            choice.finish_reason = FINISH.get(finish, finish)
        if chat and not choice.text:
            text = text.lstrip()  # the reply follows "Assistant:"; its leading space or newline is not content
        choice.text += text
        return (index, text) if text or choice.finish_reason else None

    def finished(
        self, endpoint: str, rid: str, started: float, prompts: list[list[int]], choices: list[Choice]
    ) -> None:
        """Count and log one response once its choices have ended (or its client left)."""
        for choice in choices:
            self.metrics.requests.labels(endpoint, choice.finish_reason or "abort").inc()
            self.metrics.completion_tokens.inc(choice.tokens)
        self.metrics.prompt_tokens.inc(sum(len(p) for p in prompts))
        seconds = time.perf_counter() - started
        self.metrics.request_seconds.observe(seconds)
        log.info("%s %s prompt=%d completion=%d time=%.2fs finish=%s", rid, endpoint, sum(len(p) for p in prompts),
                 sum(c.tokens for c in choices), seconds, ",".join(c.finish_reason or "abort" for c in choices))

    async def collect(self, http: Request, choices: list[Choice], updates: asyncio.Queue[Update], chat: bool) -> bool:
        """Wait for every choice to finish; False (and the requests cancelled) if the client went away."""
        checked = time.perf_counter()
        try:
            while any(c.finish_reason is None for c in choices):
                try:
                    self.advance(choices, await asyncio.wait_for(updates.get(), timeout=DISCONNECT_CHECK_S), chat)
                except asyncio.TimeoutError:
                    pass
                if time.perf_counter() - checked >= DISCONNECT_CHECK_S:  # on a clock: updates may never pause
                    checked = time.perf_counter()
                    if await http.is_disconnected():
                        return False
            return True
        finally:
            for choice in choices:
                if choice.finish_reason is None:
                    self.worker.cancel(choice.request, "cancelled")

    def stream_response(
        self, endpoint: str, rid: str, started: float, prompts: list[list[int]], choices: list[Choice],
        updates: asyncio.Queue[Update], include_usage: bool, chunk: Callable[[int, str | None, str | None], dict],
        opening: list[dict],
    ) -> EventSourceResponse:
        async def events() -> AsyncIterator[dict[str, str]]:
            try:
                for event in opening:
                    yield {"data": json.dumps(event)}
                while any(c.finish_reason is None for c in choices):
                    step = self.advance(choices, await updates.get(), endpoint == "chat")
                    if step is not None:
                        index, text = step
                        yield {"data": json.dumps(chunk(index, text, choices[index].finish_reason))}
                if self.failed_in_flight(choices):
                    yield {"data": self.engine_failed(500).response().body.decode()}
                if include_usage:
                    last = {**chunk(0, None, None), "choices": [], "usage": usage(prompts, choices)}
                    yield {"data": json.dumps(last)}
                yield {"data": "[DONE]"}
            finally:  # also when the client went away (the task is cancelled)
                for choice in choices:
                    if choice.finish_reason is None:
                        self.worker.cancel(choice.request, "cancelled")
                self.finished(endpoint, rid, started, prompts, choices)

        # On shutdown the requests are cancelled first; the grace period lets their streams end with a last chunk.
        return EventSourceResponse(events(), ping=15, shutdown_grace_period=SHUTDOWN_GRACE_S)

    async def completions(self, body: CompletionBody, http: Request) -> Any:
        started = time.perf_counter()
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not texts:
            raise ApiError(400, "prompt must not be empty", param="prompt", code="invalid_value")
        settings = self.settings_for(body, body.max_tokens or self.config.completion_max_tokens, len(texts))
        stops = self.stops_of(body)
        prompts = await asyncio.to_thread(encode_released, self.tokenizer, texts)
        choices, updates = await self.submit("completions", prompts, settings, stops)
        rid = f"cmpl-{uuid.uuid4().hex[:24]}"
        head = {"id": rid, "object": "text_completion", "created": int(time.time()), "model": self.config.model_name}
        echo = [texts[i // len(settings)] if body.echo else "" for i in range(len(choices))]
        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)

            def chunk(index: int, text: str | None, finish: str | None) -> dict:
                return {**head, "choices": [{"index": index, "text": text, "finish_reason": finish, "logprobs": None}],
                        **({"usage": None} if include else {})}

            opening = [chunk(i, echo[i], None) for i in range(len(choices)) if echo[i]]
            return self.stream_response("completions", rid, started, prompts, choices, updates, include, chunk, opening)
        complete = await self.collect(http, choices, updates, chat=False)
        self.finished("completions", rid, started, prompts, choices)
        if not complete:
            return Response(status_code=499)  # the client is gone; nobody reads this
        if self.failed_in_flight(choices):
            raise self.engine_failed(500)
        return {**head, "choices": [
            {"index": i, "text": echo[i] + c.text, "finish_reason": c.finish_reason, "logprobs": None}
            for i, c in enumerate(choices)
        ], "usage": usage(prompts, choices)}

    async def chat_completions(self, body: ChatBody, http: Request) -> Any:
        started = time.perf_counter()
        settings = self.settings_for(body, body.max_completion_tokens or body.max_tokens, 1)
        stops = self.stops_of(body)
        if self.template.stop:
            stops.append(self.template.stop)
        prompts = await asyncio.to_thread(
            lambda: encode_released(self.tokenizer, [conversation_prompt(self.template, body.messages)])
        )
        choices, updates = await self.submit("chat", prompts, settings, stops)
        rid = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        head = {"id": rid, "object": "chat.completion.chunk", "created": int(time.time()), "model": self.config.model_name}
        if body.stream:
            include = bool(body.stream_options and body.stream_options.include_usage)

            def chunk(index: int, text: str | None, finish: str | None) -> dict:
                delta = {} if text is None or (finish and not text) else {"content": text}
                return {**head, "choices": [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}],
                        **({"usage": None} if include else {})}

            opening = [
                {**chunk(i, None, None), "choices": [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                       "finish_reason": None, "logprobs": None}]}
                for i in range(len(choices))
            ]
            return self.stream_response("chat", rid, started, prompts, choices, updates, include, chunk, opening)
        complete = await self.collect(http, choices, updates, chat=True)
        self.finished("chat", rid, started, prompts, choices)
        if not complete:
            return Response(status_code=499)  # the client is gone; nobody reads this
        if self.failed_in_flight(choices):
            raise self.engine_failed(500)
        return {**head, "object": "chat.completion", "choices": [
            {"index": i, "message": {"role": "assistant", "content": c.text}, "finish_reason": c.finish_reason,
             "logprobs": None}
            for i, c in enumerate(choices)
        ], "usage": usage(prompts, choices)}

    def refused(self, status: int) -> None:
        """Count a request the guard turned away before it reached a handler."""
        self.metrics.errors.labels(str(status)).inc()


def create_app(worker: EngineWorker, tokenizer: Tokenizer, config: ServeConfig) -> FastAPI:
    """The FastAPI app over a started-or-not worker; the app starts and stops it with its lifespan."""
    service = Service(worker, tokenizer, config)
    app = FastAPI(title="calm", lifespan=service.lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(Guard, api_key=config.api_key, max_body_bytes=config.max_body_bytes, on_refuse=service.refused)
    app.add_exception_handler(ApiError, service.api_error)
    app.add_exception_handler(HTTPException, service.http_error)
    app.add_exception_handler(RequestValidationError, service.invalid)
    app.get("/health")(service.health)
    app.get("/v1/models")(service.models)
    app.get("/metrics")(service.metrics_text)
    app.post("/v1/completions")(service.completions)
    app.post("/v1/chat/completions")(service.chat_completions)
    return app


def usage(prompts: list[list[int]], choices: list[Choice]) -> dict[str, int]:
    """OpenAI's token counts of one response."""
    prompt_tokens = sum(len(p) for p in prompts)
    completion = sum(c.tokens for c in choices)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion, "total_tokens": prompt_tokens + completion}


def http_error_response(request: Request, exc: HTTPException) -> Response:
    """Starlette's own errors (no route, wrong method, a body over the limit) in OpenAI's shape."""
    code = HTTP_CODES.get(exc.status_code, f"http_{exc.status_code}")
    message = {400: "the request body is not UTF-8 JSON", 404: f"no such endpoint: {request.method} {request.url.path}",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(exc.status_code, str(exc.detail))
    body = error_body(message, "invalid_request_error", code)
    return Response(body, status_code=exc.status_code, media_type="application/json", headers=exc.headers)


def refuse_unsupported(body: Options) -> None:
    """A 400 naming the first field CALM cannot honour, unless it is null or has the value that changes nothing."""
    for name, value in (body.model_extra or {}).items():
        if name in UNSUPPORTED and value is not None and value not in UNSUPPORTED[name]:
            raise ApiError(400, f"'{name}' is not supported by this server (CALM cannot apply it)", param=name,
                           code="unsupported_parameter")


def check_cost(engine: Engine, settings: GenerationSettings, rows: int, limit: int, param: str) -> None:
    """A 400 for a request whose step would score more logits than the server's budget, before anything runs."""
    logits = engine.step_logits(settings, rows)
    if logits > limit:
        candidates = logits // (rows * engine.k * engine.config.vocab_size)
        shape = (f"{rows} row{'s' if rows > 1 else ''} x {candidates:,} candidates x K {engine.k} "
                 f"x vocabulary {engine.config.vocab_size:,}")
        raise ApiError(400, f"this request would score {logits:,} logits per step ({shape}), over this server's limit of "
                       f"{limit:,} (--max-request-logits): ask for fewer samples or choices", param=param,
                       code="request_too_costly")


def conversation_prompt(template: Template, messages: list[Message]) -> str:
    """The text `calm chat` would send for these messages: system text, past turns, the last user message."""
    if messages[-1].role != "user":
        raise ApiError(400, "the last message must have role 'user'", param="messages", code="invalid_value")
    system = "\n".join(m.text for m in messages if m.role in ("system", "developer"))
    turns: list[Turn] = []
    pending: list[str] = []
    for message in messages[:-1]:
        if message.role == "user":
            pending.append(message.text)
        elif message.role == "assistant":
            turns.append(Turn("\n".join(pending), message.text))
            pending = []
    question = "\n".join([*pending, messages[-1].text])
    return Conversation(template, system, turns).prompt(question)
