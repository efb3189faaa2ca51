"""The `calm` command line: a thin layer over the Python API.

Each command lives in its own module; this one builds the Typer app from them and owns
the entry point (one-line errors, exit codes, quiet Ctrl-C and closed pipes).
"""

from __future__ import annotations

import os
import sys
import traceback
from typing import Optional

import typer

from .. import __version__
from ..errors import CalmError
from .bench import bench
from .chat import chat
from .common import STATE
from .data import data_app, tokenizer_app
from .eval import eval_
from .generate import generate
from .model import convert, decode, encode, info, models
from .pull import pull
from .serve import serve
from .train import train_app
from .typer_setup import EPILOGS, new_typer

app = new_typer(
    add_completion=True,
    no_args_is_help=True,
    help="Run, train, evaluate and benchmark CALM (Continuous Autoregressive Language Models).",
    epilog="""Start with:

\b
  calm models                      list the models you can name with -m
  calm generate "The history of"   continue a prompt with the bundled model
  calm chat -m default             talk to it
  calm pull cccczshao/CALM-M       fetch the authors' CALM-M from the hub
  calm COMMAND --help              options and examples of one command""",
)


def _version(value: bool) -> None:
    if value:
        sys.stdout.write(f"calm {__version__}\n")
        raise typer.Exit()


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks on errors (also accepted after the command)."),
    download: bool = typer.Option(
        False, "--download", help="Let a command download a Hugging Face model (-m org/name) it does not have (also accepted after the command)."
    ),
    version: Optional[bool] = typer.Option(None, "--version", callback=_version, is_eager=True, help="Print the version and exit."),
) -> None:
    STATE["debug"] = STATE["debug"] or debug
    STATE["download"] = STATE["download"] or download


for command in (generate, chat, serve, models, pull, info, encode, decode, convert, bench):
    app.command(epilog=EPILOGS.get(command))(command)
app.command("eval", epilog=EPILOGS.get(eval_))(eval_)
app.add_typer(data_app, name="data")
app.add_typer(train_app, name="train")
app.add_typer(tokenizer_app, name="tokenizer")


def _take_debug(args: list[str]) -> list[str]:
    """--debug and --download anywhere before a bare `--` apply to the whole run, so `calm generate --debug …` works as `calm --debug generate …`."""
    end = args.index("--") if "--" in args else len(args)
    for flag in ("--debug", "--download"):
        if flag in args[:end]:
            STATE[flag.removeprefix("--")] = True
    return [a for a in args[:end] if a not in ("--debug", "--download")] + args[end:]


INTERRUPTED = 130  # the exit code of Ctrl-C, as shells give 128 + SIGINT


def main() -> None:
    """Entry point: one-line errors, exit 2 for usage and 1 for runtime errors, quiet on Ctrl-C and closed pipes.

    With --debug the traceback comes first; the message and the exit code stay the same.
    """
    command = typer.main.get_command(app)
    sys.stdout = _PipeAwareStdout(sys.stdout)
    try:
        code = command.main(args=_take_debug(sys.argv[1:]), prog_name="calm", standalone_mode=False)
        if code == INTERRUPTED:  # typer >= 0.29 turns Ctrl-C into Exit(130), which click returns here
            _end_interrupted_line()
            _quiet_exit(INTERRUPTED)
        sys.stdout.flush()
        sys.exit(code if isinstance(code, int) else 0)
    except CalmError as exc:
        if STATE["debug"]:
            traceback.print_exc()
        _fail(str(exc), exc.exit_code)
    except (KeyboardInterrupt, typer.Abort):
        _end_interrupted_line()
        _quiet_exit(INTERRUPTED)
    except (BrokenPipeError, PipeClosed):
        _quiet_exit(0)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except typer.TyperException as exc:
        if STATE["debug"]:
            traceback.print_exc()
        if type(exc).__name__ == "NoArgsIsHelpError":  # `calm` or `calm train` alone: the help, as --help gives it
            sys.stdout.write(exc.format_message() + "\n")
            sys.exit(0)
        message = exc.format_message()
        if not message:
            sys.exit(exc.exit_code)
        ctx = getattr(exc, "ctx", None)
        name = ctx.command.name if ctx is not None and ctx.command is not None else None
        hint = f" (see 'calm {name} --help')" if name and name != "calm" else ""
        _fail(f"{message}{hint}", 2)
    except Exception as exc:
        if STATE["debug"]:
            traceback.print_exc()
        first = str(exc).splitlines()[0] if str(exc) else ""
        _fail(f"{type(exc).__name__}: {first} (run with --debug for the traceback)", 1)


class PipeClosed(Exception):
    """stdout's reader went away (`| head`): not an OSError, so the parser library does not turn it into exit 1."""


class _PipeAwareStdout:
    """sys.stdout, with a closed pipe raised as PipeClosed so main() can end quietly with exit 0."""

    def __init__(self, stream) -> None:
        self._stream = stream
        self.mid_line = False  # the last text written did not end a line: Ctrl-C adds the newline

    def write(self, text: str) -> int:
        try:
            written = self._stream.write(text)
        except BrokenPipeError:
            raise PipeClosed from None
        if text:
            self.mid_line = not text.endswith("\n")
        return written

    def flush(self) -> None:
        try:
            self._stream.flush()
        except BrokenPipeError:
            raise PipeClosed from None

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


def _fail(message: str, code: int) -> None:
    """One line on stderr: control characters and line breaks (from a value the user gave) are escaped."""
    line = "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in message)
    sys.stderr.write(f"error: {line}\n")
    sys.exit(code)


def _end_interrupted_line() -> None:
    """After Ctrl-C, leave the shell its own line.

    Text cut mid-line gets its newline on stdout (a file or pipe keeps whole lines); otherwise
    a terminal has echoed "^C" after the last line, so stderr ends that line.
    """
    try:
        if isinstance(sys.stdout, _PipeAwareStdout) and sys.stdout.mid_line:
            sys.stdout.write("\n")
        elif sys.stderr is not None and sys.stderr.isatty():
            sys.stderr.write("\n")
    except (BrokenPipeError, PipeClosed, ValueError):
        pass


def _quiet_exit(code: int) -> None:
    """Leave without a traceback, and without Python's complaint about flushing a closed stdout."""
    try:
        sys.stdout.flush()
    except (BrokenPipeError, PipeClosed, ValueError):
        pass
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    sys.exit(code)
