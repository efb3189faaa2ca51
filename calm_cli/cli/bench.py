"""`calm bench`: the command over calm_cli.bench."""

from __future__ import annotations

import json
import sys
from typing import Optional

import typer

from ..errors import UsageError
from .common import (
    DeviceOpt,
    DtypeOpt,
    SamplerOpt,
    SamplesOpt,
    ThreadsOpt,
    err,
    model_path,
    seed_option,
    set_threads,
)
from .typer_setup import with_examples


@with_examples(
    "calm bench                            # random-weight tiny preset, K=4",
    "calm bench -m default -c 1,8          # the bundled model, 1 and 8 at once",
    "calm bench --preset S --K 1,2,4 --md  # a Markdown table, every column",
)
def bench(
    preset: Optional[str] = typer.Option(
        None, "--preset",
        help="Random-weight models (default tiny without --model): tiny (hidden 256, 4 layers, vocab 8192; for CPU tests), "
        "S (768/12 layers, the authors' default backbone), M (1024/16, CALM-M), L (1536/16) and XL (2560/16, 20 heads); "
        "L and XL are inferred from the paper's 735M and 1.82B parameters. S and up: vocab 128256, latent 128, "
        "the authors' autoencoder (hidden 512, intermediate 1280, 2+2 layers).",
    ),
    model: Optional[str] = typer.Option(None, "--model", "-m", metavar="NAME|DIR", help="A CALM model (name or directory) measured at its own K; a baseline alone."),
    baseline: Optional[str] = typer.Option(None, "--baseline", metavar="NAME|DIR", help="Trained baseline for --model (default: random weights, the model's backbone)."),
    k: Optional[str] = typer.Option(None, "--K", help="Chunk size(s) of the CALM side for presets: 4 or a list such as 1,2,4,8 (default 4)."),
    prompt_tokens: int = typer.Option(128, "--prompt-tokens", "-p", help="Prompt length in tokens (rounded up to a multiple of K)."),
    new_tokens: int = typer.Option(128, "--new-tokens", "-n", help="New tokens per row, EOS ignored (rounded up to a multiple of K)."),
    batch: str = typer.Option(
        "1", "--concurrency", "-c", "--batch", "-b",
        help="Requests in flight at once (the engine's slots), e.g. 1,8,32; the rate is their aggregate. --batch is the old name.",
    ),
    repetitions: int = typer.Option(3, "--repetitions", "-r", help="Timed runs per row after one warm-up run."),
    temp: str = typer.Option("1", "--temp", "-t", help="Temperature(s) in [0, 1], e.g. 1 or 1,0.5; 1 draws once per step."),
    samples: int = SamplesOpt,
    sampler: str = SamplerOpt,
    candidate_decoder: str = typer.Option(
        "fast", "--candidate-decoder",
        help="CALM candidate decoder(s): fast, dense, or dense,fast for one row of each (same tokens; see generate --help).",
    ),
    candidate_dtype: str = typer.Option(
        "auto", "--candidate-dtype",
        help="dtype of the head's draws and the decoder's layers: auto (bf16 where the device has fast bf16), float32, bf16, "
        "or a list such as float32,bf16 for one row of each.",
    ),
    seed: int = seed_option(0, "Seed for the prompts and the sampling."),
    peak_gbs: Optional[float] = typer.Option(None, "--peak-gbs", help="Memory bandwidth of the device in GB/s (H200: 4800), for the bandwidth fraction."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object with a 'rows' list instead of the table."),
    as_csv: bool = typer.Option(False, "--csv", help="Print the rows as CSV instead of the table."),
    as_md: bool = typer.Option(False, "--md", help="Print a Markdown table (every column) instead of the rich one."),
    wide: bool = typer.Option(False, "--wide", help="Every column in the table (±, prefill, bandwidth); the default fits 100 columns."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the backbone step (one graph; the candidate path stays eager). Default: on for CUDA."),
    eager_too: bool = typer.Option(
        False, "--eager-too", help="With --compile: an eager row beside each compiled one, measured in turn (A B A B) in the same run.",
    ),
    threads: Optional[int] = ThreadsOpt,
) -> None:
    """Decode speed of CALM against a token-level baseline.

    Both sides share the backbone and run side by side; the default table fits 100 columns
    (--wide, --json, --csv and --md give every column).

    The table (or --json/--csv/--md) goes to stdout, progress to stderr. Prompts are random token
    ids; model building or loading is timed apart. Peak memory is CUDA's max_memory_allocated, or on
    CPU the process's resident high-water mark (reset per row on Linux).
    """

    from ..bench.run import (
        BenchOptions,
        check_options,
        checkpoint_subjects,
        parse_list,
        preset_subjects,
        run_bench,
    )
    from ..runtime.device import resolve_device, resolve_dtype
    from ..runtime.engine import compile_by_default

    if as_json + as_csv + as_md > 1:
        raise UsageError("choose one of --json, --csv and --md")
    if model is not None and (preset is not None or k is not None):
        raise UsageError("--model measures that checkpoint at its own K: drop --preset and --K")
    if baseline is not None and model is None:
        raise UsageError("--baseline goes with --model")
    model_dir = model_path(model) if model is not None else None
    baseline_dir = model_path(baseline) if baseline is not None else None
    threads_used = set_threads(threads)
    options = BenchOptions(
        ks=parse_list(k or "4", int, "--K"), batches=parse_list(batch, int, "--concurrency"), temperatures=parse_list(temp, float, "--temp"),
        prompt_tokens=prompt_tokens, new_tokens=new_tokens, repetitions=repetitions, num_samples=samples, sampler=sampler,
        candidate_decoders=[name.strip() for name in candidate_decoder.split(",") if name.strip()],
        candidate_dtypes=[name.strip() for name in candidate_dtype.split(",") if name.strip()], seed=seed, peak_gbs=peak_gbs,
    )
    check_options(options)
    dev = resolve_device(device)
    options.compile = compile_by_default(dev) if compile is None else compile
    options.eager_too = eager_too
    dt = resolve_dtype(dtype, dev)
    if model_dir is not None:
        makers, source = checkpoint_subjects(model_dir, baseline_dir, dev, dt), str(model)
    else:
        makers, source = preset_subjects(preset or "tiny", options.ks, dev, dt), f"preset {preset or 'tiny'}"
    report = run_bench(makers, options, dev, source, progress=lambda line: err.print(f"[dim]{line}[/dim]"))
    report["threads_reason"] = threads_used.reason
    _print_report(report, as_json, as_csv, as_md, wide)


def _print_report(report: dict, as_json: bool, as_csv: bool, as_md: bool, wide: bool) -> None:
    """The rows on stdout in the format asked for, then any warning about noisy rows on stderr."""
    from rich.console import Console

    from ..bench.report import render_table, to_csv, to_markdown, variation_warnings

    if as_json:
        sys.stdout.write(json.dumps(report) + "\n")
    elif as_csv:
        sys.stdout.write(to_csv(report))
    elif as_md:
        sys.stdout.write(to_markdown(report))
    else:
        width = None if sys.stdout.isatty() else (220 if wide else 100)
        render_table(report, Console(highlight=False, width=width), wide=wide)
    for line in variation_warnings(report):
        err.print(f"warning: {line}", markup=False)
