"""`calm generate`: one prompt, or a batch of JSON lines."""

from __future__ import annotations

import json
import sys
import time
import typing
from dataclasses import replace
from pathlib import Path
from typing import Optional

import typer

from ..errors import CalmError, UsageError
from ..runtime.settings import SettingsError
from .common import (
    CandidateDecoderOpt,
    CandidateDtypeOpt,
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    SamplerOpt,
    SamplesOpt,
    TempOpt,
    ThreadsOpt,
    err,
    load_for_cli,
    model_path,
    read_prompt,
    read_stdin_bytes,
    read_text,
    seed_option,
    set_threads,
    typed_engine_options,
    typed_settings,
)
from .typer_setup import with_examples


@with_examples(
    'calm generate "The history of" -n 64       # 64 new tokens, default model',
    'calm generate "Once upon a time" -m baseline --temp 1 --seed 3',
    'cat notes.txt | calm generate "Summary:"    # stdin first, then PROMPT',
    'calm generate --jsonl -f prompts.jsonl > out.jsonl',
)
def generate(
    prompt: Optional[str] = typer.Argument(None, metavar="PROMPT", help="Prompt text; '-' (or nothing, with piped stdin) reads stdin. Piped stdin (or -f) plus PROMPT: that text first, then PROMPT."),
    model: Optional[str] = ModelOpt,
    max_tokens: int = typer.Option(128, "--max-tokens", "-n", help="Most new tokens to generate."),
    temp: float = TempOpt,
    samples: int = SamplesOpt,
    sampler: str = SamplerOpt,
    candidate_decoder: str = CandidateDecoderOpt,
    candidate_dtype: str = CandidateDtypeOpt,
    seed: Optional[int] = seed_option(None, "Seed for repeatable output."),
    stop: list[str] = typer.Option([], "--stop", metavar="TEXT", help="Stop when this text appears (repeatable)."),
    stream: bool = typer.Option(True, "--stream/--no-stream", help="Print text as each chunk is decoded."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object with the text, token counts and timings."),
    echo: bool = typer.Option(False, "--echo", help="Print the prompt before the continuation."),
    file: Optional[Path] = typer.Option(None, "--file", "-f", help="Read the prompt (with --jsonl, the JSON lines) from this file instead of stdin."),
    system: Optional[str] = typer.Option(None, "--system", help="Text put on its own line before the prompt."),
    jsonl: bool = typer.Option(
        False, "--jsonl",
        help='Batch mode: read JSON lines {"prompt": ..., "temp": ..., "max_tokens": ..., "seed": ..., "samples": ..., "id": ...} '
        "(all but prompt optional; the flags give the defaults) from stdin or -f, and write one JSON line per input, in order, "
        'with the text and stats. All lines share the engine\'s slots (--max-batch). A bad line gives {"error": ..., "line": N, "id": ...}, '
        "the run goes on, and the exit code is 1.",
    ),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    compile: bool = typer.Option(
        False, "--compile/--no-compile",
        help="torch.compile the decode step. Off by default, as in llama.cpp: one prompt would wait for a cold "
        "compile (minutes on a large model) that only long or many generations repay; `calm serve` compiles ahead.",
    ),
    ae: Optional[Path] = typer.Option(None, "--ae", help="Autoencoder directory, overriding the checkpoint's ae_path."),
    tokenizer: Optional[Path] = typer.Option(None, "--tokenizer", help="tokenizer.json to use instead of the model's."),
    max_batch: Optional[int] = typer.Option(
        None, "--max-batch", help="With --jsonl: requests decoded at once (default 8 on CPU, 64 on CUDA); the rest wait for a free slot.",
    ),
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Timings and tokens/s on stderr."),
    threads: Optional[int] = ThreadsOpt,
    max_request_logits: Optional[int] = typer.Option(
        None, "--max-request-logits", metavar="N",
        help="With --jsonl: most logits one line may score per step (candidates x K x vocabulary); more is that line's "
        "error. Default: what 16 rows at --samples cost.",
    ),
) -> None:
    """Continue PROMPT with a CALM model (or a token-level baseline)."""
    settings = typed_settings(max_tokens=max_tokens, temperature=temp, num_samples=samples, sampler=sampler, seed=seed)
    options = typed_engine_options(max_batch=max_batch if jsonl else 1, candidate_decoder=candidate_decoder,
                                   candidate_dtype=candidate_dtype, compile=compile)
    if jsonl and prompt is not None:
        raise UsageError("--jsonl reads prompts from stdin or -f FILE, not from PROMPT")
    if max_request_logits is not None and max_request_logits < 1:
        raise UsageError("--max-request-logits must be at least 1")
    lines = _jsonl_input(file) if jsonl else []
    text = "" if jsonl else _with_system(system, _generate_prompt(prompt, file))
    directory = model_path(model)  # a wrong model is reported before torch loads
    threads_used = set_threads(threads)
    if verbose:
        err.print(f"[dim]{threads_used}[/dim]")
    t0 = time.perf_counter()
    calm = load_for_cli(str(directory), device, dtype, ae, tokenizer)
    load_s = time.perf_counter() - t0
    from ..runtime.engine import build_engine  # torch is loaded by now; arguments were checked without it
    from ..runtime.text import GenerationStats, stream_text

    engine = build_engine(calm, options)
    if jsonl:
        from ..runtime.budget import default_request_logits

        budget = max_request_logits or default_request_logits(samples, engine.k, engine.config.vocab_size)
        failed = _run_jsonl(engine, calm.tokenizer, lines, settings, stop, system, verbose, budget)
        if failed:
            raise typer.Exit(1)
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
    report = _report(completion, finish, stats, load_s)
    new_tokens = report["completion_tokens"]
    if as_json:
        sys.stdout.write(json.dumps(report) + "\n")
    if verbose:
        err.print(
            f"[dim]load {load_s:.2f}s · prompt {report['prompt_tokens']} tok in {stats.prefill_s * 1000:.0f} ms · "
            f"{new_tokens} tok in {stats.steps} steps, {stats.decode_s:.2f}s · "
            f"{report['tokens_per_s']} tok/s · {report['steps_per_s']} vector-steps/s · "
            f"sampler fallbacks {stats.sampling.fallbacks}[/dim]"
        )


def _report(completion: str, finish: str | None, stats: GenerationStats, load_s: float) -> dict[str, typing.Any]:
    """The --json object of one generation: its text, token counts, finish reason and timings."""
    new_tokens = stats.completion_tokens[0] if stats.completion_tokens else 0
    return {
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


if typing.TYPE_CHECKING:
    from tokenizers import Tokenizer

    from ..runtime.engine import Engine, Request
    from ..runtime.settings import GenerationSettings
    from ..runtime.text import GenerationStats


def _generate_prompt(prompt: Optional[str], file: Optional[Path]) -> str:
    """-f FILE stands in for stdin: its text comes first, then PROMPT."""
    if file is None:
        return read_prompt(prompt)
    if prompt == "-":
        raise UsageError("give the prompt with -f FILE or '-' (stdin), not both")
    text = read_text(file)
    return text if prompt is None else text.rstrip("\n") + "\n" + prompt


def _with_system(system: Optional[str], text: str) -> str:
    return system.rstrip("\n") + "\n" + text if system else text


def _jsonl_input(file: Optional[Path]) -> list[str]:
    """Split on '\n' only: JSON strings may hold other line separators (U+2028) raw.

    Split as bytes and decoded line by line, so a line that is not UTF-8 costs only itself:
    its bad bytes stay as lone surrogates for `_jsonl_request` to report.
    """
    if file is not None:
        try:
            raw = file.read_bytes()
        except OSError as exc:
            raise UsageError(f"{file}: {exc.strerror or exc}") from None
    elif sys.stdin is None or sys.stdin.isatty():
        raise UsageError("--jsonl reads JSON lines from stdin or -f FILE")
    else:
        raw = read_stdin_bytes()
    return [line.decode("utf-8", "surrogateescape") for line in raw.split(b"\n")]


JSONL_FIELDS = {"temp": ("temperature", float), "max_tokens": ("max_tokens", int), "samples": ("num_samples", int),
                "seed": ("seed", int)}  # key: (GenerationSettings field, type); ranges are the settings gate's
JSONL_NAMES = {field: f'"{key}"' for key, (field, _) in JSONL_FIELDS.items()}


def _jsonl_request(line: str, defaults: GenerationSettings) -> tuple[str, GenerationSettings]:
    """One --jsonl line -> (prompt, settings); ValueError says what is wrong with it."""
    from ..io.tokenizer import SURROGATE

    bad = SURROGATE.search(line)
    if bad is not None:
        raise ValueError(f"the line is not UTF-8 text (byte 0x{ord(bad.group()) - 0xDC00:02x} at column {bad.start() + 1})")
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
    for key, (name, kind) in JSONL_FIELDS.items():
        value = obj.get(key)
        if value is None:
            continue
        types = (int, float) if kind is float else (int,)
        if isinstance(value, bool) or not isinstance(value, types):
            raise ValueError(f'"{key}" must be {"a number" if kind is float else "a whole number"}, got {json.dumps(value)}')
        changes[name] = kind(value)
    try:
        return obj["prompt"], replace(defaults, **changes)
    except SettingsError as exc:
        raise ValueError(exc.named(JSONL_NAMES)) from None


def _run_jsonl(
    engine: Engine, tokenizer: Optional[Tokenizer], lines: list[str], defaults: GenerationSettings, stop: list[str],
    system: Optional[str], verbose: bool, max_logits: int,
) -> int:
    """Answer every JSON line through the engine's slots and write the results in input order as they complete.

    Returns how many lines failed.
    """
    from ..io.tokenizer import encode as tok_encode
    from ..runtime.text import stream_requests

    if tokenizer is None:
        raise CalmError("the model has no tokenizer.json (pass --tokenizer PATH)")
    results: dict[int, dict] = {}
    accepted: list[tuple[int, Request, dict]] = []
    order = [n for n, line in enumerate(lines, 1) if line.strip()]
    for n in order:
        echo = _jsonl_id(lines[n - 1])
        try:
            prompt, settings = _jsonl_request(lines[n - 1], defaults)
            cost = engine.step_logits(settings)
            if cost > max_logits:
                raise ValueError(f"this line would score {cost:,} logits per step (candidates x K x vocabulary), over "
                                 f"the limit of {max_logits:,} (--max-request-logits)")
            request = engine.submit(tok_encode(tokenizer, _with_system(system, prompt)), settings)
        except (ValueError, UsageError) as exc:
            results[n] = {"error": str(exc), "line": n, **echo}
            continue
        accepted.append((n, request, echo))
    failed = len(results)
    written = 0

    def flush() -> None:
        from ..io.tokenizer import SURROGATE

        nonlocal written
        while written < len(order) and order[written] in results:
            record = results.pop(order[written])
            line = json.dumps(record, ensure_ascii=False)
            if SURROGATE.search(line):  # an "id" echoed back with a lone surrogate: \u escapes are valid JSON
                line = json.dumps(record)
            sys.stdout.write(line + "\n")
            written += 1
        sys.stdout.flush()

    flush()
    texts = [""] * len(accepted)
    t0 = time.perf_counter()
    for delta in stream_requests(engine, tokenizer, [r for _, r, _ in accepted], stop):
        texts[delta.row] += delta.text
        if delta.finish_reason is None:
            continue
        n, request, echo = accepted[delta.row]
        results[n] = {
            "line": n, **echo, "text": texts[delta.row], "prompt_tokens": len(request.prompt),
            "completion_tokens": len(request.tokens), "finish_reason": delta.finish_reason, "steps": request.steps,
            "prefill_s": round(request.prefill_s, 4), "decode_s": round(request.decode_s, 4),
            "tokens_per_s": round(len(request.tokens) / request.decode_s, 2) if request.decode_s else None,
        }
        flush()
    if verbose:
        tokens, wall = sum(len(r.tokens) for _, r, _ in accepted), time.perf_counter() - t0
        rate = f"{tokens / wall:.2f}" if wall else "-"
        err.print(
            f"[dim]{len(accepted)} prompts, {failed} bad lines · {engine.max_batch} slots · "
            f"{tokens} tok in {wall:.2f}s · {rate} tok/s aggregate[/dim]"
        )
    return failed


def _jsonl_id(line: str) -> dict:
    """The line's "id", when the line is a JSON object that has one, so even a failed line can be matched up."""
    try:
        obj = json.loads(line)
    except json.JSONDecodeError:
        return {}
    return {"id": obj["id"]} if isinstance(obj, dict) and "id" in obj else {}
