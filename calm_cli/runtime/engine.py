"""The one decode loop: requests over a fixed set of slots with a preallocated KV cache.

Every command that generates (generate, --jsonl, chat, bench, serve) goes through
`Engine`. Requests wait in a queue, join between steps (their prompt is prefilled into a
free slot, in pieces when long) and leave when done: EOS, `max_tokens`, a full context
(finish reason "length") or `cancel` (a stop string, a client gone). A freed slot takes
the next request at the next step (continuous batching).

A step samples the next chunk of every busy slot from its hidden state, one call of the
temperature rule per group of rows that share settings, then feeds all chunks back
through the backbone at once; slot positions live on the device. The engine's own host
synchronisation is the transfer of the chosen token ids that the step hands out; the
samplers add theirs where the work is data-dependent (the fast candidate decoder's
rescoring, the exact sampler's rounds, a first chunk after leftover prompt tokens with no
matching candidate). Each request has
its own random stream from its own seed (`RowRandom`), so its output depends on its
prompt, settings and seed, not on what else is in the batch. The backbone step runs on a
multiple of ROW_QUANTUM rows, so a row's hidden state is bitwise the same alone and beside
others (README "One engine for every request" says what else holds).

Prompts whose length is not a multiple of K: the authors right-pad with PAD, a token the
model never saw in training. We prefill the prompt's whole chunks and keep the r < K
leftover tokens; the first generated chunk is drawn conditioned on starting with them
(`CALMRunner._after_prefix`). Prompts shorter than one chunk are left-padded with EOS to
one chunk ("a previous document ended here"), the only context of that kind the model
can have seen.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import torch

from ..errors import UsageError
from ..models.backbone import KVCache
from ..models.baseline import TokenTransformer
from ..models.calm import CALM
from .budget import logit_elements, step_candidates
from .rng import RowRandom, mix64, new_seed
from .runners import CALMRunner, Runner, make_runner
from .sampling import SamplingStats
from .settings import EngineOptions, GenerationSettings

PREFILL_PIECE = 256  # steps of a prompt prefilled per backbone call: bounds prefill memory
SPAN_QUANTUM = 64  # attention reads the cache up to the longest row, rounded up to this
# Backbone steps run on a multiple of this many rows: CPU float32 GEMMs (oneDNN/MKL) round a row differently
# for 1-3 rows, and for 5-7 or 9-11 at some thread counts, than for any multiple of 4 (README "One engine").
ROW_QUANTUM = 4
DEFAULT_MAX_BATCH = {"cpu": 8, "cuda": 64}
_ids = itertools.count(1)


class PromptTooLong(UsageError):
    """The prompt leaves no room in the model's context."""


def default_max_batch(device: torch.device) -> int:
    """Slots when the user gives none.

    CPU: 8. A decode step there is bound by the candidate decoding, whose cost grows with
    the rows, so more slots add latency for every request while the aggregate rate levels
    off; 8 concurrent requests already give most of it. CUDA: 64, where a step is bound by
    reading the weights and rows come almost free.
    """
    return DEFAULT_MAX_BATCH.get(device.type, 8)


RECOMPILE_LIMIT = 2  # graphs compiled after warm-up; later ones run their traced graph eagerly
GRAPHS_PER_ENGINE = 8 + RECOMPILE_LIMIT  # warm-up's graphs (three or four) with room, and the recompiles


def round_up(n: int, quantum: int) -> int:
    """The smallest multiple of `quantum` that is at least `n`: the padded rows and spans a step runs on."""
    return -(-n // quantum) * quantum


def compile_by_default(device: torch.device) -> bool:
    """Compile where a compiled step repays its warm-up: on CUDA, not on CPU (minutes of C++ builds)."""
    return device.type == "cuda"


def build_engine(model: CALM | TokenTransformer, options: EngineOptions) -> Engine:
    """The engine every command builds from its flags, so each takes the same options the same way."""
    device = next(model.parameters()).device
    compile = compile_by_default(device) if options.compile is None else options.compile
    return Engine(model, max_batch=options.max_batch, candidate_decoder=options.candidate_decoder,
                  candidate_dtype=options.candidate_dtype, compile=compile)


class CompileWatch:
    """The torch.compile backend of an engine's step: counts its graphs and bounds recompiles after warm-up.

    Dynamo calls a backend once per graph it traced (a first call, or a call whose shapes
    failed every compiled graph's guards). Before `seal` those are warm-up. After it, each
    one is a compile in the request path: the first `limit` go to the real backend, later
    ones run the traced graph eagerly, so an unforeseen shape costs one trace, not minutes
    of inductor, and the counts say that it happened.
    """

    def __init__(self, backend: str | Callable = "inductor", limit: int = RECOMPILE_LIMIT) -> None:
        self.backend, self.limit = backend, limit
        self.graphs = 0  # compiled by the backend, warm-up included
        self.recompiles = 0  # graphs traced after warm-up, compiled or not
        self.eager_graphs = 0  # of those, the ones past `limit`, left eager
        self.sealed = False
        self.compiling = False  # the backend is compiling right now (minutes with inductor; it cannot be interrupted)

    def seal(self) -> None:
        """Warm-up is over: from now on a new graph is a recompile."""
        self.sealed = True

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list) -> Callable:
        if self.sealed:
            self.recompiles += 1
            if self.recompiles > self.limit:
                self.eager_graphs += 1
                return graph.forward
        self.compiling = True
        try:
            compiled = torch._dynamo.lookup_backend(self.backend)(graph, example_inputs)
        finally:
            self.compiling = False
        self.graphs += 1
        return compiled


def compiled_step(runner: Runner, watch: CompileWatch) -> Callable[[KVCache, torch.Tensor, torch.Tensor, int], torch.Tensor]:
    """`runner.step` under torch.compile as one graph (fullgraph: a graph break is an error, not a slow path).

    Each row's cache position is the `lengths` tensor, so the graph does not change as rows
    grow; only the batch rows and the attention span (a multiple of SPAN_QUANTUM) are
    shapes. They start static and turn symbolic the first time one changes (torch's
    automatic dynamic shapes); a span of the whole cache is specialised apart, so a run
    needs three or four graphs, which `Engine.warm_up` compiles before any request.
    """
    # Dynamo keeps at most `recompile_limit` graphs per code object, and every engine's step is
    # `Runner.step`'s code: each compiled engine adds its own graphs to the limit, so a second
    # engine in the process (calm bench's subjects) is compiled too, not left eager.
    torch._dynamo.config.recompile_limit += GRAPHS_PER_ENGINE
    return torch.compile(runner.step, fullgraph=True, dynamic=None, backend=watch)


@dataclass
class Request:
    """One prompt's generation. The engine fills `tokens` and sets `finish_reason` when it ends."""

    prompt: list[int]
    settings: GenerationSettings
    seed: int
    id: int = field(default_factory=lambda: next(_ids))
    tokens: list[int] = field(default_factory=list)
    finish_reason: str | None = None
    on_update: Callable[[Update], None] | None = None
    cancel_reason: str | None = None
    started: float | None = None  # prefill began
    first_step: float | None = None  # prefill ended
    finished: float | None = None
    steps: int = 0

    @property
    def done(self) -> bool:
        return self.finish_reason is not None

    @property
    def prefill_s(self) -> float:
        return (self.first_step or 0.0) - (self.started or 0.0)

    @property
    def decode_s(self) -> float:
        return (self.finished or time.perf_counter()) - self.first_step if self.first_step else 0.0


@dataclass
class Update:
    """New tokens of one request from one step; `finish_reason` is set on its last update."""

    request: Request
    tokens: list[int]
    finish_reason: str | None = None


class Engine:
    """Owns a model, its slots and KV cache; `submit` requests, then `step` (or `run`) until they are done.

    `submit` and `cancel` may be called from other threads; `step` from one thread only.
    `compile` puts the backbone step under torch.compile (`compile_backend`, else
    $CALM_COMPILE_BACKEND, else inductor: `aot_eager` traces without generating code, which
    the GPU check's dry run uses and which tells a compiler bug from a tracing one); `warm_up`
    then compiles it for every shape before the first request.
    """

    def __init__(
        self, model: CALM | TokenTransformer, *, max_batch: int | None = None, candidate_decoder: str = "fast",
        compile: bool = False, candidate_dtype: str = "auto", compile_backend: str | Callable | None = None,
    ) -> None:
        self.model = model
        self.runner = make_runner(model, candidate_decoder, candidate_dtype)
        self.config = model.config
        self.k = self.runner.unit
        self.context = self.runner.context
        param = next(model.parameters())
        self.device = param.device
        self.max_batch = max_batch or default_max_batch(self.device)
        if self.max_batch < 1:
            raise UsageError("--max-batch must be at least 1")
        # Rows of the cache and of every per-slot tensor: the slots, and scratch rows that pad a step to ROW_QUANTUM.
        self.rows = round_up(self.max_batch, ROW_QUANTUM)
        self.eos = model.config.eos_token_id
        # Padding a CALM chunk may decode to; None keeps every token (a token model's draw is always kept).
        self.pad = model.config.pad_token_id if self.runner.chunks_hold_padding else None
        self.cache: KVCache = self.runner.new_cache(self.rows)
        self.hidden = torch.zeros(self.rows, model.config.hidden_size, dtype=param.dtype, device=self.device)
        self.rng = RowRandom(
            torch.zeros(self.rows, dtype=torch.long, device=self.device),
            torch.zeros(self.rows, dtype=torch.long, device=self.device),
        )
        self.slots: list[Request | None] = [None] * self.max_batch
        self.lengths = [0] * self.max_batch  # steps in each slot's cache, on the host
        self.write_at = torch.zeros(self.rows, dtype=torch.long, device=self.device)  # the same, on the device
        self.busy_mask = torch.zeros(self.rows, dtype=torch.long, device=self.device)
        self._indices: dict[tuple[int, ...], torch.Tensor] = {}
        self.prefixes: list[list[int] | None] = [None] * self.max_batch
        self.sampling = SamplingStats()
        self._waiting: deque[Request] = deque()
        self._live: dict[int, Request] = {}  # submitted and not finished, wherever they are
        self._lock = threading.Lock()
        backend = compile_backend or os.environ.get("CALM_COMPILE_BACKEND", "inductor")
        self.compile_watch = CompileWatch(backend) if compile else None
        self._step = compiled_step(self.runner, self.compile_watch) if compile else self.runner.step

    # ---- requests --------------------------------------------------------------------------

    def submit(
        self, prompt: list[int], settings: GenerationSettings, on_update: Callable[[Update], None] | None = None
    ) -> Request:
        """Queue a prompt (token ids); raises UsageError for a prompt longer than the context (settings checked themselves)."""
        prompt = self._framed(prompt)
        if len(prompt) // self.k >= self.context:
            raise PromptTooLong(f"prompt is {len(prompt)} tokens; the model's context is {self.context * self.k} tokens")
        seed = settings.seed if settings.seed is not None else new_seed()
        request = Request(prompt, settings, seed, on_update=on_update)
        with self._lock:
            self._waiting.append(request)
            self._live[request.id] = request
        return request

    def cancel(self, request: Request, reason: str = "cancelled") -> None:
        """End a request at the next step (its slot is free by then); the first reason given stands."""
        if request.cancel_reason is None:
            request.cancel_reason = reason

    def cancel_all(self, reason: str = "cancelled") -> None:
        """Cancel every request, running or waiting (a server shutting down, a failed step)."""
        with self._lock:
            live = list(self._live.values())
        for request in live:
            self.cancel(request, reason)

    def step_logits(self, settings: GenerationSettings, rows: int = 1) -> int:
        """Logits `rows` requests with these settings score per step at most: the cost a server budgets before it runs."""
        pooled = isinstance(self.runner, CALMRunner)
        candidates = step_candidates(settings.temperature, settings.num_samples, settings.sampler) if pooled else 1
        return logit_elements(rows, candidates, self.k, self.config.vocab_size)

    @property
    def queued(self) -> int:
        return len(self._waiting)

    @property
    def active(self) -> int:
        return sum(slot is not None for slot in self.slots)

    @property
    def compiling(self) -> bool:
        """Whether the step is being compiled right now."""
        return self.compile_watch is not None and self.compile_watch.compiling

    def has_work(self) -> bool:
        return bool(self._waiting) or any(slot is not None for slot in self.slots)

    def run(self) -> Iterator[list[Update]]:
        """Step until every submitted request is done, yielding each step's updates."""
        while self.has_work():
            yield self.step()

    # ---- the loop ----------------------------------------------------------------------------

    @torch.inference_mode()
    def step(self) -> list[Update]:
        """Retire cancelled requests, admit waiting ones, and decode one chunk for every busy slot.

        The updates made so far are delivered even when the step fails, so no request that
        has left its slot waits for an end that never comes.
        """
        updates: list[Update] = []
        try:
            updates += self._retire_cancelled()
            self._admit(updates)
            busy = [i for i, request in enumerate(self.slots) if request is not None]
            if busy:
                self._decode(busy, updates)
        finally:
            self._deliver(updates)
        return updates

    def _decode(self, busy: list[int], updates: list[Update]) -> None:
        rows = self._step_rows(max(busy) + 1)
        chosen = torch.full((rows, self.k), self.eos if self.eos is not None else 0, dtype=torch.long, device=self.device)
        for members, settings, prefixes in self._groups(busy):
            index = self._index(members)
            chosen[index] = self.runner.sample(self.hidden[index], self.rng.rows(index), settings, self.sampling, prefixes)
        span = min(self.context, round_up(max(self.lengths[i] for i in busy) + 1, SPAN_QUANTUM))
        self._forward(chosen, span)
        self.write_at[:rows] += self.busy_mask[:rows]
        tokens = chosen.tolist()  # the step's one transfer to the host
        for i in busy:
            updates.append(self._take(i, tokens[i]))

    def _forward(self, chosen: torch.Tensor, span: int) -> None:
        """Feed one chunk per row of the first `chosen.shape[0]` slots through the (compiled) step."""
        rows = chosen.shape[0]
        # A row whose context is full writes over its last slot: it ends in this step, so nothing reads it.
        at = self.write_at[:rows].clamp(max=self.context - 1)
        self.hidden[:rows] = self._step(self.cache, chosen, at, span)

    def warm_up_shapes(self) -> list[tuple[int, int]]:
        """(rows, span) pairs whose graphs serve every step this engine can take.

        Rows run over the multiples of ROW_QUANTUM up to the cache's rows (`_step_rows`) and
        the span over the multiples of SPAN_QUANTUM up to the context. Torch specialises a
        span of the whole cache (the slice is then the buffer itself) and starts every other
        size static; the smallest, next and largest of each, smallest first, make it compile
        those specialisations and the symbolic graphs that cover everything in between.
        """
        rows = sorted({self._step_rows(1), self._step_rows(ROW_QUANTUM + 1), self.rows})
        spans = sorted({min(self.context, SPAN_QUANTUM * j) for j in range(1, -(-self.context // SPAN_QUANTUM) + 1)})
        return [(r, s) for s in sorted({spans[0], spans[min(1, len(spans) - 1)], spans[-1]}) for r in rows]

    @torch.inference_mode()
    def warm_up(self, stop: Callable[[], bool] = lambda: False) -> bool:
        """Compile the step for every shape a run can meet, before any request arrives.

        It runs the engine's own compiled step on its own cache and buffers (the graphs a
        step later finds are these), then seals the compile watch so later compiles count as
        recompiles. The slots it writes are free, and a prefill overwrites them before they
        are read. `stop` is asked between shapes; False if it ended the warm-up early.
        """
        if self.has_work():
            raise RuntimeError("warm-up needs an idle engine")
        filler = self.eos if self.eos is not None else 0
        for rows, span in self.warm_up_shapes():
            if stop():
                return False
            self._forward(torch.full((rows, self.k), filler, dtype=torch.long, device=self.device), span)
        self.hidden.zero_()
        if self.compile_watch is not None:
            self.compile_watch.seal()
        return True

    def _step_rows(self, used: int) -> int:
        """Rows the step runs on: those up to the highest busy slot (slots fill lowest first, so few when few are
        busy), rounded up to ROW_QUANTUM so that a row's hidden state does not depend on how many others there are."""
        return min(self.rows, round_up(used, ROW_QUANTUM))

    def _index(self, members: list[int]) -> torch.Tensor:
        """The device index of a group of slots, made once per membership (a copy to the device is a sync on CUDA)."""
        key = tuple(members)
        if key not in self._indices:
            if len(self._indices) > 256:
                self._indices.clear()
            self._indices[key] = torch.tensor(members, device=self.device)
        return self._indices[key]

    def abandon(self, reason: str = "error") -> None:
        """End every request at once without touching the device, for an engine whose device failed.

        After a sticky CUDA error no kernel runs again, so `step` cannot retire anything;
        this hands each live request its last update from the host alone. The engine takes
        no more steps after it.
        """
        with self._lock:
            requests = list(self._live.values())
            self._live.clear()
            self._waiting.clear()
        self.slots, self.prefixes, self.lengths = [None] * self.max_batch, [None] * self.max_batch, [0] * self.max_batch
        now = time.perf_counter()
        for request in requests:
            request.finish_reason, request.finished = reason, now
        self._deliver([Update(request, [], reason) for request in requests])

    def _framed(self, prompt: list[int]) -> list[int]:
        """A prompt the model can condition on: at least one whole step, filled with EOS in front."""
        filler = self.eos if self.eos is not None else 0
        return [filler] * (self.k - len(prompt)) + list(prompt) if len(prompt) < self.k else list(prompt)

    def _retire_cancelled(self) -> list[Update]:
        updates = []
        for i, request in enumerate(self.slots):
            if request is not None and request.cancel_reason is not None:
                updates.append(self._finish(i, [], request.cancel_reason))
        with self._lock:
            gone = [r for r in self._waiting if r.cancel_reason is not None]
            for request in gone:
                self._waiting.remove(request)
        for request in gone:
            request.finish_reason, request.finished = request.cancel_reason, time.perf_counter()
            updates.append(Update(request, [], request.finish_reason))
            self._forget(request)
        return updates

    def _admit(self, updates: list[Update]) -> None:
        """Prefill waiting requests into free slots, lowest slot first."""
        for i in range(self.max_batch):
            if self.slots[i] is not None:
                continue
            with self._lock:
                if not self._waiting:
                    return
                request = self._waiting.popleft()
            try:
                self._prefill(i, request)
            except BaseException:
                self.slots[i], self.lengths[i], self.prefixes[i] = None, 0, None
                request.finish_reason, request.finished = "error", time.perf_counter()
                self._forget(request)
                updates.append(Update(request, [], "error"))
                raise

    def _prefill(self, slot: int, request: Request) -> None:
        request.started = time.perf_counter()
        whole = len(request.prompt) // self.k
        ids = torch.tensor(request.prompt[: whole * self.k], dtype=torch.long, device=self.device)[None]
        view = KVCache(
            keys=[k[slot : slot + 1] for k in self.cache.keys],
            values=[v[slot : slot + 1] for v in self.cache.values],
            valid=self.cache.valid[slot : slot + 1],
        )
        view.valid.zero_()
        view.valid[:, :whole] = True
        piece = PREFILL_PIECE * self.k
        for start in range(0, whole * self.k, piece):
            hidden = self.runner.prefill(view, ids[:, start : start + piece], start // self.k)
        self.hidden[slot] = hidden[0]
        self.rng.keys[slot] = mix64(torch.tensor(request.seed, dtype=torch.long, device=self.device))
        self.rng.counters[slot] = 0
        self.slots[slot], self.lengths[slot] = request, whole
        self.write_at[slot], self.busy_mask[slot] = whole, True
        leftover = request.prompt[whole * self.k :]
        self.prefixes[slot] = leftover or None
        request.first_step = time.perf_counter()

    def _groups(self, busy: list[int]) -> Iterator[tuple[list[int], GenerationSettings, list[list[int]] | None]]:
        """Busy slots grouped by sampling settings, rows with leftover prompt tokens apart."""
        groups: dict[tuple, list[int]] = {}
        for i in busy:
            groups.setdefault((self.slots[i].settings.group, self.prefixes[i] is not None), []).append(i)
        for (_, leftover), members in groups.items():
            settings = self.slots[members[0]].settings
            yield members, settings, [self.prefixes[i] for i in members] if leftover else None

    def _take(self, slot: int, chunk: list[int]) -> Update:
        """The tokens slot `slot` keeps from its new chunk, and whether that ends the request."""
        request = self.slots[slot]
        settings = request.settings
        new = chunk[len(self.prefixes[slot] or ()) :]
        self.prefixes[slot] = None
        reason = None
        if not settings.ignore_eos and self.eos is not None and self.eos in new:
            new, reason = new[: new.index(self.eos)], "eos"
        if self.pad is not None:
            new = [t for t in new if t != self.pad]
        left = settings.max_tokens - len(request.tokens)
        if len(new) > left:
            new, reason = new[:left], "length"  # the budget ran out before any EOS
        request.tokens.extend(new)
        request.steps += 1
        if reason is None and len(request.tokens) >= settings.max_tokens:
            reason = "length"
        if reason is None and self.lengths[slot] >= self.context:
            reason = "length"  # the context is full: this chunk could not be fed back
        self.lengths[slot] += 1
        if reason is not None:
            return self._finish(slot, new, reason)
        return Update(request, new)

    def _finish(self, slot: int, new: list[int], reason: str) -> Update:
        request = self.slots[slot]
        request.finish_reason, request.finished = reason, time.perf_counter()
        self.slots[slot], self.lengths[slot], self.prefixes[slot] = None, 0, None
        self.write_at[slot], self.busy_mask[slot] = 0, False
        self._forget(request)
        return Update(request, new, reason)

    def _forget(self, request: Request) -> None:
        with self._lock:
            self._live.pop(request.id, None)

    @staticmethod
    def _deliver(updates: list[Update]) -> list[Update]:
        for update in updates:
            if update.request.on_update is not None:
                update.request.on_update(update)
        return updates
