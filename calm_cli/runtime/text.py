"""Text in, text out over the Engine: tokenising, incremental detokenising and stop strings.

`TextStream` turns one request's growing token list into text deltas in time linear in
the output: it decodes only a short window (the last few tokens already shown plus the new
ones), holds back the tokens of an incomplete UTF-8 character (the tokenizer shows it as
U+FFFD until its last byte arrives) and any text that could be the start of a stop string.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from tokenizers import Tokenizer

from ..errors import CalmError
from ..io.tokenizer import encode
from .engine import Engine, Request, Update
from .sampling import SamplingStats
from .settings import GenerationSettings

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 4  # tokens already shown that are decoded again with new ones, for spacing rules
MAX_SPLIT_TOKENS = 4  # a UTF-8 character has at most 4 bytes, so it is split over at most 4 tokens


@dataclass
class TextDelta:
    """New text for one row; `finish_reason` is set on the row's last delta."""

    row: int
    text: str
    finish_reason: str | None = None


@dataclass
class GenerationStats:
    prompt_tokens: list[int] = field(default_factory=list)
    completion_tokens: list[int] = field(default_factory=list)
    steps: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    sampling: SamplingStats = field(default_factory=SamplingStats)


class TextStream:
    """One request's text so far; `feed` takes new token ids and returns the text that is now final."""

    def __init__(self, tokenizer: Tokenizer, stop: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.ids: list[int] = []
        self.start = 0  # ids before this were decoded for good; decoding resumes from here
        self.shown = 0  # ids[start:shown] were decoded into `pending` or shown already
        self.pending = ""  # decoded text not yet handed out (a possible stop-string start)
        self.stopped = False

    def feed(self, new: list[int], final: bool = False) -> str:
        """Text that can be shown after `new`; with `final`, everything left. Sets `stopped` at a stop string."""
        if self.stopped:
            return ""
        self.ids.extend(new)
        end = len(self.ids) if final else self._whole_end()
        if end > self.shown:
            before = self._decode(self.shown)
            self.pending += self._decode(end)[len(before) :]
            self.shown = end
            self.start = max(self.start, end - CONTEXT_TOKENS)
        return self._release(final)

    def _decode(self, end: int) -> str:
        return self.tokenizer.decode(self.ids[self.start : end], skip_special_tokens=True)

    def _whole_end(self) -> int:
        """The most ids whose text ends with a whole character: a split one waits for its last bytes.

        A character has at most 4 bytes, so if none of the last MAX_SPLIT_TOKENS ends cleanly
        the text holds invalid bytes, and they are shown as U+FFFD.
        """
        for end in range(len(self.ids), max(self.shown, len(self.ids) - MAX_SPLIT_TOKENS) - 1, -1):
            if end == self.shown or not self._decode(end).endswith(REPLACEMENT):
                return end
        return len(self.ids)

    def _release(self, final: bool) -> str:
        cuts = [self.pending.find(s) for s in self.stop if s in self.pending]
        if cuts:
            self.stopped = True
            out, self.pending = self.pending[: min(cuts)], ""
            return out
        hold = 0 if final else _holdback(self.pending, self.stop)
        out = self.pending[: len(self.pending) - hold]
        self.pending = self.pending[len(out) :]
        return out


def _holdback(text: str, stops: list[str]) -> int:
    """Characters at the end of `text` that might be the start of a stop string."""
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    return hold


def stream_text(
    engine: Engine,
    tokenizer: Tokenizer | None,
    prompts: list[str],
    settings: GenerationSettings | list[GenerationSettings],
    stop: list[str] | None = None,
    stats: GenerationStats | None = None,
) -> Iterator[TextDelta]:
    """Yield text deltas per row as chunks are decoded; a stop string ends its row and is not shown.

    All prompts go to the engine at once (one settings for all, or one per prompt); each row
    ends on its own and frees its slot for the next.
    """
    if tokenizer is None:
        raise CalmError("the model has no tokenizer.json (pass --tokenizer PATH)")
    per_row = settings if isinstance(settings, list) else [settings] * len(prompts)
    requests: list[Request] = [engine.submit(encode(tokenizer, p), s) for p, s in zip(prompts, per_row)]
    yield from stream_requests(engine, tokenizer, requests, stop, stats)


def stream_requests(
    engine: Engine,
    tokenizer: Tokenizer,
    requests: list[Request],
    stop: list[str] | None = None,
    stats: GenerationStats | None = None,
) -> Iterator[TextDelta]:
    """Drive the engine until `requests` are done, yielding their text (row = index in `requests`)."""
    row_of = {request.id: i for i, request in enumerate(requests)}
    streams = [TextStream(tokenizer, stop) for _ in requests]
    stats = stats if stats is not None else GenerationStats()
    stats.prompt_tokens = [len(r.prompt) for r in requests]
    sampling_before = engine.sampling.__dict__.copy()
    t0 = time.perf_counter()
    left = len(requests)
    try:
        while left:
            for update in engine.step():
                row = row_of.get(update.request.id)
                if row is None:
                    continue
                delta = text_delta(streams[row], update, engine.cancel)
                if delta is not None:
                    left -= delta[1] is not None
                    yield TextDelta(row, *delta)
            stats.completion_tokens = [len(s.ids) for s in streams]  # a stop string freezes a row's count
            stats.steps = max(r.steps for r in requests)
            stats.prefill_s = sum(r.prefill_s for r in requests)
            stats.decode_s = time.perf_counter() - t0 - stats.prefill_s
            stats.sampling = SamplingStats(**{k: v - sampling_before[k] for k, v in engine.sampling.__dict__.items()})
    finally:
        for request in requests:
            if not request.done:
                engine.cancel(request)


def text_delta(
    stream: TextStream, update: Update, cancel: Callable[[Request, str], None]
) -> tuple[str, str | None] | None:
    """(text, finish reason) for one update of a row, or None when there is nothing to report.

    The output step every front end shares (generate, --jsonl, chat and the server):
    detokenize, cut at a stop string and cancel the request through `cancel` (the engine's,
    or the server worker's, which also wakes its thread), name the finish reason.
    """
    if stream.stopped:
        return None
    final = update.finish_reason is not None
    text = stream.feed(update.tokens, final=final)
    if stream.stopped:
        cancel(update.request, "stop")
        return text, "stop"
    if final or text:
        return text, update.finish_reason
    return None


def generate(
    engine: Engine,
    tokenizer: Tokenizer,
    prompts: list[str],
    settings: GenerationSettings | list[GenerationSettings],
    stop: list[str] | None = None,
    stats: GenerationStats | None = None,
) -> list[str]:
    """Whole continuations, one per prompt."""
    out = [""] * len(prompts)
    for delta in stream_text(engine, tokenizer, prompts, settings, stop, stats):
        out[delta.row] += delta.text
    return out
