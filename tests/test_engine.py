"""The engine: a request's tokens depend only on its prompt, settings and seed; slots, budgets and finish reasons.

The alone-versus-batched tests pin the float32 candidate path: bf16 matmuls may round a row
differently in a batch (README, "One engine for every request").
"""

from __future__ import annotations

import random

import pytest
import torch
from helpers import HostReads, LogitProbe, decode_all
from torch.utils._python_dispatch import TorchDispatchMode

from calm_cli.errors import UsageError
from calm_cli.models.baseline import TokenTransformer
from calm_cli.models.calm import CALM
from calm_cli.models.config import AutoencoderConfig, CALMConfig
from calm_cli.runtime import budget, fastdecode, runners
from calm_cli.runtime.engine import Engine
from calm_cli.runtime.rng import GOLDEN, RowRandom, mix64
from calm_cli.runtime.sampling import SamplingStats
from calm_cli.runtime.settings import GenerationSettings

MASK = (1 << 64) - 1


def _reference_mix(z: int) -> int:
    """splitmix64's finaliser on Python ints, to check the int64 tensor version bit for bit."""
    z &= MASK
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK
    return z ^ (z >> 31)


def test_mix64_matches_splitmix64_bit_for_bit() -> None:
    values = [0, 1, 2**63 - 1, 12345678901234, 2**40 + 7]
    got = mix64(torch.tensor(values, dtype=torch.long)).tolist()
    assert [g & MASK for g in got] == [_reference_mix(v) for v in values]
    assert GOLDEN & MASK == 0x9E3779B97F4A7C15


def test_row_streams_do_not_depend_on_other_rows() -> None:
    together = RowRandom.from_seeds([7, 8, 9])
    alone = RowRandom.from_seeds([8])
    first = together.uniform((3, 5))
    assert torch.equal(first[1], alone.uniform((1, 5))[0])
    # A view on row 2 advances only row 2: row 1 then matches a stream that skipped nothing.
    together.rows(torch.tensor([2])).uniform((1, 4))
    assert torch.equal(together.rows(torch.tensor([1])).uniform((1, 6))[0], alone.uniform((1, 6))[0])
    u = RowRandom.from_seeds(list(range(50))).uniform((50, 2000))
    assert 0 < u.min() and u.max() < 1 and abs(u.mean().item() - 0.5) < 0.005


def _calm(k: int, seed: int = 0, eos: int | None = 1, pad: int | None = 2, context: int = 64, vocab: int = 96) -> CALM:
    torch.manual_seed(seed)
    config = CALMConfig(
        vocab_size=vocab, patch_size=k, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, latent_size=8, noise_size=8, num_mlp_layers=1, max_position_embeddings=context,
        eos_token_id=eos, pad_token_id=pad,
    )
    ae = AutoencoderConfig(vocab_size=vocab, patch_size=k, hidden_size=32, intermediate_size=64, latent_size=8,
                           eos_token_id=eos, pad_token_id=pad)
    return CALM(config, ae).eval().requires_grad_(False)


def _token_model(seed: int = 0) -> TokenTransformer:
    torch.manual_seed(seed)
    config = CALMConfig(vocab_size=96, patch_size=1, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, eos_token_id=None, pad_token_id=2,
                        max_position_embeddings=64)
    return TokenTransformer(config).eval().requires_grad_(False)


def _prompts(count: int, seed: int) -> list[list[int]]:
    rng = random.Random(seed)
    return [[rng.randrange(3, 96) for _ in range(rng.randrange(1, 20))] for _ in range(count)]


@pytest.mark.parametrize("k", [2, 4])
@pytest.mark.parametrize(("temperature", "sampler"), [(1.0, "approx"), (0.5, "approx"), (0.5, "exact"), (0.0, "approx")])
def test_calm_row_is_the_same_alone_and_batched(k: int, temperature: float, sampler: str) -> None:
    model = _calm(k, eos=None)  # no EOS: every row runs its full budget, so rows join and leave at different steps
    prompts = _prompts(6, seed=k)  # lengths 1..19: with and without leftover tokens
    assert any(len(p) % k for p in prompts) and any(len(p) % k == 0 or len(p) < k for p in prompts)
    settings = [GenerationSettings(max_tokens=4 + 2 * i, temperature=temperature, sampler=sampler, num_samples=24, seed=40 + i)
                for i in range(len(prompts))]
    batched = decode_all(Engine(model, max_batch=4, candidate_dtype="float32"), prompts, settings)
    for prompt, s, tokens in zip(prompts, settings, batched):
        assert decode_all(Engine(model, max_batch=1, candidate_dtype="float32"), [prompt], s) == [tokens]
        assert len(tokens) == s.max_tokens


def test_rows_with_different_settings_share_a_step_and_keep_their_own_output() -> None:
    model = _calm(2, eos=None)
    prompt = [5, 6, 7, 8]
    mixed = [GenerationSettings(max_tokens=10, temperature=t, sampler=m, num_samples=16, seed=3)
             for t, m in [(1.0, "approx"), (0.5, "exact"), (0.25, "approx"), (0.0, "approx")]]
    together = decode_all(Engine(model, max_batch=4, candidate_dtype="float32"), [prompt] * 4, mixed)
    for s, tokens in zip(mixed, together):
        assert decode_all(Engine(model, max_batch=1, candidate_dtype="float32"), [prompt], s) == [tokens]


def test_token_model_row_is_the_same_alone_and_batched() -> None:
    model = _token_model()
    prompts = _prompts(5, seed=1)
    settings = [GenerationSettings(max_tokens=5 + i, temperature=[1.0, 0.7, 0.0][i % 3], seed=i) for i in range(5)]
    batched = decode_all(Engine(model, max_batch=3), prompts, settings)
    for prompt, s, tokens in zip(prompts, settings, batched):
        assert decode_all(Engine(model, max_batch=1), [prompt], s) == [tokens]


def test_seed_decides_the_output() -> None:
    model = _calm(2, eos=None)
    settings = GenerationSettings(max_tokens=12, temperature=1.0, seed=5)
    a = decode_all(Engine(model, max_batch=2), [[4, 5, 6, 7]], settings)
    b = decode_all(Engine(model, max_batch=2), [[4, 5, 6, 7]], settings)
    c = decode_all(Engine(model, max_batch=2), [[4, 5, 6, 7]], GenerationSettings(max_tokens=12, temperature=1.0, seed=6))
    assert a == b and a != c


def test_leftover_tokens_start_the_first_chunk() -> None:
    model = _calm(4, eos=None)
    engine = Engine(model, max_batch=2)
    request = engine.submit([10, 11, 12, 13, 14, 15], GenerationSettings(max_tokens=8, temperature=1.0, seed=1))
    chunks = []
    original = engine.runner.step

    def spy(cache, ids, lengths, span):
        chunks.append(ids[0].tolist())
        return original(cache, ids, lengths, span)

    engine._step = spy
    for _ in engine.run():
        pass
    assert chunks[0][:2] == [14, 15]  # the leftover tokens open the chunk that is fed back
    assert request.tokens[:2] == chunks[0][2:] and len(request.tokens) == 8


def test_budgets_finish_reasons_and_slot_reuse() -> None:
    model = _calm(2, eos=None, context=8)
    engine = Engine(model, max_batch=2)
    short = engine.submit([3, 4], GenerationSettings(max_tokens=3, temperature=1.0, seed=1))
    long = engine.submit([3, 4, 5, 6], GenerationSettings(max_tokens=1000, temperature=1.0, seed=2))
    later = engine.submit([7, 8], GenerationSettings(max_tokens=4, temperature=1.0, seed=3))
    seen_busy = []
    for _ in engine.run():
        seen_busy.append(engine.active)
    assert max(seen_busy) <= 2
    assert (short.finish_reason, len(short.tokens)) == ("length", 3)
    # context 8 steps: 2 prompt chunks, 6 more fed back, and the last drawn chunk is kept -> 7 chunks of 2 tokens.
    assert (long.finish_reason, len(long.tokens)) == ("length", 14)
    assert later.finish_reason == "length" and len(later.tokens) == 4 and later.started >= short.finished


def test_eos_ends_a_row_and_eos_past_the_budget_is_length() -> None:
    model = _token_model()
    tokens = decode_all(Engine(model, max_batch=1), [[5, 6]], GenerationSettings(max_tokens=40, temperature=0.0))[0]
    eos = tokens[3]
    model.config.eos_token_id = eos
    engine = Engine(model, max_batch=1)
    ended = engine.submit([5, 6], GenerationSettings(max_tokens=40, temperature=0.0))
    cut = engine.submit([5, 6], GenerationSettings(max_tokens=3, temperature=0.0))
    for _ in engine.run():
        pass
    assert ended.finish_reason == "eos" and ended.tokens == tokens[: tokens.index(eos)]
    assert cut.finish_reason == "length" and cut.tokens == tokens[:3]


@pytest.mark.parametrize(("pad", "kept"), [(2, False), (None, True)])
def test_padding_in_a_calm_chunk_is_dropped_only_when_the_config_names_it(monkeypatch, pad: int | None, kept: bool) -> None:
    engine = Engine(_calm(2, eos=None, pad=pad), max_batch=1)
    monkeypatch.setattr(engine.runner, "sample", lambda hidden, *_: torch.tensor([[2, 7]] * hidden.shape[0]))
    request = engine.submit([5, 6], GenerationSettings(max_tokens=4, temperature=1.0, seed=1))
    for _ in engine.run():
        pass
    assert request.tokens == ([2, 7, 2, 7] if kept else [7, 7, 7, 7])


def test_token_model_keeps_a_drawn_pad_token(monkeypatch) -> None:
    engine = Engine(_token_model(), max_batch=1)  # its config names PAD 2
    monkeypatch.setattr(engine.runner, "sample", lambda hidden, *_: torch.full((hidden.shape[0], 1), 2))
    assert decode_all(engine, [[5, 6]], GenerationSettings(max_tokens=3, temperature=1.0, seed=1)) == [[2, 2, 2]]


def test_exact_sampler_after_leftover_tokens_is_the_same_alone_and_batched() -> None:
    """Rows drawing conditioned pools must not move each other's streams, however many rounds each needs."""
    model = _calm(4, eos=None)
    prompts = [[9, 10, 11, 12, 13], [9, 10, 11, 12, 13, 14, 15], [20, 21, 22, 23, 40, 41, 42], [5, 5, 5, 5, 95]]
    for seed in range(4):
        settings = [GenerationSettings(max_tokens=8, temperature=0.5, sampler="exact", num_samples=16, seed=seed * 10 + i)
                    for i in range(len(prompts))]
        together = decode_all(Engine(model, max_batch=4, candidate_dtype="float32"), prompts, settings)
        alone = [decode_all(Engine(model, max_batch=1, candidate_dtype="float32"), [p], s)[0] for p, s in zip(prompts, settings)]
        assert together == alone


def test_cancel_frees_the_slot_at_the_next_step() -> None:
    engine = Engine(_calm(2, eos=None), max_batch=1)
    first = engine.submit([3, 4], GenerationSettings(max_tokens=50, temperature=1.0, seed=1))
    second = engine.submit([3, 4], GenerationSettings(max_tokens=20, temperature=1.0, seed=1))
    engine.step()
    engine.cancel(first, "stop")
    engine.step()
    assert first.finish_reason == "stop" and engine.slots[0] is second


def test_too_long_a_prompt_is_refused() -> None:
    engine = Engine(_calm(2, context=8), max_batch=1)
    with pytest.raises(UsageError, match="context"):
        engine.submit(list(range(3, 20)), GenerationSettings())


class _LargestTensor(TorchDispatchMode):
    """Records the most elements any operation produced."""

    def __init__(self) -> None:
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for value in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(value, torch.Tensor):
                self.largest = max(self.largest, value.numel())
        return out


def test_leftover_scoring_memory_does_not_grow_with_the_vocabulary(monkeypatch) -> None:
    """The prefix log-probabilities are scored in slices: the old path held pool x K x V float32 logits per row."""
    model = _calm(4, eos=None, vocab=2000)
    runner = runners.CALMRunner(model, "dense", "float32")  # compared with the float32 decoder below
    monkeypatch.setitem(budget.LOGIT_BUDGET, "cpu", 1024)
    rows, pool = 6, 64
    latents = torch.randn(rows, pool, 8)
    prefix = torch.tensor([[5, 6, 7, -1]] * rows)
    with torch.inference_mode(), _LargestTensor() as probe:
        scores = runner._prefix_scores(runner.pool, latents, prefix)
    old_path = rows * pool * 4 * model.config.vocab_size
    ae = model.ae_model.config
    assert probe.largest <= rows * pool * 4 * max(ae.hidden_size, ae.intermediate_size) < old_path / 10
    with torch.inference_mode():
        logp = torch.log_softmax(model.ae_model.decoder(latents.unsqueeze(-2)).float(), -1)  # [rows, pool, K, V]
    expected = logp[..., 0, 5] + logp[..., 1, 6] + logp[..., 2, 7]
    assert torch.allclose(scores, expected, atol=1e-4)


@pytest.mark.parametrize("decoder", ["dense", "fast"])
@pytest.mark.parametrize("sampler", ["approx", "exact"])
def test_a_tiny_budget_gives_the_same_tokens_after_leftovers(monkeypatch, sampler: str, decoder: str) -> None:
    """Pools, the exact sampler's conditioned draws and the leftover scores in slices of 8 states: the same tokens."""
    monkeypatch.setattr(fastdecode, "MIN_WORK", 0)  # the fast decoder certifies even at this size
    model = _calm(4, eos=None, vocab=2000)
    prompts = [[9, 10, 11, 12, 13], [9, 10, 11, 12, 13, 14, 15], [20, 21, 22, 23, 40, 41, 42], [5, 5, 5, 5, 95]]
    settings = GenerationSettings(max_tokens=8, temperature=0.5, sampler=sampler, num_samples=16, seed=3)

    def run() -> tuple[list[list[int]], Engine]:
        engine = Engine(model, max_batch=4, candidate_decoder=decoder, candidate_dtype="float32")
        return decode_all(engine, prompts, settings), engine

    whole, engine = run()
    assert engine.sampling.fallbacks > 0  # some leftovers matched no candidate: their scores were used
    monkeypatch.setitem(budget.LOGIT_BUDGET, "cpu", 8 * 2000)
    with LogitProbe(2000) as probe:
        sliced, _ = run()
    assert sliced == whole
    assert probe.largest <= 8 * 2000 and probe.made > 4 * 16 * 4 // 8  # a step's pool alone takes 32 slices


@pytest.mark.parametrize(("decoder", "reads"), [("dense", []), ("fast", ["aten.nonzero.default"])])
def test_a_pool_step_reads_back_nothing_but_the_rows_needing_a_dense_row(monkeypatch, decoder: str, reads: list[str]) -> None:
    """A T < 1 step of the approximation stays on the device; the certificate asks once which rows it left open."""
    monkeypatch.setattr(fastdecode, "MIN_WORK", 0)
    runner = runners.CALMRunner(_calm(4, vocab=2000), decoder, "float32")
    hidden, rng = torch.randn(3, 32), RowRandom.from_seeds([1, 2, 3])
    settings = GenerationSettings(temperature=0.5, num_samples=64)
    with torch.inference_mode():
        runner.sample(hidden, rng, settings, SamplingStats())  # the first call prepares W and probes the backend
        with HostReads() as probe:
            chunks = runner.sample(hidden, rng, settings, SamplingStats())
    assert chunks.shape == (3, 4) and probe.reads == reads


@pytest.mark.cuda
@pytest.mark.parametrize(("dtype", "decoder"), [(torch.bfloat16, "fast"), (torch.float32, "dense")])
def test_cuda_pool_step_does_not_synchronise(dtype: torch.dtype, decoder: str) -> None:
    """The CUDA check of the test above: no host sync in a T < 1 step before its tokens are handed out."""
    runner = runners.CALMRunner(_calm(4, vocab=2000).to("cuda", dtype), decoder, "auto")
    hidden, rng = torch.randn(3, 32, device="cuda", dtype=dtype), RowRandom.from_seeds([1, 2, 3], device="cuda")
    settings = GenerationSettings(temperature=0.5, num_samples=64)
    with torch.inference_mode():
        runner.sample(hidden, rng, settings, SamplingStats())
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            chunks = runner.sample(hidden, rng, settings, SamplingStats())
        finally:
            torch.cuda.set_sync_debug_mode("default")
    assert chunks.shape == (3, 4)  # the hand-out (.tolist()) comes after the check


def test_the_decode_step_compiles_as_one_graph() -> None:
    """`--compile` uses fullgraph=True: a host sync or Python branch on a tensor in the step would break it."""
    runner = runners.make_runner(_calm(4))
    cache = runner.new_cache(3)
    ids, lengths = torch.randint(3, 96, (3, 4)), torch.tensor([0, 5, 9])
    with torch.inference_mode():
        explained = torch._dynamo.explain(runner.step)(cache, ids, lengths, 64)
    assert explained.graph_break_count == 0, explained.break_reasons
    assert explained.graph_count == 1


def test_compiled_engine_traces_to_the_eager_tokens() -> None:
    """The engine's compiled step, traced by dynamo (aot_eager: no C++ build, so it fits CI), gives the eager tokens.

    The batch changes size as requests finish, which exercises the recompile to dynamic shapes;
    inductor's own kernels are compared in tests/test_bench.py (CUDA or CALM_TEST_COMPILE=1).
    """
    model = _calm(2)
    prompts = _prompts(3, seed=4)
    for temperature in (1.0, 0.5):
        budgets = [GenerationSettings(max_tokens=n, temperature=temperature, num_samples=16, seed=5, ignore_eos=True)
                   for n in (6, 10, 14)]
        eager = decode_all(Engine(model, max_batch=3), prompts, budgets)
        assert decode_all(Engine(model, max_batch=3, compile=True, compile_backend="aot_eager"), prompts, budgets) == eager
        assert [len(tokens) for tokens in eager] == [6, 10, 14]
