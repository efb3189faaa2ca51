"""Text in, text out: tokenisation, incremental detokenisation and stop strings over the Engine."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator

from tokenizers import Tokenizer

from ..errors import CalmError
from ..io.tokenizer import encode
from .engine import Engine, GenerationSettings, GenerationStats

REPLACEMENT = "\ufffd"


@dataclass
class TextDelta:
    """New text for one row; `finish_reason` is set on the row's last delta."""

    row: int
    text: str
    finish_reason: str | None = None


@dataclass
class _Row:
    ids: list[int] = field(default_factory=list)
    emitted: int = 0
    text: str = ""
    done: bool = False
    finish_reason: str | None = None


def _stop_cut(text: str, stops: list[str]) -> int | None:
    cuts = [text.find(s) for s in stops if s and s in text]
    return min(cuts) if cuts else None


def _holdback(text: str, stops: list[str]) -> int:
    """Characters at the end of `text` that might be the start of a stop string or a split UTF-8 byte."""
    hold = 0
    for s in stops:
        for n in range(min(len(s) - 1, len(text)), 0, -1):
            if text.endswith(s[:n]):
                hold = max(hold, n)
                break
    if text.endswith(REPLACEMENT):
        hold = max(hold, len(text) - len(text.rstrip(REPLACEMENT)))
    return hold


def stream_text(
    engine: Engine,
    tokenizer: Tokenizer,
    prompts: list[str],
    settings: GenerationSettings,
    stop: list[str] | None = None,
    stats: GenerationStats | None = None,
) -> Iterator[TextDelta]:
    """Yield text deltas per row as chunks are decoded; a stop string ends its row and is not shown."""
    if tokenizer is None:
        raise CalmError("the model has no tokenizer.json (pass --tokenizer PATH)")
    stop = [s for s in (stop or []) if s]
    token_prompts = [encode(tokenizer, p) for p in prompts]
    rows = [_Row() for _ in prompts]
    for step in engine.stream(token_prompts, settings, stats):
        for i, (new, finished) in enumerate(zip(step.tokens, step.finished)):
            row = rows[i]
            if row.done:
                continue
            row.ids.extend(new)
            text = tokenizer.decode(row.ids, skip_special_tokens=True)
            cut = _stop_cut(text, stop)
            if cut is not None:
                text, finished, row.finish_reason = text[:cut], True, "stop"
            elif finished:
                row.finish_reason = "length" if len(row.ids) >= settings.max_tokens else "eos"
            ready = len(text) if finished else len(text) - _holdback(text, stop)
            if ready > row.emitted or finished:
                delta = text[row.emitted : ready]
                row.emitted = max(row.emitted, ready)
                row.done = finished
                yield TextDelta(i, delta, row.finish_reason if finished else None)
        if all(r.done for r in rows):
            break


def generate(
    engine: Engine,
    tokenizer: Tokenizer,
    prompts: list[str],
    settings: GenerationSettings,
    stop: list[str] | None = None,
    stats: GenerationStats | None = None,
) -> list[str]:
    """Whole continuations, one per prompt."""
    out = [""] * len(prompts)
    for delta in stream_text(engine, tokenizer, prompts, settings, stop, stats):
        out[delta.row] += delta.text
    return out
