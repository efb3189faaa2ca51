"""One training loop for the autoencoder, CALM and the token-level baseline.

The model kinds are objectives (objectives.py); torchrun, DDP and FSDP2 live in
distributed.py. The loop is exactly resumable: every random draw of step s comes from
generators seeded by (seed, s, micro-batch) for the data and (seed, s, micro-batch, rank)
for noise, the LR is a function of s, and a checkpoint holds the fp32 weights, the
optimizer state and s. `OUT/checkpoint/` is a model directory in our layout (loadable by
load_model / load_baseline / load_autoencoder) plus `trainer_state.pt`; `OUT/log.jsonl` has
one JSON record per log interval, evaluation and save.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from tokenizers import Tokenizer
from torch import nn

from ..errors import CalmError, UsageError
from ..eval.brier import brier_lm
from ..io.atomic import current_file
from ..io.checkpoint import load_autoencoder, load_baseline, load_model, load_weights, write_directory
from ..models.autoencoder import Autoencoder
from ..models.config import AutoencoderConfig, CALMConfig
from ..runtime.threads import LoadWindow
from . import distributed
from .distributed import Ranks
from .objectives import AutoencoderObjective, BaselineObjective, CALMObjective, build_model

KINDS = ("autoencoder", "calm", "baseline")


@dataclass
class TrainOptions:
    """Loop settings; the model shape lives in the config passed to `train`."""

    out: Path
    block_size: int = 1024
    batch_size: int = 8  # global: blocks per micro-batch summed over all processes
    grad_accum: int = 1
    lr: float = 3e-4
    warmup_steps: int = 100
    schedule: str = "constant"  # or "cosine" (down to min_lr_ratio * lr at max_steps)
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    grad_clip: float = 1.0
    max_steps: int | None = None
    max_minutes: float | None = None  # per invocation; stops cleanly and saves
    stop_at: int | None = None  # per invocation: end at this step; the schedule still runs to max_steps
    save_every_min: float = 10.0
    save_every_steps: int | None = None
    eval_every: int = 500  # 0: only at the end
    eval_batches: int = 4
    log_every: int = 10
    seed: int = 0  # on --resume the checkpoint's seed is used
    threads: int | None = None  # None: the cores other processes leave idle now, as for generate (runtime/threads.py)
    bf16: bool = False
    shard: bool = False  # under torchrun: FSDP2 instead of DDP
    resume: bool = False
    target_samples: int = 32  # calm: posterior samples per position (the authors use 100)
    init: Path | None = None  # fresh run: start from this checkpoint's weights (see warm_start)
    device: str | None = None
    progress: bool = True
    callback: Callable[[dict[str, Any]], None] | None = None  # called with each log record (rank 0)


# ---------------------------------------------------------------------------------------
# Loading models, optimizer, schedule
# ---------------------------------------------------------------------------------------


def warm_start(kind: str, model: nn.Module, directory: Path) -> None:
    """Copy the weights of a saved model of the same kind into a fresh one.

    Every trainable part must match in shape, with two exceptions that let a CALM backbone
    move to a new autoencoder: `embed_proj` (it reads K token embeddings) stays fresh when
    the patch size differs, and the generative head (it writes latents) stays fresh when
    the latent size differs. The frozen autoencoder is never copied.
    """
    source = _load_checkpoint_model(kind, Path(directory))
    parts = ["transformer", "embed_proj", "generative_head"] if kind == "calm" else [""]
    depends_on = {"embed_proj": "patch_size", "generative_head": "latent_size"}
    for name in parts:
        mine, theirs = (m.get_submodule(name) if name else m for m in (model, source))
        field = depends_on.get(name)
        if field and getattr(source.config, field) != getattr(model.config, field):
            continue
        load_weights(mine, theirs.state_dict(), f"{directory} ({name or kind})")


def _objective(kind: str, model: nn.Module, options: TrainOptions) -> nn.Module:
    if kind == "autoencoder":
        return AutoencoderObjective(model)
    if kind == "calm":
        return CALMObjective(model, options.target_samples)
    return BaselineObjective(model)


def _load_checkpoint_model(kind: str, directory: Path) -> nn.Module:
    loaders = {"autoencoder": load_autoencoder, "calm": load_model, "baseline": load_baseline}
    return loaders[kind](directory).float()


def _optimizer(module: nn.Module, options: TrainOptions) -> torch.optim.AdamW:
    """AdamW; matrices decay, norms, biases and embeddings (incl. the AE's tied output) do not."""
    module.requires_grad_(True)
    embeddings = {id(m.weight) for m in module.modules() if isinstance(m, nn.Embedding)}
    decay, plain = [], []
    for p in module.parameters():
        (decay if p.ndim >= 2 and id(p) not in embeddings else plain).append(p)
    groups = [{"params": decay, "weight_decay": options.weight_decay}, {"params": plain, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=options.lr, betas=(0.9, 0.95), eps=1e-8)


def learning_rate(step: int, options: TrainOptions) -> float:
    """LR of optimizer step `step` (1-based): linear warm-up, then constant or cosine."""
    if step <= options.warmup_steps:
        return options.lr * step / max(1, options.warmup_steps)
    if options.schedule == "constant" or not options.max_steps:
        return options.lr
    frac = min(1.0, (step - options.warmup_steps) / max(1, options.max_steps - options.warmup_steps))
    return options.lr * (options.min_lr_ratio + (1 - options.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * frac)))


# ---------------------------------------------------------------------------------------
# Data, randomness, distribution
# ---------------------------------------------------------------------------------------


def _seed(*parts: Any) -> int:
    """A 63-bit seed from any tuple, so (seed, step, micro[, rank]) streams never overlap."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _generator(device: torch.device, *parts: Any) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(_seed(*parts))


def sample_blocks(tokens: torch.Tensor, batch: int, block: int, gen: torch.Generator, rows: slice = slice(None)) -> torch.Tensor:
    """Rows `rows` of `batch` random contiguous blocks [batch, block] (int64) of a 1-D token array.

    The offsets of the whole (global) batch are drawn, so a rank's rows do not depend on how many ranks share it.
    """
    offsets = torch.randint(0, len(tokens) - block + 1, (batch,), generator=gen)[rows]
    return torch.stack([tokens[o : o + block].long() for o in offsets.tolist()])


def heldout_blocks(tokens: torch.Tensor, count: int, block: int) -> torch.Tensor:
    """`count` evenly spaced blocks: the same held-out text at every evaluation."""
    offsets = torch.linspace(0, len(tokens) - block, count).long()
    return torch.stack([tokens[o : o + block].long() for o in offsets.tolist()])


@contextlib.contextmanager
def _stop_on_sigint() -> Iterator[list[bool]]:
    """First Ctrl-C asks the loop to save and stop after the current step; a second one kills."""
    flag = [False]

    def handler(signum: int, frame: Any) -> None:
        flag[0] = True
        signal.signal(signal.SIGINT, previous)

    try:
        previous = signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread: leave signals alone
        yield flag
        return
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


# ---------------------------------------------------------------------------------------
# Checkpoints and logs
# ---------------------------------------------------------------------------------------

STATE_FILE = "trainer_state.pt"


def checkpoint_dir(out: Path) -> Path | None:
    """OUT/checkpoint when it holds a complete checkpoint (a save killed midway leaves the previous one)."""
    directory = out / "checkpoint"
    return directory if current_file(directory, STATE_FILE).exists() else None


def saved_options(out: Path) -> dict[str, Any]:
    """The loop options stored with OUT's newest checkpoint ({} when there is none)."""
    directory = checkpoint_dir(Path(out).expanduser())
    if directory is None:
        return {}
    return dict(_load_state(directory).get("options", {}))


def _load_state(directory: Path) -> dict[str, Any]:
    return torch.load(current_file(directory, STATE_FILE), map_location="cpu", weights_only=True)


def _save(out: Path, objective: nn.Module, state: dict[str, Any], weights: dict[str, torch.Tensor] | None = None) -> Path:
    """Replace the model files and the trainer state in OUT/checkpoint as one change, keeping other files there.

    `weights`: the full weights a sharded run gathered (else the objective's own).
    """
    directory = out / "checkpoint"
    files = objective.files(weights)
    files[STATE_FILE] = lambda path: torch.save(state, path)
    write_directory(directory, files, force=True)
    return directory


def _trim_log(path: Path, step: int) -> None:
    """On resume, drop records past the checkpoint: those steps are about to be redone."""
    if not path.exists():
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and json.loads(line).get("step", 0) <= step]
    path.write_text("".join(line + "\n" for line in kept))


class _Progress:
    """A rich progress bar on stderr (steps when --max-steps is set, else minutes)."""

    def __init__(self, enabled: bool, options: TrainOptions, kind: str, start: int) -> None:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.by_steps = options.max_steps is not None
        total = options.max_steps if self.by_steps else (options.max_minutes * 60 if options.max_minutes else None)
        self.bar = Progress(
            TextColumn(f"[bold]{kind}[/]"), BarColumn(), TextColumn("step {task.fields[step]}"),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[tps]} tok/s"),
            TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
            console=Console(stderr=True), disable=not enabled,
        )
        self.task = self.bar.add_task(kind, total=total, completed=start if self.by_steps else 0, step=start, loss="-", tps="-")
        self.bar.start()

    def update(self, step: int, elapsed: float, loss: float | None = None, tps: float | None = None) -> None:
        fields: dict[str, Any] = {"step": step}
        if loss is not None:
            fields.update(loss=f"{loss:.4f}", tps=f"{tps:,.0f}")
        self.bar.update(self.task, completed=step if self.by_steps else elapsed, **fields)

    def close(self) -> None:
        self.bar.stop()


# ---------------------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------------------


def _check_block(kind: str, model: nn.Module, options: TrainOptions, tokens: torch.Tensor) -> None:
    k = model.config.patch_size
    if options.block_size % k:
        raise UsageError(f"--block-size {options.block_size} must be a multiple of the patch size {k}")
    if options.block_size < 2 * k:
        raise UsageError(f"--block-size must be at least {2 * k} tokens (two chunks)")
    if len(tokens) < options.block_size:
        raise UsageError(f"the training data has {len(tokens)} tokens, fewer than --block-size {options.block_size}")
    if kind == "calm" and options.target_samples < 1:
        raise UsageError("--target-samples must be at least 1")
    if options.schedule not in ("constant", "cosine"):
        raise UsageError(f"--schedule must be constant or cosine, not {options.schedule!r}")
    if options.schedule == "cosine" and not options.max_steps:
        raise UsageError("the cosine schedule needs --max-steps")
    if options.max_steps is None and options.max_minutes is None:
        raise UsageError("set --max-steps or --max-minutes")


def resume_point(options: TrainOptions) -> Path | None:
    """OUT's checkpoint on --resume, None for a fresh run; a usage error when OUT and --resume disagree.

    Its own function so the command line can check before it says anything else on stderr.
    """
    out = Path(options.out).expanduser()
    existing = checkpoint_dir(out)
    if options.resume and existing is None:
        raise UsageError(f"{out}: no checkpoint to resume from")
    if not options.resume and existing is not None:
        raise UsageError(f"{out} already holds a checkpoint: pass --resume or choose another --out")
    return existing


def train(
    kind: str,
    options: TrainOptions,
    train_tokens: torch.Tensor,
    heldout_tokens: torch.Tensor | None = None,
    *,
    config: AutoencoderConfig | CALMConfig | None = None,
    autoencoder: Autoencoder | None = None,
    tokenizer: Tokenizer | None = None,
) -> dict[str, Any]:
    """Train a fresh model of `kind` from `config` (calm also needs `autoencoder`), or resume.

    Returns the final step, loss, held-out metrics and checkpoint path.
    """
    if kind not in KINDS:
        raise UsageError(f"unknown model kind {kind!r} (one of {', '.join(KINDS)})")
    out = Path(options.out).expanduser()
    existing = resume_point(options)
    torch.set_num_threads(options.threads or LoadWindow().close(torch.get_num_threads()).count)
    ranks, device = distributed.setup(options.device)
    finished = False
    try:
        result = _run(kind, options, out, existing, ranks, device, train_tokens, heldout_tokens, config, autoencoder, tokenizer)
        finished = True
        return result
    except torch.cuda.OutOfMemoryError:
        raise CalmError("out of device memory: lower --batch-size (and raise --grad-accum), or share the model out with --shard under torchrun") from None
    finally:
        distributed.teardown(ranks, finished)


def _run(
    kind: str, options: TrainOptions, out: Path, existing: Path | None, ranks: Ranks, device: torch.device,
    train_tokens: torch.Tensor, heldout_tokens: torch.Tensor | None, config: AutoencoderConfig | CALMConfig | None,
    autoencoder: Autoencoder | None, tokenizer: Tokenizer | None,
) -> dict[str, Any]:
    state: dict[str, Any] | None = None
    if existing is not None:
        model = _load_checkpoint_model(kind, existing)
        state = _load_state(existing)
    else:
        if config is None:
            raise UsageError("a fresh run needs a model config")
        torch.manual_seed(options.seed)
        model = build_model(kind, config, autoencoder)
        if options.init is not None:
            warm_start(kind, model, options.init)
    if tokenizer is not None:
        model.tokenizer = tokenizer
    _check_block(kind, model, options, train_tokens)
    rows = distributed.local_rows(options.batch_size, ranks)
    trainer = _Trainer(kind, _objective(kind, model.to(device), options), options, out, ranks, device, state, rows)
    heldout = None
    if heldout_tokens is not None and len(heldout_tokens) >= options.block_size:
        heldout = heldout_blocks(heldout_tokens, options.eval_batches * options.batch_size, options.block_size)
    return trainer.run(train_tokens, heldout)


class _Trainer:
    """One run's objective, optimizer and counters, and the files it writes (rank 0 only)."""

    def __init__(self, kind: str, objective: nn.Module, options: TrainOptions, out: Path, ranks: Ranks,
                 device: torch.device, state: dict[str, Any] | None, rows: slice) -> None:
        self.kind, self.objective, self.options, self.out, self.ranks, self.device = kind, objective, options, out, ranks, device
        self.rows, self.local_batch = rows, rows.stop - rows.start
        # Wrapped before the optimizer exists: FSDP2 swaps the parameters for sharded ones.
        self.wrapped = distributed.wrap(objective, ranks, device, options.shard, options.bf16)
        self.optimizer = _optimizer(objective.trainable(), options)
        self.params = list(objective.trainable().parameters())
        self.seed, self.step, self.tokens, self.elapsed_before = options.seed, 0, 0, 0.0
        if state is not None:
            distributed.load_optimizer_state(objective, self.optimizer, state["optimizer"])
            self.seed, self.step, self.tokens = int(state["seed"]), int(state["step"]), int(state["tokens"])
            self.elapsed_before = float(state["elapsed_s"])
            torch.set_rng_state(state["rng"])
        self.log_path = out / "log.jsonl"
        if ranks.main:
            out.mkdir(parents=True, exist_ok=True)
            if state is not None:
                _trim_log(self.log_path, self.step)
        self.started = time.monotonic()

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.options.bf16)

    def log(self, record: dict[str, Any]) -> None:
        if self.ranks.main:
            with open(self.log_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
            if self.options.callback is not None:
                self.options.callback(record)

    def evaluate(self, heldout: torch.Tensor | None) -> dict[str, float]:
        """Mean held-out metrics, with the same noise at every evaluation so they compare over time.

        Rank 0 evaluates alone, except that every rank joins in when the weights are sharded.
        """
        sharded = distributed.sharded(self.objective)
        if heldout is None or not (self.ranks.main or sharded):
            return {}
        gen = _generator(self.device, self.seed, "eval")
        batches = heldout.split(self.local_batch)
        means: dict[str, float] = {}
        with distributed.gathered(self.objective):
            for ids in batches:
                with self.autocast():
                    for key, value in self.objective.evaluate(ids.to(self.device), gen).items():
                        means[key] = means.get(key, 0.0) + value / len(batches)
        if all(f"brier{n}" in means for n in range(1, 5)):
            means["brierlm"] = brier_lm([means[f"brier{n}"] for n in range(1, 5)])
        self.log({"event": "eval", "step": self.step, **means})
        return means if self.ranks.main else {}

    def save(self) -> Path | None:
        """Every rank takes part (gathering sharded weights and optimizer state); rank 0 writes."""
        weights = distributed.full_model_state(self.objective)
        optimizer = distributed.optimizer_state(self.objective, self.optimizer)
        if not self.ranks.main:
            return None
        state = {
            "kind": self.kind, "step": self.step, "tokens": self.tokens, "seed": self.seed,
            "elapsed_s": self.elapsed_before + time.monotonic() - self.started,
            "optimizer": optimizer, "rng": torch.get_rng_state(),
            "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.options).items() if k != "callback"},
        }
        path = _save(self.out, self.objective, state, weights)
        self.log({"event": "save", "step": self.step, "path": str(path)})
        return path

    def train_step(self, tokens: torch.Tensor) -> tuple[dict[str, torch.Tensor], float]:
        """One optimizer step over grad_accum micro-batches: (mean loss and extra metrics, grad norm).

        The blocks come from a generator without the rank (see distributed.py); noise is drawn per rank.
        """
        o, accum = self.options, self.options.grad_accum
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.step + 1, o)
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = {}
        for micro in range(accum):
            ids = sample_blocks(tokens, o.batch_size, o.block_size, _generator(torch.device("cpu"), self.seed, self.step, micro), self.rows)
            gen = _generator(self.device, self.seed, self.step, micro, self.ranks.rank, "noise")
            with distributed.gradients_held(self.wrapped, self.ranks.world > 1 and micro < accum - 1):
                with self.autocast():
                    loss, extra = self.wrapped(ids.to(self.device), gen)
                (loss / accum).backward()
            for key, value in {"loss": loss, **extra}.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float() / accum
        grad_norm = distributed.full_norm(torch.nn.utils.clip_grad_norm_(self.params, o.grad_clip))
        self.optimizer.step()
        self.step += 1
        self.tokens += o.batch_size * accum * o.block_size
        return sums, grad_norm

    def should_stop(self, interrupted: bool, step_time: float) -> bool:
        """Out of time (one more step would overrun) or Ctrl-C, on any rank."""
        over = self.options.max_minutes is not None and time.monotonic() - self.started + step_time > self.options.max_minutes * 60
        return distributed.any_rank(torch.tensor([float(over), float(interrupted)], device=self.device), self.ranks)

    def log_window(self, sums: dict[str, torch.Tensor], steps: int, seconds: float, grad_norm: float) -> dict[str, Any]:
        stats = distributed.mean_over_ranks(torch.stack(list(sums.values())) / steps, self.ranks)
        record = {
            "event": "train", "step": self.step, **dict(zip(sums, stats.tolist())),
            "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": grad_norm, "tokens": self.tokens,
            "tokens_per_s": self.options.batch_size * self.options.grad_accum * self.options.block_size * steps / seconds,
            "elapsed_s": time.monotonic() - self.started,
        }
        self.log(record)
        return record

    def run(self, tokens: torch.Tensor, heldout: torch.Tensor | None) -> dict[str, Any]:
        o = self.options
        progress = _Progress(o.progress and self.ranks.main, o, self.kind, self.step)
        last_save, last_eval, last_loss = time.monotonic(), {}, None
        window: dict[str, torch.Tensor] = {}
        window_steps, window_time = 0, 0.0
        try:
            with _stop_on_sigint() as interrupted:
                while (o.max_steps is None or self.step < o.max_steps) and (o.stop_at is None or self.step < o.stop_at):
                    t0 = time.monotonic()
                    sums, grad_norm = self.train_step(tokens)
                    for key, value in sums.items():
                        window[key] = window.get(key, 0.0) + value
                    window_steps, window_time = window_steps + 1, window_time + time.monotonic() - t0
                    finishing = self.should_stop(interrupted[0], window_time / window_steps) or self.step in (o.max_steps, o.stop_at)
                    elapsed = time.monotonic() - self.started
                    if self.step % o.log_every == 0 or finishing:
                        record = self.log_window(window, window_steps, window_time, grad_norm)
                        last_loss = record["loss"]
                        progress.update(self.step, elapsed, last_loss, record["tokens_per_s"])
                        window, window_steps, window_time = {}, 0, 0.0
                    else:
                        progress.update(self.step, elapsed)
                    if finishing:
                        break
                    if o.eval_every and self.step % o.eval_every == 0:
                        last_eval = self.evaluate(heldout)
                    if (o.save_every_steps and self.step % o.save_every_steps == 0) or time.monotonic() - last_save >= o.save_every_min * 60:
                        self.save()
                        last_save = time.monotonic()
        finally:
            progress.close()
        last_eval = self.evaluate(heldout) or last_eval
        path = self.save()
        return {"step": self.step, "loss": last_loss, "tokens": self.tokens, "eval": last_eval, "checkpoint": str(path) if path else None}
