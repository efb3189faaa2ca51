"""What a candidate step costs, stated before it runs: logits = rows x candidates x K x vocabulary.

One model of cost for two uses: a request whose step would score more logits than the
server's budget is refused before it runs, and a step that is admitted decodes its pool in
row slices so that the logits alive at once stay under a fixed number per device. This
module imports no torch, so the command line and the server can price a request before
anything loads: devices are named by their type ("cpu", "cuda", ...).

The per-device budget (logit elements alive at once, counted as float32)
------------------------------------------------------------------------
* CPU, 2^25 (128 MB in float32): each slice reads the whole output matrix again, so a slice
  needs enough rows for its arithmetic to outweigh that read. At vocabulary 128,256 this is
  261 states; measured on a shared 2-core VM (noisy), 1,600 states decoded in slices of 32
  states (2^22) took 2.5x the whole-pool time and peaked at 783 MB (the small-row matmul
  copies the matrix), 128 states (2^24) 1.5x, 261 states 1.25x, at 137 MB.
* CUDA, 2^26 (256 MB in float32, 128 MB in bf16): at vocabulary 128,256 a slice is 523
  states, so each slice is a [523 x H] x [H x V] matmul whose arithmetic (about 70 GFLOP at
  H = 512) outweighs reading the output matrix (131 MB in bf16 on a 4.8 TB/s H200) even on
  bf16 tensor cores: slicing costs launches, not throughput. The CALM-XL shape at 64 slots
  (51,200 states per T = 0.5 step) needs about 100 slices, against 13 GB for the whole pool.
* Any other device type uses the CPU's budget.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

from .settings import inverse_temperature

LOGIT_BUDGET = {"cpu": 1 << 25, "cuda": 1 << 26}


def logit_elements(rows: int, candidates: int, patch_size: int, vocab_size: int) -> int:
    """Logits a dense decode of `candidates` chunks for each of `rows` rows would hold at once."""
    return rows * candidates * patch_size * vocab_size


def logit_budget(device_type: str) -> int:
    """Logit elements a candidate step may hold at once on this type of device (module docstring)."""
    return LOGIT_BUDGET.get(device_type, LOGIT_BUDGET["cpu"])


def rows_per_slice(per_row: int, device_type: str) -> int:
    """How many rows of `per_row` elements each fit in the device's budget: at least one."""
    return max(1, logit_budget(device_type) // max(1, per_row))


def row_slices(rows: int, per_row: int, device_type: str) -> Iterator[slice]:
    """Consecutive slices covering `rows` rows, each within the device's budget at `per_row` elements a row."""
    step = rows_per_slice(per_row, device_type)
    for start in range(0, rows, step):
        yield slice(start, min(start + step, rows))


BUDGET_ROWS = 16  # by default a request may cost per step what 16 rows at the default samples cost (MAX_CHOICES)
EXACT_DRAWS = 2000  # the exact sampler's candidates per row and step before it falls back (temperature_sample's max_draws)
EXACT_FIRST_BLOCK = 8  # the exact sampler's first round (runners.EXACT_BLOCK); a round holds at least 1/T candidates


def default_request_logits(samples: int, patch_size: int, vocab_size: int) -> int:
    """The default budget of one request's step: BUDGET_ROWS rows at the default pool.

    Any request that keeps the default samples then fits whatever the model (the exact
    sampler below T = 1/200 aside), and one row may ask for up to 16 times the default pool.
    """
    return logit_elements(BUDGET_ROWS, samples, patch_size, vocab_size)


def step_candidates(temperature: float, samples: int, sampler: str) -> int:
    """The most candidate chunks one row decodes in one call of a step, from its settings alone.

    T = 1 draws one. Other temperatures draw a pool of N; the exact sampler's rounds hold
    max(8, floor(1/T)) candidates up to its limit of EXACT_DRAWS, then a pool of N.
    """
    beta = inverse_temperature(temperature)
    if beta == 1.0:
        return 1
    if sampler == "exact" and temperature > 0.0:
        return max(samples, min(max(EXACT_FIRST_BLOCK, math.floor(min(beta, EXACT_DRAWS))), EXACT_DRAWS))
    return samples
