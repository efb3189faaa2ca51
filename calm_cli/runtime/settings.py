"""A request's generation settings, their limits and the names of the decoding options.

Everything a request's output depends on besides the prompt. This module imports no torch,
so the command line and the server check what a user typed before loading anything.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from ..errors import UsageError

SAMPLERS = ("approx", "exact")
CANDIDATE_DECODERS = ("dense", "fast")
CANDIDATE_DTYPES = ("auto", "float32", "bf16")
MAX_SEED = (1 << 63) - 1  # seeds are 0 <= seed < 2^63, as torch.Generator.manual_seed takes them
SAMPLES_LIMIT = 2**20  # more candidate chunks per step than memory holds would end in an allocation failure
DEFAULT_MAX_BODY_BYTES = 4 * 2**20  # `calm serve`: a 128k-token prompt is about 0.5 MB; a JSON escape takes 6 bytes a character


# Past this 1/T the tempered pick is the most frequent chunk for any pool that fits in memory
# (counts differ by at least one in 2^20), so it is taken as T = 0 and no tuple of 1/T draws is built.
MAX_BETA = 2.0**20


class SettingsError(UsageError):
    """A generation setting out of range, worded without a front end's names.

    `field` is the `GenerationSettings` field, so the command line and the server can each
    name it as their users typed it (`--temp`, `"temp"`, `temperature`) through `named`.
    """

    def __init__(self, field: str, rule: str) -> None:
        super().__init__(f"{field} {rule}")
        self.field = field
        self.rule = rule

    def named(self, names: dict[str, str]) -> str:
        """The message with the field under the name a front end gives it."""
        return f"{names.get(self.field, self.field)} {self.rule}"


@dataclass(frozen=True)
class GenerationSettings:
    """Validated on construction (and on `dataclasses.replace`), so a value that exists is one the engine can run."""

    max_tokens: int = 128
    temperature: float = 0.5
    num_samples: int = 200
    sampler: str = "approx"
    seed: int | None = None
    ignore_eos: bool = False  # for benchmarks: a fixed number of new tokens

    def __post_init__(self) -> None:
        if self.max_tokens < 1:
            raise SettingsError("max_tokens", f"must be at least 1, got {self.max_tokens}")
        inverse_temperature(self.temperature)  # the temperature's range is checked there, for the samplers too
        if not 1 <= self.num_samples <= SAMPLES_LIMIT:
            raise SettingsError("num_samples", f"must be a whole number in [1, {SAMPLES_LIMIT}], got {self.num_samples}")
        if self.sampler not in SAMPLERS:
            raise SettingsError("sampler", f"must be 'approx' or 'exact', got '{self.sampler}'")
        if self.seed is not None and not 0 <= self.seed <= MAX_SEED:
            raise SettingsError("seed", f"must be a whole number in [0, 2^63), got {self.seed}")

    @property
    def group(self) -> tuple[float, str, int]:
        """Rows with equal groups are sampled by one call of the temperature rule."""
        return (self.temperature, self.sampler, self.num_samples)


def inverse_temperature(temperature: float) -> float:
    """1/T with near-integers snapped (1/3 is exactly 3); inf for T = 0 and for T below 1/MAX_BETA.

    The one place the rule "T = 1, or 1/T a whole number" is written: the samplers, the
    candidate budget and the choice of a single draw all read 1/T through it.
    """
    if not 0.0 <= temperature <= 1.0:
        raise SettingsError("temperature", f"must be in [0, 1], got {temperature:g}: CALM samples "
                            "T = 1/n by rejection, so it cannot go above 1")
    if temperature == 0.0 or 1.0 / temperature > MAX_BETA:
        return math.inf
    beta = 1.0 / temperature
    nearest = round(beta)
    return float(nearest) if math.isclose(beta, nearest, rel_tol=1e-9, abs_tol=0.0) else beta


def draws_one(temperature: float) -> bool:
    """Whether the temperature rule draws a single candidate: 1/T is 1 once snapped."""
    return inverse_temperature(temperature) == 1.0


@dataclass(frozen=True)
class EngineOptions:
    """How a command builds its engine, from its flags; checked on construction, before torch loads.

    `compile=None` leaves the choice to the device (`runtime.engine.build_engine`: on for CUDA).
    """

    max_batch: int | None = None
    candidate_decoder: str = "fast"
    candidate_dtype: str = "auto"
    compile: bool | None = None

    def __post_init__(self) -> None:
        if self.max_batch is not None and self.max_batch < 1:
            raise SettingsError("max_batch", f"must be at least 1, got {self.max_batch}")
        check_candidate_decoder(self.candidate_decoder)
        check_candidate_dtype(self.candidate_dtype)


def check_candidate_decoder(name: str) -> None:
    if name not in CANDIDATE_DECODERS:
        raise SettingsError("candidate_decoder", f"must be 'dense' or 'fast', got '{name}'")


def check_candidate_dtype(name: str) -> None:
    if name not in CANDIDATE_DTYPES:
        raise SettingsError("candidate_dtype", f"must be auto, float32 or bf16, got '{name}'")
