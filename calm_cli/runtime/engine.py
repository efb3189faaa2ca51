"""Next-vector decoding: prefill the prompt's chunks, then one backbone step per K tokens.

A step is: backbone hidden state -> generative head draws -> autoencoder decodes each draw
to K tokens by argmax -> the temperature rule picks one chunk per row -> it is fed back.
The KV cache is allocated once per call. Prompts in a batch are left-padded to the same
number of chunks; padding slots are masked out and positions count real chunks only.

Prompts whose length is not a multiple of K: the authors right-pad with PAD, a token the
model never saw in training. We instead prefill the prompt's whole chunks and keep the
r < K leftover tokens; the first generated chunk is drawn from a pool of candidates kept
only where their first r tokens equal the leftover (rejection sampling from the model's
own distribution conditioned on that prefix). When no candidate in the pool matches, we
take the candidate whose decoder gives the leftover the highest log-probability. Prompts
shorter than one chunk are left-padded with EOS to one chunk ("a previous document ended
here"), the only context of that kind the model can have seen.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
import torch.nn.functional as F

from ..errors import UsageError
from ..models.calm import CALM
from .fastdecode import FastCandidateDecoder
from .sampling import SamplingStats, select_from_pool, temperature_sample

LEFTOVER_POOL = 64
CANDIDATE_DECODERS = ("dense", "fast")
EXACT_BLOCK = 8  # the exact sampler's first round: a confident position is accepted within it
# The approximation draws its N candidates in one call.  An adaptive pool (16, doubling until
# settled) needs 2+ calls: on the default model's diffuse positions it never settles early and
# is 19% slower; on concentrated ones it decodes about half as many at a TV of 0.0006 or less
# from the fixed rule (benchmarks/adaptive_pool.py, benchmarks/sampler_speed.py).  Set 16 for it.
POOL_BLOCK: int | None = None


@dataclass
class GenerationSettings:
    max_tokens: int = 128
    temperature: float = 0.5
    num_samples: int = 200
    sampler: str = "approx"
    seed: int | None = None


@dataclass
class StepOutput:
    """New token ids per row from one step (empty for rows already finished)."""

    tokens: list[list[int]]
    finished: list[bool]


@dataclass
class GenerationStats:
    prompt_tokens: list[int] = field(default_factory=list)
    completion_tokens: list[int] = field(default_factory=list)
    steps: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    sampling: SamplingStats = field(default_factory=SamplingStats)


class Engine:
    """Owns a CALM model on one device; `stream` yields tokens chunk by chunk."""

    def __init__(self, model: CALM, compile: bool = False, candidate_decoder: str = "fast") -> None:
        check_candidate_decoder(candidate_decoder)
        self.model = model
        # Both give the same chunks (calm_cli/fastdecode.py); dense is kept for comparison.
        self.decode_chunks = FastCandidateDecoder(model.ae_model) if candidate_decoder == "fast" else model.ae_model.decode_tokens
        self.config = model.config
        self.k = model.config.patch_size
        self.device = next(model.parameters()).device
        self.eos = model.config.eos_token_id
        self.pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0
        self._step = torch.compile(model.step, dynamic=True) if compile else model.step

    def draw_fn(self, hidden: torch.Tensor, generator: torch.Generator | None) -> Callable[..., torch.Tensor]:
        """The black-box sampler the temperature rules see: n fresh chunks for the given rows."""
        head, decode = self.model.generative_head, self.decode_chunks

        def draw(n: int, rows: torch.Tensor | None = None) -> torch.Tensor:
            h = hidden if rows is None else hidden[rows]
            return decode(head.sample(h, n, generator=generator))

        return draw

    @torch.inference_mode()
    def stream(
        self, prompts: list[list[int]], settings: GenerationSettings, stats: GenerationStats | None = None
    ) -> Iterator[StepOutput]:
        """Yield one StepOutput per decode step until every row has finished or hit max_tokens."""
        if not prompts:
            return
        stats = stats if stats is not None else GenerationStats()
        k, device = self.k, self.device
        prompts = [p if len(p) >= k else [self.eos] * (k - len(p)) + p for p in prompts]
        chunks = [len(p) // k for p in prompts]
        leftovers = [p[c * k :] for p, c in zip(prompts, chunks)]
        max_steps = -(-(settings.max_tokens + k - 1) // k)
        limit = self.config.max_position_embeddings
        if max(chunks) >= limit:
            raise UsageError(f"prompt is {max(len(p) for p in prompts)} tokens; the model's context is {limit * k} tokens")
        ids, valid, positions = left_pad([p[: c * k] for p, c in zip(prompts, chunks)], k, self.pad, device)
        batch, width = valid.shape
        max_steps = min(max_steps, limit - width)
        generator = seeded_generator(settings.seed, device)
        stats.prompt_tokens = [len(p) for p in prompts]

        t0 = time.perf_counter()
        cache = self.model.new_cache(batch, width + max_steps)
        cache.valid[:, :width] = valid
        hidden = self._step(ids, cache, 0, positions)[:, -1]
        stats.prefill_s = time.perf_counter() - t0

        rows = RowTracker(batch, settings.max_tokens, self.eos, self.pad)
        t0 = time.perf_counter()
        for step in range(max_steps):
            if any(leftovers) and step == 0:
                chunk, skip = self._first_chunk(hidden, leftovers, settings, generator)
            else:
                chunk = sample_step(self.draw_fn(hidden, generator), settings, generator, stats.sampling)
                skip = [0] * batch
            out = rows.take([row[s:] for row, s in zip(chunk.tolist(), skip)], last=step + 1 == max_steps)
            stats.steps, stats.completion_tokens = step + 1, list(rows.produced)
            stats.decode_s = time.perf_counter() - t0
            yield StepOutput(out, list(rows.done))
            if all(rows.done):
                break
            cache.valid[:, width + step] = True
            hidden = self._step(chunk, cache, width + step, (positions[:, -1:] + step + 1))[:, -1]

    def _first_chunk(
        self, hidden: torch.Tensor, leftovers: list[list[int]], settings: GenerationSettings, generator: torch.Generator
    ) -> tuple[torch.Tensor, list[int]]:
        """First chunk conditioned on each row's leftover prompt tokens (see the module docstring)."""
        k, batch = self.k, hidden.shape[0]
        pool = max(settings.num_samples, LEFTOVER_POOL)
        head, ae = self.model.generative_head, self.model.ae_model
        latents = head.sample(hidden, pool, generator=generator)
        logits = ae.decoder(latents.unsqueeze(-2)).float()
        candidates = logits.argmax(-1)
        prefix = torch.full((batch, k), -1, dtype=torch.long, device=hidden.device)
        for i, left in enumerate(leftovers):
            prefix[i, : len(left)] = torch.tensor(left, dtype=torch.long)
        fixed = prefix >= 0
        match = ((candidates == prefix[:, None]) | ~fixed[:, None]).all(-1)
        logp = F.log_softmax(logits, -1).gather(-1, prefix.clamp(min=0)[:, None, :, None].expand(-1, pool, -1, -1))[..., 0]
        best = (logp * fixed[:, None]).sum(-1).argmax(-1)
        fallback = candidates[torch.arange(batch, device=hidden.device), best]
        found = match.any(-1, keepdim=True)
        chosen = select_from_pool(candidates, settings.temperature, generator=generator, valid=match | ~found)
        chosen = torch.where(found, chosen, fallback)
        chosen = torch.where(fixed, prefix, chosen)
        return chosen, [len(left) for left in leftovers]


def sample_step(
    draw: Callable[..., torch.Tensor], settings: GenerationSettings, generator: torch.Generator | None,
    stats: SamplingStats | None = None,
) -> torch.Tensor:
    """One decode step's chunks by the settings' temperature rule, as the engine draws them.

    The exact sampler starts with EXACT_BLOCK candidates and doubles its rounds up to the pool
    size; the approximation grows its pool POOL_BLOCK at a time when that is set.  `calm bench`
    calls this too, so both pay the same candidate decodes.
    """
    return temperature_sample(
        draw, settings.temperature, method=settings.sampler, num_samples=settings.num_samples, generator=generator,
        block=EXACT_BLOCK, max_block=settings.num_samples, pool_block=POOL_BLOCK, stats=stats,
    )


class RowTracker:
    """Per-row bookkeeping shared by the CALM and token engines: EOS, PAD, the token budget.

    `pad` is dropped from the output when given: CALM chunks may hold it; a token model's
    sampled token is kept whatever it is, so each step is one token.
    """

    def __init__(self, batch: int, max_tokens: int, eos: int | None, pad: int | None) -> None:
        self.max_tokens, self.eos, self.pad = max_tokens, eos, pad
        self.produced = [0] * batch
        self.done = [False] * batch

    def take(self, new_tokens: list[list[int]], last: bool = False) -> list[list[int]]:
        """The tokens each row keeps from this step: cut at EOS, PAD dropped, capped at max_tokens."""
        out: list[list[int]] = []
        for i, new in enumerate(new_tokens):
            if self.done[i]:
                out.append([])
                continue
            if self.eos is not None and self.eos in new:
                new = new[: new.index(self.eos)]
                self.done[i] = True
            new = [t for t in new if t != self.pad][: self.max_tokens - self.produced[i]]
            self.produced[i] += len(new)
            self.done[i] = self.done[i] or self.produced[i] >= self.max_tokens or last
            out.append(new)
        return out


def left_pad(prompts: list[list[int]], unit: int, pad: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Left-pad prompts (lengths multiples of `unit`) to one width.

    Returns ids [B, W * unit], valid [B, W] (real slots, one per `unit` tokens) and positions
    [B, W] that count real slots only, so a padded row sees the positions it would see alone.
    """
    width = max(len(p) for p in prompts) // unit
    ids = torch.full((len(prompts), width * unit), pad, dtype=torch.long)
    valid = torch.zeros(len(prompts), width, dtype=torch.bool)
    for i, p in enumerate(prompts):
        if p:
            ids[i, width * unit - len(p) :] = torch.tensor(p)
        valid[i, width - len(p) // unit :] = True
    ids, valid = ids.to(device), valid.to(device)
    positions = (torch.arange(width, device=device) - (width - valid.sum(1))[:, None]).clamp(min=0)
    return ids, valid, positions


def seeded_generator(seed: int | None, device: torch.device) -> torch.Generator:
    generator = torch.Generator(device=device)
    generator.manual_seed(seed if seed is not None else torch.seed())
    return generator


def check_candidate_decoder(name: str) -> None:
    if name not in CANDIDATE_DECODERS:
        raise UsageError(f"--candidate-decoder must be 'dense' or 'fast', got '{name}'")


def check_settings(settings: GenerationSettings) -> None:
    if settings.max_tokens < 1:
        raise UsageError("--max-tokens must be at least 1")
    if not 0.0 <= settings.temperature <= 1.0:
        raise UsageError(f"--temp must be in [0, 1], got {settings.temperature}")
    if settings.num_samples < 1:
        raise UsageError("--samples must be at least 1")
    if settings.sampler not in ("approx", "exact"):
        raise UsageError(f"--sampler must be 'approx' or 'exact', got '{settings.sampler}'")
