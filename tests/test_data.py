"""Tests for tokenizer training, token-file preparation and the corpus cleaning helpers."""

from __future__ import annotations

import array
import gzip
import json
import struct
import sys
import zlib
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer

from calm_cli.errors import CalmError
from calm_cli.io.documents import iter_documents, load_tokens
from calm_cli.training.data import (
    assign_splits,
    heldout_score,
    prepare_data,
    train_tokenizer,
)

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
import corpus  # noqa: E402  (the corpus recipe lives in scripts/, outside the package)

TINY = Path(__file__).parent / "data" / "tiny_corpus.txt"
OFFICIAL_TOKENIZER = Path(__file__).parent / "fixtures" / "official-tiny" / "tokenizer.json"


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    train_tokenizer([TINY], 400, out)
    return out


def _documents(tokens: torch.Tensor, tokenizer: Tokenizer) -> list[str]:
    """Decode a prepared split back into its documents (each <s> ... </s>)."""
    ids = tokens.long().tolist()
    docs, current = [], []
    for token in ids:
        if token == 0:
            current = []
        elif token == 1:
            docs.append(tokenizer.decode(current))
        else:
            current.append(token)
    return docs


# ------------------------------------------------------------------------------- tokenizer


def test_tokenizer_matches_official_layout(tokenizer_path: Path) -> None:
    ours, official = json.loads(tokenizer_path.read_text()), json.loads(OFFICIAL_TOKENIZER.read_text())
    assert ours["added_tokens"] == official["added_tokens"]
    for key in ("pre_tokenizer", "post_processor", "decoder", "normalizer"):
        assert ours[key] == official[key], key
    assert ours["model"]["type"] == "BPE"


def test_tokenizer_prepends_bos_and_round_trips(tokenizer_path: Path) -> None:
    tokenizer = Tokenizer.from_file(str(tokenizer_path))
    assert [tokenizer.token_to_id(t) for t in ("<s>", "</s>", "[PAD]")] == [0, 1, 2]
    assert tokenizer.get_vocab_size() == 400
    text = "The lighthouse keeper wrote: storm from the north east, all boats home! Ünïcödé too."
    ids = tokenizer.encode(text).ids
    assert ids[0] == 0 and 0 not in ids[1:]
    assert tokenizer.decode(ids) == text


def test_tokenizer_training_is_deterministic(tmp_path: Path, tokenizer_path: Path) -> None:
    again = tmp_path / "again.json"
    train_tokenizer([TINY], 400, again)
    assert again.read_bytes() == tokenizer_path.read_bytes()
    assert not list(tmp_path.glob("*.tmp"))


def test_jsonl_detected_by_extension_and_first_line(tmp_path: Path) -> None:
    records = [{"text": "First document here.", "source": "a"}, {"text": "  "}, {"text": "Second one."}]
    body = "".join(json.dumps(r) + "\n" for r in records)
    (tmp_path / "a.jsonl").write_text(body)
    (tmp_path / "noext").write_text(body)
    expected = ["First document here.", "Second one."]
    assert list(iter_documents(tmp_path / "a.jsonl")) == expected
    assert list(iter_documents(tmp_path / "noext")) == expected
    (tmp_path / "b.txt").write_text("para one\nline two\n\n\npara two\n")
    assert list(iter_documents(tmp_path / "b.txt")) == ["para one\nline two", "para two"]


# ------------------------------------------------------------------------------- prepare


def test_prepare_data_counts_split_and_round_trip(tmp_path: Path, tokenizer_path: Path) -> None:
    extra = tmp_path / "extra.jsonl"
    extra.write_text("".join(json.dumps({"text": f"Extra document number {i} about boats."}) + "\n" for i in range(30)))
    manifest = prepare_data([TINY, extra], tokenizer_path, tmp_path / "out", heldout_fraction=0.3)
    tokenizer = Tokenizer.from_file(str(tokenizer_path))

    assert manifest == json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["dtype"] == "uint16" and manifest["vocab_size"] == 400
    assert [s["documents"] for s in manifest["sources"]] == [21, 30]
    split_docs = {}
    for split in ("train", "heldout"):
        tokens = load_tokens(tmp_path / "out" / f"{split}.bin")
        assert tokens.dtype == torch.uint16
        assert len(tokens) == manifest["splits"][split]["tokens"]
        assert int((tokens.long() == 0).sum()) == manifest["splits"][split]["documents"]
        assert int(tokens[0]) == 0 and int(tokens[-1]) == 1
        split_docs[split] = _documents(tokens, tokenizer)
    assert manifest["splits"]["train"]["documents"] + manifest["splits"]["heldout"]["documents"] == 51

    # Every document decodes back exactly, and lands in the split its hash says.
    all_docs = list(iter_documents(TINY)) + list(iter_documents(extra))
    assert sorted(split_docs["train"] + split_docs["heldout"]) == sorted(all_docs)
    assert set(split_docs["heldout"]) == {d for d in all_docs if heldout_score(d) < 0.3}

    # The split does not depend on source order.
    again = prepare_data([extra, TINY], tokenizer_path, tmp_path / "again", heldout_fraction=0.3)
    heldout = _documents(load_tokens(tmp_path / "again" / "heldout.bin"), tokenizer)
    assert sorted(heldout) == sorted(split_docs["heldout"])
    assert again["splits"]["heldout"]["tokens"] == manifest["splits"]["heldout"]["tokens"]
    assert not list((tmp_path / "out").glob("*.tmp"))


def test_assign_splits_never_leaves_a_split_empty() -> None:
    assert assign_splits([0.5, 0.7, 0.2], 0.01) == ["train", "train", "heldout"]
    assert assign_splits([0.005, 0.003], 0.01) == ["train", "heldout"]
    assert assign_splits([0.5], 0.01) == ["train"]
    assert assign_splits([0.5, 0.7], 0.0) == ["train", "train"]


@pytest.mark.parametrize(("dtype", "code"), [("uint16", "H"), ("uint32", "I")])
def test_load_tokens_memory_maps(tmp_path: Path, dtype: str, code: str) -> None:
    values = [0, 5, 65535, 1, 7] if dtype == "uint16" else [0, 70000, 1, 2**31 + 5]
    (tmp_path / "x.bin").write_bytes(array.array(code, values).tobytes())
    tokens = load_tokens(tmp_path / "x.bin", dtype)
    assert tokens.long().tolist() == values
    (tmp_path / "empty.bin").write_bytes(b"")
    assert len(load_tokens(tmp_path / "empty.bin", dtype)) == 0


def test_load_tokens_errors(tmp_path: Path) -> None:
    (tmp_path / "odd.bin").write_bytes(b"\x00\x01\x02")
    with pytest.raises(CalmError, match="truncated"):
        load_tokens(tmp_path / "odd.bin", "uint16")
    with pytest.raises(CalmError, match="dtype"):
        load_tokens(tmp_path / "odd.bin")


# ------------------------------------------------------------------------------- errors


def test_empty_corpus_is_an_error(tmp_path: Path, tokenizer_path: Path) -> None:
    (tmp_path / "blank.txt").write_text("\n\n   \n")
    (tmp_path / "blank.jsonl").write_text(json.dumps({"text": " "}) + "\n")
    sources = [tmp_path / "blank.txt", tmp_path / "blank.jsonl"]
    with pytest.raises(CalmError, match="empty"):
        train_tokenizer(sources, 300, tmp_path / "t.json")
    with pytest.raises(CalmError, match="empty"):
        prepare_data(sources, tokenizer_path, tmp_path / "out")
    assert not (tmp_path / "t.json").exists()


def test_unreadable_files_are_errors(tmp_path: Path, tokenizer_path: Path) -> None:
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait\n".encode("latin-1"))
    (tmp_path / "bad.jsonl").write_text('{"text": "ok"}\n{not json\n')
    (tmp_path / "notext.jsonl").write_text('{"body": "x"}\n')
    cases = {
        tmp_path / "missing.txt": "cannot read",
        tmp_path: "cannot read",
        tmp_path / "latin1.txt": "not UTF-8",
        tmp_path / "bad.jsonl": "bad.jsonl:2: not valid JSON",
        tmp_path / "notext.jsonl": "text",
    }
    for path, message in cases.items():
        with pytest.raises(CalmError, match=message):
            train_tokenizer([path], 300, tmp_path / "t.json")
        with pytest.raises(CalmError, match=message):
            prepare_data([path], tokenizer_path, tmp_path / "out")
    with pytest.raises(CalmError, match="cannot load tokenizer"):
        prepare_data([TINY], tmp_path / "latin1.txt", tmp_path / "out")


# ------------------------------------------------------------------------------- corpus cleaning

RST = """\
.. SPDX-License-Identifier: GPL-2.0

=========
The Title
=========

Section heading
---------------

This paragraph explains the **important** idea with a :ref:`cross reference <target>`
and ``literal`` text; see `the site <https://example.org>`_ for *much* more detail.

  An indented block quote is still prose when it reads like ordinary English sentences.

Example code follows::

    This indented literal block looks like prose but must be dropped entirely.

.. code-block:: c

   Nor should this directive body, even though it is also written in plain words.

.. note::

   Notes are kept because they are written as ordinary sentences for readers.

+-------+------------------------------------------------------------+
| cell  | a table cell with several words in it but no real paragraph |
+-------+------------------------------------------------------------+

- A bullet item written as a full sentence keeps its words but loses the marker.

short line
"""


def test_clean_rst() -> None:
    assert corpus.clean_rst(RST) == [
        "This paragraph explains the important idea with a cross reference and literal text; "
        "see the site for much more detail.",
        "An indented block quote is still prose when it reads like ordinary English sentences.",
        "Notes are kept because they are written as ordinary sentences for readers.",
        "A bullet item written as a full sentence keeps its words but loses the marker.",
    ]


def test_strip_inline_rst() -> None:
    text = r"Call :func:`~os.path.join` or :c:func:`kmalloc`, see footnote [#]_ and the `docs`_ \*now\*."
    assert corpus.strip_inline_rst(text) == "Call os.path.join or kmalloc, see footnote and the docs *now*."


def test_is_prose() -> None:
    assert corpus.is_prose("The quick brown fox jumps over the lazy dog near the river.")
    assert not corpus.is_prose("Too short to count.")
    assert not corpus.is_prose("if (x == 0) { return y; } else { z = x_y / 2; } /* done */ ok then.")
    assert not corpus.is_prose("Alpha Beta Gamma Delta Epsilon Zeta Eta Theta Iota Kappa.")
    assert not corpus.is_prose("the quick brown fox jumps over the lazy dog near the river")
    assert not corpus.is_prose("Это русский текст, который не должен попасть в английский корпус.")


def test_strip_gutenberg() -> None:
    modern = (
        "The Project Gutenberg EBook of Things, by Someone\n\nThis eBook is for the use of anyone.\n\n"
        "*** START OF THIS PROJECT GUTENBERG EBOOK THINGS ***\n\n\nChapter one begins here.\n\n"
        "*** END OF THIS PROJECT GUTENBERG EBOOK THINGS ***\n\nLicence text.\n"
    )
    assert corpus.strip_gutenberg(modern) == "Chapter one begins here.\n"
    old = (
        "Legal header\n*END*THE SMALL PRINT! FOR PUBLIC DOMAIN ETEXTS*Ver.04.29.93*END*\n\n"
        "First line.\n<<THIS ELECTRONIC VERSION IS COPYRIGHT\nBY WORLD LIBRARY>>\nSecond line.\n"
        "End of the Project Gutenberg etext\n"
    )
    assert corpus.strip_gutenberg(old) == "First line.\n\nSecond line.\n"
    assert corpus.strip_gutenberg("No markers at all.\n") == "No markers at all.\n"


def test_plain_html_and_fortunes() -> None:
    plain = (
        "   This paragraph is ordinary prose written across\n   two lines of a plain file.\n\n"
        "         indented code block that should be dropped because it is deeper.\n\n"
        "   | a table | row with many words that is not a paragraph at all |\n"
    )
    assert corpus.clean_plain(plain) == ["This paragraph is ordinary prose written across two lines of a plain file."]
    markup = (
        "<html><body><p>A paragraph of <b>real</b> text that is long enough to keep.</p>"
        "<div class=\"para\">Publican paragraphs use a div element with the para class.<pre>code { here }</pre></div>"
        "<pre>A preformatted block is never prose, whatever it happens to say.</pre>"
        "<p>Too short.</p></body></html>"
    )
    assert corpus.html_paragraphs(markup) == [
        "A paragraph of real text that is long enough to keep.",
        "Publican paragraphs use a div element with the para class.",
    ]
    fortunes = "A fortune with enough words to pass the prose filter, surely.\n%\nTiny one.\n%\n" \
               "Two line fortune that goes on\nfor a while before it stops.\n\t-- Someone\n%\n"
    assert corpus.split_fortunes(fortunes) == [
        "A fortune with enough words to pass the prose filter, surely.",
        "Two line fortune that goes on\nfor a while before it stops.\n-- Someone",
    ]


def test_group_caps_and_licences() -> None:
    assert corpus.group_paragraphs(["a b c", "d e", "f g h i"], max_words=5) == ["a b c\n\nd e", "f g h i"]
    budgets = corpus.word_budgets({"modern": 700, "old": 1000, "tiny": 10}, {"old": 0.15, "tiny": 0.15})
    assert set(budgets) == {"old"} and budgets["old"] == int(0.15 * 710 / 0.85)
    source = corpus.Source("old", "x", "y", [f"word {i} " * 5 for i in range(50)])
    corpus.apply_caps([corpus.Source("modern", "x", "y", ["w " * 850]), source], {"old": 0.15})
    assert 0 < source.words <= 150
    dep5 = "Format: https://x\n\nFiles: *\nLicense: MIT\n\nFiles: a\nLicense: GPL-2+\n\nLicense: MIT\n Permission is...\n"
    assert corpus.licence_from_copyright(dep5) == "MIT; GPL-2+"
    assert corpus.licence_from_copyright("This document is in the public domain, to be used.") == "public domain"


# ------------------------------------------------------------------------------- R XDR reader


def _ints(*values: int) -> bytes:
    return struct.pack(f">{len(values)}i", *values)


def _char(text: str | None) -> bytes:
    if text is None:
        return _ints(9, -1)
    raw = text.encode("utf-8")
    return _ints(9 | (8 << 12), len(raw)) + raw  # CHARSXP flagged UTF-8


def _names_attr(names: list[str], symbol: bytes) -> bytes:
    """Attribute pairlist holding only names=...; symbol is a SYMSXP or a REFSXP to one."""
    return _ints(2 | 0x400) + symbol + _ints(16, len(names)) + b"".join(map(_char, names)) + _ints(254)


NAMES_SYMBOL = _ints(1) + _char("names")
NAMES_REF = _ints((1 << 8) | 255)  # first entry of the reference table
HEADER = b"X\n" + _ints(3, 0x040300, 0x030500, 5) + b"UTF-8"


def test_read_rds_named_character_vector() -> None:
    body = _ints(16 | 0x200, 3) + _char("It is a truth") + _char(None) + _char("café")
    body += _names_attr(["a", "b", "c"], NAMES_SYMBOL)
    assert corpus.read_rds(HEADER + body) == {"a": "It is a truth", "b": None, "c": "café"}
    plain = b"X\n" + _ints(2, 0x030601, 0x020300) + _ints(16, 2) + _char("x") + _char("y")
    assert corpus.read_rds(gzip.compress(plain)) == ["x", "y"]
    with pytest.raises(corpus.RDataError):
        corpus.read_rds(b"RDA3\nnot xdr")


def test_read_lazyload_db(tmp_path: Path) -> None:
    novel = HEADER + _ints(16, 3) + _char("CHAPTER 1") + _char("") + _char("Emma was clever.")
    blob = struct.pack(">I", len(novel)) + zlib.compress(novel)
    variables = _ints(19 | 0x200, 1) + _ints(13, 2, 0, len(blob)) + _names_attr(["emma"], NAMES_SYMBOL)
    index = (
        HEADER + _ints(19 | 0x200, 3) + variables + _ints(19, 0) + _ints(10, 1, 1)
        + _names_attr(["variables", "references", "compressed"], NAMES_REF)
    )
    (tmp_path / "Rdata.rdx").write_bytes(gzip.compress(index))
    (tmp_path / "Rdata.rdb").write_bytes(blob)
    assert corpus.read_lazyload_db(tmp_path / "Rdata.rdx") == {"emma": ["CHAPTER 1", "", "Emma was clever."]}


def test_read_rda_and_austen_paragraphs() -> None:
    lines = ["CHAPTER I", "", "Emma Woodhouse, handsome, clever, and rich, with a comfortable", "home and happy disposition."]
    vector = _ints(16, len(lines)) + b"".join(map(_char, lines))
    rda = b"RDX3\n" + HEADER + _ints(2 | 0x400) + _ints(1) + _char("emma") + vector + _ints(254)
    objects = corpus.read_rda(gzip.compress(rda))
    assert objects == {"emma": lines}
    assert corpus.austen_paragraphs(objects["emma"]) == [
        "Emma Woodhouse, handsome, clever, and rich, with a comfortable home and happy disposition."
    ]
