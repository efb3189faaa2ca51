"""Tokenizer training and token-file preparation for CALM training.

prepare_data writes each split as one flat, memory-mappable array of token ids (documents
wrapped as <s> ... </s> and concatenated), so training can sample windows without loading
the corpus into memory.
"""

from __future__ import annotations

import array
import contextlib
import hashlib
import itertools
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ..errors import CalmError, UsageError
from ..io.atomic import atomic_open, atomic_path, write_text_atomic
from ..io.documents import TOKEN_DTYPES, iter_documents

BOS, EOS, PAD = "<s>", "</s>", "[PAD]"
SPECIAL_TOKENS = (BOS, EOS, PAD)  # ids 0, 1, 2, as in the official checkpoints' tokenizer
SPLITS = ("train", "heldout")
_BATCH_DOCUMENTS = 1024


def _check_sources(sources: list[Path]) -> None:
    """Fail before any slow work when a source is missing or unreadable."""
    if not sources:
        raise UsageError("no data files given")
    for path in sources:
        if not path.is_file():
            raise CalmError(f"cannot read {path}: no such file")
        if not os.access(path, os.R_OK):
            raise CalmError(f"cannot read {path}: permission denied")


def _all_documents(sources: list[Path]) -> Iterator[str]:
    for path in sources:
        yield from iter_documents(path)


def train_tokenizer(sources: list[Path], vocab_size: int, out: Path) -> None:
    """Train a byte-level BPE tokenizer laid out like the official CALM one and save it to `out`.

    <s>=0, </s>=1, [PAD]=2; encoding prepends <s> (the model is trained on <s>-led sequences).
    """
    from tokenizers import (
        Tokenizer,
        decoders,
        models,
        pre_tokenizers,
        processors,
        trainers,
    )

    byte_alphabet = pre_tokenizers.ByteLevel.alphabet()
    if vocab_size < len(byte_alphabet) + len(SPECIAL_TOKENS) + 1:
        raise UsageError(f"vocabulary size must be at least {len(byte_alphabet) + len(SPECIAL_TOKENS) + 1}")
    _check_sources(sources)
    texts = _all_documents(sources)
    try:
        first = next(texts)
    except StopIteration:
        raise CalmError("the corpus is empty: no text in " + ", ".join(map(str, sources))) from None

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=byte_alphabet,
        show_progress=False,
    )
    tokenizer.train_from_iterator(itertools.chain([first], texts), trainer=trainer)
    tokenizer.post_processor = processors.Sequence([
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B:1", special_tokens=[(BOS, 0)]),
    ])
    with atomic_path(out) as tmp:
        tokenizer.save(str(tmp))


def heldout_score(text: str) -> float:
    """A stable number in [0, 1) for a document, so it lands in the same split on every run and machine."""
    return int.from_bytes(hashlib.sha1(text.encode("utf-8")).digest()[:8], "big") / 2.0**64


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _load_tokenizer(path: Path) -> Any:
    from tokenizers import Tokenizer

    try:
        return Tokenizer.from_file(str(path))
    except Exception as exc:  # the library raises a bare Exception for unreadable or malformed files
        raise CalmError(f"cannot load tokenizer {path}: {str(exc).splitlines()[0] if str(exc) else exc}") from None


def prepare_data(
    sources: list[Path],
    tokenizer_path: Path,
    out_dir: Path,
    heldout_fraction: float = 0.01,
) -> dict[str, Any]:
    """Tokenize documents into out_dir/train.bin and heldout.bin plus manifest.json; returns the manifest.

    A document goes to heldout when its sha1-derived score is below heldout_fraction, so the
    split does not depend on corpus order. With at least two documents each split gets one,
    so a tiny corpus still has something to evaluate on.
    """
    if not 0.0 <= heldout_fraction < 1.0:
        raise UsageError("the held-out fraction must be in [0, 1)")
    _check_sources(sources)
    tokenizer = _load_tokenizer(tokenizer_path)
    bos, eos = tokenizer.token_to_id(BOS), tokenizer.token_to_id(EOS)
    if bos is None or eos is None:
        raise CalmError(f"tokenizer {tokenizer_path} has no {BOS} / {EOS} tokens")
    vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
    dtype = "uint16" if vocab_size <= 1 << 16 else "uint32"
    typecode = TOKEN_DTYPES[dtype][1]

    # Scores are gathered first so the "at least one document per split" rule sees the whole corpus.
    scores: list[float] = []
    per_source: list[dict[str, Any]] = []
    for path in sources:
        before = len(scores)
        scores.extend(heldout_score(text) for text in iter_documents(path))
        per_source.append({"path": str(path), "sha256": _sha256(path), "documents": len(scores) - before})
    if not scores:
        raise CalmError("the corpus is empty: no text in " + ", ".join(map(str, sources)))
    split_of = assign_splits(scores, heldout_fraction)

    counts = {split: {"tokens": 0, "documents": 0} for split in SPLITS}
    with contextlib.ExitStack() as files:
        handles = {split: files.enter_context(atomic_open(out_dir / f"{split}.bin", "wb")) for split in SPLITS}
        batch: list[str] = []
        index = 0

        def flush() -> None:
            nonlocal index
            encodings = tokenizer.encode_batch(batch, add_special_tokens=False)
            buffers = {split: array.array(typecode) for split in SPLITS}
            for encoding in encodings:
                split = split_of[index]
                index += 1
                buffers[split].append(bos)
                buffers[split].extend(encoding.ids)
                buffers[split].append(eos)
                counts[split]["documents"] += 1
            for split, buffer in buffers.items():
                counts[split]["tokens"] += len(buffer)
                if sys.byteorder != "little":
                    buffer.byteswap()
                buffer.tofile(handles[split])
            batch.clear()

        for text in _all_documents(sources):
            batch.append(text)
            if len(batch) == _BATCH_DOCUMENTS:
                flush()
        if batch:
            flush()

    manifest = {
        "tokenizer": str(tokenizer_path),
        "tokenizer_sha256": _sha256(tokenizer_path),
        "vocab_size": vocab_size,
        "dtype": dtype,
        "byte_order": "little",
        "bos_id": bos,
        "eos_id": eos,
        "heldout_fraction": heldout_fraction,
        "splits": {split: {"file": f"{split}.bin", **counts[split]} for split in SPLITS},
        "sources": per_source,
    }
    write_text_atomic(out_dir / "manifest.json", json.dumps(manifest, indent=2) + "\n")
    return manifest


def assign_splits(scores: list[float], heldout_fraction: float) -> list[str]:
    """Split names for documents by score; with two or more documents neither split is left empty.

    When a split would be empty, the document whose score lies nearest the threshold moves to it.
    """
    splits = ["heldout" if score < heldout_fraction else "train" for score in scores]
    if len(scores) >= 2 and heldout_fraction > 0.0:
        if "heldout" not in splits:
            splits[min(range(len(scores)), key=scores.__getitem__)] = "heldout"
        if "train" not in splits:
            splits[max(range(len(scores)), key=scores.__getitem__)] = "train"
    return splits
