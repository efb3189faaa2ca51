"""One training loop for the autoencoder, CALM and the token-level baseline.

Each model kind is an *objective* (an nn.Module whose forward gives the training loss, so
DDP can wrap it) plus an `evaluate` for held-out metrics. The loop is exactly resumable:
every random draw of step s (data offsets, masks, noise) comes from generators seeded by
(seed, s, micro-batch, rank), the LR is a function of s, and a checkpoint holds the fp32
weights, the optimizer state and s. `OUT/checkpoint/` is a model directory in our layout
(loadable by load_model / load_baseline / load_autoencoder) plus `trainer_state.pt`;
`OUT/log.jsonl` has one JSON record per log interval, evaluation and save.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import signal
import time
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn

from ..errors import CalmError, UsageError
from ..eval.brier import brier_from_samples, brier_lm
from ..io.atomic import current_file
from ..io.checkpoint import (
    TIED_AE_KEY,
    FileWriter,
    baseline_files,
    calm_files,
    load_autoencoder,
    load_baseline,
    load_model,
    load_weights,
    model_files,
    write_directory,
)
from ..models.autoencoder import Autoencoder
from ..models.baseline import TokenTransformer
from ..models.calm import CALM
from ..models.config import AutoencoderConfig, CALMConfig, config_to_dict
from ..runtime.threads import LoadWindow

KINDS = ("autoencoder", "calm", "baseline")
DISTANCE_EPS = 1e-12  # keeps the gradient of ||a - b||^beta finite when two vectors coincide


@dataclass
class TrainOptions:
    """Loop settings; the model shape lives in the config passed to `train`."""

    out: Path
    block_size: int = 1024
    batch_size: int = 8
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
    resume: bool = False
    target_samples: int = 32  # calm: posterior samples per position (the authors use 100)
    init: Path | None = None  # fresh run: start from this checkpoint's weights (see warm_start)
    device: str | None = None
    progress: bool = True
    callback: Callable[[dict[str, Any]], None] | None = None  # called with each log record (rank 0)


# ---------------------------------------------------------------------------------------
# Losses and objectives
# ---------------------------------------------------------------------------------------


def _powered_distance(sq: torch.Tensor, beta: float) -> torch.Tensor:
    return sq.clamp_min(DISTANCE_EPS).pow(beta / 2)


def energy_loss(pred: torch.Tensor, target: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Energy-score loss per position: 2 E||x - y||^beta - E_{i != j}||x_i - x_j||^beta.

    pred [..., N, D] are model samples (N >= 2), target [..., M, D] samples of the truth;
    returns [...]. Minimised in expectation when the model's distribution is the truth's.
    """
    n = pred.shape[-2]
    if n < 2:
        raise ValueError("energy_loss needs at least two predictions per position")
    # fp32 even under autocast: the expansion below cancels badly in bf16.
    with torch.autocast(pred.device.type, enabled=False):
        pred, target = pred.float(), target.float()
        # ||x||^2 + ||y||^2 - 2 x.y avoids an [..., N, M, D] difference tensor.
        cross = pred.pow(2).sum(-1)[..., :, None] + target.pow(2).sum(-1)[..., None, :] - 2 * pred @ target.transpose(-1, -2)
        fit = _powered_distance(cross, beta).mean((-2, -1))
        i, j = torch.triu_indices(n, n, 1, device=pred.device)
        spread = _powered_distance((pred[..., i, :] - pred[..., j, :]).pow(2).sum(-1), beta).mean(-1)
    return 2 * fit - spread


def _randn_like(x: torch.Tensor, generator: torch.Generator, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    return torch.randn(shape or x.shape, generator=generator, device=x.device, dtype=x.dtype)


class AutoencoderObjective(nn.Module):
    """The robust VAE loss: masked inputs, posterior sample, latent dropout, clamped KL."""

    def __init__(self, model: Autoencoder) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        c = self.model.config
        p = c.ae_dropout
        keep = torch.rand(ids.shape, generator=gen, device=ids.device) >= p
        mean, log_std = self.model.encode(torch.where(keep, ids, torch.zeros_like(ids)))
        z = mean + log_std.exp() * _randn_like(mean, gen)
        if p > 0:
            z = z * (torch.rand(z.shape, generator=gen, device=z.device) >= p).to(z.dtype) / (1 - p)
        logits = self.model.decode(z).float()
        ce = F.cross_entropy(logits.flatten(0, 1), ids.flatten())
        mean, log_std = mean.float(), log_std.float()
        kl = (0.5 * (mean.pow(2) + (2 * log_std).exp() - 1 - 2 * log_std)).clamp_min(c.kl_clamp).sum(-1).mean()
        loss = ce * c.patch_size + c.kl_weight * kl
        return loss, {"ce": ce.detach(), "kl": kl.detach(), "acc": (logits.argmax(-1) == ids).float().mean()}

    @torch.no_grad()
    def evaluate(self, ids: torch.Tensor, gen: torch.Generator) -> dict[str, float]:
        """Reconstruction from the posterior mean, the latent CALM is trained to predict."""
        mean, _ = self.model.encode(ids)
        logits = self.model.decode(mean).float()
        ce = F.cross_entropy(logits.flatten(0, 1), ids.flatten())
        return {"ce": ce.item(), "acc": (logits.argmax(-1) == ids).float().mean().item()}

    def trainable(self) -> nn.Module:
        return self.model

    def files(self) -> dict[str, FileWriter]:
        """The autoencoder's checkpoint files (its tied head is not stored twice)."""
        config = config_to_dict(self.model.config)
        config["architectures"] = ["Autoencoder"]
        state = {k: v.contiguous().cpu() for k, v in self.model.state_dict().items() if k != TIED_AE_KEY}
        return model_files(config, state, getattr(self.model, "tokenizer", None))


class CALMObjective(nn.Module):
    """Energy score between head samples and the frozen autoencoder's posterior of the next chunk."""

    def __init__(self, model: CALM, target_samples: int) -> None:
        super().__init__()
        self.model = model
        self.target_samples = target_samples
        model.ae_model.requires_grad_(False)

    def _hidden(self, ids: torch.Tensor) -> torch.Tensor:
        """Position t (having read chunks 0..t) predicts chunk t + 1: drop the last position."""
        return self.model.backbone_hidden(ids)[:, :-1]

    def _loss(self, ids: torch.Tensor, hidden: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
        with torch.no_grad():
            mean, log_std = (t[:, 1:].float() for t in self.model.ae_model.encode(ids))
        pred = self.model.generative_head.sample(hidden, self.model.config.num_samples, gen)
        shape = (*mean.shape[:-1], self.target_samples, mean.shape[-1])
        target = mean.unsqueeze(-2) + log_std.exp().unsqueeze(-2) * _randn_like(mean, gen, shape)
        return energy_loss(pred, target, self.model.config.beta).mean()

    def forward(self, ids: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self._loss(ids, self._hidden(ids), gen), {}

    @torch.no_grad()
    def evaluate(self, ids: torch.Tensor, gen: torch.Generator) -> dict[str, float]:
        """Energy loss, and BrierLM from two head samples per position decoded by the autoencoder."""
        hidden = self._hidden(ids)
        result = {"energy": self._loss(ids, hidden, gen).item()}
        chunks = self.model.ae_model.decode_tokens(self.model.generative_head.sample(hidden, 2, gen))
        truth = ids.reshape(ids.shape[0], -1, self.model.patch_size)[:, 1:]
        scores = brier_from_samples(chunks[..., 0, :], chunks[..., 1, :], truth)
        result.update({k: v for k, v in scores.items() if k.startswith("brier") and k != "brierlm"})
        return result

    def trainable(self) -> nn.Module:
        return nn.ModuleList([self.model.transformer, self.model.embed_proj, self.model.generative_head])

    def files(self) -> dict[str, FileWriter]:
        return calm_files(self.model)


class BaselineObjective(nn.Module):
    """Next-token cross-entropy."""

    def __init__(self, model: TokenTransformer) -> None:
        super().__init__()
        self.model = model

    def forward(self, ids: torch.Tensor, gen: torch.Generator) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        logits = self.model(ids[:, :-1]).float()
        loss = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        return loss, {}

    @torch.no_grad()
    def evaluate(self, ids: torch.Tensor, gen: torch.Generator) -> dict[str, float]:
        logits = self.model(ids[:, :-1]).float()
        ce = F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten())
        return {"ce": ce.item(), "acc": (logits.argmax(-1) == ids[:, 1:]).float().mean().item()}

    def trainable(self) -> nn.Module:
        return self.model

    def files(self) -> dict[str, FileWriter]:
        return baseline_files(self.model)


# ---------------------------------------------------------------------------------------
# Building, initialising and loading models
# ---------------------------------------------------------------------------------------


def init_weights(module: nn.Module) -> None:
    """normal(0, 0.02) for linear and embedding weights, zero biases (norms keep their ones/zeros)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)


def build_model(kind: str, config: AutoencoderConfig | CALMConfig, autoencoder: Autoencoder | None = None) -> nn.Module:
    """A freshly initialised model (seed torch first for reproducibility)."""
    if kind == "autoencoder":
        model: nn.Module = Autoencoder(config)
        init_weights(model)
    elif kind == "baseline":
        model = TokenTransformer(config)
        init_weights(model)
    else:
        if autoencoder is None:
            raise UsageError("training CALM needs a trained autoencoder (--ae DIR)")
        ae_config = autoencoder.config
        if (config.patch_size, config.latent_size, config.vocab_size) != (ae_config.patch_size, ae_config.latent_size, ae_config.vocab_size):
            raise UsageError("the CALM config's patch_size, latent_size and vocab_size must match the autoencoder's")
        model = CALM(config, autoencoder.float().eval())
        for part in (model.transformer, model.embed_proj, model.generative_head):
            init_weights(part)
        # The head starts by predicting zeros, as the authors initialise it.
        final = model.generative_head.final_layer.linears[-1]
        nn.init.zeros_(final.weight)
        nn.init.zeros_(final.bias)
    return model


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
    """A 63-bit seed from any tuple, so (seed, step, micro, rank) streams never overlap."""
    digest = hashlib.blake2b(":".join(map(str, parts)).encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def _generator(device: torch.device, *parts: Any) -> torch.Generator:
    return torch.Generator(device=device).manual_seed(_seed(*parts))


def sample_blocks(tokens: torch.Tensor, batch: int, block: int, gen: torch.Generator) -> torch.Tensor:
    """`batch` random contiguous blocks [batch, block] (int64) of a 1-D token array."""
    offsets = torch.randint(0, len(tokens) - block + 1, (batch,), generator=gen)
    return torch.stack([tokens[o : o + block].long() for o in offsets.tolist()])


def heldout_blocks(tokens: torch.Tensor, count: int, block: int) -> torch.Tensor:
    """`count` evenly spaced blocks: the same held-out text at every evaluation."""
    offsets = torch.linspace(0, len(tokens) - block, count).long()
    return torch.stack([tokens[o : o + block].long() for o in offsets.tolist()])


@dataclass
class _Dist:
    rank: int = 0
    world: int = 1

    @property
    def main(self) -> bool:
        return self.rank == 0


def _setup_device(options: TrainOptions) -> tuple[_Dist, torch.device]:
    """One process per device under torchrun (WORLD_SIZE > 1); otherwise a plain single process."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() and options.device != "cpu"
    if world == 1:
        return _Dist(), torch.device(options.device or ("cuda" if cuda else "cpu"))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = torch.device("cpu")
    if cuda:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    return _Dist(dist.get_rank(), world), device


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


def _save(out: Path, objective: nn.Module, state: dict[str, Any]) -> Path:
    """Replace the model files and the trainer state in OUT/checkpoint as one change, keeping other files there."""
    directory = out / "checkpoint"
    files = objective.files()
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
    rank, device = _setup_device(options)
    try:
        return _run(kind, options, out, existing, rank, device, train_tokens, heldout_tokens, config, autoencoder, tokenizer)
    except torch.cuda.OutOfMemoryError:
        raise CalmError("out of device memory: lower --batch-size (and raise --grad-accum)") from None
    finally:
        if rank.world > 1:
            dist.destroy_process_group()


def _run(
    kind: str, options: TrainOptions, out: Path, existing: Path | None, rank: _Dist, device: torch.device,
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
    trainer = _Trainer(kind, _objective(kind, model.to(device), options), options, out, rank, device, state)
    heldout = None
    if heldout_tokens is not None and len(heldout_tokens) >= options.block_size:
        heldout = heldout_blocks(heldout_tokens, options.eval_batches * options.batch_size, options.block_size)
    return trainer.run(train_tokens, heldout)


class _Trainer:
    """One run's objective, optimizer and counters, and the files it writes (rank 0 only)."""

    def __init__(self, kind: str, objective: nn.Module, options: TrainOptions, out: Path, rank: _Dist,
                 device: torch.device, state: dict[str, Any] | None) -> None:
        self.kind, self.objective, self.options, self.out, self.rank, self.device = kind, objective, options, out, rank, device
        self.optimizer = _optimizer(objective.trainable(), options)
        self.params = list(objective.trainable().parameters())
        self.seed, self.step, self.tokens, self.elapsed_before = options.seed, 0, 0, 0.0
        if state is not None:
            self.optimizer.load_state_dict(state["optimizer"])
            self.seed, self.step, self.tokens = int(state["seed"]), int(state["step"]), int(state["tokens"])
            self.elapsed_before = float(state["elapsed_s"])
            torch.set_rng_state(state["rng"])
        self.wrapped: nn.Module = objective
        if rank.world > 1:
            self.wrapped = nn.parallel.DistributedDataParallel(objective, device_ids=[device] if device.type == "cuda" else None)
        self.log_path = out / "log.jsonl"
        if rank.main:
            out.mkdir(parents=True, exist_ok=True)
            if state is not None:
                _trim_log(self.log_path, self.step)
        self.started = time.monotonic()

    def autocast(self) -> contextlib.AbstractContextManager:
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.options.bf16)

    def log(self, record: dict[str, Any]) -> None:
        if self.rank.main:
            with open(self.log_path, "a", encoding="utf-8") as fh:
                fh.write(json.dumps(record) + "\n")
            if self.options.callback is not None:
                self.options.callback(record)

    def evaluate(self, heldout: torch.Tensor | None) -> dict[str, float]:
        """Mean held-out metrics, with the same noise at every evaluation so they compare over time."""
        if heldout is None or not self.rank.main:
            return {}
        gen = _generator(self.device, self.seed, "eval")
        batches = heldout.split(self.options.batch_size)
        means: dict[str, float] = {}
        for ids in batches:
            with self.autocast():
                for key, value in self.objective.evaluate(ids.to(self.device), gen).items():
                    means[key] = means.get(key, 0.0) + value / len(batches)
        if all(f"brier{n}" in means for n in range(1, 5)):
            means["brierlm"] = brier_lm([means[f"brier{n}"] for n in range(1, 5)])
        self.log({"event": "eval", "step": self.step, **means})
        return means

    def save(self) -> Path | None:
        if not self.rank.main:
            return None
        state = {
            "kind": self.kind, "step": self.step, "tokens": self.tokens, "seed": self.seed,
            "elapsed_s": self.elapsed_before + time.monotonic() - self.started,
            "optimizer": self.optimizer.state_dict(), "rng": torch.get_rng_state(),
            "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(self.options).items() if k != "callback"},
        }
        path = _save(self.out, self.objective, state)
        self.log({"event": "save", "step": self.step, "path": str(path)})
        return path

    def train_step(self, tokens: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
        """One optimizer step over grad_accum micro-batches: (mean loss and extra metrics, grad norm)."""
        o, accum = self.options, self.options.grad_accum
        for group in self.optimizer.param_groups:
            group["lr"] = learning_rate(self.step + 1, o)
        self.optimizer.zero_grad(set_to_none=True)
        sums: dict[str, torch.Tensor] = {}
        for micro in range(accum):
            gen = _generator(torch.device("cpu"), self.seed, self.step, micro, self.rank.rank)
            ids = sample_blocks(tokens, o.batch_size, o.block_size, gen).to(self.device)
            if self.device.type != "cpu":
                gen = _generator(self.device, self.seed, self.step, micro, self.rank.rank, "noise")
            last = micro == accum - 1
            with contextlib.nullcontext() if self.rank.world == 1 or last else self.wrapped.no_sync():
                with self.autocast():
                    loss, extra = self.wrapped(ids, gen)
                (loss / accum).backward()
            for key, value in {"loss": loss, **extra}.items():
                sums[key] = sums.get(key, 0.0) + value.detach().float() / accum
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, o.grad_clip)
        self.optimizer.step()
        self.step += 1
        self.tokens += o.batch_size * accum * o.block_size * self.rank.world
        return sums, grad_norm

    def should_stop(self, interrupted: bool, step_time: float) -> bool:
        """Out of time (one more step would overrun) or Ctrl-C, on any rank."""
        over = self.options.max_minutes is not None and time.monotonic() - self.started + step_time > self.options.max_minutes * 60
        flags = torch.tensor([float(over), float(interrupted)], device=self.device)
        if self.rank.world > 1:
            dist.all_reduce(flags, op=dist.ReduceOp.MAX)
        return bool(flags.any())

    def log_window(self, sums: dict[str, torch.Tensor], steps: int, seconds: float, grad_norm: torch.Tensor) -> dict[str, Any]:
        stats = torch.stack(list(sums.values())) / steps
        if self.rank.world > 1:
            dist.all_reduce(stats)
            stats /= self.rank.world
        record = {
            "event": "train", "step": self.step, **dict(zip(sums, stats.tolist())),
            "lr": self.optimizer.param_groups[0]["lr"], "grad_norm": float(grad_norm), "tokens": self.tokens,
            "tokens_per_s": self.options.batch_size * self.options.grad_accum * self.options.block_size * self.rank.world * steps / seconds,
            "elapsed_s": time.monotonic() - self.started,
        }
        self.log(record)
        return record

    def run(self, tokens: torch.Tensor, heldout: torch.Tensor | None) -> dict[str, Any]:
        o = self.options
        progress = _Progress(o.progress and self.rank.main, o, self.kind, self.step)
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
