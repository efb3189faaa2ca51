"""The `calm` command line: a thin layer over the Python API."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Optional

import click
import typer
from rich.console import Console

from .errors import CalmError, UsageError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Run, train, evaluate and benchmark CALM (Continuous Autoregressive Language Models).",
)
err = Console(stderr=True, highlight=False)
STATE = {"debug": False}

ModelOpt = typer.Option(None, "--model", "-m", help="Model directory (default: $CALM_MODEL, else the bundled weights/default).")
TempOpt = typer.Option(0.5, "--temp", "-t", help="Temperature in [0, 1]. Default 0.5, as the CALM authors advise for fluent text; 1 draws once per step; 0 picks the most frequent of --samples draws.")
SamplesOpt = typer.Option(200, "--samples", help="Candidate chunks drawn per step by the approximate sampler (N).")
SamplerOpt = typer.Option("approx", "--sampler", help="Temperature sampler: approx (count repeats among N draws) or exact (rejection).")
DeviceOpt = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto (CUDA when present).")
DtypeOpt = typer.Option("auto", "--dtype", help="fp32, bf16, fp16 or auto (bf16 on CUDA, fp32 on CPU).")


@app.callback()
def _root(debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors.")) -> None:
    STATE["debug"] = debug


def default_model_path() -> Path:
    """$CALM_MODEL, else weights/default shipped inside the installed package (or beside it in a checkout)."""
    if os.environ.get("CALM_MODEL"):
        return Path(os.environ["CALM_MODEL"])
    here = Path(__file__).resolve().parent
    for candidate in (here / "weights" / "default", here.parent / "weights" / "default"):
        if (candidate / "config.json").exists():
            return candidate
    raise UsageError("no model given and no bundled weights/default found (pass --model DIR or set CALM_MODEL)")


def load_for_cli(model: Optional[Path], device: str, dtype: str, ae: Optional[Path] = None, tokenizer: Optional[Path] = None):
    from .checkpoint import load_model
    from .engine import resolve_device, resolve_dtype

    dev = resolve_device(device)
    return load_model(
        model or default_model_path(), device=dev, dtype=resolve_dtype(dtype, dev),
        ae=str(ae) if ae else None, tokenizer=str(tokenizer) if tokenizer else None,
    )


def read_prompt(prompt: Optional[str]) -> str:
    """PROMPT, or stdin for '-' or no argument; piped stdin plus an argument gives stdin first, then the argument."""
    piped = not sys.stdin.isatty() if sys.stdin else False
    if prompt == "-" or (prompt is None and piped):
        return sys.stdin.read()
    if prompt is None:
        raise UsageError("no prompt: give PROMPT, '-' or pipe text on stdin")
    if piped and prompt:
        stdin_text = sys.stdin.read()
        if stdin_text:
            return stdin_text.rstrip("\n") + "\n" + prompt
    return prompt


@app.command()
def generate(
    prompt: Optional[str] = typer.Argument(None, help="Prompt text; '-' (or nothing, with piped stdin) reads stdin."),
    model: Optional[Path] = ModelOpt,
    max_tokens: int = typer.Option(128, "--max-tokens", "-n", help="Most new tokens to generate."),
    temp: float = TempOpt,
    samples: int = SamplesOpt,
    sampler: str = SamplerOpt,
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for repeatable output."),
    stop: list[str] = typer.Option([], "--stop", help="Stop when this text appears (repeatable)."),
    stream: bool = typer.Option(True, "--stream/--no-stream", help="Print text as each chunk is decoded."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object with the text, token counts and timings."),
    echo: bool = typer.Option(False, "--echo", help="Print the prompt before the continuation."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the decode step (default: on for CUDA)."),
    ae: Optional[Path] = typer.Option(None, "--ae", help="Autoencoder directory, overriding the checkpoint's ae_path."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="tokenizer.json to use instead of the model's."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Timings and tokens/s on stderr."),
) -> None:
    """Continue PROMPT with a CALM model."""
    from .engine import Engine, GenerationSettings, GenerationStats, check_settings
    from .generation import stream_text

    settings = GenerationSettings(max_tokens=max_tokens, temperature=temp, num_samples=samples, sampler=sampler, seed=seed)
    check_settings(settings)
    text = read_prompt(prompt)
    t0 = time.perf_counter()
    calm = load_for_cli(model, device, dtype, ae, tokenizer)
    load_s = time.perf_counter() - t0
    use_compile = compile if compile is not None else calm.transformer.embed_tokens.weight.is_cuda
    engine = Engine(calm, compile=use_compile)
    stats = GenerationStats()
    out, finish = [], None
    if echo and not as_json:
        sys.stdout.write(text)
        sys.stdout.flush()
    for delta in stream_text(engine, calm.tokenizer, [text], settings, stop, stats):
        out.append(delta.text)
        finish = delta.finish_reason or finish
        if stream and not as_json:
            sys.stdout.write(delta.text)
            sys.stdout.flush()
    completion = "".join(out)
    if not as_json:
        if not stream:
            sys.stdout.write(completion)
        sys.stdout.write("\n")
    new_tokens = stats.completion_tokens[0] if stats.completion_tokens else 0
    report = {
        "text": completion,
        "prompt_tokens": stats.prompt_tokens[0] if stats.prompt_tokens else 0,
        "completion_tokens": new_tokens,
        "steps": stats.steps,
        "finish_reason": finish,
        "load_s": round(load_s, 4),
        "prefill_s": round(stats.prefill_s, 4),
        "decode_s": round(stats.decode_s, 4),
        "tokens_per_s": round(new_tokens / stats.decode_s, 2) if stats.decode_s else None,
        "steps_per_s": round(stats.steps / stats.decode_s, 2) if stats.decode_s else None,
    }
    if as_json:
        sys.stdout.write(json.dumps(report) + "\n")
    if verbose:
        err.print(
            f"[dim]load {load_s:.2f}s · prompt {report['prompt_tokens']} tok in {stats.prefill_s * 1000:.0f} ms · "
            f"{new_tokens} tok in {stats.steps} steps, {stats.decode_s:.2f}s · "
            f"{report['tokens_per_s']} tok/s · {report['steps_per_s']} vector-steps/s · "
            f"sampler fallbacks {stats.sampling.fallbacks}[/dim]"
        )


@app.command()
def encode(
    text: Optional[str] = typer.Argument(None, help="Text to encode; '-' or nothing reads stdin."),
    model: Optional[Path] = ModelOpt,
    out: Optional[Path] = typer.Option(None, "--out", "-o", help="Write input_ids, mean and log_std to this .safetensors file."),
    roundtrip: bool = typer.Option(False, "--roundtrip", help="Report token reconstruction accuracy from the mean latent."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="tokenizer.json to use instead of the model's."),
) -> None:
    """Text -> one latent vector per K tokens (JSON lines on stdout, or --out FILE)."""
    import torch

    from .checkpoint import load_autoencoder
    from .tokenizer import encode as tok_encode

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
        from .checkpoint import atomic_save_tensors

        atomic_save_tensors(
            {"input_ids": input_ids[0], "mean": mean[0].contiguous(), "log_std": log_std[0].contiguous()},
            out, {"num_tokens": str(len(ids)), "patch_size": str(k)},
        )
        err.print(f"wrote {mean.shape[1]} latents of size {mean.shape[2]} to {out}")
        return
    for i in range(mean.shape[1]):
        row = {"tokens": padded[i * k : (i + 1) * k], "mean": mean[0, i].tolist(), "log_std": log_std[0, i].tolist()}
        sys.stdout.write(json.dumps(row) + "\n")


@app.command()
def decode(
    source: Optional[str] = typer.Argument(None, help="A .safetensors file from `calm encode --out`, or JSON lines with a 'mean' list; '-' or nothing reads stdin."),
    model: Optional[Path] = ModelOpt,
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="tokenizer.json to use instead of the model's."),
) -> None:
    """Latent vectors -> text."""
    import torch

    from .checkpoint import load_autoencoder

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


@app.command()
def info(model: Optional[Path] = typer.Argument(None, help="Model directory (default: the bundled model)."),
         as_json: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """Configuration, K, parameter counts per part, dtype and file format."""
    from .checkpoint import describe

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


@app.command()
def convert(
    src: Path = typer.Argument(..., help="Checkpoint directory (the authors' layout or ours)."),
    dst: Path = typer.Argument(..., help="Output directory (our layout: config.json, model.safetensors, tokenizer.json)."),
    dtype: str = typer.Option("fp32", "--dtype", help="fp32, bf16 or fp16."),
    ae: Optional[Path] = typer.Option(None, "--ae", help="Autoencoder directory, overriding the checkpoint's ae_path."),
) -> None:
    """Rewrite a checkpoint in calm's own single-file layout."""
    from .checkpoint import load_model, save_model
    from .engine import DTYPES

    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype '{dtype}' (use fp32, bf16 or fp16)")
    model = load_model(src, ae=str(ae) if ae else None)
    save_model(model, dst, dtype=DTYPES[dtype])
    err.print(f"wrote {dst}")


def main() -> None:
    """Entry point: one-line errors, exit 2 for usage and 1 for runtime errors, quiet on Ctrl-C and closed pipes."""
    command = typer.main.get_command(app)
    try:
        code = command.main(args=sys.argv[1:], prog_name="calm", standalone_mode=False)
        sys.stdout.flush()
        sys.exit(code if isinstance(code, int) else 0)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.UsageError as exc:
        if STATE["debug"]:
            raise
        name = exc.ctx.command.name if exc.ctx and exc.ctx.command else None
        hint = f" (see 'calm {name} --help')" if name and name != "calm" else ""
        _fail(f"{exc.format_message()}{hint}", 2)
    except CalmError as exc:
        if STATE["debug"]:
            raise
        _fail(str(exc), exc.exit_code)
    except (KeyboardInterrupt, click.exceptions.Abort):
        _quiet_exit(130)
    except BrokenPipeError:
        _quiet_exit(0)
    except Exception as exc:
        if STATE["debug"]:
            raise
        _fail(f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''} (run with --debug for the traceback)", 1)


def _fail(message: str, code: int) -> None:
    sys.stderr.write(f"error: {message}\n")
    sys.exit(code)


def _quiet_exit(code: int) -> None:
    """Leave without a traceback, and without Python's complaint about flushing a closed stdout."""
    try:
        sys.stdout.flush()
    except (BrokenPipeError, ValueError):
        pass
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(code)
