"""Reading what models are trained and evaluated on: documents from text or JSON lines, and token files.

A token file (written by `calm data prepare`) is one flat little-endian array of token ids,
its dtype named in the manifest.json beside it, so it can be memory-mapped.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from ..errors import CalmError

TOKEN_DTYPES = {"uint16": (torch.uint16, "H"), "uint32": (torch.uint32, "I")}


def _is_jsonl(path: Path, first_line: str) -> bool:
    """JSON lines by extension, or by a first line that is a JSON object (extensionless dumps)."""
    if path.suffix.lower() in (".jsonl", ".json"):
        return True
    if not first_line.lstrip().startswith("{"):
        return False
    try:
        return isinstance(json.loads(first_line), dict)
    except json.JSONDecodeError:
        return False


def iter_documents(path: Path) -> Iterator[str]:
    """Documents of one source: the `text` field of each JSONL record, or blank-line separated paragraphs."""
    try:
        with open(path, encoding="utf-8") as handle:
            first = handle.readline()
            lines = itertools.chain([first], handle)
            if _is_jsonl(path, first):
                for number, line in enumerate(lines, start=1):
                    yield from _jsonl_text(path, number, line)
                return
            paragraph: list[str] = []
            for line in lines:
                if line.strip():
                    paragraph.append(line.rstrip("\n"))
                elif paragraph:
                    yield "\n".join(paragraph)
                    paragraph = []
            if paragraph:
                yield "\n".join(paragraph)
    except OSError as exc:
        raise CalmError(f"cannot read {path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise CalmError(f"cannot read {path}: not UTF-8 text") from None


def _jsonl_text(path: Path, number: int, line: str) -> Iterator[str]:
    if not line.strip():
        return
    try:
        record = json.loads(line)
    except json.JSONDecodeError:
        raise CalmError(f"{path}:{number}: not valid JSON") from None
    text = record.get("text") if isinstance(record, dict) else None
    if not isinstance(text, str):
        raise CalmError(f"{path}:{number}: no \"text\" string field")
    if text.strip():
        yield text


def load_tokens(path: str | Path, dtype: str | None = None) -> torch.Tensor:
    """Memory-map a token file written by prepare_data (dtype from the manifest beside it unless given)."""
    path = Path(path)
    if dtype is None:
        manifest_path = path.parent / "manifest.json"
        try:
            dtype = json.loads(manifest_path.read_text(encoding="utf-8"))["dtype"]
        except (OSError, ValueError, KeyError):
            raise CalmError(f"cannot read the token dtype from {manifest_path}") from None
    if dtype not in TOKEN_DTYPES:
        raise CalmError(f"unknown token dtype {dtype!r}")
    torch_dtype = TOKEN_DTYPES[dtype][0]
    try:
        size = path.stat().st_size
    except OSError as exc:
        raise CalmError(f"cannot read {path}: {exc.strerror or exc}") from None
    itemsize = torch.empty(0, dtype=torch_dtype).element_size()
    if size % itemsize:
        raise CalmError(f"{path} is truncated ({size} bytes is not a whole number of {dtype} tokens)")
    if size == 0:
        return torch.empty(0, dtype=torch_dtype)
    return torch.from_file(str(path), shared=False, size=size // itemsize, dtype=torch_dtype)
