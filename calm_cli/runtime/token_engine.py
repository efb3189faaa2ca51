"""Decoding for the token-level baseline: prefill, then one backbone step per token.

`TokenEngine.stream` has the interface of `Engine.stream` (same settings, stats and
StepOutput per step), so `generation.stream_text`, `calm generate` and the benchmark treat
both models alike. Prompts are left-padded to one width with masked-out slots, as in
`Engine`. Temperature is exact here: T = 0 takes the argmax, otherwise one draw from
softmax(logits / T); `num_samples` and `sampler` only concern CALM and are ignored.
"""

from __future__ import annotations

import time
from typing import Iterator

import torch

from ..errors import UsageError
from ..models.backbone import KVCache
from ..models.baseline import TokenTransformer
from ..models.calm import CALM
from .engine import (
    Engine,
    GenerationSettings,
    GenerationStats,
    RowTracker,
    StepOutput,
    left_pad,
    seeded_generator,
)


def next_logits(
    model: TokenTransformer, input_ids: torch.Tensor, cache: KVCache, start: int, positions: torch.Tensor | None = None
) -> torch.Tensor:
    """Cached pass over new tokens -> logits [B, V] after the last one; lm_head runs on that position only."""
    embeds = model.transformer.embed_tokens(input_ids)
    return model.lm_head(model.transformer(embeds, positions=positions, cache=cache, start=start)[:, -1])


def sample_logits(logits: torch.Tensor, temperature: float, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row from logits [B, V]: argmax at T = 0, else a draw from softmax(logits / T)."""
    if temperature == 0.0:
        return logits.argmax(-1)
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]


class TokenEngine:
    """Owns a TokenTransformer on one device; `stream` yields one token per row per step."""

    k = 1

    def __init__(self, model: TokenTransformer, compile: bool = False) -> None:
        self.model = model
        self.config = model.config
        self.device = next(model.parameters()).device
        self.eos = model.config.eos_token_id
        self.pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        self._next = torch.compile(next_logits, dynamic=True) if compile else next_logits

    @torch.inference_mode()
    def stream(
        self, prompts: list[list[int]], settings: GenerationSettings, stats: GenerationStats | None = None
    ) -> Iterator[StepOutput]:
        """Yield one StepOutput per generated token until every row has finished or hit max_tokens."""
        if not prompts:
            return
        stats = stats if stats is not None else GenerationStats()
        filler = self.eos if self.eos is not None else self.pad
        prompts = [p if p else [filler] for p in prompts]
        limit = self.config.max_position_embeddings
        longest = max(len(p) for p in prompts)
        if longest >= limit:
            raise UsageError(f"prompt is {longest} tokens; the model's context is {limit} tokens")
        ids, valid, positions = left_pad(prompts, 1, self.pad, self.device)
        batch, width = valid.shape
        max_steps = min(settings.max_tokens, limit - width)
        generator = seeded_generator(settings.seed, self.device)
        stats.prompt_tokens = [len(p) for p in prompts]

        t0 = time.perf_counter()
        cache = self.model.new_cache(batch, width + max_steps)
        cache.valid[:, :width] = valid
        logits = self._next(self.model, ids, cache, 0, positions)
        stats.prefill_s = time.perf_counter() - t0

        rows = RowTracker(batch, settings.max_tokens, self.eos, None)
        t0 = time.perf_counter()
        for step in range(max_steps):
            token = sample_logits(logits, settings.temperature, generator)
            out = rows.take([[t] for t in token.tolist()], last=step + 1 == max_steps)
            stats.steps, stats.completion_tokens = step + 1, list(rows.produced)
            stats.decode_s = time.perf_counter() - t0
            yield StepOutput(out, list(rows.done))
            if all(rows.done):
                break
            cache.valid[:, width + step] = True
            logits = self._next(self.model, token[:, None], cache, width + step, positions[:, -1:] + step + 1)


def make_engine(model: CALM | TokenTransformer, compile: bool = False, candidate_decoder: str = "fast") -> Engine | TokenEngine:
    """The engine that decodes `model`: CALM's chunk engine or the token-level one (which decodes no candidates)."""
    if isinstance(model, TokenTransformer):
        return TokenEngine(model, compile=compile)
    return Engine(model, compile=compile, candidate_decoder=candidate_decoder)
