"""Tokenizer helpers around `tokenizers.Tokenizer` (the model's `.tokenizer` is one of those)."""

from __future__ import annotations

import re
from pathlib import Path

from tokenizers import Tokenizer

from ..errors import CalmError

SURROGATE = re.compile("[\ud800-\udfff]")


def load_tokenizer(path: str | Path) -> Tokenizer:
    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # the Rust side raises plain Exception subclasses
        raise CalmError(f"{path}: cannot read tokenizer ({str(exc).splitlines()[0]})") from None


def vocab_size(tokenizer: Tokenizer) -> int:
    return tokenizer.get_vocab_size(with_added_tokens=True)


def replace_surrogates(text: str) -> str:
    """Lone surrogates become U+FFFD: JSON can escape them ("\\ud800") and Python keeps them, but they are not
    Unicode text and the tokenizer refuses them."""
    return SURROGATE.sub("\ufffd", text)


def encode(tokenizer: Tokenizer, text: str, add_special_tokens: bool = True) -> list[int]:
    """Token ids; with special tokens the post-processor prepends BOS, as Llama-3's does."""
    return tokenizer.encode(replace_surrogates(text), add_special_tokens=add_special_tokens).ids


def encode_released(tokenizer: Tokenizer, texts: list[str]) -> list[list[int]]:
    """`encode` of each text, through `encode_batch`, which releases the GIL while the Rust side works (`encode`
    holds it): a server tokenizing a large prompt on a worker thread keeps its event loop answering."""
    return [e.ids for e in tokenizer.encode_batch([replace_surrogates(t) for t in texts], add_special_tokens=True)]
