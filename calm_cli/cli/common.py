"""What the command modules share: the common options, the error console, model loading and prompt reading.

Nothing here imports torch: `calm --help` and usage errors must stay fast, so the command
modules import torch and the runtime only inside their command functions.
"""

from __future__ import annotations

import sys
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from ..errors import UsageError
from ..runtime.settings import MAX_SEED, SAMPLES_LIMIT, EngineOptions, GenerationSettings, SettingsError
from ..runtime.threads import LoadWindow, ThreadChoice, requested_threads

if TYPE_CHECKING:
    from rich.console import Console

STATE = {"debug": False, "download": False}  # --debug and --download, taken anywhere on the command line (main.py)

# The flag each generation setting is typed as, to word the settings gate's errors (runtime/settings.py)
FLAGS = {"max_tokens": "--max-tokens", "temperature": "--temp", "num_samples": "--samples", "sampler": "--sampler",
         "seed": "--seed", "max_batch": "--max-batch", "candidate_decoder": "--candidate-decoder",
         "candidate_dtype": "--candidate-dtype"}

ModelOpt = typer.Option(
    None, "--model", "-m", metavar="NAME|DIR",
    help="Model name (see 'calm models'), directory or Hugging Face id (org/name[@rev], after 'calm pull'). Default: $CALM_MODEL, else 'default'.",
)
TempOpt = typer.Option(0.5, "--temp", "-t", help="Temperature in [0, 1]; 0.5 (the authors' advice) reads fluently, 1 draws once per step.")
SamplesOpt = typer.Option(200, "--samples", max=SAMPLES_LIMIT, help="Candidate chunks drawn per step by the approx sampler (N).")
SamplerOpt = typer.Option("approx", "--sampler", help="approx (count repeats among N draws) or exact (rejection).")
CandidateDecoderOpt = typer.Option(
    "fast", "--candidate-decoder",
    help="fast (bf16 scores, float32 where they cannot decide; same tokens) or dense (float32, for comparison).",
)
SEED_LIMIT = MAX_SEED + 1


def seed_option(default: int | None, help: str) -> Any:
    """--seed, refused with a usage error (exit 2) outside [0, 2^63) before any work starts."""
    return typer.Option(default, "--seed", min=0, max=SEED_LIMIT - 1, help=help)


CandidateDtypeOpt = typer.Option(
    "auto", "--candidate-dtype",
    help="dtype of the head's draws and the decoder's layers: auto (bf16 for T < 1 pools where the device has fast "
    "bf16, the model's dtype at T = 1), float32 (a request's tokens then match alone and batched), or bf16. "
    "The argmax of each candidate stays float32 (README).",
)
DeviceOpt = typer.Option("auto", "--device", help="cpu, cuda, cuda:N or auto (CUDA when present).")
DtypeOpt = typer.Option("auto", "--dtype", help="fp32, bf16, fp16 or auto (bf16 on CUDA, fp32 on CPU).")
ThreadsOpt = typer.Option(
    None, "--threads", metavar="N",
    help="CPU threads for torch. Default: $CALM_THREADS, else the cores not busy as the command starts (see README).",
)


class _LazyConsole:
    """rich's stderr console, built on first use so that importing a command module stays cheap."""

    _console: Optional[Console] = None

    def __getattr__(self, name: str) -> Any:
        if _LazyConsole._console is None:
            from rich.console import Console

            _LazyConsole._console = Console(stderr=True, highlight=False)
        return getattr(_LazyConsole._console, name)


err = _LazyConsole()


def set_threads(threads: Optional[int]) -> ThreadChoice:
    """Apply --threads (else $CALM_THREADS, else the cores idle now) to torch; return the count and why.

    The load window opens before torch is imported and closes after, so the import is the window
    and measuring the load costs nothing on a cold start (README, Threads).
    """
    requested = requested_threads(threads)
    window = LoadWindow() if requested is None else None
    import torch

    choice = window.close(torch.get_num_threads()) if window is not None else requested
    torch.set_num_threads(choice.count)
    return choice


def model_path(model: Optional[str]) -> Path:
    """--model as a directory: a name, a path, a hub id (fetched only with --download), or (when not given) $CALM_MODEL, else `default`."""
    from ..io.registry import resolve_model

    return resolve_model(model, download=STATE["download"])


def load_for_cli(model: Optional[str], device: str, dtype: str, ae: Optional[Path] = None, tokenizer: Optional[Path] = None):
    """calm_cli.io.checkpoint.load with the CLI's device and dtype words (auto, bf16, cuda:1).

    The model is found first, so a wrong name or folder is reported before torch is imported.
    """
    directory = model_path(model)
    from ..io.checkpoint import load
    from ..runtime.device import resolve_device, resolve_dtype

    dev = resolve_device(device)
    return load(
        directory, device=dev, dtype=resolve_dtype(dtype, dev),
        ae=str(ae) if ae else None, tokenizer=str(tokenizer) if tokenizer else None,
    )


def read_prompt(prompt: Optional[str]) -> str:
    """PROMPT, or stdin for '-' or no argument; piped stdin plus an argument gives stdin first, then the argument."""
    piped = not sys.stdin.isatty() if sys.stdin else False
    if prompt == "-" or (prompt is None and piped):
        text = read_stdin()
        if not text:  # an empty pipe is a mistake more often than a wish; '' asks for no prompt explicitly
            raise UsageError("no prompt: stdin was empty (give PROMPT, or '' for none)")
        return text
    if prompt is None:
        raise UsageError("no prompt: give PROMPT, '-' or pipe text on stdin")
    if piped and prompt:
        stdin_text = read_stdin()
        if stdin_text:
            return stdin_text.rstrip("\n") + "\n" + prompt
    return prompt


def read_stdin() -> str:
    """All of stdin as text; bytes that are not UTF-8 are a usage error, not a crash.

    Read as bytes and decoded strictly: under a C or POSIX locale Python's own stdin would
    smuggle them in as lone surrogates, which the tokenizer refuses with a TypeError.
    """
    return utf8_text(read_stdin_bytes(), "stdin")


def read_stdin_bytes() -> bytes:
    """All of stdin as bytes (a text-only stdin, as in tests, is encoded back, its surrogates kept for utf8_text)."""
    if hasattr(sys.stdin, "buffer"):
        return sys.stdin.buffer.read()
    try:
        return sys.stdin.read().encode("utf-8", "surrogateescape")
    except UnicodeError:
        raise UsageError("stdin is not UTF-8 text") from None


def utf8_text(raw: bytes, where: str) -> str:
    """Strict UTF-8, or a usage error that says where the first bad byte is."""
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UsageError(f"{where} is not UTF-8 text (byte 0x{raw[exc.start]:02x} at offset {exc.start})") from None


def read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"{path}: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise UsageError(f"{path}: not UTF-8 text") from None


def typed_settings(
    base: GenerationSettings | None = None, names: dict[str, str] = FLAGS, **fields: Any
) -> GenerationSettings:
    """Settings from what the user typed (`base` with `fields` changed), an error naming the user's own flag."""
    try:
        return GenerationSettings(**fields) if base is None else replace(base, **fields)
    except SettingsError as exc:
        raise UsageError(exc.named(names)) from None


def typed_engine_options(**fields: Any) -> EngineOptions:
    """Engine options from the command's flags, an error naming the flag."""
    try:
        return EngineOptions(**fields)
    except SettingsError as exc:
        raise UsageError(exc.named(FLAGS)) from None
