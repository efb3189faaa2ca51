"""A request's generation settings, their limits and the names of the decoding options.

Everything a request's output depends on besides the prompt. This module imports no torch,
so the command line and the server check what a user typed before loading anything.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import UsageError

SAMPLERS = ("approx", "exact")
CANDIDATE_DECODERS = ("dense", "fast")
CANDIDATE_DTYPES = ("auto", "float32", "bf16")
MAX_SEED = (1 << 63) - 1  # seeds are 0 <= seed < 2^63, as torch.Generator.manual_seed takes them
SAMPLES_LIMIT = 2**20  # more candidate chunks per step than memory holds would end in an allocation failure
DEFAULT_MAX_BODY_BYTES = 4 * 2**20  # `calm serve`: a 128k-token prompt is about 0.5 MB; a JSON escape takes 6 bytes a character


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
    if not 1 <= settings.num_samples <= SAMPLES_LIMIT:
        raise UsageError(f"--samples must be a whole number in [1, {SAMPLES_LIMIT}], got {settings.num_samples}")
    if settings.sampler not in SAMPLERS:
        raise UsageError(f"--sampler must be 'approx' or 'exact', got '{settings.sampler}'")
    if settings.seed is not None and not 0 <= settings.seed <= MAX_SEED:
        raise UsageError(f"--seed must be a whole number in [0, 2^63), got {settings.seed}")


def check_candidate_decoder(name: str) -> None:
    if name not in CANDIDATE_DECODERS:
        raise UsageError(f"--candidate-decoder must be 'dense' or 'fast', got '{name}'")


def check_candidate_dtype(name: str) -> None:
    if name not in CANDIDATE_DTYPES:
        raise UsageError(f"--candidate-dtype must be auto, float32 or bf16, got '{name}'")
