"""What the command modules share: the common options, the error console, model loading and prompt reading."""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Any, Optional

import typer
from rich.console import Console

from ..errors import UsageError

err = Console(stderr=True, highlight=False)
STATE = {"debug": False}

ModelOpt = typer.Option(None, "--model", "-m", help="Model directory (default: $CALM_MODEL, else the bundled weights/default).")
TempOpt = typer.Option(0.5, "--temp", "-t", help="Temperature in [0, 1]. Default 0.5, as the CALM authors advise for fluent text; 1 draws once per step; 0 picks the most frequent of --samples draws.")
SAMPLES_LIMIT = 2**20  # more candidate chunks per step than memory holds would end in an allocation failure
SamplesOpt = typer.Option(200, "--samples", max=SAMPLES_LIMIT, help="Candidate chunks drawn per step by the approximate sampler (N).")
SamplerOpt = typer.Option("approx", "--sampler", help="Temperature sampler: approx (count repeats among N draws) or exact (rejection).")
CandidateDecoderOpt = typer.Option(
    "fast", "--candidate-decoder",
    help="How candidate chunks are decoded: fast (bf16 scores with an error certificate, float32 where it cannot "
    "decide; the same tokens as dense) or dense (float32 over the whole vocabulary, for comparison).",
)
SEED_LIMIT = 2**63  # seeds are 0 <= seed < 2^63: what torch.Generator.manual_seed takes without overflow


def seed_option(default: int | None, help: str) -> Any:
    """--seed, refused with a usage error (exit 2) outside [0, 2^63) before any work starts."""
    return typer.Option(default, "--seed", min=0, max=SEED_LIMIT - 1, help=help)


DeviceOpt = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto (CUDA when present).")
DtypeOpt = typer.Option("auto", "--dtype", help="fp32, bf16, fp16 or auto (bf16 on CUDA, fp32 on CPU).")


def default_model_path() -> Path:
    """$CALM_MODEL, else weights/default shipped inside the installed package (or beside it in a checkout)."""
    if os.environ.get("CALM_MODEL"):
        return Path(os.environ["CALM_MODEL"])
    here = Path(__file__).resolve().parents[1]
    for candidate in (here / "weights" / "default", here.parent / "weights" / "default"):
        if (candidate / "config.json").exists():
            return candidate
    raise UsageError("no model given and no bundled weights/default found (pass --model DIR or set CALM_MODEL)")


def load_for_cli(model: Optional[Path], device: str, dtype: str, ae: Optional[Path] = None, tokenizer: Optional[Path] = None):
    from ..io.checkpoint import is_baseline_dir, load_baseline, load_model
    from ..runtime.device import resolve_device, resolve_dtype

    dev = resolve_device(device)
    path = model or default_model_path()
    if is_baseline_dir(path):
        if ae:
            raise UsageError("--ae applies to CALM models; this is a token-level baseline")
        return load_baseline(path, device=dev, dtype=resolve_dtype(dtype, dev), tokenizer=str(tokenizer) if tokenizer else None)
    return load_model(
        path, device=dev, dtype=resolve_dtype(dtype, dev),
        ae=str(ae) if ae else None, tokenizer=str(tokenizer) if tokenizer else None,
    )


def read_prompt(prompt: Optional[str]) -> str:
    """PROMPT, or stdin for '-' or no argument; piped stdin plus an argument gives stdin first, then the argument."""
    piped = not sys.stdin.isatty() if sys.stdin else False
    if prompt == "-" or (prompt is None and piped):
        return read_stdin()
    if prompt is None:
        raise UsageError("no prompt: give PROMPT, '-' or pipe text on stdin")
    if piped and prompt:
        stdin_text = read_stdin()
        if stdin_text:
            return stdin_text.rstrip("\n") + "\n" + prompt
    return prompt


def read_stdin() -> str:
    """All of stdin as text; bytes that are not UTF-8 are a usage error, not a crash."""
    try:
        return sys.stdin.read()
    except UnicodeDecodeError:
        raise UsageError("stdin is not UTF-8 text") from None


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text") from None
