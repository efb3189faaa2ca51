"""`calm eval`: BrierLM on held-out documents."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from .common import (
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    ThreadsOpt,
    err,
    load_for_cli,
    model_path,
    seed_option,
    set_threads,
)
from .typer_setup import with_examples


@with_examples(
    "calm eval heldout.jsonl     # JSON lines with a 'text' field",
    "calm eval notes.txt -m baseline --max-docs 200 --json",
    "torchrun --nproc-per-node 2 -m calm_cli eval heldout.jsonl  # 2 processes",
)
def eval_(
    data: list[Path] = typer.Argument(
        ..., help="Text files (paragraphs split on blank lines), JSON lines with a 'text' field, .bin token files of "
        "'calm data prepare', or a prepared-data directory (its heldout.bin); token files are cut into documents at BOS.",
    ),
    model: Optional[str] = ModelOpt,
    max_docs: Optional[int] = typer.Option(None, "--max-docs", help="Score only the first N documents."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Stop after this many tokens in all (the last document is cut)."),
    seed: int = seed_option(0, "Seed of the model samples and the bootstrap; same seed, data and batch size give the same numbers."),
    batch_size: int = typer.Option(8, "--batch-size", help="Context windows per forward pass."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object: brier1..brier4, brierlm, brierlm_ci95, positions, documents, model, seconds."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    threads: Optional[int] = ThreadsOpt,
) -> None:
    """BrierLM (higher is better) of a model on held-out documents.

    BrierLM is at most 100; the model may be CALM or token-level.

    Each document is scored on its own, BOS first, in windows of the model's context, at every
    chunk boundary followed by at least 4 true tokens (the authors' document-level test). Brier-n
    is estimated from two model samples per position (token models: exact P(y), sampled
    collisions); the 95% interval is a bootstrap over documents.
    """
    from ..eval.evaluate import check_arguments, evaluate, format_report
    from ..training.distributed import setup, teardown

    check_arguments(data, max_docs, max_tokens, batch_size)
    path = model_path(model)
    set_threads(threads)
    # Under torchrun each process scores a share of the batches on its own device; rank 0 reports.
    ranks, local = setup(None if device == "auto" else device)
    report = None
    try:
        loaded = load_for_cli(str(path), str(local) if ranks.world > 1 else device, dtype)
        report = evaluate(loaded, data, max_docs=max_docs, max_tokens=max_tokens, seed=seed, batch_size=batch_size,
                          console=err if ranks.main else None, rank=ranks.rank, world=ranks.world)
    finally:
        teardown(ranks, finished=report is not None)
    if ranks.main:
        report["model"] = str(path)
        sys.stdout.write(json.dumps(report) + "\n" if as_json else format_report(report))
