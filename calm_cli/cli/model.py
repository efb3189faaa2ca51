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
)


def encode(
    text: Optional[str] = typer.Argument(None, help="Text to encode; '-' or nothing reads stdin."),
    model: Optional[Path] = ModelOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write input_ids, mean and log_std to this .safetensors file."),
    roundtrip: bool = typer.Option(False, "--roundtrip", help="Report token reconstruction accuracy from the mean latent."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="tokenizer.json to use instead of the model's."),
) -> None:
    """Text -> one latent vector per K tokens (JSON lines on stdout, or --out FILE)."""
    import torch

    from ..io.checkpoint import load_autoencoder
    from ..io.tokenizer import encode as tok_encode

    ae = load_autoencoder(model or default_model_path(), tokenizer=str(tokenizer) if tokenizer else None)
    if ae.tokenizer is None:
        raise CalmError("the model has no tokenizer.json (pass --tokenizer PATH)")
    ids = tok_encode(ae.tokenizer, read_prompt(text))
    k = ae.config.patch_size
    pad = ae.config.pad_token_id if ae.config.pad_token_id is not None else 0
    padded = ids + [pad] * (-len(ids) % k)
    input_ids = torch.tensor([padded])
    with torch.inference_mode():
        mean, log_std = ae.encode(input_ids)
        recon = ae.decode(mean).argmax(-1)
    if roundtrip:
        n = len(ids)
        correct = (recon[0, :n] == input_ids[0, :n]).sum().item()
        sys.stdout.write(json.dumps({"tokens": n, "correct": correct, "accuracy": correct / n}) + "\n")
        return
    if out is not None:
        from safetensors.torch import save_file

        from ..io.atomic import atomic_path

        with atomic_path(out) as tmp:
            save_file(
                {"input_ids": input_ids[0], "mean": mean[0].contiguous(), "log_std": log_std[0].contiguous()},
                str(tmp), {"num_tokens": str(len(ids)), "patch_size": str(k)},
            )
        err.print(f"wrote {mean.shape[1]} latents of size {mean.shape[2]} to {out}")
        return
    for i in range(mean.shape[1]):
        row = {"tokens": padded[i * k : (i + 1) * k], "mean": mean[0, i].tolist(), "log_std": log_std[0, i].tolist()}
        sys.stdout.write(json.dumps(row) + "\n")


def decode(
    source: Optional[str] = typer.Argument(None, help="A .safetensors file from `calm encode --out`, or JSON lines with a 'mean' list; '-' or nothing reads stdin."),
    model: Optional[Path] = ModelOpt,
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="tokenizer.json to use instead of the model's."),
) -> None:
    """Latent vectors -> text."""
    import torch

    from ..io.checkpoint import load_autoencoder

    ae = load_autoencoder(model or default_model_path(), tokenizer=str(tokenizer) if tokenizer else None)
    if ae.tokenizer is None:
        raise CalmError("the model has no tokenizer.json (pass --tokenizer PATH)")
    num_tokens = None
    if source not in (None, "-") and source.endswith(".safetensors"):
        from safetensors import safe_open

        path = Path(source)
        if not path.exists():
            raise UsageError(f"{path}: no such file")
        with safe_open(str(path), "pt") as fh:
            if "mean" not in fh.keys():
                raise CalmError(f"{path}: no 'mean' tensor")
            latents = fh.get_tensor("mean")
            num_tokens = int((fh.metadata() or {}).get("num_tokens", 0)) or None
    else:
        if source in (None, "-"):
            lines = sys.stdin.read().splitlines()
        else:
            try:
                lines = Path(source).read_text().splitlines()
            except OSError as exc:
                raise UsageError(f"{source}: {exc.strerror}") from None
        rows = []
        for n, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line)["mean"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UsageError(f"line {n}: expected a JSON object with a 'mean' list") from None
        if not rows:
            raise UsageError("no latents to decode")
        latents = torch.tensor(rows, dtype=torch.float32)
    if latents.ndim != 2 or latents.shape[-1] != ae.config.latent_size:
        raise CalmError(f"latents have shape {list(latents.shape)}; the autoencoder needs [chunks, {ae.config.latent_size}]")
    with torch.inference_mode():
        ids = ae.decode_tokens(latents.to(next(ae.parameters()).dtype)).reshape(-1).tolist()
    if num_tokens:
        ids = ids[:num_tokens]
    sys.stdout.write(ae.tokenizer.decode(ids, skip_special_tokens=True) + "\n")


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
