"""`calm encode`, `decode`, `info` and `convert`: the autoencoder and checkpoint files on the command line."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Optional

import typer

from ..errors import CalmError, UsageError
from .common import (
    ModelOpt,
    ThreadsOpt,
    err,
    model_path,
    read_prompt,
    read_stdin,
    read_text,
    set_threads,
)
from .typer_setup import with_examples


@with_examples(
    "calm models                 # the bundled default and baseline, and your own",
    "calm generate Hi -m baseline",
    "CALM_HOME=~/calm calm models   # lists ~/calm/models/*",
)
def models(as_json: bool = typer.Option(False, "--json", help="Print JSON lines, one per model.")) -> None:
    """The model names that --model and $CALM_MODEL accept.

    The bundled models come first, then each subfolder of your models directory.
    The models directory is $CALM_HOME/models, else $XDG_DATA_HOME/calm/models, else
    ~/.local/share/calm/models; a subfolder there with a config.json answers to its name.
    """
    from ..io.registry import list_models, user_models_dir

    entries = list_models()
    if as_json:
        for e in entries:
            row = {"name": e.name, "path": str(e.path), "kind": e.kind, "K": e.k, "size_mb": round(e.size_mb, 1), "dtype": e.dtype}
            sys.stdout.write(json.dumps(row) + "\n")
        return
    rows = [("NAME", "KIND", "K", "SIZE", "DTYPE", "PATH")]
    rows += [(e.name, e.kind, str(e.k or "?"), f"{e.size_mb:.1f} MB", e.dtype, str(e.path)) for e in entries]
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    for r in rows:
        sys.stdout.write("  ".join(cell.ljust(w) if i != 3 else cell.rjust(w) for i, (cell, w) in enumerate(zip(r, widths))) + f"  {r[5]}\n")
    sys.stderr.write(f"your models: {user_models_dir()} (a subfolder with a config.json answers to its name)\n")


@with_examples(
    'calm encode "Some text" --out z.safetensors',
    'calm encode --roundtrip "Some text"   # token reconstruction accuracy',
)
def encode(
    text: Optional[str] = typer.Argument(None, help="Text to encode; '-' or nothing reads stdin."),
    model: Optional[str] = ModelOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write input_ids, mean and log_std to this .safetensors file."),
    roundtrip: bool = typer.Option(False, "--roundtrip", help="Report how many text tokens the mean latent reconstructs."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="tokenizer.json to use instead of the model's."),
    threads: Optional[int] = ThreadsOpt,
) -> None:
    """Text -> one latent vector per K tokens.

    JSON lines on stdout ({"tokens", "mean", "log_std"} per chunk), or one .safetensors file with --out.
    """
    from ..io.checkpoint import load_autoencoder
    from ..runtime.latents import encode_text, first_lost_span, reconstructed, reconstruction, tokenizer_of

    set_threads(threads)
    ae = load_autoencoder(model_path(model), tokenizer=str(tokenizer) if tokenizer else None)
    tokenizer_of(ae)
    source = read_prompt(text)
    if roundtrip:
        n, correct = reconstruction(ae, source)
        sys.stdout.write(json.dumps({"tokens": n, "correct": correct, "accuracy": correct / n}) + "\n")
        return
    encoded = encode_text(ae, source)
    ok = reconstructed(ae, encoded)
    if (lost := first_lost_span(ae, source, ok)) is not None:
        err.print(f"warning: the latents give back {int(ok.sum())} of {ok.numel()} tokens, so decoding them loses text "
                  f"(first lost: {lost!r})", soft_wrap=True, markup=False)
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


@with_examples(
    "calm decode z.safetensors                   # from calm encode --out",
    'calm encode "Some text" | calm decode -     # JSON lines with "mean"',
)
def decode(
    source: Optional[str] = typer.Argument(None, help="A .safetensors file from `calm encode --out`, or JSON lines with a 'mean' list; '-' or nothing reads stdin."),
    model: Optional[str] = ModelOpt,
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="tokenizer.json to use instead of the model's."),
    threads: Optional[int] = ThreadsOpt,
) -> None:
    """Latent vectors -> text."""
    from ..io.checkpoint import load_autoencoder
    from ..runtime.latents import decode_latents, ids_to_text, tokenizer_of

    set_threads(threads)
    ae = load_autoencoder(model_path(model), tokenizer=str(tokenizer) if tokenizer else None)
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


@with_examples(
    "calm info                    # the default model",
    "calm info -m baseline --json",
)
def info(
    model_arg: Optional[str] = typer.Argument(None, metavar="MODEL", help="Model name or directory (the same as -m)."),
    model: Optional[str] = ModelOpt,
    as_json: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Configuration, K, parameter counts, dtype and file format."""
    if model_arg is not None and model is not None:
        raise UsageError("give the model once: as MODEL or with -m")
    directory = model_path(model_arg or model)
    from ..io.checkpoint import describe

    facts = describe(directory)
    if as_json:
        sys.stdout.write(json.dumps(facts, indent=2) + "\n")
        return
    sys.stdout.write(format_info(facts))


def format_info(facts: dict) -> str:
    """`calm info` as aligned text: facts, then parameters (with separators and MB), then each config."""
    size = BYTES.get(str(facts.get("stored dtype")), 4)
    scalars = {k: v for k, v in facts.items() if not isinstance(v, dict)}
    lines = [f"{k:<18}{v}" for k, v in scalars.items()]
    counts = facts.get("parameters", {})
    lines += ["", f"{'parameters':<18}{'count':>12}  {'MB':>8}"]
    lines += [f"  {part:<16}{n:>12,}  {n * size / 1e6:>8.1f}" for part, n in counts.items()]
    for title in [k for k, v in facts.items() if isinstance(v, dict) and k != "parameters"]:
        lines += ["", title]
        lines += [f"  {k:<28}{json.dumps(v) if isinstance(v, (dict, list)) else v}" for k, v in facts[title].items()]
    return "\n".join(lines) + "\n"


BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@with_examples(
    "calm convert ~/CALM-M ~/calm-m              # authors' layout -> ours",
    "calm convert default ~/small --dtype fp32   # a float32 copy",
)
def convert(
    src: str = typer.Argument(..., metavar="SRC", help="Checkpoint directory (the authors' layout or ours) or model name."),
    dst: Path = typer.Argument(..., help="Output directory (our layout: config.json, model.safetensors, tokenizer.json)."),
    dtype: Optional[str] = typer.Option(None, "--dtype", help="fp32, bf16 or fp16. Default: the source's dtype (config.json torch_dtype), else fp32."),
    ae: Optional[Path] = typer.Option(None, "--ae", help="Autoencoder directory, overriding the checkpoint's ae_path."),
    force: bool = typer.Option(False, "--force", help="Write into DST even when it is a non-empty folder that holds no model (its other files are kept)."),
) -> None:
    """Rewrite a checkpoint in calm's own single-file layout.

    Takes a CALM checkpoint (the authors' layout or ours) or a token-level baseline; keeps the
    source's dtype unless --dtype is given, and says so when DST already held a model.
    """
    from ..io.atomic import current_file
    from ..io.checkpoint import (
        is_baseline_dir,
        load_baseline,
        load_model,
        save_baseline,
        save_model,
    )
    from ..io.registry import describe_entry
    from ..runtime.device import DTYPES

    source = model_path(src)
    if dtype is None:
        stored = describe_entry(src, source).dtype
        dtype = stored if stored in DTYPES else "fp32"
    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype '{dtype}' (use fp32, bf16 or fp16)")
    replacing = current_file(dst, "config.json").is_file()
    if is_baseline_dir(source):
        save_baseline(load_baseline(source), dst, dtype=DTYPES[dtype], force=force)
    else:
        save_model(load_model(source, ae=str(ae) if ae else None), dst, dtype=DTYPES[dtype], force=force)
    name = str(DTYPES[dtype]).removeprefix("torch.")
    err.print(f"{'replaced the model at' if replacing else 'wrote'} {dst} ({name})")
