"""`calm eval`: the BrierLM estimators are unbiased, the token path's two estimators agree, the CLI works."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import run_calm

from calm_cli.errors import UsageError
from calm_cli.eval.brier import brier_lm_rows
from calm_cli.eval.evaluate import (
    _Side,
    bootstrap_ci,
    check_arguments,
    continue_pairs,
    evaluate,
    evaluate_documents,
    make_windows,
    plan_windows,
    sampled_scores,
    tree_hidden,
)
from calm_cli.models.backbone import KVCache
from calm_cli.models.baseline import TokenTransformer
from calm_cli.models.calm import CALM
from calm_cli.models.config import AutoencoderConfig, CALMConfig
from calm_cli.training.data import prepare_data

CORPUS = Path(__file__).parent / "data" / "tiny_corpus.txt"
FIXTURE = Path(__file__).parent / "fixtures" / "official-tiny" / "calm"
SEEDS = 200


@pytest.fixture(autouse=True)
def one_thread():
    """These models are tiny: on a busy machine thread hand-offs cost ten times the arithmetic."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# ---- analytic Brier scores of a known distribution over 4-token sequences ----------------------


def analytic_brier(sequences: torch.Tensor, probs: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Brier-1..4 = 2 P(y[:n]) - sum over n-prefixes of P(prefix)^2, by enumeration."""
    out = []
    for n in range(1, 5):
        groups: dict[tuple[int, ...], float] = {}
        for seq, p in zip(sequences.tolist(), probs.tolist()):
            groups[tuple(seq[:n])] = groups.get(tuple(seq[:n]), 0.0) + p
        out.append(2 * groups.get(tuple(truth[:n].tolist()), 0.0) - sum(v * v for v in groups.values()))
    return torch.tensor(out, dtype=torch.float64)


def within_three_se(estimates: torch.Tensor, expected: torch.Tensor) -> bool:
    """Mean over seeds [S, 4] within 3 standard errors of `expected`, for every n (an exact term has none: rounding only)."""
    se = estimates.std(0) / math.sqrt(estimates.shape[0])
    return bool(((estimates.mean(0) - expected).abs() < 3 * se + 1e-6).all())


CHUNKS4 = torch.tensor([[1, 2, 3, 4], [1, 2, 3, 5], [1, 2, 6, 7], [1, 8, 9, 9], [2, 2, 2, 2]])
PROBS4 = torch.tensor([0.3, 0.2, 0.2, 0.2, 0.1], dtype=torch.float64)
TRUTHS4 = torch.tensor([[1, 2, 3, 4], [1, 2, 9, 9], [3, 3, 3, 3]])


def _k4_estimate(gen: torch.Generator, same_sample: bool = False) -> torch.Tensor:
    truth = TRUTHS4.repeat_interleave(100, 0)
    picks = torch.multinomial(PROBS4.float().expand(len(truth), -1), 2, replacement=True, generator=gen)
    if same_sample:  # a biased variant: x2 = x1
        picks = picks[:, :1].expand(-1, 2)
    draws = CHUNKS4[picks][:, None]  # [P, m = 1, 2, 4]

    def never(rows, path):
        raise AssertionError("K >= 4 needs no continuation")

    pairs, _ = continue_pairs(draws, draws.new_zeros(len(truth), 0, 4), never)
    return sampled_scores(draws, pairs, truth).mean(0)


def test_k4_estimate_is_unbiased():
    gen = torch.Generator().manual_seed(0)
    expected = torch.stack([analytic_brier(CHUNKS4, PROBS4, y) for y in TRUTHS4]).mean(0)
    estimates = torch.stack([_k4_estimate(gen) for _ in range(SEEDS)])
    assert within_three_se(estimates, expected)
    biased = torch.stack([_k4_estimate(gen, same_sample=True) for _ in range(SEEDS)])
    assert not within_three_se(biased, expected)  # the check has the power to catch a wrong estimator


# K = 2: a Markov chain over four chunks; the 4 tokens after a position span two chunks.
CHUNKS2 = torch.tensor([[1, 2], [1, 3], [4, 5], [4, 4]])
TRANSITIONS = torch.tensor(
    [[0.6, 0.2, 0.1, 0.1], [0.1, 0.1, 0.2, 0.6], [0.25, 0.25, 0.25, 0.25], [0.1, 0.6, 0.2, 0.1]], dtype=torch.float64
)
CASES2 = [(0, 2, [4, 5, 1, 2]), (1, 1, [1, 3, 4, 9]), (3, 0, [1, 2, 1, 3])]  # (previous chunk, true chunk, truth)


def _k2_estimate(gen: torch.Generator, continue_along_truth: bool = False) -> torch.Tensor:
    prev = torch.tensor([c[0] for c in CASES2]).repeat_interleave(100)
    true_next = torch.tensor([c[1] for c in CASES2]).repeat_interleave(100)
    truth = torch.tensor([c[2] for c in CASES2]).repeat_interleave(100, 0)

    def two_draws(context: torch.Tensor) -> torch.Tensor:
        return torch.multinomial(TRANSITIONS[context].float(), 2, replacement=True, generator=gen)

    draws = CHUNKS2[torch.stack([two_draws(prev), two_draws(true_next)], dim=1)]  # [P, 2 levels, 2, K]

    def extend(rows: torch.Tensor, path: torch.Tensor):
        last = (path[:, -1, None, :] == CHUNKS2).all(-1).long().argmax(-1)
        context = true_next[rows] if continue_along_truth else last  # the biased variant ignores the sampled path
        return CHUNKS2[two_draws(context)], None

    pairs, _ = continue_pairs(draws, CHUNKS2[true_next][:, None], extend)
    return sampled_scores(draws, pairs, truth).mean(0)


def test_k2_autoregressive_continuation_is_unbiased():
    pairs = torch.cartesian_prod(torch.arange(4), torch.arange(4))
    sequences = torch.cat([CHUNKS2[pairs[:, 0]], CHUNKS2[pairs[:, 1]]], dim=1)
    expected = torch.stack([
        analytic_brier(sequences, TRANSITIONS[prev, pairs[:, 0]] * TRANSITIONS[pairs[:, 0], pairs[:, 1]], torch.tensor(y))
        for prev, _, y in CASES2
    ]).mean(0)
    gen = torch.Generator().manual_seed(1)
    estimates = torch.stack([_k2_estimate(gen) for _ in range(SEEDS)])
    assert within_three_se(estimates, expected)
    biased = torch.stack([_k2_estimate(gen, continue_along_truth=True) for _ in range(SEEDS)])
    assert not within_three_se(biased, expected)


# ---- the model side -------------------------------------------------------------------------


def _tiny_baseline(vocab: int = 8, context: int = 16) -> TokenTransformer:
    torch.manual_seed(0)
    config = CALMConfig(vocab_size=vocab, patch_size=1, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=context, bos_token_id=0)
    model = TokenTransformer(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(4)  # peaked next-token distributions: collisions and continuations happen
    return model


def _tiny_calm(k: int) -> CALM:
    torch.manual_seed(0)
    config = CALMConfig(vocab_size=16, patch_size=k, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, max_position_embeddings=12, latent_size=8, noise_size=4, num_mlp_layers=1)
    ae = AutoencoderConfig(vocab_size=16, patch_size=k, hidden_size=16, intermediate_size=32, latent_size=8)
    return CALM(config, ae).eval()


@pytest.mark.parametrize("make", [_tiny_baseline, lambda: _tiny_calm(2)], ids=["baseline", "calm-k2"])
def test_tree_continuation_matches_a_full_pass(make):
    model = make()
    side, k, n = _Side(model), model.patch_size, 10
    ids = torch.randint(0, 8, (3, n * k))
    cache = KVCache.allocate(model.config, 3, n, "cpu", torch.float32)
    cache.valid.fill_(True)
    b, t = torch.tensor([0, 0, 1, 2, 2, 2]), torch.tensor([3, 7, 0, 2, 5, 9])
    path = torch.randint(0, 8, (6, 2, k))
    with torch.no_grad():
        side.backbone(side.embed(ids), cache=cache)
        hidden = tree_hidden(side, cache, n, b, t, path)
        for row in range(6):
            sequence = torch.cat([ids[b[row], : (t[row] + 1) * k], path[row].flatten()])[None]
            assert torch.allclose(hidden[row], side.backbone(side.embed(sequence))[0, -1], atol=1e-5)


def test_windows_score_every_position_once_with_half_a_context():
    for positions, context in [(1, 8), (8, 8), (9, 8), (50, 8), (50, 7), (5, 1)]:
        spans = plan_windows(positions, context)
        scored = [p for _, first, end in spans for p in range(first, end)]
        assert scored == list(range(positions))
        assert all(end - start <= context and first - start >= min(first, context - max(1, context // 2)) for start, first, end in spans)
    doc = torch.arange(30)
    windows = make_windows([doc, torch.arange(5)], 2, 6)  # K = 2: 13 positions, lookahead 1 chunk; the short doc has none
    assert sum(len(w.truth) for w in windows) == 13 and all(len(w.ids) <= 12 for w in windows)
    assert windows[-1].truth[-1].tolist() == [26, 27, 28, 29]


def _sample_documents(model: TokenTransformer, count: int, length: int) -> list[torch.Tensor]:
    """Documents drawn from the model itself, so true tokens are likely under it and P(y) matters."""
    gen = torch.Generator().manual_seed(5)
    ids = torch.zeros(count, 1, dtype=torch.long)
    with torch.no_grad():
        for _ in range(length - 1):
            probs = model(ids[:, -15:])[:, -1].softmax(-1)
            ids = torch.cat([ids, torch.multinomial(probs, 1, generator=gen)], dim=1)
    return list(ids)


def test_token_exact_and_two_sample_estimators_agree():
    model = _tiny_baseline()
    docs = _sample_documents(model, 40, 40)
    means = {}
    for exact in (True, False):
        result = evaluate_documents(model, docs, seed=2, batch_size=16, exact=exact)
        per_doc = result.sums / result.counts[:, None]
        means[exact] = (per_doc.mean(0), per_doc.std(0) / math.sqrt(len(per_doc)))
    (a, se_a), (b, se_b) = means[True], means[False]
    assert (se_a < se_b).all()  # the exact term lowers the variance
    assert ((a - b).abs() < 3 * (se_a**2 + se_b**2).sqrt()).all(), (a, b)
    assert (a > 0).all()  # the model predicts its own samples: a positive score on every n


def _exact_brier_by_enumeration(model: TokenTransformer, doc: torch.Tensor, t: int) -> torch.Tensor:
    """Brier-1..4 at position t from the model's probabilities of all V^4 continuations."""
    vocab = model.config.vocab_size
    grid = torch.cartesian_prod(*[torch.arange(vocab)] * 4)
    with torch.no_grad():
        log_probs = model(torch.cat([doc[: t + 1].expand(len(grid), -1), grid], dim=1)).log_softmax(-1)
    steps = log_probs[:, t : t + 4].gather(-1, grid[:, :, None]).squeeze(-1)
    joint = steps.double().sum(-1).exp().reshape([vocab] * 4)
    truth = doc[t + 1 : t + 5].tolist()
    out = []
    for n in range(1, 5):
        marginal = joint.sum(dim=tuple(range(n, 4))) if n < 4 else joint
        out.append(2 * marginal[tuple(truth[:n])] - marginal.square().sum())
    return torch.stack(out)


@pytest.mark.parametrize("exact", [True, False], ids=["exact-p", "two-sample"])
def test_token_path_is_unbiased_end_to_end(exact):
    """Through windows, the batched pass and the tree continuation: the mean over replicates matches enumeration."""
    model = _tiny_baseline(vocab=4, context=16)
    with torch.no_grad():
        model.lm_head.weight.mul_(0.5)
    docs = _sample_documents(model, 4, 12)
    expected = torch.stack([_exact_brier_by_enumeration(model, d, t) for d in docs for t in range(len(d) - 4)]).mean(0)
    replicates = 60
    result = evaluate_documents(model, docs * replicates, seed=3, batch_size=64, exact=exact)
    assert result.counts.tolist() == [8.0] * (4 * replicates)
    per_replicate = (result.sums / result.counts[:, None]).reshape(replicates, 4, 4).mean(1)
    assert within_three_se(per_replicate, expected)


def test_calm_k2_end_to_end_counts_positions():
    docs = [torch.randint(0, 16, (n,)) for n in (3, 6, 7, 40)]
    result = evaluate_documents(_tiny_calm(2), docs, seed=0, batch_size=2)
    assert result.counts.tolist() == [1, 1, 18] and torch.isfinite(result.sums).all()


@pytest.mark.parametrize("batch_size", [1, 2, 5])
def test_calm_k2_end_to_end_scores_by_hand(batch_size, monkeypatch):
    """An autoencoder that decodes every latent to 5s: both samples are 5 5 5 5, so Brier-n = 2 [y[:n] = 5...5] - 1.

    Positions sit at chunk boundaries (even offsets), so in 5 3 5 3 ... each true continuation
    starts 5 3: Brier-1 is +1 and Brier-2..4 are -1 there.
    """
    model = _tiny_calm(2)
    monkeypatch.setattr(model.ae_model, "decode_tokens", lambda latents: torch.full((*latents.shape[:-1], 2), 5))
    docs = [torch.full((20,), 5), torch.full((20,), 3), torch.tensor([5, 3] * 10)]
    result = evaluate_documents(model, docs, seed=0, batch_size=batch_size)
    counts = result.counts[:, None]
    assert result.counts.tolist() == [8, 8, 8]
    expected = torch.tensor([[1, 1, 1, 1], [-1, -1, -1, -1], [1, -1, -1, -1]], dtype=torch.float64) * counts
    assert torch.equal(result.sums, expected)


# ---- end to end on the fixture model ---------------------------------------------------------


@pytest.fixture(scope="module")
def fixture_model():
    from calm_cli import load_model

    return load_model(FIXTURE)


def test_fixture_eval_is_finite_and_repeatable(fixture_model):
    first = evaluate(fixture_model, [CORPUS], seed=4, batch_size=4)
    again = evaluate(fixture_model, [CORPUS], seed=4, batch_size=4)
    keys = {"brier1", "brier2", "brier3", "brier4", "brierlm", "brierlm_ci95", "positions", "documents"}
    assert keys <= set(first) and first["positions"] > 0 and first["documents"] > 1
    assert all(math.isfinite(first[k]) for k in ("brier1", "brier2", "brier3", "brier4", "brierlm"))
    # This random model never gets two tokens right: Brier-2 is 0 in every resample, so BrierLM and its interval are 0.
    assert first["brier2"] == 0.0 and first["brier1"] < 0
    assert first["brierlm"] == 0.0 and first["brierlm_ci95"] == [0.0, 0.0]
    assert {k: v for k, v in first.items() if k != "seconds"} == {k: v for k, v in again.items() if k != "seconds"}
    limited = evaluate(fixture_model, [CORPUS], max_docs=3, max_tokens=400)
    assert limited["documents"] <= 3 and limited["positions"] <= 100


def test_bootstrap_interval_by_hand():
    """Identical documents: every resample gives the same BrierLM, so the interval is that point; spread widens it."""
    same = torch.tensor([[0.5, 0.4, 0.3, 0.2]] * 5, dtype=torch.float64)
    point = brier_lm_rows(same.sum(0) / 5).item()
    assert bootstrap_ci(same, torch.ones(5, dtype=torch.float64), seed=0) == pytest.approx([point, point], abs=1e-12)
    spread = same * torch.tensor([0.2, 0.6, 1.0, 1.4, 1.8], dtype=torch.float64)[:, None]
    low, high = bootstrap_ci(spread, torch.ones(5, dtype=torch.float64), seed=0)
    assert low < point < high
    assert bootstrap_ci(same[:1], torch.ones(1, dtype=torch.float64), seed=0) == [None, None]


def test_eval_of_prepared_token_files(fixture_model, tmp_path):
    manifest = prepare_data([CORPUS], FIXTURE / "tokenizer.json", tmp_path, heldout_fraction=0.3)
    (tmp_path / "tokenizer.json").write_bytes((FIXTURE / "tokenizer.json").read_bytes())
    by_dir = evaluate(fixture_model, [tmp_path])
    assert by_dir["documents"] == manifest["splits"]["heldout"]["documents"]
    assert evaluate(fixture_model, [tmp_path / "heldout.bin"])["positions"] == by_dir["positions"]


def test_cli_eval_json_and_errors():
    args = ("eval", str(CORPUS), "--model", str(FIXTURE), "--json", "--seed", "3", "--max-docs", "6", "--batch-size", "2")
    result = run_calm(*args)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout)
    for key in ("brier1", "brier2", "brier3", "brier4", "brierlm", "brierlm_ci95", "positions", "documents", "model", "seconds"):
        assert key in report
    assert report["documents"] <= 6 and len(report["brierlm_ci95"]) == 2
    missing = run_calm("eval", "no/such/file.txt", "--model", str(FIXTURE))
    assert missing.returncode == 2 and missing.stderr.startswith("error:") and len(missing.stderr.splitlines()) == 1
    with pytest.raises(UsageError):
        check_arguments([CORPUS], None, None, 0)
