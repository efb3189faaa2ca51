"""Temperature sampling for CALM from a black-box chunk sampler.

CALM predicts one continuous vector per step that decodes to a *chunk* of K token ids.
There are no logits, so the tempered target P(x)^(1/T) / Z is reached only through a
function that draws fresh chunks.  Everything here is independent of the model.

Draw protocol
-------------
``draw(n)`` returns a LongTensor ``[rows, n, K]``: ``n`` fresh, independent chunks for
every row of the batch.  The first call of every step is always this form, and it fixes
the batch size.  A ``draw`` that declares a parameter named ``rows`` is also called as
``draw(n, rows=index)``, with ``index`` an increasing LongTensor of batch rows (on the
chunks' device), and must then return ``[len(index), n, K]`` for those rows only; the
exact sampler uses it so that only rows still rejecting pay for new candidates.  A
``draw`` without that parameter keeps working: the sampler draws for all rows and keeps
the ones it needs.  ``draw`` owns its randomness; the sampler's own coin flips come from
``generator``: a torch.Generator, or a ``RowRandom`` (calm_cli/runtime/rng.py) whose rows
have streams of their own, so that a row's pick does not depend on the other rows.

Temperatures (beta = 1/T; within 1e-9 relative of an integer it is snapped to it)
--------------------------------------------------------------------------------
* beta == 1: one draw per row.
* T == 0: the most frequent chunk among ``num_samples`` draws, ties to the chunk seen
  first ("approximate greedy"), whatever ``method`` says.
* ``method="exact"``, beta = n + alpha, 0 <= alpha < 1: draw n-tuples until all n agree
  on x; if alpha > 0, run the Bernoulli factory (k = 1, 2, ...: draw y; y == x accepts;
  otherwise reject with probability alpha/k and start over with a fresh n-tuple).  Its
  acceptance probability is exactly P(x)^alpha, so the output follows P^beta / Z.  Rows
  advance together in rounds of ``block`` candidates; a round reads its block as n-tuples
  and takes the first agreeing one, and the candidates after it feed the factory.
  Skipping candidates is harmless: which ones are skipped never depends on their values.
  With ``max_block`` the rounds grow: ``block``, then twice that, up to ``max_block``, so
  a confident row is accepted after a handful of candidates while a flat one needs few
  rounds; round sizes depend only on the round number, so exactness is untouched.
  Each round reads back which rows are still pending (one host synchronisation per round):
  whether to stop and which rows draw next depend on the draws.
  Rows that have drawn ``max_draws`` candidates fall back to the approximation below
  (counted in ``SamplingStats.fallbacks``).
* ``method="approx"``: draw a pool of N = ``num_samples`` chunks per row in one call,
  count repeats (sorting on the device, no Python loop over rows or candidates, no host
  synchronisation) and pick one distinct chunk with weight w(c) from its count c.
  With ``pool_block`` the pool starts with that many candidates and doubles (up to N), only
  for rows whose choice is not yet settled (below), and each row picks from the pool it has.
  When no pending row would settle even at N with the shares it has now, the rest of the
  pool comes in one draw.  This costs one host synchronisation per growth (at most
  log2(N / pool_block) + 1, two on flat positions) instead of none.

Settled pools (``pool_block``)
------------------------------
After m draws with the most frequent chunk x seen c1 times and the runner-up c2 times,
take L = the Wilson lower bound of c1 / m for p = P(x) and U = the Wilson upper bound of
c2 / m for the largest other probability q (z = ``SETTLE_Z``; U also bounds the chunks seen
less often, as the bound grows with the count).  Since sum_{y != x} p_y^beta <=
q^(beta - 1) sum_{y != x} p_y <= min(U, 1 - L)^(beta - 1) (1 - L) = R for beta >= 1, the
target picks something other than x with probability at most

    r = R / (L^beta + R),

and so, up to finite-pool effects, does the fixed-N rule.  A row stops growing once
r <= ``settle``: more draws could then move its pick by about that much in total variation.
This is a heuristic (the bounds hold with high probability, not surely, and many chunks are
bounded at once); ``benchmarks/adaptive_pool.py`` measures the actual distance to the fixed-N
rule on a trained model's positions.

Pool weights
------------
For integer beta = n this is the authors' rule: among chunks with c >= n pick one with
weight C(c, n); if none has c >= n, use n - 1, ..., 1.  Since C(N, n)^-1 C(c, n) is an
unbiased estimate of P(x)^n, the pick tends to P^n / Z as N grows.

For beta = n + alpha we use the generalised falling factorial

    w(c) = Gamma(c + 1) / Gamma(c + 1 - beta)   for c >= n, else 0,

which is n! C(c, n) when alpha = 0 (same probabilities as the authors' rule).  Why it
estimates P(x)^beta: write w(c) = n! C(c, n) * g(c - n) with
g(r) = Gamma(r + 1) / Gamma(r + 1 - alpha).  Up to a constant, g(r) equals

    f(r) = prod_{i=r+1}^{M} (1 - alpha / i),      M = N - n,

the chance that the Bernoulli factory above does *not* reject when its draws are taken
without replacement from the M pool members left after the n-tuple, r of them copies of
x (running out counts as acceptance).  Indeed P(reject) = sum_k c_k C(M-r, k) / C(M, k)
with c_k = (alpha / k) prod_{j<k} (1 - alpha / j), and 1 - that sum collapses to the
product by the Chu-Vandermonde identity.  With c ~ Binomial(N, p):
E[C(c, n) g(c - n)] = C(N, n) p^n E[g(r)] with r ~ Binomial(M, p), and
E[C(M-r, k) / C(M, k)] = (1 - p)^k, so

    E[w(c)] = Gamma(N + 1) / Gamma(N + 1 - beta) * p^n * (p^alpha + eps),
    0 <= eps = sum_{k>M} c_k (1 - p)^k <= (1 - p)^(M + 1),

i.e. every weight is unbiased for P(x)^beta up to an error that vanishes exponentially in
N, and the pick w(c_x) / sum w converges to P(x)^beta / Z as N grows.  g(r) behaves like
(r + (1 - alpha) / 2)^alpha, so a chunk seen exactly n times keeps a small positive
weight instead of the zero a plug-in ((c - n) / (N - n))^alpha would give it.  The
cascade is the same: when no chunk has c >= n, use m = the largest count and beta_m =
m + alpha.

Timing the counting
-------------------
``select_from_pool(pool, temperature, generator=g)`` is counting plus selection with no
drawing, so ``timeit.timeit(lambda: select_from_pool(pool, 0.5, generator=g), number=100)``
measures it; ``benchmarks/sampling_overhead.py`` does that for a few batch sizes.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from ..errors import UsageError
from .rng import RowRandom
from .settings import inverse_temperature

DrawFn = Callable[..., Tensor]
Random = torch.Generator | RowRandom | None
METHODS = ("approx", "exact")
SETTLE_TV = 0.02  # default ``settle`` (a bound; the measured distance is far smaller): see "Settled pools"
SETTLE_Z = 2.0  # Wilson bounds at about 97.7% one-sided confidence


@dataclass
class SamplingStats:
    """Counters a caller keeps across steps to see what sampling cost and where it gave up."""

    steps: int = 0  # calls to temperature_sample
    rows: int = 0  # rows sampled, summed over steps
    draw_calls: int = 0  # calls made to draw
    draws: int = 0  # candidate chunks returned by draw, summed over rows
    fallbacks: int = 0  # rows the exact sampler handed to the approximation at max_draws


def temperature_sample(
    draw: DrawFn,
    temperature: float,
    *,
    method: str = "approx",
    num_samples: int = 200,
    generator: Random = None,
    max_draws: int = 2000,
    block: int = 32,
    max_block: int | None = None,
    pool_block: int | None = None,
    settle: float = SETTLE_TV,
    stats: SamplingStats | None = None,
) -> Tensor:
    """Sample one chunk per row from P^(1/T) / Z; returns a LongTensor ``[rows, K]``.

    ``draw`` follows the protocol in the module docstring.  ``num_samples`` is the pool
    size of the approximation (and of T = 0 and of the exact sampler's fallback);
    ``max_draws``, ``block`` and ``max_block`` (rounds double up to it) only affect
    ``method="exact"``; ``pool_block`` and ``settle`` (start the pool that small and double it
    until settled) only ``method="approx"``.
    """
    beta = inverse_temperature(temperature)
    if method not in METHODS:
        raise UsageError(f"sampling method must be one of {', '.join(METHODS)} (got {method!r})")
    if num_samples < 1:
        raise UsageError(f"num_samples must be at least 1 (got {num_samples})")
    if max_draws < 1 or block < 1 or min(max_block or 1, pool_block or 1) < 1:
        raise UsageError(f"max_draws and block sizes must be at least 1 (got {max_draws}, {block}, {max_block}, {pool_block})")
    stats = stats if stats is not None else SamplingStats()
    drawer = _Drawer(draw, stats)
    if beta == 1.0:
        chunks = drawer(1)[:, 0]
    elif beta == math.inf:
        chunks = _greedy(drawer(num_samples))
    elif method == "approx" and pool_block is not None and pool_block < num_samples:
        chunks = _grown_select(drawer, beta, generator, num_samples, pool_block, settle)
    elif method == "approx":
        chunks = _select(drawer(num_samples), beta, generator)
    else:
        chunks = _exact(drawer, beta, generator, block, max_block or block, max_draws, num_samples, stats)
    stats.steps += 1
    stats.rows += chunks.shape[0]
    return chunks


def select_from_pool(
    pool: Tensor, temperature: float, *, generator: Random = None, valid: Tensor | None = None
) -> Tensor:
    """Pick one chunk per row of a drawn pool ``[rows, N, K]`` by the pool weights.

    This is the approximation's counting and selection alone, for reuse and for timing.
    ``valid`` ``[rows, N]`` restricts the pick to some members (it must depend on the
    chunk's value only, e.g. "starts with these tokens"), which samples the tempered
    distribution conditioned on that event; a row must keep at least one valid member.
    """
    beta = inverse_temperature(temperature)
    if valid is not None:
        pool = pool.masked_fill(~valid.unsqueeze(2), -1)
    return _greedy(pool) if beta == math.inf else _select(pool, beta, generator)


def count_pool(pool: Tensor) -> tuple[Tensor, Tensor]:
    """Count identical chunks in each row of ``pool`` ``[rows, N, K]`` without leaving the device.

    Returns ``(counts, first)``, both ``[rows, N]``: slot g of a row is its g-th distinct
    chunk in lexicographic order, ``counts`` its number of copies and ``first`` the pool
    index where it first appears; unused slots hold count 0 and index N. Members filled
    with -1 (masked out by ``select_from_pool``) form no group: their count is 0.
    """
    rows, size, chunk = pool.shape
    order = torch.arange(size, device=pool.device).expand(rows, size)
    for position in reversed(range(chunk)):  # stable sorts, last token first: lexicographic
        column = pool[:, :, position].gather(1, order)
        order = order.gather(1, torch.sort(column, dim=1, stable=True).indices)
    ordered = pool.gather(1, order.unsqueeze(2).expand(rows, size, chunk))
    starts = torch.ones(rows, size, dtype=torch.bool, device=pool.device)
    starts[:, 1:] = (ordered[:, 1:] != ordered[:, :-1]).any(2)
    group = starts.cumsum(1) - 1
    counts = torch.zeros(rows, size, dtype=torch.long, device=pool.device)
    counts.scatter_add_(1, group, torch.ones_like(group))
    first = torch.full((rows, size), size, dtype=torch.long, device=pool.device)
    first.scatter_reduce_(1, group, order, reduce="amin")
    masked = (ordered[:, :1] < 0).all(2) & (counts[:, :1] > 0)  # members masked out as -1 sort first
    counts[:, :1] = counts[:, :1].masked_fill(masked, 0)
    return counts, first


def selection_probabilities(counts: Tensor, temperature: float) -> Tensor:
    """Chance that the approximation picks each distinct chunk, given counts ``[..., G]``.

    Zero counts mark absent chunks.  For integer 1/T this is the authors' rule exactly
    (weights C(c, n) with the cascade); see the module docstring for fractional 1/T.
    """
    beta = inverse_temperature(temperature)
    if beta == math.inf:
        raise UsageError("selection probabilities need a temperature above 0")
    return torch.softmax(_log_weights(torch.as_tensor(counts), beta), dim=-1)


def _log_weights(counts: Tensor, beta: float) -> Tensor:
    """Log pool weights log Gamma(c+1) - log Gamma(c+1-beta_m), -inf where c < m (the cascade)."""
    counts = counts.to(torch.float64)
    whole = math.floor(beta)
    used = counts.amax(dim=-1, keepdim=True).clamp(max=whole)  # the cascade level m per row
    beta_used = beta - whole + used
    qualifies = counts >= used
    gap = torch.where(qualifies, counts + 1 - beta_used, torch.ones_like(counts))
    log_w = torch.lgamma(counts + 1) - torch.lgamma(gap)
    return log_w.masked_fill(~qualifies, -math.inf)


def _select(pool: Tensor, beta: float, generator: Random) -> Tensor:
    """One weighted pick per row via Gumbel-max over the log weights (no host sync)."""
    counts, first = count_pool(pool)
    noise = _uniform(counts.shape, generator, pool.device).clamp_min(torch.finfo(torch.float64).tiny)
    group = (_log_weights(counts, beta) - torch.log(-torch.log(noise))).argmax(1)
    return _chunks_at(pool, first.gather(1, group.unsqueeze(1)).squeeze(1))


def _grown_select(
    drawer: _Drawer, beta: float, generator: Random, num_samples: int, pool_block: int, settle: float
) -> Tensor:
    """The approximation on pools of ``pool_block``, doubled until settled or ``num_samples`` long."""
    first = drawer(pool_block)
    rows, drawn, chunk = first.shape
    pool = torch.full((rows, num_samples, chunk), -1, dtype=torch.long, device=first.device)
    pool[:, :drawn] = first
    pending = torch.arange(rows, device=first.device)
    while drawn < num_samples:
        counts, _ = count_pool(pool[pending, :drawn])
        top = torch.cat([counts, counts.new_zeros(len(pending), 1)], 1).topk(2, dim=1).values  # runner-up 0 if alone
        done = settled(top[:, 0], top[:, 1], drawn, beta, settle)
        # Rows that would not settle even at N with the shares they have now: no point checking again.
        hopeless = ~settled(top[:, 0] * num_samples / drawn, top[:, 1] * num_samples / drawn, num_samples, beta, settle)
        pending, hopeless = pending[~done], hopeless[~done]
        if pending.numel() == 0:
            break
        size = num_samples - drawn if bool(hopeless.all()) else min(drawn, num_samples - drawn)
        pool[pending, drawn : drawn + size] = drawer(size, pending)
        drawn += size
    return _select(pool, beta, generator)  # unfilled slots are -1: no group, as in select_from_pool


def settled(top: Tensor, second: Tensor, drawn: int, beta: float, settle: float = SETTLE_TV, z: float = SETTLE_Z) -> Tensor:
    """Rows whose most frequent chunk (``top`` of ``drawn``; runner-up ``second``) leaves at most ``settle`` to the rest.

    See "Settled pools" in the module docstring: r <= settle with Wilson bounds at ``z``.
    """
    lower = _wilson(top, drawn, z, -1.0)
    upper = torch.minimum(_wilson(second, drawn, z, 1.0), 1 - lower)
    rest = upper ** (beta - 1) * (1 - lower)
    return rest <= settle * (lower**beta + rest)


def _wilson(count: Tensor, drawn: int, z: float, side: float) -> Tensor:
    """Wilson score bound for a proportion count / drawn: lower for side -1, upper for side +1."""
    share = count.to(torch.float64) / drawn
    z2 = z * z
    spread = z * torch.sqrt(share * (1 - share) / drawn + z2 / (4 * drawn * drawn))
    return ((share + z2 / (2 * drawn) + side * spread) / (1 + z2 / drawn)).clamp(0.0, 1.0)


def _greedy(pool: Tensor) -> Tensor:
    """The most frequent chunk per row; ties go to the chunk that appears first in the pool."""
    counts, first = count_pool(pool)
    size = pool.shape[1]
    group = (counts * (size + 1) + (size - first)).argmax(1)
    return _chunks_at(pool, first.gather(1, group.unsqueeze(1)).squeeze(1))


def _exact(
    drawer: _Drawer,
    beta: float,
    generator: Random,
    block: int,
    max_block: int,
    max_draws: int,
    num_samples: int,
    stats: SamplingStats,
) -> Tensor:
    """Exact rejection sampler; every pending row has drawn the same number of candidates."""
    whole = int(beta)
    alpha = beta - whole
    block = max(block, whole)
    max_block = max(max_block, block)
    size = min(block, max_draws)
    candidates = drawer(size)
    rows, _, chunk = candidates.shape
    device = candidates.device
    result = torch.empty(rows, chunk, dtype=torch.long, device=device)
    pending = torch.arange(rows, device=device)
    state = _FactoryState(
        active=torch.zeros(rows, dtype=torch.bool, device=device),
        value=torch.zeros(rows, chunk, dtype=torch.long, device=device),
        step=torch.ones(rows, dtype=torch.long, device=device),
    )
    used = size
    while True:
        accepted, state = _exact_round(candidates, whole, alpha, state, _rows(generator, pending))
        result[pending] = torch.where(accepted.unsqueeze(1), state.value, result[pending])
        keep = (~accepted).nonzero().squeeze(1)  # the round's one host synchronisation: which rows go on
        pending, state = pending[keep], state.subset(keep)
        if pending.numel() == 0 or used >= max_draws:
            break
        block = min(2 * block, max_block)
        size = min(block, max_draws - used)
        candidates = drawer(size, pending)
        used += size
    if pending.numel():
        stats.fallbacks += pending.numel()
        result[pending] = _select(drawer(num_samples, pending), beta, _rows(generator, pending))
    return result


@dataclass
class _FactoryState:
    """Per pending row: inside a Bernoulli factory?, its agreed chunk, and the factory's next k."""

    active: Tensor
    value: Tensor
    step: Tensor

    def subset(self, keep: Tensor) -> _FactoryState:
        return _FactoryState(self.active[keep], self.value[keep], self.step[keep])


def _exact_round(
    candidates: Tensor, whole: int, alpha: float, state: _FactoryState, generator: Random
) -> tuple[Tensor, _FactoryState]:
    """Run one block ``[P, B, K]`` of the exact sampler for every pending row at once.

    Rows outside a factory read the block as n-tuples and take the first agreeing one; the
    factory then runs on the candidates after it (from the block's start for rows already
    inside one).  Returns which rows accepted (their chunk in ``state.value``) and the
    state to continue from.
    """
    rows, size, chunk = candidates.shape
    index = torch.arange(rows, device=candidates.device)
    tuples_per_block = size // whole
    tuples = candidates[:, : tuples_per_block * whole].reshape(rows, tuples_per_block, whole, chunk)
    agreeing = (tuples == tuples[:, :, :1]).all(3).all(2)
    first_tuple = _first_true(agreeing)
    found = (first_tuple < tuples_per_block) & ~state.active
    start = first_tuple * whole
    value = torch.where(found.unsqueeze(1), candidates[index, start.clamp(max=size - 1)], state.value)
    if alpha == 0.0:
        return found, _FactoryState(state.active, value, state.step)
    # Rows with no agreeing tuple get factory_start > size, hence no factory slots this round.
    factory_start = torch.where(state.active, 0, start + whole)
    first_k = torch.where(state.active, state.step, 1)
    position = torch.arange(size, device=candidates.device)
    in_factory = position >= factory_start.unsqueeze(1)
    k = first_k.unsqueeze(1) + position - factory_start.unsqueeze(1)
    match = (candidates == value.unsqueeze(1)).all(2) & in_factory
    coin = _uniform((rows, size), generator, candidates.device)
    reject = in_factory & ~match & (coin * k < alpha)
    event = _first_true(match | reject)
    resolved = event < size
    accepted = resolved & match[index, event.clamp(max=size - 1)]
    still_in = (state.active | found) & ~resolved
    step = torch.where(still_in, first_k + size - factory_start, state.step)
    return accepted, _FactoryState(still_in, value, step)


def _first_true(mask: Tensor) -> Tensor:
    """Index of the first True along dim 1, or the dim's length when there is none."""
    padded = torch.cat([mask, mask.new_ones(mask.shape[0], 1)], dim=1)
    return padded.to(torch.uint8).argmax(1)


def _chunks_at(pool: Tensor, index: Tensor) -> Tensor:
    """Row r's chunk at pool position index[r]."""
    return pool[torch.arange(pool.shape[0], device=pool.device), index]


def _rows(generator: Random, rows: Tensor) -> Random:
    """The generator for a subset of rows: per-row streams follow their rows, a shared generator stays as it is."""
    return generator.rows(rows) if isinstance(generator, RowRandom) else generator


def _uniform(shape: tuple[int, ...] | torch.Size, generator: Random, device: torch.device) -> Tensor:
    """Uniforms from the caller's generator (a row's own stream for a RowRandom), on the chunks' device."""
    if isinstance(generator, RowRandom):
        return generator.uniform(shape).to(device)
    source = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=source, dtype=torch.float64).to(device)


class _Drawer:
    """Calls ``draw`` per the protocol, checks what comes back and counts the cost."""

    def __init__(self, draw: DrawFn, stats: SamplingStats) -> None:
        self.draw = draw
        self.stats = stats
        try:
            self.takes_rows = "rows" in inspect.signature(draw).parameters
        except (TypeError, ValueError):  # builtins without a signature: plain draw(n)
            self.takes_rows = False

    def __call__(self, n: int, rows: Tensor | None = None) -> Tensor:
        out = self.draw(n, rows=rows) if rows is not None and self.takes_rows else self.draw(n)
        if out.dim() != 3 or out.shape[1] != n:
            raise ValueError(f"draw({n}) must return [rows, {n}, K] chunks, got shape {tuple(out.shape)}")
        self.stats.draw_calls += 1
        self.stats.draws += out.shape[0] * n
        return out if rows is None or self.takes_rows else out[rows]
