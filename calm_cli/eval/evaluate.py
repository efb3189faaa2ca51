"""`calm eval`: BrierLM of a CALM or token-level model on held-out documents.

BrierLM (see `brier.py`) needs only samples, so it scores CALM, which has no likelihood,
and token-level models on one scale.

Data. Documents are scored one by one, each tokenised with BOS in front and never mixed
with another document, which is how the authors' document-level WikiText-103 test reads;
the document is also the unit of the confidence interval. Text files are split into
documents by `data.iter_documents` (JSON lines: one `text` per line; plain text: blank-
line separated paragraphs). A `.bin` token file of `calm data prepare`, or a prepared-data
directory (meaning its `heldout.bin`, the documents prepare assigned to the held-out
split), is one concatenated stream cut at every BOS into documents; those end with EOS,
which is then predicted too (tokenised text has no EOS).

Positions. Position t of a document has read its chunks 0..t (K tokens each, BOS
included) and is scored on the 4 true tokens that follow; Brier-n uses the first n. A
position with fewer than 4 true tokens after it is dropped for every n, so Brier-1..4
average the same positions, and a document shorter than K + 4 tokens contributes nothing.
A document longer than the model's context is read in windows of the context: each
window ends half a context after the previous one and scores only its new positions, so
every position is scored once with at least half a context before it (the whole document
when it fits). Brier-n is the mean over all scored positions.

Estimators (two model samples per position, T = 1, all drawn in batched calls):
- CALM, K >= 4: the head draws two chunks at each position in one call; the first 4
  tokens of each give both samples for all n.
- CALM, K < 4 (the 4 tokens span m = ceil(4/K) chunks): the terms 1{x_s = y} need x_s
  only while it equals the truth, and along the truth the next chunk's distribution is
  the one at the next position of the same teacher-forced pass, so sample s at level j is
  the draw s made at position t + j: no extra passes. The collision term 1{x1 = x2} needs
  both samples only while they agree, and while they agree they share one context, so
  both next draws come from that context: the teacher-forced one while the shared path
  is still the truth, otherwise one extra backbone step over [true prefix + the shared
  sampled chunks], run for all such positions of a batch at once from the window's KV
  cache. Every draw is a fresh independent draw from the model's conditional at the path
  it is compared along, so each of the three indicators has exactly the expectation of
  the two-independent-samples estimator and the sum stays unbiased for 2P(y) - sum P(x)^2;
  stopping at the first disagreement only skips indicators already known to be 0. This
  is the authors' scheme (the collision followed along one shared path, stopped at the
  first disagreement) with both samples' accuracy terms carried to 4 tokens as well.
- Token-level models: P(y) over the next n tokens is exact (the product of the true
  tokens' conditional probabilities, from the same pass). The collision term is
  1{the two samples agree on n - 1 tokens} x sum_v P(v | that prefix)^2, the last token's
  collision probability taken exactly: unbiased and of lower variance. The samples are
  continued as for CALM with K = 1.

Interval: a percentile bootstrap over documents (2000 resamples, each recomputing
Brier-1..4 as position-weighted means and then BrierLM), because positions within a
document are correlated and BrierLM is not a mean. With one document there is none.
The same seed, data and batch size give the same numbers, on one process or several
under torchrun: each batch of windows draws from its own generator, seeded by (seed, batch).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Union

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from ..errors import CalmError, UsageError
from ..io.documents import iter_documents, load_tokens
from ..io.tokenizer import encode, load_tokenizer
from ..models.backbone import KVCache
from ..models.baseline import TokenTransformer
from ..models.calm import CALM
from ..models.config import read_json
from .brier import brier_lm_rows, brier_per_position, prefix_match

WIDTH = 4  # Brier-1..4
RESAMPLES = 2000
SLICE_LOGITS = 1 << 25  # logits alive at once while drawing: bounds memory whatever the batch size

Model = Union[CALM, TokenTransformer]
Extend = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, Union[torch.Tensor, None]]]


# ---- data ------------------------------------------------------------------------------------


def check_arguments(paths: list[Path], max_docs: int | None, max_tokens: int | None, batch_size: int) -> None:
    """Fail on bad flags and missing data before any slow loading."""
    if max_docs is not None and max_docs < 1 or max_tokens is not None and max_tokens < 1:
        raise UsageError("--max-docs and --max-tokens must be at least 1")
    if batch_size < 1:
        raise UsageError("--batch-size must be at least 1")
    for path in paths:
        if not path.exists():
            raise UsageError(f"{path}: no such file or directory")
        if path.is_dir() and not (path / "manifest.json").is_file():
            raise UsageError(f"{path}: not a prepared-data directory (no manifest.json)")


def load_documents(paths: list[Path], model: Model, max_docs: int | None = None, max_tokens: int | None = None) -> list[torch.Tensor]:
    """Token ids of each document in order, BOS first; at most max_docs documents and max_tokens tokens (the last one cut)."""
    docs: list[torch.Tensor] = []
    total = 0
    for path in paths:
        source = _token_documents(path, model) if path.is_dir() or path.suffix == ".bin" else _text_documents(path, model)
        for doc in source:
            if max_docs is not None and len(docs) >= max_docs or max_tokens is not None and total >= max_tokens:
                return docs
            doc = doc if max_tokens is None else doc[: max_tokens - total]
            docs.append(doc)
            total += len(doc)
    return docs


def _text_documents(path: Path, model: Model):
    if model.tokenizer is None:
        raise CalmError("the model has no tokenizer.json: give token files (.bin or a prepared-data directory)")
    bos = model.config.bos_token_id
    for text in iter_documents(path):
        ids = encode(model.tokenizer, text)
        if bos is not None and (not ids or ids[0] != bos):
            ids = [bos, *ids]
        yield torch.tensor(ids, dtype=torch.long)


def _token_documents(path: Path, model: Model):
    """The documents of a token stream, cut before every BOS; a directory means its heldout.bin."""
    path = path / "heldout.bin" if path.is_dir() else path
    tokens = load_tokens(path).long()
    manifest = read_json(path.parent / "manifest.json")
    tokenizer_file = path.parent / "tokenizer.json"
    if model.tokenizer is not None and tokenizer_file.is_file():
        if load_tokenizer(tokenizer_file).get_vocab() != model.tokenizer.get_vocab():
            raise CalmError(f"{path}: prepared with another tokenizer than the model's")
    if len(tokens) and int(tokens.max()) >= model.config.vocab_size:
        raise CalmError(f"{path}: token id {int(tokens.max())} is outside the model's vocabulary of {model.config.vocab_size}")
    bos = manifest.get("bos_id", model.config.bos_token_id)
    starts = (tokens == bos).nonzero().squeeze(1) if bos is not None else torch.empty(0, dtype=torch.long)
    for doc in torch.tensor_split(tokens, starts):
        if len(doc):
            yield doc


# ---- windows ---------------------------------------------------------------------------------


@dataclass
class Window:
    """One forward pass's worth of a document."""

    doc: int
    ids: torch.Tensor  # model input, whole chunks
    first: int  # chunk index in `ids` of the first scored position
    truth: torch.Tensor  # [scored positions, 4]: the true tokens after each scored position


def levels(k: int) -> int:
    """Chunks that the 4 tokens after a position span."""
    return -(-WIDTH // k)


def plan_windows(positions: int, context: int) -> list[tuple[int, int, int]]:
    """(start, first, end) per window: it reads chunks start.. and scores positions first..end-1."""
    stride = max(1, context // 2)
    spans, first, end = [], 0, min(context, positions)
    while first < positions:
        spans.append((max(0, end - context), first, end))
        first, end = end, min(end + stride, positions)
    return spans


def make_windows(docs: list[torch.Tensor], k: int, context: int) -> list[Window]:
    """Windows of every document; each also reads the m - 1 chunks after its last position (the continuation levels)."""
    lookahead = levels(k) - 1
    if context <= lookahead:
        raise CalmError(f"the model's context of {context} positions is too short to score {WIDTH} tokens")
    windows = []
    for index, doc in enumerate(docs):
        positions = (len(doc) - WIDTH) // k if len(doc) >= WIDTH else 0
        if positions <= 0:
            continue
        truth = doc[k:].unfold(0, WIDTH, k)
        for start, first, end in plan_windows(positions, context - lookahead):
            windows.append(Window(index, doc[start * k : (end + lookahead) * k], first - start, truth[first:end]))
    return windows


# ---- estimators (no model needed) ------------------------------------------------------------


def continue_pairs(
    draws: torch.Tensor, truth_chunks: torch.Tensor, extend: Extend, q: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The two samples the collision term compares, level by level (see the module docstring).

    draws [P, m, 2, K]: two draws per position at each level along the truth (the
    teacher-forced contexts); truth_chunks [P, m - 1, K]: the true chunks of levels
    0..m-2; q [P, m]: optional per-context values that are replaced alongside (the exact
    collision probability of the token path). While a position's two samples agree but
    their shared path has left the truth, level j's draws come from
    extend(rows, path [R, j, K]) -> (draws [R, 2, K], q [R] or None). Levels after a
    disagreement keep their (unused) truth draws: the prefix comparison ignores them.
    """
    pairs, q = draws.clone(), None if q is None else q.clone()
    alive = torch.ones(draws.shape[0], dtype=torch.bool, device=draws.device)
    on_truth = alive.clone()
    for level in range(1, draws.shape[1]):
        first, second = pairs[:, level - 1, 0], pairs[:, level - 1, 1]
        alive &= (first == second).all(-1)
        on_truth &= (first == truth_chunks[:, level - 1]).all(-1)
        rows = (alive & ~on_truth).nonzero().squeeze(1)
        if rows.numel():
            new_pairs, new_q = extend(rows, pairs[rows, :level, 0])
            pairs[rows, level] = new_pairs
            if q is not None:
                q[rows, level] = new_q
    return pairs, q


def sampled_scores(draws: torch.Tensor, pairs: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """Per-position Brier-1..4 [P, 4] from truth-path draws (accuracy) and collision pairs, both [P, m, 2, K]."""
    p = draws.shape[0]
    x1, x2 = (draws[:, :, s].reshape(p, -1)[:, :WIDTH] for s in (0, 1))
    c1, c2 = (pairs[:, :, s].reshape(p, -1)[:, :WIDTH] for s in (0, 1))
    hits = (prefix_match(x1, truth, WIDTH) + prefix_match(x2, truth, WIDTH)) / 2
    return brier_per_position(hits, prefix_match(c1, c2, WIDTH))


def exact_scores(log_p: torch.Tensor, q: torch.Tensor, pairs: torch.Tensor) -> torch.Tensor:
    """Token-level Brier-1..4 [P, 4]: exact P(y[:n]) from log_p [P, 4], collisions from pairs [P, 4, 2, 1] and q [P, 4]."""
    agree = (pairs[:, :, 0] == pairs[:, :, 1]).all(-1).double()
    alive = torch.cat([torch.ones_like(agree[:, :1]), agree[:, :-1].cumprod(-1)], dim=1)
    return brier_per_position(log_p.double().cumsum(-1).exp(), alive * q.double())


# ---- the model side --------------------------------------------------------------------------


class _Side:
    """What differs between CALM and the token baseline: the input embedding and what a hidden state yields."""

    def __init__(self, model: Model) -> None:
        self.model = model
        self.calm = isinstance(model, CALM)
        self.k = model.patch_size
        self.backbone = model.transformer
        self.pad = model.config.pad_token_id if model.config.pad_token_id is not None else 0

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_chunks(ids) if self.calm else self.backbone.embed_tokens(ids)

    def reduce(self, hidden: torch.Tensor, next_ids: torch.Tensor | None, gen: torch.Generator) -> tuple[Any, ...]:
        """Hidden states [N, H] -> (two draws [N, 2, K], sum_v P(v)^2 [N] or None, log P(next_ids) [N] or None)."""
        step = max(1, SLICE_LOGITS // (2 * self.k * self.model.config.vocab_size))
        parts = [
            self._reduce(hidden[i : i + step], None if next_ids is None else next_ids[i : i + step], gen)
            for i in range(0, hidden.shape[0], step)
        ]
        return tuple(None if column[0] is None else torch.cat(column) for column in zip(*parts))

    def _reduce(self, hidden: torch.Tensor, next_ids: torch.Tensor | None, gen: torch.Generator) -> tuple[Any, ...]:
        if self.calm:
            latents = self.model.generative_head.sample(hidden, 2, generator=gen)
            return self.model.ae_model.decode_tokens(latents), None, None
        log_probs = self.model.lm_head(hidden).float().log_softmax(-1)
        probs = log_probs.exp()
        draws = torch.multinomial(probs, 2, replacement=True, generator=gen).unsqueeze(-1)
        log_p = None if next_ids is None else log_probs.gather(-1, next_ids[:, None]).squeeze(-1)
        return draws, probs.square().sum(-1), log_p


def tree_hidden(side: _Side, cache: KVCache, n: int, b: torch.Tensor, t: torch.Tensor, path: torch.Tensor) -> torch.Tensor:
    """Hidden states [R, H] after window b's chunks 0..t followed by path [R, j, K], all rows in one pass.

    The rows of one window share a copy of its KV cache (slots 0..n-1): their chunks are
    appended after slot n and each attends to the window's slots 0..t and to its own
    earlier path chunks (a tree mask), so no true prefix is recomputed. b must be sorted.
    """
    device = path.device
    rows, depth = path.shape[:2]
    windows, sizes = torch.unique_consecutive(b, return_counts=True)
    group = torch.repeat_interleave(torch.arange(len(windows), device=device), sizes)
    slot = torch.arange(rows, device=device) - torch.repeat_interleave(sizes.cumsum(0) - sizes, sizes)
    width = int(sizes.max()) * depth
    column = slot[:, None] * depth + torch.arange(depth, device=device)
    where = (group[:, None].expand_as(column), column)

    def laid_out(fill: int, values: torch.Tensor, *tail: int) -> torch.Tensor:
        out = torch.full((len(windows), width, *tail), fill, dtype=torch.long, device=device)
        out[where] = values
        return out

    tokens = laid_out(side.pad, path, side.k)
    positions = laid_out(0, t[:, None] + 1 + torch.arange(depth, device=device))
    reads_to = laid_out(-1, t[:, None].expand_as(column))  # padding queries read no window slot
    owner = laid_out(-1, slot[:, None].expand_as(column))
    past = torch.arange(n, device=device) <= reads_to[..., None]
    columns = torch.arange(width, device=device)
    own = (owner[:, :, None] == owner[:, None, :]) & (columns[None, :] <= columns[:, None])
    mask = torch.cat([past, own], dim=-1)[:, None]

    def extended(buffer: torch.Tensor) -> torch.Tensor:
        return torch.cat([buffer[windows], buffer.new_zeros(len(windows), buffer.shape[1], width, buffer.shape[3])], dim=2)

    x = side.embed(tokens.reshape(len(windows), width * side.k))
    caches = [(extended(keys), extended(values)) for keys, values in zip(cache.keys, cache.values)]
    return side.backbone.run_layers(x, positions, mask, caches, n)[group, column[:, -1]]


def _score_batch(side: _Side, windows: list[Window], gen: torch.Generator, exact: bool) -> torch.Tensor:
    """Per-position Brier-1..4 [P, 4] of a batch of windows: one backbone pass, then the continuation levels."""
    k, m = side.k, levels(side.k)
    param = next(side.model.parameters())
    device, batch = param.device, len(windows)
    n = max(len(w.ids) for w in windows) // k
    ids = torch.full((batch, n * k), side.pad, dtype=torch.long)
    next_ids = torch.zeros(batch, n, dtype=torch.long)  # token path: the true token after each position
    for row, w in enumerate(windows):
        ids[row, : len(w.ids)] = w.ids
        if not side.calm:
            next_ids[row, : len(w.ids)] = torch.cat([w.ids[1:], w.truth[-1, -1:]])
    b = torch.cat([torch.full((len(w.truth),), row) for row, w in enumerate(windows)]).to(device)
    t = torch.cat([torch.arange(w.first, w.first + len(w.truth)) for w in windows]).to(device)
    truth = torch.cat([w.truth for w in windows]).to(device)
    ids, next_ids = ids.to(device), next_ids.to(device)

    cache = None
    if m > 1:
        cache = KVCache.allocate(side.model.config, batch, n, device, param.dtype)
        cache.valid.fill_(True)
    hidden = side.backbone(side.embed(ids), cache=cache)
    at_s = t[:, None] + torch.arange(m, device=device)  # [P, m] the truth-path context of each level
    at_b = b[:, None].expand_as(at_s)
    needed = torch.zeros(batch, n, dtype=torch.bool, device=device)
    needed[at_b, at_s] = True
    draws_at, q_at, log_p_at = side.reduce(hidden[needed], None if side.calm else next_ids[needed], gen)
    index = torch.zeros(batch, n, dtype=torch.long, device=device)
    index[needed] = torch.arange(draws_at.shape[0], device=device)
    at = index[at_b, at_s]
    draws = draws_at[at]
    truth_chunks = ids.view(batch, n, k)[at_b[:, 1:], at_s[:, 1:]]

    def extend(rows: torch.Tensor, path: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        new_draws, new_q, _ = side.reduce(tree_hidden(side, cache, n, b[rows], t[rows], path), None, gen)
        return new_draws, new_q

    pairs, q = continue_pairs(draws, truth_chunks, extend, None if q_at is None else q_at[at])
    if exact and not side.calm:
        return exact_scores(log_p_at[at], q, pairs)
    return sampled_scores(draws, pairs, truth)


# ---- running and reporting -------------------------------------------------------------------


def _batch_seed(seed: int, index: int) -> int:
    """Seed of the batch starting at window `index`: a batch's draws do not depend on which process runs it."""
    digest = hashlib.blake2b(f"{seed}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


@dataclass
class EvalResult:
    sums: torch.Tensor  # [documents, 4]: summed per-position Brier-n of each scored document
    counts: torch.Tensor  # [documents]: its scored positions
    seconds: float


def evaluate_documents(
    model: Model,
    docs: list[torch.Tensor],
    *,
    seed: int = 0,
    batch_size: int = 8,
    exact: bool = True,
    progress: Callable[[int, int, float], None] | None = None,
    rank: int = 0,
    world: int = 1,
) -> EvalResult:
    """Score token documents; `exact=False` scores a token model by two samples alone, as CALM is.

    progress(positions just scored, this process's total positions, its running BrierLM) is
    called per batch. With world > 1 (torchrun, process group set up) process `rank` scores
    every world-th batch and all get the summed result: batch i draws from a generator
    seeded by (seed, i), so the numbers are the same on any number of processes.
    """
    side = _Side(model)
    windows = make_windows(docs, side.k, model.config.max_position_embeddings)
    if not windows:
        raise CalmError(f"no document has the {side.k + WIDTH} tokens needed to score one position")
    windows.sort(key=lambda w: -len(w.ids))  # batches of similar length: little padding
    mine = list(range(0, len(windows), batch_size))[rank::world]
    total = sum(len(w.truth) for i in mine for w in windows[i : i + batch_size])
    sums = torch.zeros(len(docs), WIDTH, dtype=torch.float64)
    counts = torch.zeros(len(docs), dtype=torch.float64)
    device = next(model.parameters()).device
    start = time.perf_counter()
    with torch.inference_mode():
        for i in mine:
            batch = windows[i : i + batch_size]
            gen = torch.Generator(device=device).manual_seed(_batch_seed(seed, i))
            scores = _score_batch(side, batch, gen, exact).cpu()
            owners = torch.cat([torch.full((len(w.truth),), w.doc) for w in batch])
            sums.index_add_(0, owners, scores)
            counts.index_add_(0, owners, torch.ones(len(owners), dtype=torch.float64))
            if progress is not None:
                progress(len(scores), total, brier_lm_rows(sums.sum(0) / counts.sum()).item())
    if world > 1:
        import torch.distributed as dist

        both = torch.cat([sums, counts[:, None]], dim=1).to(device)  # NCCL reduces device tensors only
        dist.all_reduce(both)
        sums, counts = both[:, :WIDTH].cpu(), both[:, WIDTH].cpu()
    keep = counts > 0
    return EvalResult(sums[keep], counts[keep], time.perf_counter() - start)


def bootstrap_ci(sums: torch.Tensor, counts: torch.Tensor, seed: int, resamples: int = RESAMPLES) -> list[float | None]:
    """95% percentile interval of BrierLM, resampling documents; [None, None] for fewer than two."""
    docs = len(counts)
    if docs < 2:
        return [None, None]
    pick = torch.randint(docs, (resamples, docs), generator=torch.Generator().manual_seed(seed))
    weights = torch.zeros(resamples, docs, dtype=torch.float64).scatter_add_(1, pick, torch.ones(resamples, docs, dtype=torch.float64))
    values = brier_lm_rows((weights @ sums) / (weights @ counts)[:, None])
    low, high = torch.quantile(values, torch.tensor([0.025, 0.975], dtype=torch.float64)).tolist()
    return [low, high]


def summarize(result: EvalResult, seed: int = 0) -> dict[str, Any]:
    """brier1..4, brierlm, brierlm_ci95, positions, documents."""
    briers = result.sums.sum(0) / result.counts.sum()
    report: dict[str, Any] = {f"brier{n}": briers[n - 1].item() for n in range(1, WIDTH + 1)}
    report["brierlm"] = brier_lm_rows(briers).item()
    report["brierlm_ci95"] = bootstrap_ci(result.sums, result.counts, seed)
    report["positions"] = int(result.counts.sum().item())
    report["documents"] = len(result.counts)
    return report


def evaluate(
    model: Model,
    paths: list[Path],
    *,
    max_docs: int | None = None,
    max_tokens: int | None = None,
    seed: int = 0,
    batch_size: int = 8,
    console: Console | None = None,
    rank: int = 0,
    world: int = 1,
) -> dict[str, Any]:
    """`calm eval` without the printing: load the documents, score them with a progress bar on `console`, summarise.

    Under torchrun each of the `world` processes scores its share (see evaluate_documents) and all get the whole report.
    """
    check_arguments(paths, max_docs, max_tokens, batch_size)
    docs = load_documents(paths, model, max_docs, max_tokens)
    if not docs:
        raise CalmError("no documents in " + ", ".join(map(str, paths)))
    bar = Progress(
        TextColumn("scoring"), BarColumn(), MofNCompleteColumn(), TextColumn("positions · BrierLM ≈ {task.fields[estimate]}"),
        TimeElapsedColumn(), console=console, transient=True, disable=console is None or not console.is_terminal,
    )
    with bar:
        task = bar.add_task("eval", total=None, estimate="…")

        def show(done: int, total: int, estimate: float) -> None:
            bar.update(task, advance=done, total=total, estimate=f"{estimate:.2f}")

        result = evaluate_documents(model, docs, seed=seed, batch_size=batch_size, progress=show, rank=rank, world=world)
    report = summarize(result, seed)
    report["seconds"] = round(result.seconds, 3)
    report["k"] = model.patch_size
    report["estimator"] = "two samples" if isinstance(model, CALM) else "exact P(y), sampled collisions"
    return report


FEW_DOCUMENTS = 30  # below this, the bootstrap over documents says little: warn
WIDE_INTERVAL = 0.5  # warn when the 95% interval is wider than this fraction of the BrierLM itself


def format_report(report: dict[str, Any]) -> str:
    """The human-readable summary `calm eval` prints, with a note on anything that makes the number weak."""
    low, high = report["brierlm_ci95"]
    interval = f"95% CI {low:.2f} – {high:.2f}, bootstrap over documents" if low is not None else "one document: no interval"
    lines = [f"BrierLM  {report['brierlm']:.2f}  ({interval})"]
    lines += [f"Brier-{n}  {report[f'brier{n}']:.4f}" for n in range(1, WIDTH + 1)]
    docs = report["documents"]
    lines.append(
        f"{report['positions']} positions in {docs} document{'s' * (docs != 1)} · K = {report['k']} · "
        f"{report['estimator']} · {report['seconds']:.1f} s"
    )
    return "\n".join(lines + [f"note: {note}" for note in report_notes(report)]) + "\n"


def report_notes(report: dict[str, Any]) -> list[str]:
    """Why a BrierLM is 0 (a Brier-n <= 0 floors the geometric mean), and when the interval or the sample is too small to trust."""
    notes = []
    floored = [n for n in range(1, WIDTH + 1) if report[f"brier{n}"] <= 0]
    if floored:
        which = ", ".join(f"Brier-{n} = {report[f'brier{n}']:.4f}" for n in floored)
        notes.append(
            f"BrierLM is floored at 0 because {which} (<= 0): there the model's two samples matched each other "
            "at least as often as they matched the text, and a geometric mean needs every term > 0"
        )
    low, high = report["brierlm_ci95"]
    docs = report["documents"]
    if low is not None and report["brierlm"] > 0 and high - low > WIDE_INTERVAL * report["brierlm"]:
        notes.append(
            f"the 95% interval is {high - low:.2f} wide, more than {WIDE_INTERVAL:.0%} of the BrierLM: "
            "score more documents before comparing models"
        )
    if docs < FEW_DOCUMENTS:
        notes.append(f"only {docs} document{'s' * (docs != 1)}: the interval needs at least {FEW_DOCUMENTS} to mean much")
    return notes
