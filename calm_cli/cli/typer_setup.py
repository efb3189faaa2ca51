"""How every `calm` Typer app is built: plain help that uses the terminal's width, and command suggestions.

Help is rendered by click's plain formatter rather than Typer's rich panels: the panels print
a `<bool>` type column for every flag and give descriptions a narrow column at 80 columns.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable
from typing import Any

import typer
from typer.core import TyperGroup

HELP_WIDTH = 120  # the widest help text gets, however wide the terminal


class CalmGroup(TyperGroup):
    """A command group whose 'No such command' error suggests the commands the user may have meant."""

    def resolve_command(self, ctx: Any, args: list[str]) -> Any:
        try:
            return super().resolve_command(ctx, args)
        except Exception as exc:  # click's UsageError, which newer Typer versions vendor under another module
            message = getattr(exc, "message", None)
            if args and isinstance(message, str) and message.startswith("No such command") and "Did you mean" not in message:
                close = suggest(args[0], list(self.commands))
                if close:
                    exc.message = f"{message.rstrip('.')}. Did you mean {' or '.join(repr(c) for c in close)}?"
            raise


def suggest(typed: str, names: list[str]) -> list[str]:
    """Commands that start with what was typed (`gen`), else the closest spellings (`genrate`)."""
    prefixed = [n for n in names if n.startswith(typed.lower())]
    return prefixed[:3] or difflib.get_close_matches(typed.lower(), names, n=3, cutoff=0.5)


def new_typer(**kwargs: Any) -> typer.Typer:
    """A Typer app with calm's help style, suggestions and no pretty tracebacks."""
    return typer.Typer(
        cls=CalmGroup,
        rich_markup_mode=None,
        pretty_exceptions_enable=False,
        context_settings={"max_content_width": HELP_WIDTH, "help_option_names": ["--help", "-h"]},
        **{"add_completion": False, **kwargs},
    )


def examples(*lines: str) -> str:
    """An 'Examples:' epilog whose lines click prints as written (\\b stops it re-wrapping them)."""
    return "Examples:\n\n\b\n" + "\n".join(f"  {line}" for line in lines)


EPILOGS: dict[Callable[..., Any], str] = {}


def with_examples(*lines: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Give a command function an examples epilog, which main.py passes to Typer when it registers the command."""

    def mark(command: Callable[..., Any]) -> Callable[..., Any]:
        EPILOGS[command] = examples(*lines)
        return command

    return mark
