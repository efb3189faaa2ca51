"""Conversations as plain text, shared by `calm chat` and the server's /v1/chat/completions.

CALM checkpoints are base models, so a conversation is text: the system text on top, then
one template turn per exchange ("User: {message}\\nAssistant:" followed by the reply),
ending with the new message and an open "Assistant:". The template's turn marker
("\\nUser:") is a stop string, so the model's attempt to write the user's next line ends
its reply.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import UsageError

DEFAULT_TEMPLATE = "User: {message}\nAssistant:"
SLOT = "{message}"


@dataclass(frozen=True)
class Template:
    """A turn as text around the user's message; the reply follows the text after the message."""

    head: str
    tail: str

    @classmethod
    def parse(cls, text: str) -> Template:
        """Accept `\\n` typed on a command line as a newline, and require exactly one {message}."""
        text = text.replace("\\n", "\n")
        if text.count(SLOT) != 1:
            raise UsageError("--template must contain {message} exactly once, e.g. 'User: {message}\\nAssistant:'")
        head, tail = text.split(SLOT)
        return cls(head.lstrip("\n"), tail)

    @property
    def text(self) -> str:
        return self.head + SLOT + self.tail

    @property
    def stop(self) -> str | None:
        """The start of the next turn: where the model has finished answering."""
        marker = self.head.strip()
        return "\n" + marker if marker else None

    def ask(self, message: str) -> str:
        return self.head + message + self.tail

    def answered(self, message: str, reply: str) -> str:
        joint = "" if self.tail[-1:].isspace() else " "
        return self.ask(message) + joint + reply + "\n"


@dataclass
class Turn:
    user: str
    assistant: str


@dataclass
class Conversation:
    """The turns so far; `first` is the oldest one still sent to the model (earlier ones fell out of the window)."""

    template: Template
    system: str = ""
    turns: list[Turn] = field(default_factory=list)
    first: int = 0

    def prompt(self, message: str, first: int | None = None) -> str:
        """The text the model continues: system text, the turns from `first` (default: all still in the window), the message."""
        top = self.system.strip() + "\n" if self.system.strip() else ""
        kept = self.turns[self.first if first is None else first :]
        past = "".join(self.template.answered(t.user, t.assistant) for t in kept)
        return top + past + self.template.ask(message)

    def fit(self, message: str, count: Callable[[str], int], budget: int) -> int:
        """Drop the oldest turns until the prompt is at most `budget` tokens; return how many were dropped."""
        dropped = 0
        while self.first < len(self.turns) and count(self.prompt(message)) > budget:
            self.first += 1
            dropped += 1
        return dropped

    def reset(self) -> None:
        self.turns.clear()
        self.first = 0
