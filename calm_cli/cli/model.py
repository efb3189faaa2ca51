"""`calm encode`, `decode`, `info` and `convert`: the autoencoder and checkpoint files on the command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from ..errors import CalmError, UsageError
from .common import (
    ModelOpt,
    default_model_path,
    err,
    read_prompt,
    read_stdin,
    read_text,
)


def encode(
    text: Optional[str] = typer.Argument(None, help="Text to encode; '-' or nothing reads stdin."),
    model: Optional[Path] = ModelOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write input_ids, mean and log_std to this .safetensors file."),
    roundtrip: bool = typer.Option(False, "--roundtrip", help="Report how many text tokens the mean latent reconstructs."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="tokenizer.json to use instead of the model's."),
) -> None:
    """Text -> one latent vector per K tokens (JSON lines on stdout, or --out FILE)."""
    from ..io.checkpoint import load_autoencoder
    from ..runtime.latents import encode_text, reconstruction, tokenizer_of

    ae = load_autoencoder(model or default_model_path(), tokenizer=str(tokenizer) if tokenizer else None)
    tokenizer_of(ae)
    source = read_prompt(text)
    if roundtrip:
        n, correct = reconstruction(ae, source)
        sys.stdout.write(json.dumps({"tokens": n, "correct": correct, "accuracy": correct / n}) + "\n")
        return
    encoded = encode_text(ae, source)
    k = ae.config.patch_size
    if out is not None:
        import torch
        from safetensors.torch import save_file

        from ..io.atomic import atomic_path

        tensors = {"input_ids": torch.tensor(encoded.padded), "mean": encoded.mean.contiguous(), "log_std": encoded.log_std.contiguous()}
        with atomic_path(out) as tmp:
            save_file(tensors, str(tmp), {"num_tokens": str(len(encoded.ids)), "patch_size": str(k)})
        err.print(f"wrote {encoded.mean.shape[0]} latents of size {encoded.mean.shape[1]} to {out}")
        return
    for i, length in enumerate(encoded.chunk_lengths(k)):
        row = {
            "tokens": encoded.padded[i * k : (i + 1) * k], "text_tokens": length,
            "mean": encoded.mean[i].tolist(), "log_std": encoded.log_std[i].tolist(),
        }
        sys.stdout.write(json.dumps(row) + "\n")


def decode(
    source: Optional[str] = typer.Argument(None, help="A .safetensors file from `calm encode --out`, or JSON lines with a 'mean' list; '-' or nothing reads stdin."),
    model: Optional[Path] = ModelOpt,
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="tokenizer.json to use instead of the model's."),
) -> None:
    """Latent vectors -> text."""
    from ..io.checkpoint import load_autoencoder
    from ..runtime.latents import decode_latents, ids_to_text, tokenizer_of

    ae = load_autoencoder(model or default_model_path(), tokenizer=str(tokenizer) if tokenizer else None)
    tokenizer_of(ae)
    if source not in (None, "-") and source.endswith(".safetensors"):
        latents, lengths = _read_latent_file(Path(source), ae.config.patch_size)
    else:
        latents, lengths = _read_latent_lines(source, ae.config.patch_size)
    sys.stdout.write(ids_to_text(ae, decode_latents(ae, latents, lengths)) + "\n")


def _read_latent_file(path: Path, patch_size: int):
    """'mean' of a `calm encode --out` file, and how many text tokens each chunk holds (from 'num_tokens')."""
    from safetensors import SafetensorError, safe_open

    if not path.is_file():
        raise UsageError(f"{path}: no such file")
    try:
        with safe_open(str(path), "pt") as fh:
            if "mean" not in fh.keys():
                raise CalmError(f"{path}: no 'mean' tensor")
            latents = fh.get_tensor("mean")
            count = (fh.metadata() or {}).get("num_tokens")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CalmError(f"{path}: cannot read safetensors file ({str(exc).splitlines()[0] if str(exc) else exc})") from None
    if count is None or latents.ndim != 2:
        return latents, None
    if not count.isdigit() or not 0 <= int(count) <= patch_size * latents.shape[0]:
        raise CalmError(f"{path}: num_tokens {count!r} does not fit {latents.shape[0]} chunks of {patch_size}")
    n = int(count)
    return latents, [min(patch_size, max(0, n - start)) for start in range(0, patch_size * latents.shape[0], patch_size)]


def _read_latent_lines(source: Optional[str], patch_size: int):
    """JSON lines with a 'mean' list (and, from `calm encode`, 'text_tokens': that chunk's text token count)."""
    import torch

    if source in (None, "-"):
        lines = read_stdin().splitlines()
    else:
        lines = read_text(Path(source)).splitlines()
    rows, lengths = [], []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            mean = [float(x) for x in row["mean"]]
            length = row.get("text_tokens", patch_size)
        except (json.JSONDecodeError, KeyError, TypeError, ValueError, AttributeError):
            raise UsageError(f"line {n}: expected a JSON object with a 'mean' list of numbers") from None
        if isinstance(length, bool) or not isinstance(length, int) or not 0 <= length <= patch_size:
            raise UsageError(f"line {n}: 'text_tokens' must be a whole number from 0 to {patch_size}")
        if rows and len(mean) != len(rows[0]):
            raise UsageError(f"line {n}: 'mean' has {len(mean)} numbers, line 1 has {len(rows[0])}")
        rows.append(mean)
        lengths.append(length)
    if not rows:
        raise UsageError("no latents to decode")
    return torch.tensor(rows, dtype=torch.float32), lengths


def info(model: Optional[Path] = typer.Argument(None, help="Model directory (default: the bundled model)."),
         as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Configuration, K, parameter counts per part, dtype and file format."""
    from ..io.checkpoint import describe

    facts = describe(model or default_model_path())
    if as_json:
        sys.stdout.write(json.dumps(facts, indent=2) + "\n")
        return
    out = Console(highlight=False)
    for key, value in facts.items():
        if isinstance(value, dict):
            out.print(f"[bold]{key}[/bold]")
            for k2, v2 in value.items():
                out.print(f"  {k2:<26} {v2}")
        else:
            out.print(f"[bold]{key:<28}[/bold]{value}")


def convert(
    src: Path = typer.Argument(..., help="Checkpoint directory (the authors' layout or ours)."),
    dst: Path = typer.Argument(..., help="Output directory (our layout: config.json, model.safetensors, tokenizer.json)."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32, bf16 or fp16."),
    ae: Optional[Path] = typer.Option(None, "--ae", help="Autoencoder directory, overriding the checkpoint's ae_path."),
    force: bool = typer.Option(False, "--force", help="Write into DST even when it is a non-empty folder that holds no model (its other files are kept)."),
) -> None:
    """Rewrite a checkpoint (CALM or token-level baseline) in calm's own single-file layout."""
    from ..io.checkpoint import (
        is_baseline_dir,
        load_baseline,
        load_model,
        save_baseline,
        save_model,
    )
    from ..runtime.device import DTYPES

    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype '{dtype}' (use fp32, bf16 or fp16)")
    if is_baseline_dir(src):
        save_baseline(load_baseline(src), dst, dtype=DTYPES[dtype], force=force)
    else:
        save_model(load_model(src, ae=str(ae) if ae else None), dst, dtype=DTYPES[dtype], force=force)
    err.print(f"wrote {dst}")
