"""`calm chat`: a conversation with a base CALM model through a plain-text turn template.

CALM checkpoints are base models, so a conversation is plain text: the system text on top,
then one template turn per exchange ("User: {message}\\nAssistant:" followed by the reply),
ending with the new message and an open "Assistant:". The template's turn marker ("\\nUser:")
is a stop string, so the model's attempt to write the user's next line ends its reply.

In a terminal, input comes from prompt-toolkit (history, Ctrl-R, Esc-Enter for a newline) and
output goes through rich. With stdin or stdout not a terminal, chat reads one turn per line
and writes one reply per line with nothing else on stdout, so it can be scripted.
"""

from __future__ import annotations

import difflib
import json
import os
import sys
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from ..errors import CalmError, UsageError
from ..io.atomic import write_text_atomic
from ..runtime.chat import DEFAULT_TEMPLATE, Conversation, Template, Turn
from .common import (
    FLAGS,
    SAMPLES_LIMIT,
    SEED_LIMIT,
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
    seed_option,
    set_threads,
    typed_engine_options,
    typed_settings,
)
from .typer_setup import with_examples

if TYPE_CHECKING:
    from ..models.calm import CALM
    from ..runtime.settings import EngineOptions, GenerationSettings

PROMPT = ">>> "
CONTINUATION = "... "
BLOCK = '"""'

# Characters that would move the cursor or start an escape sequence if a reply printed them raw.
_CONTROL = {c: None for c in [*range(0x00, 0x09), *range(0x0B, 0x20), 0x7F]}
# Everything str.splitlines() breaks on: turned into spaces (before _CONTROL) so a piped reply stays on one line.
_LINE_BREAKS = {ord(c): " " for c in "\n\r\v\f\x1c\x1d\x1e\x85\u2028\u2029"}


class Display:
    """Where chat output goes: a rich console on a terminal, or plain lines for a script."""

    def __init__(self, interactive: bool) -> None:
        self.interactive = interactive
        if interactive:
            from rich.console import Console

            self.console: Optional[Console] = Console(highlight=False, soft_wrap=True)
        else:
            self.console = None

    def note(self, text: str) -> None:
        if self.console:
            self.console.print(text, style="dim", markup=False)
        else:
            sys.stderr.write(text + "\n")

    def error(self, text: str) -> None:
        if self.console:
            self.console.print(f"error: {text}", style="red", markup=False)
        else:
            sys.stderr.write(f"error: {text}\n")

    def show(self, text: str) -> None:
        """Command output (/help): on stdout in a terminal, stderr in a script so stdout holds only replies."""
        if self.console:
            self.console.print(text, markup=False)
        else:
            sys.stderr.write(text + "\n")

    def chunk(self, text: str) -> None:
        if self.console:
            self.console.out(text.translate(_CONTROL), end="", highlight=False)
        else:
            sys.stdout.write(text.translate(_LINE_BREAKS).translate(_CONTROL))
            sys.stdout.flush()

    def end_reply(self, interrupted: bool, cut: Optional[int] = None) -> None:
        """End the reply's line; in a terminal, say why it ended early (Ctrl-C, or `cut` = the token limit it hit)."""
        if self.console:
            if cut is not None and not interrupted:
                self.console.print(f" [… cut at {cut} tokens; /max-tokens N for longer replies]", style="dim", markup=False)
            else:
                self.console.out("")
            if interrupted:
                self.note("(interrupted)")
        else:
            sys.stdout.write("\n")
            sys.stdout.flush()


HELP = [
    ("/help", "this help"),
    ("/temp T", "temperature in [0, 1]; '/temp' alone shows it (as do the other settings)"),
    ("/max-tokens N", "longest reply, in tokens"),
    ("/samples N", "candidate chunks drawn per step"),
    ("/seed N", "repeatable replies (the reply to turn i uses seed N+i); '/seed random' to stop"),
    ("/system TEXT", "system text on top of the conversation; '/system' alone clears it"),
    ("/reset", "start a new conversation"),
    ("/save FILE", "write the transcript as JSON"),
    ("/load FILE", "continue a conversation saved with /save"),
    ("/model NAME|PATH", "switch to another model, keeping the conversation"),
    ("/verbose", "toggle tokens/s and vector-steps/s after each reply"),
    ("/exit", "leave (also /bye, Ctrl-D, or Ctrl-C on an empty prompt)"),
]
# The slash command that changes each generation setting, to word the settings gate's errors
COMMANDS = {**FLAGS, "max_tokens": "/max-tokens", "temperature": "/temp", "num_samples": "/samples", "seed": "/seed"}
KEYS = [
    ("Esc-Enter", "new line (Alt-Enter in most terminals)"),
    ('"""', "start and end a multi-line message"),
    ("Up, Ctrl-R", "recall and search earlier input"),
    ("Ctrl-C", "stop a reply; on an empty prompt, leave"),
]
ALIASES = {"/bye": "/exit", "/quit": "/exit", "/?": "/help"}


class ChatSession:
    """Settings, model and conversation; `reply` streams one answer, `command` runs one slash command."""

    def __init__(
        self,
        loader: Callable[[str], CALM],
        model_name: str,
        settings: GenerationSettings,
        conversation: Conversation,
        display: Display,
        engine_options: EngineOptions,
        verbose: bool = False,
    ) -> None:
        self.loader = loader
        self.engine_options = engine_options
        self.display = display
        self.settings = settings
        self.conversation = conversation
        self.verbose = verbose
        self._use(loader(model_name), model_name)

    def _use(self, model: CALM, name: str) -> None:
        if model.tokenizer is None:
            raise CalmError(f"{name}: the model has no tokenizer.json")
        self.model_name = name
        from ..runtime.engine import build_engine

        self.engine = build_engine(model, self.engine_options)
        self.tokenizer = model.tokenizer

    @property
    def context_tokens(self) -> int:
        return self.engine.config.max_position_embeddings * self.engine.k

    def describe(self) -> str:
        """The model as the user named it (a directory shows its last part), K and the context."""
        name = self.model_name.rstrip("/\\")
        short = Path(name).name if os.sep in name or "/" in name else name
        return f"{short} · K={self.engine.k} · context {self.context_tokens} tokens"

    def _count(self, text: str) -> int:
        from ..io.tokenizer import encode

        return len(encode(self.tokenizer, text))

    def reply(self, message: str) -> None:
        """Stream the model's answer to `message`; Ctrl-C in a terminal keeps what was shown and returns."""
        from ..runtime.text import GenerationStats, stream_text

        alone = self._count(self.conversation.prompt(message, first=len(self.conversation.turns)))
        if alone // self.engine.k >= self.engine.config.max_position_embeddings:
            self.display.error(f"the message is {alone} tokens with the template; the model's context is {self.context_tokens} tokens")
            return
        room = min(self.settings.max_tokens, self.context_tokens // 2)
        dropped = self.conversation.fit(message, self._count, self.context_tokens - room)
        if dropped:
            kept = len(self.conversation.turns) - self.conversation.first
            self.display.note(
                f"(dropped the {dropped} oldest turn{'s' * (dropped > 1)} to stay within the model's "
                f"{self.context_tokens}-token context; {kept} kept)"
            )
        prompt = self.conversation.prompt(message)
        size = self._count(prompt)
        stop = self.conversation.template.stop
        settings = self.settings
        if settings.seed is not None:  # the same conversation replays exactly, yet its replies differ from each other
            settings = replace(settings, seed=(settings.seed + len(self.conversation.turns)) % SEED_LIMIT)
        stats = GenerationStats()
        parts: list[str] = []
        shown, pending, interrupted, finish = False, "", False, None
        try:
            for delta in stream_text(self.engine, self.tokenizer, [prompt], settings, [stop] if stop else [], stats):
                parts.append(delta.text)
                finish = delta.finish_reason or finish
                text = pending + delta.text if shown else (pending + delta.text).lstrip()
                core = text.rstrip()
                pending = text[len(core) :]
                if core:
                    self.display.chunk(core)
                    shown = True
        except KeyboardInterrupt:
            if not self.display.interactive:
                raise
            interrupted = True
        self.display.end_reply(interrupted, settings.max_tokens if finish == "length" else None)
        self.conversation.turns.append(Turn(message, "".join(parts).strip()))
        if self.verbose and stats.decode_s:
            new = stats.completion_tokens[0] if stats.completion_tokens else 0
            self.display.note(
                f"prompt {size} tok in {stats.prefill_s * 1000:.0f} ms · {new} tok in {stats.steps} steps, "
                f"{stats.decode_s:.2f}s · {new / stats.decode_s:.1f} tokens/s · "
                f"{stats.steps / stats.decode_s:.2f} vector-steps/s"
            )

    def command(self, line: str) -> bool:
        """Run a slash command; False means leave the chat."""
        name, _, arg = line.partition(" ")
        name, arg = ALIASES.get(name.lower(), name.lower()), arg.strip()
        handler = getattr(self, "_cmd_" + name[1:].replace("-", "_"), None) if name[1:] else None
        if handler is None:
            close = difflib.get_close_matches(name, [usage.split()[0] for usage, _ in HELP], n=1)
            hint = f"did you mean {close[0]}? " if close else ""
            self.display.error(f"unknown command {name}; {hint}type /help for the list")
            return True
        try:
            return handler(arg) is not False
        except UsageError as exc:
            self.display.error(str(exc))
            return True

    def _settings(self, **changes: Any) -> None:
        self.settings = typed_settings(self.settings, COMMANDS, **changes)

    def _cmd_help(self, arg: str) -> None:
        width = max(len(usage) for usage, _ in HELP + KEYS) + 2
        lines = [f"  {usage:<{width}}{what}" for usage, what in HELP]
        lines += ["", *(f"  {keys:<{width}}{what}" for keys, what in KEYS)]
        self.display.show("\n".join(lines))

    def _cmd_temp(self, arg: str) -> None:
        if arg:
            self._settings(temperature=_number(arg, float, "/temp T (a number in [0, 1])"))
        self.display.note(f"temperature {self.settings.temperature:g}")

    def _cmd_max_tokens(self, arg: str) -> None:
        if arg:
            self._settings(max_tokens=_number(arg, int, "/max-tokens N (a whole number)"))
        self.display.note(f"replies of at most {self.settings.max_tokens} tokens")

    def _cmd_samples(self, arg: str) -> None:
        if arg:
            usage = f"/samples N (a whole number up to {SAMPLES_LIMIT})"
            samples = _number(arg, int, usage)
            if samples > SAMPLES_LIMIT:
                raise UsageError(f"usage: {usage}")
            self._settings(num_samples=samples)
        self.display.note(f"{self.settings.num_samples} samples per step")

    def _cmd_seed(self, arg: str) -> None:
        if not arg:
            seed = self.settings.seed
            self.display.note("random seed for every reply" if seed is None else f"seed {seed} (+ turn number) for each reply")
            return
        if arg.lower() in ("random", "off", "none"):
            self._settings(seed=None)
            self.display.note("random seed for every reply")
            return
        usage = "/seed N (a whole number from 0 to 2^63 - 1, or 'random')"
        seed = _number(arg, int, usage)
        if not 0 <= seed < SEED_LIMIT:
            raise UsageError(f"usage: {usage}")
        self._settings(seed=seed)
        self.display.note(f"seed {self.settings.seed} (+ turn number) for each reply")

    def _cmd_system(self, arg: str) -> None:
        self.conversation.system = arg
        self.display.note(f"system text set ({len(arg)} characters)" if arg else "system text cleared")

    def _cmd_reset(self, arg: str) -> None:
        self.conversation.reset()
        self.display.note("new conversation")

    def _cmd_save(self, arg: str) -> None:
        path = Path(_required(arg, "/save FILE")).expanduser()
        data = {
            "model": str(self.model_name),
            "template": self.conversation.template.text,
            "system": self.conversation.system,
            "settings": asdict(self.settings),
            "turns": [asdict(t) for t in self.conversation.turns],
        }
        try:
            write_text_atomic(path, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
        except OSError as exc:
            raise UsageError(f"{path}: {exc.strerror or exc}") from None
        self.display.note(f"saved {len(self.conversation.turns)} turns to {path}")

    def _cmd_load(self, arg: str) -> None:
        path = Path(_required(arg, "/load FILE")).expanduser()
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except OSError as exc:
            raise UsageError(f"{path}: {exc.strerror or exc}") from None
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise UsageError(f"{path}: not a JSON file") from None
        turns = data.get("turns") if isinstance(data, dict) else None
        system = data.get("system", "") if isinstance(data, dict) else None
        valid = isinstance(turns, list) and isinstance(system, str) and all(
            isinstance(t, dict) and isinstance(t.get("user"), str) and isinstance(t.get("assistant"), str) for t in turns
        )
        if not valid:
            raise UsageError(f"{path}: not a transcript from /save (needs 'turns': [{{'user': …, 'assistant': …}}])")
        self.conversation.reset()
        self.conversation.system = system
        self.conversation.turns.extend(Turn(t["user"], t["assistant"]) for t in turns)
        self.display.note(f"loaded {len(turns)} turns from {path}" + (f" (system text: {_clip(system)})" if system else ""))
        for turn in self.conversation.turns[-LOAD_SHOWN:]:
            self.display.show(f"  you:   {_clip(turn.user)}\n  reply: {_clip(turn.assistant)}")
        if len(turns) > LOAD_SHOWN:
            self.display.note(f"(the last {LOAD_SHOWN} shown)")

    def _cmd_model(self, arg: str) -> None:
        name = _required(arg, "/model NAME|PATH")
        try:
            self._use(self.loader(name), name)
        except CalmError as exc:
            raise UsageError(str(exc)) from None
        self.display.note(f"model {self.describe()}; the conversation goes on")

    def _cmd_verbose(self, arg: str) -> None:
        self.verbose = not self.verbose
        self.display.note(f"verbose {'on' if self.verbose else 'off'}")

    def _cmd_exit(self, arg: str) -> bool:
        return False


LOAD_SHOWN = 3  # turns /load prints, the latest ones


def _clip(text: str, width: int = 200) -> str:
    """One line of at most `width` characters, for showing a loaded turn."""
    flat = " ".join(text.split())
    return flat if len(flat) <= width else flat[: width - 1] + "…"


def _required(arg: str, usage: str) -> str:
    if not arg:
        raise UsageError(f"usage: {usage}")
    return arg


def _number(arg: str, kind: type, usage: str) -> Any:
    try:
        return kind(arg)
    except ValueError:
        raise UsageError(f"usage: {usage}") from None


def history_path() -> Path:
    """$XDG_DATA_HOME/calm/chat_history, else ~/.local/share/calm/chat_history (the XDG default)."""
    base = os.environ.get("XDG_DATA_HOME")
    root = Path(base) if base and os.path.isabs(base) else Path.home() / ".local" / "share"
    return root / "calm" / "chat_history"


class _BlockCancelled(Exception):
    """Ctrl-C or Ctrl-D (or the end of input) inside a \"\"\" block."""


def read_turn(read: Callable[[str], str]) -> str:
    """One user turn: a line, or the lines between an opening and a closing \"\"\"."""
    first = read(PROMPT)
    if not first.lstrip().startswith(BLOCK):
        return first
    lines, body = [], first.lstrip()[len(BLOCK) :]
    while not body.rstrip().endswith(BLOCK):
        lines.append(body)
        try:
            body = read(CONTINUATION)
        except (EOFError, KeyboardInterrupt):
            raise _BlockCancelled from None
    lines.append(body.rstrip()[: -len(BLOCK)])
    return "\n".join(lines)


def _terminal_reader(history: Path | None, display: Display) -> Callable[[str], str]:
    """prompt-toolkit input: Esc-Enter inserts a newline, Ctrl-C clears the line or, on an empty one, leaves."""
    from prompt_toolkit import PromptSession
    from prompt_toolkit.completion import WordCompleter
    from prompt_toolkit.history import FileHistory, History, InMemoryHistory
    from prompt_toolkit.key_binding import KeyBindings

    store: History = InMemoryHistory()
    if history is not None:
        try:
            history.parent.mkdir(parents=True, exist_ok=True)
            history.touch(mode=0o600)  # what people type can be private
            store = FileHistory(str(history))
        except OSError as exc:
            display.note(f"(history off: {history}: {exc.strerror or exc})")
    keys = KeyBindings()

    @keys.add("escape", "enter")
    def _newline(event: Any) -> None:
        event.current_buffer.insert_text("\n")

    @keys.add("c-c")
    def _interrupt(event: Any) -> None:
        event.app.exit(exception=KeyboardInterrupt() if event.current_buffer.text else EOFError())

    commands = sorted({usage.split()[0] for usage, _ in HELP} | set(ALIASES))
    session: PromptSession[str] = PromptSession(
        history=store, key_bindings=keys, prompt_continuation=CONTINUATION,
        completer=WordCompleter(commands, sentence=True), complete_while_typing=False,
    )
    return session.prompt


def _pipe_reader(prompt: str) -> str:
    line = sys.stdin.readline()
    if not line:
        raise EOFError
    return line.rstrip("\r\n")


def run_chat(
    loader: Callable[[str], CALM],
    model_name: str,
    settings: GenerationSettings,
    template: str,
    system: str,
    verbose: bool,
    history: bool,
    engine_options: EngineOptions,
) -> None:
    """The chat loop: read a turn, answer it or run its slash command, until /exit or end of input."""
    conversation = Conversation(Template.parse(template), system)
    interactive = sys.stdin.isatty() and sys.stdout.isatty()
    display = Display(interactive)
    session = ChatSession(loader, model_name, settings, conversation, display, engine_options, verbose)
    if interactive:
        read = _terminal_reader(history_path() if history else None, display)
        display.note(f"calm chat · {session.describe()} · /help for commands, Ctrl-D to leave")
    else:
        if hasattr(sys.stdin, "reconfigure"):
            sys.stdin.reconfigure(errors="replace")  # a line that is not UTF-8 is read as U+FFFD, not the end of the chat
        read = _pipe_reader
    while True:
        try:
            text = read_turn(read).strip()
            if not text:
                continue
            if text.startswith("/"):
                if not session.command(text):
                    return
            else:
                session.reply(text)
        except EOFError:
            return
        except _BlockCancelled:
            display.note('(multi-line message dropped: no closing """)')
        except KeyboardInterrupt:
            if not interactive:
                raise


@with_examples(
    "calm chat                       # the default model; /help for commands",
    "calm chat -m baseline --temp 0.7 -n 64",
    "printf 'Hi!\\nMore?\\n' | calm chat -n 16   # one reply per input line",
)
def chat(
    model: Optional[str] = ModelOpt,
    max_tokens: int = typer.Option(256, "--max-tokens", "-n", help="Longest reply, in tokens (/max-tokens N changes it)."),
    temp: float = TempOpt,
    samples: int = SamplesOpt,
    sampler: str = SamplerOpt,
    seed: Optional[int] = seed_option(None, "Seed for a repeatable conversation: the reply to turn i uses SEED+i (/seed N changes it)."),
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
    compile: bool = typer.Option(
        False, "--compile/--no-compile",
        help="torch.compile the decode step. Off by default, as for `calm generate`: the first reply would wait for a "
        "cold compile (minutes on a large model).",
    ),
    candidate_decoder: str = CandidateDecoderOpt,
    candidate_dtype: str = CandidateDtypeOpt,
    verbose: bool = typer.Option(False, "--verbose", "-v", help="Show tokens/s and vector-steps/s after each reply (/verbose toggles)."),
    threads: Optional[int] = ThreadsOpt,
) -> None:
    """Chat with a model: streamed replies and slash commands.

    Input history, Esc-Enter for a newline, Tab completes /commands (/help lists them). With stdin or stdout not a terminal, each input line is one turn and each reply is one line on stdout.
    """
    settings = typed_settings(max_tokens=max_tokens, temperature=temp, num_samples=samples, sampler=sampler, seed=seed)
    # one conversation decodes one row at a time: more slots would only hold cache
    options = typed_engine_options(max_batch=1, candidate_decoder=candidate_decoder, candidate_dtype=candidate_dtype,
                                   compile=compile)
    threads_used = set_threads(threads)
    if verbose:
        err.print(f"[dim]{threads_used}[/dim]")
    run_chat(
        lambda name: load_for_cli(name, device, dtype), model or os.environ.get("CALM_MODEL") or "default", settings,
        DEFAULT_TEMPLATE if template is None else template, system, verbose, history, options,
    )
