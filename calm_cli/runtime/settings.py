"""A request's generation settings: everything its output depends on besides the prompt."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError
from .rng import MAX_SEED

SAMPLERS = ("approx", "exact")


@dataclass(frozen=True)
class GenerationSettings:
    max_tokens: int = 128
    temperature: float = 0.5
    num_samples: int = 200
    sampler: str = "approx"
    seed: int | None = None
    ignore_eos: bool = False  # for benchmarks: a fixed number of new tokens

    @property
    def group(self) -> tuple[float, str, int]:
        """Rows with equal groups are sampled by one call of the temperature rule."""
        return (self.temperature, self.sampler, self.num_samples)


def check_settings(settings: GenerationSettings) -> None:
    if settings.max_tokens < 1:
        raise UsageError("--max-tokens must be at least 1")
    if not 0.0 <= settings.temperature <= 1.0:
        raise UsageError(f"--temp must be in [0, 1], got {settings.temperature}")
    if settings.num_samples < 1:
        raise UsageError("--samples must be at least 1")
    if settings.sampler not in SAMPLERS:
        raise UsageError(f"--sampler must be 'approx' or 'exact', got '{settings.sampler}'")
    if settings.seed is not None and not 0 <= settings.seed <= MAX_SEED:
        raise UsageError(f"--seed must be a whole number in [0, 2^63), got {settings.seed}")
