"""Statistical tests of calm_cli.runtime.sampling against a fake black-box chunk sampler.

Everything is seeded, so each test gives the same verdict on every run; the thresholds
(p > 0.001, and p < 1e-6 for a deliberately wrong target) make them able to fail.
"""

from __future__ import annotations

import json
import math
from fractions import Fraction
from pathlib import Path

import pytest
import scipy.stats
import torch
from helpers import HostReads
from torch import Tensor

from calm_cli.errors import UsageError
from calm_cli.runtime.sampling import (
    SETTLE_TV,
    SamplingStats,
    count_pool,
    select_from_pool,
    selection_probabilities,
    settled,
    temperature_sample,
)

REFERENCE = Path(__file__).parent / "fixtures" / "official-tiny" / "official_sampling_reference.json"
PROBS = torch.tensor([0.30, 0.20, 0.15, 0.12, 0.10, 0.06, 0.04, 0.03], dtype=torch.float64)
# Distinct K = 4 chunks that share prefixes and suffixes, so counting must compare whole chunks.
TABLE = torch.tensor(
    [[5, 5, 5, 5], [5, 5, 5, 6], [5, 5, 6, 5], [5, 6, 5, 5], [6, 5, 5, 5], [0, 0, 0, 0], [128255, 0, 0, 1], [1, 0, 0, 0]]
)


class FakeSampler:
    """Draws chunks i.i.d. from PROBS for every row, owning its own random stream."""

    def __init__(self, rows: int, seed: int) -> None:
        self.batch = rows
        self.generator = torch.Generator().manual_seed(seed)
        self.requested: list[Tensor | None] = []
        self.sizes: list[int] = []

    def __call__(self, n: int, rows: Tensor | None = None) -> Tensor:
        self.requested.append(rows)
        self.sizes.append(n)
        count = self.batch if rows is None else len(rows)
        u = torch.rand(count, n, generator=self.generator, dtype=torch.float64)
        return TABLE[torch.searchsorted(PROBS.cumsum(0), u, right=True).clamp(max=len(PROBS) - 1)]


def categories(chunks: Tensor) -> Tensor:
    """Index into TABLE of each chunk [..., K]."""
    hits = (chunks.unsqueeze(-2) == TABLE).all(-1)
    assert bool(hits.any(-1).all()), "a chunk outside the fake sampler's support came out"
    return hits.to(torch.uint8).argmax(-1)


def tempered(temperature: float) -> Tensor:
    target = PROBS ** (1.0 / temperature)
    return target / target.sum()


def chi2_pvalue(observed: Tensor, expected_probs: Tensor) -> float:
    """Pearson chi-square p-value; bins expected below 5 are pooled so the test stays valid."""
    observed = observed.to(torch.float64)
    expected = expected_probs.to(torch.float64) * observed.sum()
    order = torch.argsort(expected)
    obs, exp = observed[order].tolist(), expected[order].tolist()
    while len(exp) > 2 and exp[0] < 5.0:
        obs = [obs[0] + obs[1]] + obs[2:]
        exp = [exp[0] + exp[1]] + exp[2:]
    return float(scipy.stats.chisquare(obs, exp).pvalue)


def frequencies(chunks: Tensor) -> Tensor:
    return torch.bincount(categories(chunks), minlength=len(TABLE))


@pytest.mark.parametrize("temperature", [1.0, 1 / 2, 1 / 3, 0.7, 0.45])
def test_exact_matches_tempered_target(temperature: float) -> None:
    stats = SamplingStats()
    out = temperature_sample(
        FakeSampler(12000, seed=1),
        temperature,
        method="exact",
        generator=torch.Generator().manual_seed(2),
        max_draws=100_000,
        stats=stats,
    )
    assert out.shape == (12000, 4) and out.dtype == torch.long
    assert stats.fallbacks == 0 and stats.rows == 12000 and stats.steps == 1
    p = chi2_pvalue(frequencies(out), tempered(temperature))
    print(f"exact T={temperature:.4f}: chi-square p = {p:.4f} ({stats.draws / 12000:.1f} draws/row)")
    assert p > 0.001


def test_chi_square_rejects_a_wrong_target() -> None:
    out = temperature_sample(
        FakeSampler(12000, seed=3), 0.5, method="exact", generator=torch.Generator().manual_seed(4), max_draws=100_000
    )
    p = chi2_pvalue(frequencies(out), PROBS)
    print(f"exact T=0.5 tested against P itself: p = {p:.3g}")
    assert p < 1e-6


@pytest.mark.parametrize(("temperature", "block"), [(1 / 3, 1), (0.45, 1), (0.7, 2), (0.45, 5)])
def test_exact_with_small_blocks_and_plain_draw(temperature: float, block: int) -> None:
    fake = FakeSampler(6000, seed=5)
    stats = SamplingStats()
    out = temperature_sample(
        lambda n: fake(n),  # no `rows` parameter: the sampler must draw for all rows and subset
        temperature,
        method="exact",
        generator=torch.Generator().manual_seed(6),
        block=block,
        max_draws=100_000,
        stats=stats,
    )
    assert stats.fallbacks == 0 and stats.draw_calls > 10
    assert stats.draws == stats.draw_calls * 6000 * max(block, int(1 / temperature + 1e-9))
    p = chi2_pvalue(frequencies(out), tempered(temperature))
    print(f"exact T={temperature:.4f} block={block}, plain draw(n): chi-square p = {p:.4f}")
    assert p > 0.001


@pytest.mark.parametrize("temperature", [1 / 2, 0.7, 0.45])
def test_exact_with_growing_blocks_as_the_engine_runs_it(temperature: float) -> None:
    fake = FakeSampler(12000, seed=24)
    stats = SamplingStats()
    out = temperature_sample(
        fake, temperature, method="exact", generator=torch.Generator().manual_seed(25), block=8, max_block=200,
        max_draws=100_000, stats=stats,
    )
    assert stats.fallbacks == 0 and fake.sizes[:3] == [8, 16, 32] and max(fake.sizes) <= 200
    p = chi2_pvalue(frequencies(out), tempered(temperature))
    print(f"exact T={temperature:.4f} blocks 8, 16, ... 200: chi-square p = {p:.4f} ({stats.draws / 12000:.1f} draws/row)")
    assert p > 0.001


def test_exact_draws_only_for_pending_rows() -> None:
    fake = FakeSampler(500, seed=7)
    temperature_sample(fake, 0.45, method="exact", generator=torch.Generator().manual_seed(8), block=4)
    first, *later = fake.requested
    assert first is None and later
    sizes = [len(rows) for rows in later]
    assert all(b <= a for a, b in zip([500] + sizes, sizes)) and sizes[-1] < 50
    for rows in later:
        assert rows.dtype == torch.long and bool((rows[1:] > rows[:-1]).all())


def test_exact_falls_back_at_max_draws_and_counts_it() -> None:
    rows, pool = 4000, 50
    stats = SamplingStats()
    out = temperature_sample(
        FakeSampler(rows, seed=9),
        1 / 3,
        method="exact",
        generator=torch.Generator().manual_seed(10),
        num_samples=pool,
        block=3,
        max_draws=3,
        stats=stats,
    )
    # One round of one 3-tuple: it agrees with probability sum(p^3) ~ 0.041, else fall back.
    accept = float((PROBS**3).sum())
    assert abs(stats.fallbacks - rows * (1 - accept)) < 5 * math.sqrt(rows * accept * (1 - accept))
    assert stats.draw_calls == 2 and stats.draws == rows * 3 + stats.fallbacks * pool
    assert out.shape == (rows, 4)
    categories(out)

    stats = SamplingStats()
    temperature_sample(FakeSampler(300, seed=11), 0.5, method="exact", max_draws=1, stats=stats)
    assert stats.fallbacks == 300  # a single candidate can never complete a 2-tuple


def _reference() -> dict:
    return json.loads(REFERENCE.read_text())


@pytest.mark.parametrize("example", _reference()["worked_examples"], ids=lambda e: str(e["pool_counts_in_first_seen_order"]))
def test_authors_rule_on_worked_examples(example: dict) -> None:
    names = list(example["pool_counts_in_first_seen_order"])
    counts = [example["pool_counts_in_first_seen_order"][name] for name in names]
    got = selection_probabilities(torch.tensor(counts), example["T"]).tolist()
    want = [Fraction(example["probabilities"].get(name, "0")) for name in names]
    assert got == pytest.approx([float(f) for f in want], abs=1e-12)
    assert sum(want) == 1


def _pool_from_counts(counts: list[int], rows: int, seed: int) -> Tensor:
    """Rows that each hold the same multiset of chunks (chunk i repeated counts[i] times), shuffled per row."""
    flat = torch.cat([TABLE[i].expand(c, 4) for i, c in enumerate(counts)])
    order = torch.rand(rows, len(flat), generator=torch.Generator().manual_seed(seed)).argsort(1)
    return flat[order]


def test_count_pool_counts_whole_chunks() -> None:
    counts = [5, 3, 1, 1, 0, 2, 0, 4]
    pool = _pool_from_counts(counts, rows=3, seed=12)
    got_counts, first = count_pool(pool)
    for row in range(3):
        present = got_counts[row] > 0
        seen = categories(pool[row, first[row, present]])
        assert sorted(zip(seen.tolist(), got_counts[row, present].tolist())) == [
            (i, c) for i, c in enumerate(counts) if c
        ]
        for slot in range(int(present.sum())):  # `first` is the earliest position of that chunk
            matches = (pool[row] == pool[row, first[row, slot]]).all(1).nonzero().flatten()
            assert int(first[row, slot]) == int(matches[0])
        assert bool((got_counts[row, ~present] == 0).all()) and bool((first[row, ~present] == pool.shape[1]).all())


@pytest.mark.parametrize(("counts", "temperature"), [([5, 3, 1, 1], 1 / 3), ([4, 2, 1, 0, 3], 0.45), ([1, 1, 1, 1], 0.5)])
def test_select_from_pool_follows_selection_probabilities(counts: list[int], temperature: float) -> None:
    pool = _pool_from_counts(counts, rows=20000, seed=13)
    picked = frequencies(select_from_pool(pool, temperature, generator=torch.Generator().manual_seed(14)))
    want = torch.zeros(len(TABLE), dtype=torch.float64)
    want[: len(counts)] = selection_probabilities(torch.tensor(counts), temperature)
    assert bool((picked[want == 0] == 0).all())
    p = chi2_pvalue(picked[want > 0], want[want > 0])
    print(f"select_from_pool counts={counts} T={temperature:.4f}: chi-square p = {p:.4f}")
    assert p > 0.001


def _selection_distribution(pool_size: int, rows: int, temperature: float, seed: int) -> Tensor:
    """Average over drawn pools of the approximation's exact pick probabilities (Rao-Blackwellised)."""
    pool = FakeSampler(rows, seed)(pool_size)
    counts, first = count_pool(pool)
    probs = selection_probabilities(counts, temperature)
    slot_category = categories(pool.gather(1, first.clamp(max=pool_size - 1).unsqueeze(2).expand(-1, -1, 4)))
    total = torch.zeros(rows, len(TABLE), dtype=torch.float64).scatter_add_(1, slot_category, probs)
    return total.mean(0)


@pytest.mark.parametrize("temperature", [0.7, 1 / 3])
def test_approx_total_variation_shrinks_with_pool_size(temperature: float) -> None:
    target = tempered(temperature)
    small = 0.5 * float((_selection_distribution(20, 20000, temperature, seed=15) - target).abs().sum())
    large = 0.5 * float((_selection_distribution(2000, 1000, temperature, seed=16) - target).abs().sum())
    print(f"approx T={temperature:.4f}: TV(N=20) = {small:.4f}, TV(N=2000) = {large:.4f}")
    assert large < 0.005 and large < small / 4


def test_approx_end_to_end_matches_its_pool_rule() -> None:
    fake = FakeSampler(20000, seed=17)
    stats = SamplingStats()
    out = temperature_sample(fake, 0.5, num_samples=20, generator=torch.Generator().manual_seed(18), stats=stats)
    assert stats.draw_calls == 1 and stats.draws == 20000 * 20
    replay = FakeSampler(20000, seed=17)(20)  # the same pool, to compute each row's pick probabilities
    counts, first = count_pool(replay)
    slot_category = categories(replay.gather(1, first.clamp(max=19).unsqueeze(2).expand(-1, -1, 4)))
    expected = torch.zeros(20000, len(TABLE), dtype=torch.float64)
    expected.scatter_add_(1, slot_category, selection_probabilities(counts, 0.5))
    # Rows pick independently from their own distributions: Pearson's statistic is conservative here.
    p = chi2_pvalue(frequencies(out), expected.mean(0))
    print(f"approx end to end T=0.5 N=20: chi-square p = {p:.4f}")
    assert p > 0.001


class ConcentratedSampler:
    """Draws TABLE[0], TABLE[1], TABLE[2] with the given probabilities, like a confident position."""

    def __init__(self, probs: list[float], rows: int, seed: int) -> None:
        self.probs = torch.tensor(probs, dtype=torch.float64)
        self.batch = rows
        self.generator = torch.Generator().manual_seed(seed)

    def __call__(self, n: int, rows: Tensor | None = None) -> Tensor:
        count = self.batch if rows is None else len(rows)
        return TABLE[torch.multinomial(self.probs, count * n, replacement=True, generator=self.generator).reshape(count, n)]


def test_settled_needs_a_clear_majority_and_enough_draws() -> None:
    cases = [(32, 0, 32), (48, 0, 48), (40, 3, 48), (16, 0, 16)]  # (top, runner-up, drawn)
    at_half = [bool(settled(torch.tensor(t), torch.tensor(r), d, 2.0, 0.01, 2.0)) for t, r, d in cases]
    assert at_half == [False, True, False, False]  # at T = 1/2 a unanimous 32 is not enough, a unanimous 48 is
    assert bool(settled(torch.tensor(32), torch.tensor(0), 32, 3.0, 0.01, 2.0))  # T = 1/3 sharpens: 32 is enough
    assert not bool(settled(torch.tensor(200), torch.tensor(0), 200, 1.0 / 0.9, 0.01, 2.0))  # near T = 1: never


def _adaptive_against_fixed(probs: list[float], settle: float, rows: int = 20000) -> tuple[float, float]:
    """TV between the adaptive pool's picks and the fixed-N rule's pick probabilities at T = 1/2, and draws per row."""
    stats = SamplingStats()
    out = temperature_sample(
        ConcentratedSampler(probs, rows, seed=26), 0.5, generator=torch.Generator().manual_seed(27), pool_block=16,
        settle=settle, stats=stats,
    )
    pool = ConcentratedSampler(probs, rows, seed=28)(200)  # the fixed-N rule's pick probabilities, Rao-Blackwellised
    counts, first = count_pool(pool)
    slot_category = categories(pool.gather(1, first.clamp(max=199).unsqueeze(2).expand(-1, -1, 4)))
    fixed = torch.zeros(rows, len(TABLE), dtype=torch.float64).scatter_add_(1, slot_category, selection_probabilities(counts, 0.5))
    tv = 0.5 * float((frequencies(out).double() / rows - fixed.mean(0)).abs().sum())
    print(f"adaptive pool (settle {settle}) vs fixed N=200 at T=0.5, P={probs}: TV = {tv:.4f}, {stats.draws / rows:.1f} draws/row")
    return tv, stats.draws / rows


@pytest.mark.parametrize(("probs", "most_draws"), [([0.99, 0.01], 60), ([0.95, 0.03, 0.02], 150)])
def test_adaptive_pool_stops_early_on_confident_rows_and_picks_like_the_fixed_pool(probs: list[float], most_draws: int) -> None:
    tv, draws = _adaptive_against_fixed(probs, SETTLE_TV)
    assert draws < most_draws and tv < 0.004


def test_loose_settling_would_bias_the_pick() -> None:
    """Stopping when the runner-up happens to be rare under-picks it; the default settles late enough not to."""
    probs = [0.8, 0.15, 0.05]
    assert _adaptive_against_fixed(probs, 0.3)[0] > 0.006
    assert _adaptive_against_fixed(probs, SETTLE_TV)[0] < 0.004


def test_temperature_one_is_a_single_draw() -> None:
    stats = SamplingStats()
    out = temperature_sample(FakeSampler(64, seed=19), 1.0, method="exact", stats=stats)
    assert out.shape == (64, 4) and stats.draw_calls == 1 and stats.draws == 64


def test_greedy_is_deterministic_and_breaks_ties_by_first_occurrence() -> None:
    runs = [temperature_sample(FakeSampler(256, seed=20), 0.0, generator=torch.Generator().manual_seed(21)) for _ in range(2)]
    assert torch.equal(runs[0], runs[1])
    assert float((categories(runs[0]) == 0).double().mean()) > 0.9  # the mode, 0.30 vs 0.20 over 200 draws
    a, b, c = TABLE[0], TABLE[1], TABLE[2]
    pool = torch.stack([torch.stack([b, a, a, b, c]), torch.stack([c, a, b, a, c])])
    assert torch.equal(temperature_sample(lambda n: pool, 0.0, num_samples=5), torch.stack([b, c]))


def test_same_seeds_give_same_samples() -> None:
    for method in ("approx", "exact"):
        runs = [
            temperature_sample(FakeSampler(200, seed=22), 0.45, method=method, generator=torch.Generator().manual_seed(23))
            for _ in range(2)
        ]
        assert torch.equal(runs[0], runs[1])


@pytest.mark.parametrize(
    "kwargs",
    [
        {"temperature": -0.1},
        {"temperature": 1.5},
        {"temperature": float("nan")},
        {"temperature": 0.5, "num_samples": 0},
        {"temperature": 0.5, "method": "greedy"},
        {"temperature": 0.5, "max_draws": 0},
    ],
)
def test_bad_arguments_are_usage_errors(kwargs: dict) -> None:
    with pytest.raises(UsageError) as info:
        temperature_sample(FakeSampler(2, seed=0), **kwargs)
    assert "\n" not in str(info.value)


def test_a_temperature_below_one_over_max_beta_picks_as_zero_does() -> None:
    from calm_cli.runtime.settings import MAX_BETA

    pool = torch.tensor([[[1, 1], [2, 2], [2, 2], [3, 3]]] * 5)
    for temperature in (1e-20, 5e-324, 0.5 / MAX_BETA):
        chosen = temperature_sample(lambda n: pool[:, :n], temperature, num_samples=4)
        assert chosen.tolist() == [[2, 2]] * 5


def test_the_exact_sampler_reads_back_once_per_round_and_the_approximation_never() -> None:
    """Which rows are still pending is an exact round's one host read (it decides the next draw); a pool needs none."""
    stats = SamplingStats()
    with HostReads() as probe:
        temperature_sample(FakeSampler(64, seed=9), 0.4, method="exact", block=4, generator=torch.Generator().manual_seed(1), stats=stats)
    assert stats.fallbacks == 0 and stats.draw_calls > 2
    assert probe.reads == ["aten.nonzero.default"] * stats.draw_calls
    with HostReads() as probe:
        temperature_sample(FakeSampler(64, seed=9), 0.4, generator=torch.Generator().manual_seed(1))
    assert probe.reads == []
