"""How much of a model's generated text is real English words (the default model's quality bar; not a test).

The lexicon is every lower-cased alphabetic word that occurs at least `--min-count` times in
the training corpus (JSON lines with a `text` field). Generated text is split on whitespace,
punctuation is stripped from both ends of each piece, and a piece counts as a word when it
is alphabetic (apostrophes and inner hyphens allowed); the real-word rate is the share of
those words found in the lexicon. Held-out text scored the same way gives the ceiling.

    python benchmarks/word_rate.py data/corpus/corpus.jsonl --model weights/default --model weights/baseline \\
        --heldout data/prepared/heldout.bin --tokenizer data/prepared/tokenizer.json
"""

from __future__ import annotations

import argparse
import json
import re
import string
import sys
from collections import Counter
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from calm_cli.cli.main import load_for_cli  # noqa: E402
from calm_cli.runtime.engine import Engine  # noqa: E402
from calm_cli.runtime.settings import GenerationSettings  # noqa: E402
from calm_cli.runtime.text import generate  # noqa: E402

PROMPTS = [
    "The history of", "In the morning", "She said that", "The kernel", "It is a truth",
    "The best way to", "When he came", "Python is",
]
WORD = re.compile(r"[a-z]+(?:['-][a-z]+)*")
STRIP = string.punctuation + "\u201c\u201d\u2018\u2019"


def _pieces(text: str) -> list[str]:
    """Whitespace-separated pieces, lower-cased, with punctuation stripped from both ends."""
    return [p for p in (p.strip(STRIP).lower() for p in text.split()) if p]


def words(text: str) -> list[str]:
    """Alphabetic words of `text`, lower-cased; pieces with digits or symbols inside are not words."""
    return [p for p in _pieces(text) if WORD.fullmatch(p)]


def non_words(text: str) -> list[str]:
    """Pieces that contain letters but are not clean words (e.g. 'ofack.IBOnce')."""
    return [p for p in _pieces(text) if any(c.isalpha() for c in p) and not WORD.fullmatch(p)]


def lexicon(corpus: Path, min_count: int) -> set[str]:
    counts: Counter[str] = Counter()
    with corpus.open(encoding="utf-8") as f:
        for line in f:
            counts.update(words(json.loads(line)["text"]))
    return {w for w, c in counts.items() if c >= min_count}


def score(texts: list[str], lex: set[str]) -> dict[str, float]:
    found = [w for t in texts for w in words(t)]
    broken = [w for t in texts for w in non_words(t)]
    total = len(found) + len(broken)
    return {
        "real_word_rate": sum(w in lex for w in found) / max(1, total),
        "broken_piece_rate": len(broken) / max(1, total),
        "words": total,
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("corpus", type=Path)
    ap.add_argument("--model", type=Path, action="append", required=True)
    ap.add_argument("--temps", default="0.5,1.0")
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--seeds", type=int, default=4)
    ap.add_argument("--min-count", type=int, default=3)
    ap.add_argument("--heldout", type=Path, help="uint16 token file whose text gives the ceiling")
    ap.add_argument("--tokenizer", type=Path, help="tokenizer.json for --heldout")
    ap.add_argument("--show", type=int, default=1, help="sample texts to print per model and temperature")
    args = ap.parse_args()

    lex = lexicon(args.corpus, args.min_count)
    rows = []
    if args.heldout and args.tokenizer:
        from calm_cli.io.tokenizer import load_tokenizer

        ids = np.fromfile(args.heldout, dtype=np.uint16)[:20000].tolist()
        text = load_tokenizer(args.tokenizer).decode(ids, skip_special_tokens=True)
        rows.append({"model": "held-out text", "temperature": None, **score([text], lex)})
    for path in args.model:
        model = load_for_cli(path, "cpu", "fp32")
        engine = Engine(model)
        for temp in (float(t) for t in args.temps.split(",")):
            texts = []
            for seed in range(args.seeds):
                settings = GenerationSettings(max_tokens=args.tokens, temperature=temp, seed=seed)
                texts += generate(engine, model.tokenizer, PROMPTS, settings)
            rows.append({"model": str(path), "temperature": temp, **score(texts, lex)})
            for t in texts[: args.show]:
                print(f"# {path} T={temp}: {PROMPTS[0]}{t!r}", file=sys.stderr)
    for r in rows:
        print(json.dumps(r))


if __name__ == "__main__":
    main()
