"""`calm generate`: one prompt, or a batch of JSON lines."""

from __future__ import annotations

import json
import sys
import time
import typing
from pathlib import Path
from typing import Optional

import typer

from ..errors import CalmError, UsageError
from .common import (
    CandidateDecoderOpt,
    DeviceOpt,
    DtypeOpt,
    ModelOpt,
    SamplerOpt,
    SamplesOpt,
    TempOpt,
    err,
    load_for_cli,
    read_prompt,
    read_stdin,
    read_text,
    seed_option,
)


def generate(
    prompt: Optional[str] = typer.Argument(None, help="Prompt text; '-' (or nothing, with piped stdin) reads stdin. Piped stdin (or -f) plus PROMPT: that text first, then PROMPT."),
    model: Optional[Path] = ModelOpt,
    max_tokens: int = typer.Option(128, "--max-tokens", "-n", help="Most new tokens to generate."),
    temp: float = TempOpt,
    samples: int = SamplesOpt,
    sampler: str = SamplerOpt,
    candidate_decoder: str = CandidateDecoderOpt,
    seed: Optional[int] = seed_option(None, "Seed for repeatable output."),
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
    from ..runtime.engine import (
        GenerationSettings,
        GenerationStats,
        check_candidate_decoder,
        check_settings,
    )
    from ..runtime.text import stream_text
    from ..runtime.token_engine import make_engine

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

    from ..runtime.engine import Engine, GenerationSettings


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
    """Split on '\n' only: JSON strings may hold other line separators (U+2028) raw."""
    if file is not None:
        return read_text(file).split("\n")
    if sys.stdin is None or sys.stdin.isatty():
        raise UsageError("--jsonl reads JSON lines from stdin or -f FILE")
    return read_stdin().split("\n")


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

    from ..io.tokenizer import encode as tok_encode
    from ..runtime.engine import GenerationStats
    from ..runtime.text import stream_text

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
