"""Incremental detokenising: linear in the output, whole characters only, stop strings across chunk edges."""

from __future__ import annotations

from pathlib import Path

import pytest
from tokenizers import Tokenizer

from calm_cli.runtime.text import CONTEXT_TOKENS, MAX_SPLIT_TOKENS, TextStream

TOKENIZER = Path(__file__).parent.parent / "weights" / "default" / "tokenizer.json"
TEXT = "Naïve café — 東京 and Zürich, señor! ✓ Ünïcödé… the end."


class CountingTokenizer:
    """The real tokenizer, recording how many ids each decode call gets."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        self.tokenizer = tokenizer
        self.lengths: list[int] = []

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        self.lengths.append(len(ids))
        return self.tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)


@pytest.fixture(scope="module")
def tokenizer() -> Tokenizer:
    return Tokenizer.from_file(str(TOKENIZER))


@pytest.mark.parametrize("step", [1, 2, 3, 4])
def test_deltas_join_to_the_whole_text_and_never_split_a_character(tokenizer: Tokenizer, step: int) -> None:
    ids = tokenizer.encode(TEXT * 3, add_special_tokens=False).ids
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids)  # some tokens hold part of a character
    counting = CountingTokenizer(tokenizer)
    stream = TextStream(counting)
    parts = [stream.feed(ids[i : i + step], final=i + step >= len(ids)) for i in range(0, len(ids), step)]
    assert "".join(parts) == tokenizer.decode(ids)
    assert all("\ufffd" not in part for part in parts)
    # Each decode sees a bounded window, not the whole text so far: linear work in the output length.
    assert max(counting.lengths) <= CONTEXT_TOKENS + MAX_SPLIT_TOKENS + step


def test_stop_string_split_across_chunks_is_cut_and_not_shown(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("Hello world. User: more text", add_special_tokens=False).ids
    stream = TextStream(tokenizer, stop=["\nUser:", " User:"])
    shown = ""
    for i in range(len(ids)):
        shown += stream.feed(ids[i : i + 1])
        if stream.stopped:
            break
    assert stream.stopped and shown == "Hello world."


def test_text_that_only_looks_like_a_stop_prefix_is_released_at_the_end(tokenizer: Tokenizer) -> None:
    ids = tokenizer.encode("ends with Us", add_special_tokens=False).ids
    stream = TextStream(tokenizer, stop=[" User:"])
    held = "".join(stream.feed([i]) for i in ids)
    assert held == "ends with" and stream.feed([], final=True) == " Us" and not stream.stopped


def test_text_delta_cuts_at_a_stop_string_and_cancels_once(tokenizer: Tokenizer) -> None:
    from calm_cli.runtime.engine import Update
    from calm_cli.runtime.text import text_delta

    request = object()
    cancelled: list[str] = []
    stream = TextStream(tokenizer, ["\nUser:"])
    ids = tokenizer.encode("Hello there.\nUser: more").ids
    deltas = [text_delta(stream, Update(request, [i]), lambda r, why: cancelled.append(why)) for i in ids]
    reported = [d for d in deltas if d is not None]
    assert "".join(text for text, _ in reported) == "Hello there."
    assert reported[-1][1] == "stop" and cancelled == ["stop"]
    assert text_delta(stream, Update(request, ids[:1], "length"), lambda r, why: cancelled.append(why)) is None
