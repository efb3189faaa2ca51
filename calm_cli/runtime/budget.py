"""What a candidate step costs, stated before it runs: logits = rows x candidates x K x vocabulary.

One model of cost for two uses: a request whose step would score more logits than the
server's budget is refused before it runs, and a step that is admitted decodes its pool in
row slices so that the logits alive at once stay under a fixed number per device. This
module imports no torch, so the command line and the server can price a request before
anything loads.
"""

from __future__ import annotations


def logit_elements(rows: int, candidates: int, patch_size: int, vocab_size: int) -> int:
    """Logits a dense decode of `candidates` chunks for each of `rows` rows would hold at once."""
    return rows * candidates * patch_size * vocab_size


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
    if temperature > 0.0 and abs(1.0 / temperature - 1.0) <= 1e-9:
        return 1
    if sampler == "exact" and temperature > 0.0:
        return max(samples, min(max(EXACT_FIRST_BLOCK, int(1.0 / temperature)), EXACT_DRAWS))
    return samples
