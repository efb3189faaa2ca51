"""What the engine needs from a model: prefill a slot, step every slot, sample each row's next chunk.

CALM and the token-level baseline differ only here. Both run the same backbone over a
preallocated KV cache whose rows are the engine's slots; a step feeds one input per slot
(a chunk of K tokens for CALM, one token for the baseline) and returns one hidden state
per slot, from which `sample` draws the next chunk. `sample` is called per group of rows
that share sampling settings and gets each row's own random stream (`RowRandom`), so a
row's chunk depends on its own hidden state, settings and seed only.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from ..models.backbone import Backbone, KVCache
from ..models.baseline import TokenTransformer
from ..models.calm import CALM
from .budget import row_slices
from .fastdecode import ieee_float32
from .precision import CandidatePath, candidate_dtypes
from .rng import RowRandom
from .sampling import SamplingStats, select_from_pool, temperature_sample
from .settings import GenerationSettings, check_candidate_decoder, draws_one

EXACT_BLOCK = 8  # the exact sampler's first round: a confident position is accepted within it
# The approximation draws its N candidates in one call.  An adaptive pool (16, doubling until
# settled) needs 2+ calls: on the default model's diffuse positions it never settles early and
# is 19% slower; on concentrated ones it decodes about half as many at a TV of 0.0006 or less
# from the fixed rule (benchmarks/adaptive_pool.py, benchmarks/sampler_speed.py).  Its pool
# sizes depend on the whole group, so it would also break batch invariance.  Set 16 for it.
POOL_BLOCK: int | None = None
LEFTOVER_POOL = 64  # fewest candidates drawn for a first chunk that must start with leftover tokens
LEFTOVER_BUDGET = 8  # the exact sampler's conditioned draws give up after this many pools


class Runner:
    """The shared half: prefill and step over the backbone; subclasses embed inputs and sample."""

    unit: int  # tokens per step
    chunks_hold_padding = False  # whether a drawn chunk may contain PAD that is not text
    backbone: Backbone
    config: object

    def embed(self, ids: Tensor) -> Tensor:
        """Token ids [B, n * unit] -> backbone inputs [B, n, H]."""
        raise NotImplementedError

    def sample(
        self, hidden: Tensor, rng: RowRandom, settings: GenerationSettings, stats: SamplingStats,
        prefixes: list[list[int]] | None = None,
    ) -> Tensor:
        """One chunk [R, unit] per row of hidden [R, H]; `prefixes` are tokens a row's chunk must start with."""
        raise NotImplementedError

    @property
    def context(self) -> int:
        """Steps a slot holds: the model's positions."""
        return self.config.max_position_embeddings

    def new_cache(self, slots: int) -> KVCache:
        p = next(self.backbone.parameters())
        return KVCache.allocate(self.config, slots, self.context, p.device, p.dtype)

    def prefill(self, cache: KVCache, ids: Tensor, start: int) -> Tensor:
        """Write ids [1, n * unit] at slots start.. of a one-row cache view; the last hidden state [1, H]."""
        return self.backbone(self.embed(ids), cache=cache, start=start)[:, -1]

    def step(self, cache: KVCache, ids: Tensor, lengths: Tensor, span: int) -> Tensor:
        """One input per slot, ids [B, unit], written at each slot's own length; hidden states [B, H]."""
        return self.backbone.decode(self.embed(ids), lengths, cache, span)[:, 0]


class TokenRunner(Runner):
    """The baseline: one token per step, exact temperature (T = 0 is the argmax)."""

    unit = 1

    def __init__(self, model: TokenTransformer) -> None:
        self.model, self.config, self.backbone = model, model.config, model.transformer

    def embed(self, ids: Tensor) -> Tensor:
        return self.backbone.embed_tokens(ids)

    def sample(
        self, hidden: Tensor, rng: RowRandom, settings: GenerationSettings, stats: SamplingStats,
        prefixes: list[list[int]] | None = None,
    ) -> Tensor:
        logits = self.model.lm_head(hidden).float()
        if settings.temperature == 0.0:
            return logits.argmax(-1, keepdim=True)
        probs = torch.softmax(logits / settings.temperature, dim=-1).double()
        cdf = probs.cumsum(-1)
        u = rng.uniform((hidden.shape[0], 1)) * cdf[:, -1:]
        return torch.searchsorted(cdf, u).clamp(max=logits.shape[-1] - 1)


class CALMRunner(Runner):
    """CALM: a chunk of K tokens per step, drawn by the energy head and decoded by the autoencoder."""

    chunks_hold_padding = True  # the autoencoder learnt PAD where a document's last chunk was short

    def __init__(self, model: CALM, candidate_decoder: str = "fast", candidate_dtype: str = "auto") -> None:
        check_candidate_decoder(candidate_decoder)
        self.model, self.config, self.backbone = model, model.config, model.transformer
        self.unit = model.config.patch_size
        weight = model.ae_model.decoder.lm_head_weight
        # Pools (T < 1) and single draws (T = 1) may run in different dtypes: calm_cli/runtime/precision.py.
        pool, single = candidate_dtypes(candidate_dtype, weight.dtype, weight.device)
        self.pool = CandidatePath(model, pool, candidate_decoder)
        self.single = self.pool if single == pool else CandidatePath(model, single, candidate_decoder)

    def embed(self, ids: Tensor) -> Tensor:
        return self.model.embed_chunks(ids)

    def path(self, temperature: float) -> CandidatePath:
        """The candidate path for a temperature: T = 1 draws one candidate per step, T < 1 a pool."""
        return self.single if draws_one(temperature) else self.pool

    def sample(
        self, hidden: Tensor, rng: RowRandom, settings: GenerationSettings, stats: SamplingStats,
        prefixes: list[list[int]] | None = None,
    ) -> Tensor:
        if prefixes is not None:
            return self._after_prefix(hidden, rng, settings, stats, prefixes)

        path = self.path(settings.temperature)

        def draw(n: int, rows: Tensor | None = None) -> Tensor:
            h, r = (hidden, rng) if rows is None else (hidden[rows], rng.rows(rows))
            return path.decode_chunks(path.latents(h, r, n))

        return temperature_sample(
            draw, settings.temperature, method=settings.sampler, num_samples=settings.num_samples, generator=rng,
            block=EXACT_BLOCK, max_block=settings.num_samples, pool_block=POOL_BLOCK, stats=stats,
        )

    def _after_prefix(
        self, hidden: Tensor, rng: RowRandom, settings: GenerationSettings, stats: SamplingStats, prefixes: list[list[int]]
    ) -> Tensor:
        """The first chunk after a prompt whose last r < K tokens are not a whole chunk.

        The prompt's whole chunks were prefilled; this chunk must start with the r leftover
        tokens, so it is drawn from the model's own distribution conditioned on that: the
        temperature rule runs over candidates that match. The approximation keeps the
        matching members of one pool of max(N, 64); the exact sampler draws pools until it
        has the matches it asks for. A row with no match at all takes the candidate whose
        decoder gives the leftover the highest log-probability, scored at the r positions
        only and in slices, so memory stays bounded at any vocabulary.
        """
        k, path = self.unit, self.path(settings.temperature)
        prefix = torch.tensor([p + [-1] * (k - len(p)) for p in prefixes], dtype=torch.long, device=hidden.device)
        fixed = prefix >= 0
        if settings.sampler == "exact" and settings.temperature > 0.0 and not draws_one(settings.temperature):
            chunks = temperature_sample(
                self._matching_draw(path, hidden, rng, prefix, settings.num_samples, stats), settings.temperature,
                method="exact", num_samples=settings.num_samples, generator=rng, block=EXACT_BLOCK,
                max_block=settings.num_samples, stats=stats,
            )
            return torch.where(fixed, prefix, chunks)
        pool = max(settings.num_samples, LEFTOVER_POOL)
        latents = path.latents(hidden, rng, pool)
        candidates = path.decode_chunks(latents)
        match = _matches(candidates, prefix)
        found = match.any(-1)
        chosen = select_from_pool(candidates, settings.temperature, generator=rng, valid=match | ~found[:, None])
        missing = (~found).nonzero().squeeze(1)  # a host sync, on a request's first step only
        if missing.numel():
            best = self._prefix_scores(path, latents[missing], prefix[missing]).argmax(-1)
            chosen[missing] = candidates[missing, best]
            stats.fallbacks += missing.numel()
        stats.steps += 1
        stats.rows += hidden.shape[0]
        stats.draw_calls += 1
        stats.draws += hidden.shape[0] * pool
        return torch.where(fixed, prefix, chosen)

    def _matching_draw(
        self, path: CandidatePath, hidden: Tensor, rng: RowRandom, prefix: Tensor, num_samples: int, stats: SamplingStats
    ):
        """A draw function for the exact sampler: n candidates per row that all start with the row's prefix.

        Pools are drawn until every row has n matches; a row still short after
        LEFTOVER_BUDGET pools gets its best match (or best-scoring candidate) n times, so
        the sampler accepts it at once (counted as a fallback).
        """
        k = self.unit

        def draw(n: int, rows: Tensor | None = None) -> Tensor:
            index = torch.arange(hidden.shape[0], device=hidden.device) if rows is None else rows
            want = prefix[index]
            out = torch.full((len(index), n, k), -1, dtype=torch.long, device=hidden.device)
            have = torch.zeros(len(index), dtype=torch.long, device=hidden.device)
            size = max(LEFTOVER_POOL, 4 * n)
            short = torch.arange(len(index), device=hidden.device)
            for _ in range(LEFTOVER_BUDGET):
                # Only rows still short draw again: a row's stream must not move for its neighbours' sake.
                drawn = short
                latents = path.latents(hidden[index[drawn]], rng.rows(index[drawn]), size)
                candidates = path.decode_chunks(latents)
                match = _matches(candidates, want[drawn])
                slot = have[drawn, None] + match.cumsum(1) - 1
                take = match & (slot < n)
                row, column = take.nonzero(as_tuple=True)
                out[drawn[row], slot[row, column]] = candidates[row, column]
                have[drawn] = (have[drawn] + match.sum(1)).clamp(max=n)
                short = drawn[have[drawn] < n]
                if short.numel() == 0:
                    return out
            stats.fallbacks += short.numel()
            fallback = out[short, 0]
            none = (have[short] == 0).nonzero().squeeze(1)
            if none.numel():  # never a match: the last pool's candidate that explains the leftover best
                pool = torch.searchsorted(drawn, short[none])
                scores = self._prefix_scores(path, latents[pool], want[short[none]])
                fallback[none] = candidates[pool, scores.argmax(-1)]
            out[short] = fallback[:, None].expand(-1, n, -1)
            return out

        return draw

    def _prefix_scores(self, path: CandidatePath, latents: Tensor, prefix: Tensor) -> Tensor:
        """Sum over the fixed positions of log P(prefix token | latent): latents [M, P, latent] -> [M, P]."""
        weight = self.model.ae_model.decoder.lm_head_weight
        hidden = path.states(latents.unsqueeze(-2))  # [M, P, K, H]
        m, p = hidden.shape[:2]
        total = torch.zeros(m, p, dtype=torch.float32, device=latents.device)
        for j in range(self.unit - 1):  # leftovers are shorter than a chunk
            fixed = prefix[:, j] >= 0
            if not bool(fixed.any()):
                break
            h = hidden[:, :, j].reshape(m * p, -1)
            target = weight[prefix[:, j].clamp(min=0)].repeat_interleave(p, 0)
            with ieee_float32(h.device):
                logp = torch.cat([  # slices within the device's logit budget (calm_cli/runtime/budget.py)
                    (h[s] * target[s]).sum(-1).float() - F.linear(h[s], weight).float().logsumexp(-1)
                    for s in row_slices(m * p, weight.shape[0], h.device.type)
                ])
            total += logp.view(m, p) * fixed[:, None]
        return total


def _matches(candidates: Tensor, prefix: Tensor) -> Tensor:
    """Which candidates [R, N, K] start with the row's prefix [R, K] (-1 marks free positions)."""
    return ((candidates == prefix[:, None]) | (prefix < 0)[:, None]).all(-1)


def make_runner(model: CALM | TokenTransformer, candidate_decoder: str = "fast", candidate_dtype: str = "auto") -> Runner:
    if isinstance(model, TokenTransformer):
        return TokenRunner(model)
    return CALMRunner(model, candidate_decoder, candidate_dtype)

