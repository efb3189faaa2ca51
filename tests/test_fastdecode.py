"""The fast candidate decoder must give exactly the dense float32 argmax.

Random latents exercise the common case; constructed near-ties put the top two scores of a
row a chosen multiple of the bf16 error scale apart (same vocabulary tile or different ones),
so the certificate, the candidate rescoring and the dense fallback all get used and checked.
"""

from __future__ import annotations

import copy
import json

import pytest
import torch
import torch.nn.functional as F
from helpers import HostReads, LogitProbe, decode_all, run_calm

from calm_cli.errors import UsageError
from calm_cli.models.autoencoder import Autoencoder
from calm_cli.models.config import AutoencoderConfig
from calm_cli.runtime import budget, fastdecode
from calm_cli.runtime.engine import Engine
from calm_cli.runtime.fastdecode import (
    BF16_UNIT,
    DEFAULT_TILE,
    FastCandidateDecoder,
    PreparedWeight,
    RowNorms,
    _accumulates_in_float32,
    score_error,
)
from calm_cli.runtime.settings import GenerationSettings

MIN_WORK = fastdecode.MIN_WORK


@pytest.fixture(autouse=True)
def always_certify(monkeypatch) -> None:
    """These models are small enough that calls would go dense for speed; test the bf16 path instead."""
    monkeypatch.setattr(fastdecode, "MIN_WORK", 0)


def _random_ae(vocab: int = 4096, hidden: int = 128, seed: int = 0) -> Autoencoder:
    torch.manual_seed(seed)
    config = AutoencoderConfig(vocab_size=vocab, patch_size=4, hidden_size=hidden, intermediate_size=2 * hidden, latent_size=32)
    return Autoencoder(config).eval().requires_grad_(False)


def test_this_backend_accumulates_bf16_in_float32() -> None:
    assert _accumulates_in_float32(torch.device("cpu"))


@pytest.mark.parametrize("which", ["fixture", "random"])
def test_random_latents_decode_like_dense(which: str, tiny_model) -> None:
    ae = tiny_model.ae_model if which == "fixture" else _random_ae()
    fast = FastCandidateDecoder(ae)
    generator = torch.Generator().manual_seed(1)
    with torch.inference_mode():
        for scale in (0.3, 1.0, 3.0):
            latents = scale * torch.randn(64, 5, ae.config.latent_size, generator=generator)
            assert torch.equal(fast(latents), ae.decode_tokens(latents))
    stats = fast.stats
    assert stats.rows == 3 * 64 * 5 * 4 and stats.rows - stats.rescored - stats.dense > 0  # some proven by bf16 alone


def _near_ties(factors: list[float], partner_offset: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows h_r whose best column 2r has a partner scoring f * 2^-8 |h_r| |w_2r| more (f = 0: a duplicate).

    The partner is a different vector (its bf16 rounding errors are its own), so small f can
    flip the order between bf16 and float32 scores.
    """
    generator = torch.Generator().manual_seed(seed)
    rows, size, vocab = len(factors), 256, 2 * DEFAULT_TILE
    hidden = torch.randn(rows, size, generator=generator)
    weight = 0.05 * torch.randn(vocab, size, generator=generator)
    for r, factor in enumerate(factors):
        h = hidden[r].double()
        direction = h / h.norm()
        best = 3.0 * direction + 0.01 * torch.randn(size, generator=generator, dtype=torch.float64)
        partner = best.clone()
        if factor != 0.0:
            side = torch.randn(size, generator=generator, dtype=torch.float64)
            side -= side.dot(direction) * direction
            partner = 2.5 * direction + 1.5 * side / side.norm()
            target = h.dot(best) + factor * 2.0**-8 * float(h.norm() * best.norm())
            partner += (target - h.dot(partner)) / h.dot(h) * h
        weight[2 * r] = best.float()
        weight[2 * r + partner_offset] = partner.float()
    return hidden, weight


@pytest.mark.parametrize("partner_offset", [1, DEFAULT_TILE + 1], ids=["same-tile", "other-tile"])
def test_constructed_near_ties_match_dense(partner_offset: int) -> None:
    factors = [0.0] * 4 + torch.linspace(-0.1, 0.1, 81).tolist() + [-3.0, 3.0, -10.0, 10.0, -30.0, 30.0]
    hidden, weight = _near_ties(factors, partner_offset, seed=2)
    ae = _random_ae(vocab=weight.shape[0], hidden=weight.shape[1])
    fast = FastCandidateDecoder(ae)
    got = fast.argmax(hidden, weight)
    want = F.linear(hidden, weight).argmax(-1)
    assert torch.equal(got, want)
    partners = torch.arange(len(factors)) * 2 + partner_offset
    assert bool(((want == 2 * torch.arange(len(factors))) | (want == partners)).all())  # the ties are the contest
    bf16_order = F.linear(hidden.bfloat16(), weight.bfloat16()).float().argmax(-1)
    assert bool((bf16_order != want).any())  # plain bf16 gets some of these wrong
    stats = fast.stats
    proven = stats.rows - stats.rescored - stats.dense
    assert proven > 0 and stats.dense > 0  # exact duplicates (factor 0) need dense rows
    # Partners in other tiles are settled by float32 scores of the two winners; a tile holding both is crowded: dense.
    assert bool(stats.rescored > 0) == (partner_offset != 1)


def test_a_tiny_budget_slices_the_screen_and_the_dense_rows(monkeypatch) -> None:
    """Slices of 8 rows for the bf16 screen and 4 for dense rows give the tokens of one whole-call decode."""
    factors = [0.0] * 4 + torch.linspace(-0.1, 0.1, 41).tolist() + [-3.0, 3.0]
    hidden, weight = _near_ties(factors * 3, DEFAULT_TILE + 1, seed=3)
    hidden[::7] = -hidden[::7]  # some rows with no positive score: dense rows spread over the call
    ae = _random_ae(vocab=weight.shape[0], hidden=weight.shape[1])
    whole = FastCandidateDecoder(ae)
    want = whole.argmax(hidden, weight)
    monkeypatch.setitem(budget.LOGIT_BUDGET, "cpu", 8 * DEFAULT_TILE)
    sliced = FastCandidateDecoder(ae)
    with LogitProbe(DEFAULT_TILE) as screen, LogitProbe(weight.shape[0]) as dense:
        got = sliced.argmax(hidden, weight)
    assert torch.equal(got, want) and torch.equal(got, F.linear(hidden, weight).argmax(-1))
    assert screen.largest == 8 * DEFAULT_TILE and screen.made >= 2 * (len(hidden) // 8)  # two tiles per slice
    assert dense.largest == 4 * weight.shape[0] and dense.made == -(-sliced.stats.dense // 4) > 1
    assert (sliced.stats.rows, int(sliced.stats.rescored), sliced.stats.dense) == (whole.stats.rows, int(whole.stats.rescored), whole.stats.dense)


def test_a_certified_call_reads_back_once_and_counts_on_the_device() -> None:
    """The one host read of a call is which rows need a dense row; the counters stay tensors until reported."""
    hidden, weight = _near_ties([0.0, 0.05, 3.0, 10.0] * 8, DEFAULT_TILE + 1, seed=4)
    fast = FastCandidateDecoder(_random_ae(vocab=weight.shape[0], hidden=weight.shape[1]))
    fast.argmax(hidden, weight)  # prepares W (read back once per output matrix)
    with HostReads() as probe:
        fast.argmax(hidden, weight)
    assert probe.reads == ["aten.nonzero.default"]
    assert isinstance(fast.stats.rescored, torch.Tensor) and int(fast.stats.rescored) > 0
    low = FastCandidateDecoder(_random_ae().to(torch.bfloat16))
    with torch.inference_mode(), HostReads() as probe:
        low(torch.randn(64, 32, dtype=torch.bfloat16))  # a bf16 model decodes densely: nothing read back
    assert probe.reads == [] and low.stats.dense == 256


PRECISION_SETTINGS = {
    "legacy-medium": lambda: torch.set_float32_matmul_precision("medium"),
    "legacy-high": lambda: torch.set_float32_matmul_precision("high"),
    "legacy-allow-tf32": lambda: setattr(torch.backends.cuda.matmul, "allow_tf32", True),
    "cuda-tf32": lambda: setattr(torch.backends.cuda.matmul, "fp32_precision", "tf32"),
    "mkldnn-bf16": lambda: setattr(torch.backends.mkldnn.matmul, "fp32_precision", "bf16"),
    "global-bf16": lambda: setattr(torch.backends, "fp32_precision", "bf16"),
    "global-tf32": lambda: setattr(torch.backends, "fp32_precision", "tf32"),
}
PRECISION_FLAGS = [(torch.backends, "fp32_precision"), (torch.backends.cuda.matmul, "fp32_precision"), (torch.backends.mkldnn.matmul, "fp32_precision")]


@pytest.fixture
def restore_precision():
    """Put the legacy and the new-style float32 precision settings back as they were."""
    legacy = torch.get_float32_matmul_precision()
    flags = [getattr(owner, name) for owner, name in PRECISION_FLAGS]
    yield
    torch.set_float32_matmul_precision(legacy)
    for (owner, name), value in zip(PRECISION_FLAGS, flags):
        setattr(owner, name, value)


LINEAR = F.linear


def effective_cpu_precision() -> str:
    """What oneDNN applies to a float32 matmul: the most specific of the new-style settings that is not "none"."""
    for value in (torch.backends.mkldnn.matmul.fp32_precision, torch.backends.mkldnn.fp32_precision, torch.backends.fp32_precision):
        if value != "none":
            return value
    return "ieee"


def amx_like_linear(x: torch.Tensor, w: torch.Tensor, *args) -> torch.Tensor:
    """F.linear as a CPU with bf16 matrix units runs it: float32 inputs rounded to bf16 when the setting allows."""
    if x.dtype == torch.float32 and effective_cpu_precision() == "bf16":
        return LINEAR(x.bfloat16().float(), w.bfloat16().float(), *args)
    return LINEAR(x, w, *args)


@pytest.mark.parametrize("setting", sorted(PRECISION_SETTINGS))
def test_near_ties_match_ieee_float32_under_every_precision_setting(setting: str, restore_precision, monkeypatch) -> None:
    """The decoder's reference is the IEEE float32 argmax even where the user let float32 matmuls run in bf16 or TF32.

    This CPU may have no bf16 matrix units, so F.linear is replaced by one that honours the
    settings as such a CPU does; on the real thing (or CUDA with TF32) the same holds.
    """
    hidden, weight = _near_ties(torch.linspace(-0.1, 0.1, 81).tolist(), 1, seed=2)
    truth = LINEAR(hidden, weight).argmax(-1)
    ae = _random_ae(vocab=weight.shape[0], hidden=weight.shape[1])
    monkeypatch.setattr(F, "linear", amx_like_linear)
    PRECISION_SETTINGS[setting]()
    if effective_cpu_precision() == "bf16":
        assert not torch.equal(F.linear(hidden, weight).argmax(-1), truth)  # the setting does change plain float32 argmaxes
    before = [getattr(owner, name) for owner, name in PRECISION_FLAGS]
    fast = FastCandidateDecoder(ae)
    assert torch.equal(fast.argmax(hidden, weight), truth)
    assert torch.equal(fast(torch.zeros(3, 2, ae.config.latent_size)), ae.decode_tokens(torch.zeros(3, 2, ae.config.latent_size)))
    assert fast.stats.rescored + fast.stats.dense > 0  # the float32 reference was used
    assert [getattr(owner, name) for owner, name in PRECISION_FLAGS] == before


def test_score_bounds_hold_where_rounding_errors_line_up() -> None:
    """Entries that all round down by almost u make the bf16 error reach the worst case.

    Every dense float32 score must lie within the certificate's bounds around its bf16 score
    (module docstring, steps 1-5), and here it would not without the input-rounding terms.
    """
    size, near = 256, 1 + 0.99 * 2.0**-8  # rounds down to 1 in bf16
    generator = torch.Generator().manual_seed(5)
    hidden = torch.stack([torch.full((size,), near), torch.full((size,), -near / 4), torch.randn(size, generator=generator)])
    weight = torch.cat([torch.full((1, size), near), torch.full((1, size), near / 2), torch.randn(30, size, generator=generator)])
    prepared = PreparedWeight.of(weight)
    rounded = hidden.bfloat16()
    norms = RowNorms.of(hidden, rounded)
    bf16 = F.linear(rounded, prepared.bf16).double()
    dense = F.linear(hidden, weight).double()
    u = BF16_UNIT
    columns = [torch.full((3,), v) for v in range(weight.shape[0])]
    error = torch.stack([score_error(norms, prepared, size, c) for c in columns], 1)
    inputs = norms.error[:, None] * prepared.norms + norms.rounded[:, None] * prepared.rounding  # step 1's terms
    upper = torch.where(bf16 >= 0, bf16 / (1 - u), bf16 / (1 + u))
    lower = torch.where(bf16 >= 0, bf16 / (1 + u), bf16 / (1 - u))
    assert bool((dense <= upper + error).all() and (dense >= lower - error).all())
    assert bool((dense > upper + error - inputs).any() or (dense < lower - error + inputs).any())


def test_all_negative_scores_go_dense_and_start_a_dense_spell() -> None:
    ae = _random_ae()
    fast = FastCandidateDecoder(ae)
    hidden = torch.rand(40, 128) + 0.1
    weight = -(torch.rand(300, 128) + 0.1)
    assert torch.equal(fast.argmax(hidden, weight), F.linear(hidden, weight).argmax(-1))
    assert fast.stats.dense == 40
    with torch.inference_mode():
        latents = torch.randn(10, ae.config.latent_size)
        assert torch.equal(fast(latents), ae.decode_tokens(latents))
    assert fast.stats.dense == 80  # the next calls decode densely without trying bf16


def test_changed_weights_are_picked_up() -> None:
    ae = _random_ae()
    fast = FastCandidateDecoder(ae)
    latents = torch.randn(30, ae.config.latent_size, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        assert torch.equal(fast(latents), ae.decode_tokens(latents))
        ae.encoder.embed_tokens.weight.mul_(-1.0)  # tied to the decoder's output matrix
        assert torch.equal(fast(latents), ae.decode_tokens(latents))


def test_low_precision_models_decode_densely() -> None:
    ae = _random_ae().to(torch.bfloat16)
    fast = FastCandidateDecoder(ae)
    latents = torch.randn(16, ae.config.latent_size, dtype=torch.bfloat16)
    with torch.inference_mode():
        assert torch.equal(fast(latents), ae.decode_tokens(latents))
    assert fast.stats.dense == fast.stats.rows == 64


def test_small_calls_decode_densely(monkeypatch) -> None:
    monkeypatch.setattr(fastdecode, "MIN_WORK", MIN_WORK)
    ae = _random_ae()
    fast = FastCandidateDecoder(ae)
    latents = torch.randn(2, ae.config.latent_size)  # 8 rows x 4096 x 128 multiply-adds, below MIN_WORK
    with torch.inference_mode():
        assert torch.equal(fast(latents), ae.decode_tokens(latents))
    assert fast.stats.dense == fast.stats.rows == 8


@pytest.mark.parametrize(("sampler", "temperature"), [("approx", 0.5), ("exact", 0.5), ("exact", 0.7)])
def test_engine_generates_the_same_with_either_decoder(tiny_model, sampler: str, temperature: float) -> None:
    prompts = [[0, 5, 9, 11, 20, 3, 7, 8], [0, 40, 41, 42, 43, 44, 45, 46], [0, 100, 101, 102]]
    settings = GenerationSettings(max_tokens=24, temperature=temperature, sampler=sampler, num_samples=64, seed=4)
    outputs = {decoder: decode_all(Engine(tiny_model, candidate_decoder=decoder), prompts, settings) for decoder in ("dense", "fast")}
    assert outputs["dense"] == outputs["fast"] and all(len(tokens) == 24 for tokens in outputs["fast"])


def test_unknown_candidate_decoder_is_a_usage_error(tiny_model) -> None:
    with pytest.raises(UsageError, match="candidate_decoder"):
        Engine(tiny_model, candidate_decoder="int8")


def test_cli_candidate_decoder_option(fixtures) -> None:
    model = str(fixtures / "calm")
    args = ("generate", "Once upon a time", "-m", model, "-n", "12", "--temp", "0.5", "--seed", "5", "--json")
    texts = []
    for decoder in ("dense", "fast"):
        r = run_calm(*args, "--candidate-decoder", decoder)
        assert r.returncode == 0, r.stderr
        texts.append(json.loads(r.stdout)["text"])
    assert texts[0] == texts[1]
    bad = run_calm(*args, "--candidate-decoder", "int8")
    assert bad.returncode == 2 and "candidate-decoder" in bad.stderr and bad.stderr.count("\n") == 1


def test_bench_reports_both_decoders_and_decodes_per_step() -> None:
    r = run_calm(
        "bench", "--preset", "tiny", "-p", "8", "-n", "8", "-r", "1", "--threads", "1", "--device", "cpu", "--temp", "0.5",
        "--samples", "16", "--candidate-decoder", "dense,fast", "--json",
    )
    assert r.returncode == 0, r.stderr
    rows = json.loads(r.stdout)["rows"]
    calm = {row["candidate_decoder"]: row for row in rows if row["kind"] == "calm"}
    assert set(calm) == {"dense", "fast"} and all(row["decodes_per_step"] == 16 for row in calm.values())
    assert [row["decodes_per_step"] for row in rows if row["kind"] == "baseline"] == [None]


@pytest.mark.cuda
def test_cuda_fast_equals_the_dense_float32_argmax() -> None:
    """As test_random_latents_decode_like_dense and the near ties, on CUDA at a vocabulary of 32,768 (four tiles)."""
    cuda = torch.device("cuda")
    assert _accumulates_in_float32(cuda)  # cuBLAS with reduced-precision reduction off: the decoder certifies here
    generator = torch.Generator().manual_seed(5)
    hidden, weight = torch.randn(4096, 512, generator=generator).to(cuda), (0.05 * torch.randn(32768, 512, generator=generator)).to(cuda)
    ae = _random_ae(vocab=32768, hidden=512).to(cuda)
    fast = FastCandidateDecoder(ae)
    with fastdecode.ieee_float32(cuda):
        want = F.linear(hidden, weight).argmax(-1)
    assert torch.equal(fast.argmax(hidden, weight), want)
    assert fast.stats.rows - int(fast.stats.rescored) - fast.stats.dense > 0  # the certificate, not dense rows, decided
    near, partner = _near_ties(torch.linspace(-0.1, 0.1, 81).tolist(), DEFAULT_TILE + 1, seed=2)
    with fastdecode.ieee_float32(cuda):
        assert torch.equal(fast.argmax(near.to(cuda), partner.to(cuda)), F.linear(near.to(cuda), partner.to(cuda)).argmax(-1))


@pytest.mark.cuda
@pytest.mark.parametrize(("sampler", "temperature"), [("approx", 0.5), ("exact", 0.7)])
def test_cuda_engine_generates_the_same_with_either_decoder_in_float32(tiny_model, sampler: str, temperature: float) -> None:
    """As test_engine_generates_the_same_with_either_decoder, on CUDA with the float32 model (the certified path)."""
    model = copy.deepcopy(tiny_model).to("cuda", torch.float32)
    prompts = [[0, 5, 9, 11, 20, 3, 7, 8], [0, 40, 41, 42, 43, 44, 45, 46], [0, 100, 101, 102]]
    settings = GenerationSettings(max_tokens=24, temperature=temperature, sampler=sampler, num_samples=64, seed=4)
    engines = {decoder: Engine(model, candidate_decoder=decoder, candidate_dtype="float32") for decoder in ("dense", "fast")}
    outputs = {decoder: decode_all(engine, prompts, settings) for decoder, engine in engines.items()}
    assert outputs["dense"] == outputs["fast"] and all(len(tokens) == 24 for tokens in outputs["fast"])
    stats = engines["fast"].runner.pool.decode_chunks.stats
    assert stats.rows - int(stats.rescored) - stats.dense > 0  # the bf16 screen did settle rows
