"""`calm data prepare` and `calm tokenizer train`."""

from __future__ import annotations

from pathlib import Path

import typer

from ..errors import UsageError
from .common import (
    err,
)
from .typer_setup import examples, new_typer

data_app = new_typer(no_args_is_help=True, help="Turn text into token files for training.")
tokenizer_app = new_typer(no_args_is_help=True, help="Train a byte-level BPE tokenizer.")


@data_app.command("prepare", epilog=examples("calm data prepare corpus.jsonl --tokenizer tok.json --out data/prepared"))
def data_prepare(
    sources: list[Path] = typer.Argument(..., help="Text files (paragraphs split on blank lines) or JSON lines with a 'text' field."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory: train.bin, heldout.bin, manifest.json."),
    tokenizer: Path = typer.Option(..., "--tokenizer", help="tokenizer.json to encode with (copied into --out)."),
    heldout: float = typer.Option(0.01, "--heldout", help="Fraction of documents held out, chosen by a hash of each document."),
    force: bool = typer.Option(False, "--force", help="Write into a non-empty folder that holds no earlier prepare (its other files are left alone)."),
) -> None:
    """Tokenise documents into memory-mapped train/held-out token files."""
    import shutil

    from ..io.atomic import atomic_path
    from ..training.data import prepare_data

    if not 0.0 < heldout < 1.0:
        raise UsageError("--heldout must be between 0 and 1")
    if out.exists() and not out.is_dir():
        raise UsageError(f"--out {out}: a file is in the way")
    # As convert refuses a folder that holds no model: a folder with other things in it is probably not ours.
    if out.is_dir() and not force and not (out / "manifest.json").exists() and any(out.iterdir()):
        raise UsageError(f"--out {out}: not empty and not an earlier 'calm data prepare' output (use --force to write into it)")
    manifest = prepare_data(sources, tokenizer, out, heldout_fraction=heldout)
    if tokenizer.resolve() != (out / "tokenizer.json").resolve():
        with atomic_path(out / "tokenizer.json") as tmp:
            shutil.copyfile(tokenizer, tmp)
    splits = manifest.get("splits", {})
    err.print(" · ".join(f"{name}: {info.get('tokens')} tokens" for name, info in splits.items()) or f"wrote {out}")


@tokenizer_app.command("train", epilog=examples("calm tokenizer train corpus.jsonl --vocab 8192 --out tok.json"))
def tokenizer_train(
    sources: list[Path] = typer.Argument(..., help="Text or JSON-lines files."),
    vocab: int = typer.Option(8192, "--vocab", help="Vocabulary size, special tokens included."),
    out: Path = typer.Option(Path("tokenizer.json"), "--out", "-o", help="Where to write tokenizer.json."),
) -> None:
    """Byte-level BPE with <s>, </s> and [PAD]; encoding prepends <s> as Llama-3's tokenizer does."""
    from ..training.data import train_tokenizer

    train_tokenizer(sources, vocab, out)
    err.print(f"wrote {out}")
