"""`calm train autoencoder|calm|baseline`: the Typer commands over `calm_cli.train.train`.

DATA is a prepared directory (train.bin, heldout.bin, manifest.json). Shape flags only
matter for a fresh run; `--resume` takes the model from OUT/checkpoint.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import typer

from ..errors import CalmError, UsageError
from ..models.config import AutoencoderConfig, CALMConfig, read_json
from .common import err, seed_option, set_threads
from .typer_setup import examples, new_typer

if TYPE_CHECKING:
    import torch

train_app = new_typer(no_args_is_help=True, help="Train an autoencoder, a CALM model or a token-level baseline.")

Data = typer.Argument(..., help="Prepared data directory with train.bin, heldout.bin and manifest.json.")
Out = typer.Option(..., "--out", "-o", help="Output directory: OUT/checkpoint (model + trainer state) and OUT/log.jsonl.")
Tok = typer.Option(None, "--tokenizer", help="tokenizer.json (default: DATA/tokenizer.json when present).")
BatchSize = typer.Option(8, "--batch-size", help="Blocks per micro-batch in all (the global batch; under torchrun each process takes an equal share).")
Accum = typer.Option(1, "--grad-accum", help="Micro-batches per optimizer step.")
Lr = typer.Option(3e-4, "--lr", help="Peak learning rate (AdamW, betas 0.9/0.95).")
Warmup = typer.Option(100, "--warmup", help="Linear warm-up steps.")
Schedule = typer.Option("constant", "--schedule", help="After warm-up: constant (the authors') or cosine (to --min-lr-ratio at --max-steps).")
MinLr = typer.Option(0.1, "--min-lr-ratio", help="Cosine floor as a fraction of --lr.")
Wd = typer.Option(0.1, "--weight-decay", help="On weight matrices only (not norms, biases, embeddings).")
MaxSteps = typer.Option(None, "--max-steps", help="Stop after this many optimizer steps in total.")
StopAt = typer.Option(None, "--stop-at", help="End this invocation (and save) at this step; the schedule still runs to --max-steps, so --resume continues it. Rebuilds a time-limited run exactly.")
MaxMin = typer.Option(None, "--max-minutes", help="Stop cleanly (and save) before this many minutes of this invocation.")
SaveMin = typer.Option(10.0, "--save-every-min", help="Checkpoint every this many minutes (and at the end).")
SaveSteps = typer.Option(None, "--save-every-steps", help="Also checkpoint every this many steps.")
EvalEvery = typer.Option(500, "--eval-every", help="Held-out evaluation every this many steps (0: only at the end).")
EvalBatches = typer.Option(4, "--eval-batches", help="Held-out batches per evaluation.")
LogEvery = typer.Option(10, "--log-every", help="Steps per log.jsonl record.")
Seed = seed_option(0, "Seed of initialisation, data order and noise (a resumed run keeps its own).")
Threads = typer.Option(
    None, "--threads", metavar="N",
    help="CPU threads. Default: $CALM_THREADS, else the cores not busy as training starts (see README); --resume decides anew.",
)
Bf16 = typer.Option(False, "--bf16/--fp32", help="bf16 autocast (weights and optimizer stay fp32).")
Resume = typer.Option(False, "--resume", help="Continue from OUT/checkpoint exactly where it stopped.")
Init = typer.Option(None, "--init", help="Fresh run starting from the weights of this saved model of the same kind and shape (fresh optimizer and step count); a CALM backbone also moves to an autoencoder of another K or latent size.")
Shard = typer.Option(False, "--shard/--no-shard", help="Under torchrun: shard weights, gradients and optimizer state across the processes (FSDP2) instead of copying them (DDP).")
Device = typer.Option(None, "--device", help="cpu, cuda or cuda:N (default: CUDA when present; torchrun sets one per process).")
Progress = typer.Option(True, "--progress/--no-progress", help="Progress bar on stderr.")
Hidden = typer.Option(256, "--hidden", help="Hidden size.")
Context = typer.Option(1024, "--context", help="Longest context in tokens (max positions; CALM counts it in chunks).")
Layers = typer.Option(6, "--layers", help="Transformer layers.")
Heads = typer.Option(4, "--heads", help="Attention heads.")
KvHeads = typer.Option(None, "--kv-heads", help="Key/value heads (default: --heads).")
Intermediate = typer.Option(704, "--intermediate", help="MLP intermediate size.")


def _load_data(data: Path, tokenizer: Optional[Path]) -> tuple[torch.Tensor, torch.Tensor | None, dict[str, Any], Any]:
    """Train and held-out token arrays, the manifest and the tokenizer (None when not found)."""
    from ..io.documents import load_tokens
    from ..io.tokenizer import load_tokenizer

    if not data.is_dir():
        raise UsageError(f"{data}: no such data directory")
    if not (data / "train.bin").exists():
        raise UsageError(f"{data}: no train.bin (prepare the data first)")
    manifest = read_json(data / "manifest.json") if (data / "manifest.json").exists() else {}
    tok_path = tokenizer or (data / "tokenizer.json")
    if tokenizer is not None and not tokenizer.exists():
        raise UsageError(f"{tokenizer}: no such tokenizer file")
    tok = load_tokenizer(tok_path) if tok_path.exists() else None
    heldout = load_tokens(data / "heldout.bin") if (data / "heldout.bin").exists() else None
    return load_tokens(data / "train.bin"), heldout, manifest, tok


def _vocab(tokens: torch.Tensor, manifest: dict[str, Any], tok: Any) -> int:
    import torch

    from ..io.tokenizer import vocab_size as tokenizer_vocab_size

    size = tokenizer_vocab_size(tok) if tok is not None else manifest.get("vocab_size")
    if not size:
        raise UsageError("no tokenizer and no vocab_size in manifest.json (pass --tokenizer PATH)")
    if len(tokens) == 0:
        raise UsageError("train.bin holds no tokens")
    # uint16 token files lack max(): scan in int32 slices.
    top = max(int(tokens[i : i + (1 << 24)].to(torch.int32).max()) for i in range(0, len(tokens), 1 << 24))
    if top >= size:
        raise CalmError(f"the data holds token id {top}, outside the vocabulary of {size}")
    return int(size)


def _special_ids(manifest: dict[str, Any], tok: Any) -> dict[str, int | None]:
    """BOS/EOS as prepare_data recorded them; PAD from the tokenizer (generation pads prompts with it)."""
    from ..training.data import PAD

    return {
        "bos_token_id": manifest.get("bos_id"),
        "eos_token_id": manifest.get("eos_id"),
        "pad_token_id": tok.token_to_id(PAD) if tok is not None else None,
    }


def _is_default(ctx: typer.Context, param: str) -> bool:
    """Whether the flag was left at its default (compared by name: Typer may carry its own click)."""
    source = ctx.get_parameter_source(param)
    return source is None or source.name in ("DEFAULT", "DEFAULT_MAP")


def _resumed(ctx: typer.Context, loop: dict[str, Any]) -> dict[str, Any]:
    """On --resume, loop flags not given on this command line keep the checkpoint's values.

    Not --threads: it describes the machine and its load, not the run, so a resumed run decides anew.
    """
    from ..training.train import saved_options

    merged = dict(loop)
    for key, value in saved_options(loop["out"]).items():
        param = "warmup" if key == "warmup_steps" else key
        if key in loop and key not in ("out", "resume", "stop_at", "threads") and _is_default(ctx, param):
            merged[key] = value
    return merged


def _run(kind: str, ctx: typer.Context, data: Path, tokenizer: Optional[Path], make_config, loop: dict[str, Any], autoencoder=None) -> None:
    from ..training.distributed import launched, local_rows
    from ..training.train import TrainOptions, resume_point, train

    if loop["resume"]:
        if loop["init"] is not None:
            raise UsageError("--init starts a fresh run; --resume continues one: give one of them")
        loop = _resumed(ctx, loop)
    elif loop["init"] is not None and not Path(loop["init"]).is_dir():
        raise UsageError(f"{loop['init']}: no such model directory")

    tokens, heldout, manifest, tok = _load_data(data, tokenizer)
    config = None if loop["resume"] else make_config(_vocab(tokens, manifest, tok), _special_ids(manifest, tok))
    if kind == "calm" and autoencoder is not None and tok is None:
        tok = getattr(autoencoder, "tokenizer", None)
    resume_point(TrainOptions(**loop))  # OUT and --resume agree: the thread line below is not followed by an error
    ranks = launched()
    local_rows(loop["batch_size"], ranks)  # nor is it by a batch that the processes cannot share
    threads = set_threads(loop["threads"])
    if ranks.main:  # under torchrun only rank 0 speaks; the others stay quiet unless they fail
        err.print(f"[dim]calm train: {threads}[/dim]")
    result = train(kind, TrainOptions(**{**loop, "threads": threads.count}), tokens, heldout, config=config, autoencoder=autoencoder, tokenizer=tok)
    if not ranks.main:
        return
    metrics = " ".join(f"{k}={v:.4g}" for k, v in result["eval"].items())
    loss = f"{result['loss']:.4f}" if result["loss"] is not None else "-"
    typer.echo(f"step {result['step']} loss {loss} {metrics}".rstrip())
    typer.echo(f"saved {result['checkpoint']}")


def _loop(**kw: Any) -> dict[str, Any]:
    kw["warmup_steps"] = kw.pop("warmup")
    return kw


@train_app.command(epilog=examples("calm train autoencoder data/prepared --out runs/ae --max-steps 2000", "calm train autoencoder data/prepared --out runs/ae --resume"))
def autoencoder(
    ctx: typer.Context, data: Path = Data, out: Path = Out, tokenizer: Optional[Path] = Tok,
    hidden: int = typer.Option(256, "--hidden", help="Hidden size."),
    intermediate: int = typer.Option(512, "--intermediate", help="MLP intermediate size."),
    latent: int = typer.Option(128, "--latent", help="Latent size per chunk."),
    patch_size: int = typer.Option(4, "--patch-size", "-k", help="Tokens per chunk (K)."),
    layers: int = typer.Option(2, "--layers", help="Encoder layers (the decoder gets as many)."),
    dropout: float = typer.Option(0.15, "--dropout", help="Token masking and latent dropout probability."),
    kl_weight: float = typer.Option(1e-3, "--kl-weight", help="Weight of the clamped KL term."),
    kl_clamp: float = typer.Option(0.5, "--kl-clamp", help="Per-dimension lower clamp of the KL."),
    block_size: int = typer.Option(2048, "--block-size", help="Tokens per training block (a multiple of K)."),
    batch_size: int = typer.Option(4, "--batch-size", help="Blocks per micro-batch in all (the global batch; under torchrun each process takes an equal share)."),
    grad_accum: int = Accum, lr: float = Lr, warmup: int = Warmup, schedule: str = Schedule,
    min_lr_ratio: float = MinLr, weight_decay: float = Wd, max_steps: Optional[int] = MaxSteps,
    max_minutes: Optional[float] = MaxMin, stop_at: Optional[int] = StopAt, save_every_min: float = SaveMin, save_every_steps: Optional[int] = SaveSteps,
    eval_every: int = EvalEvery, eval_batches: int = EvalBatches, log_every: int = LogEvery, seed: int = Seed,
    threads: Optional[int] = Threads, bf16: bool = Bf16, resume: bool = Resume, init: Optional[Path] = Init,
    device: Optional[str] = Device, progress: bool = Progress, shard: bool = Shard,
) -> None:
    """Train the chunk autoencoder (the robust VAE loss of the CALM paper)."""
    if not 0 <= dropout < 1:
        raise UsageError("--dropout must be in [0, 1)")

    def make_config(vocab: int, special: dict[str, int | None]) -> AutoencoderConfig:
        return AutoencoderConfig(
            vocab_size=vocab, patch_size=patch_size, hidden_size=hidden, intermediate_size=intermediate,
            num_encoder_layers=layers, num_decoder_layers=layers, latent_size=latent, ae_dropout=dropout,
            kl_clamp=kl_clamp, kl_weight=kl_weight, **special,
        )

    loop = _loop(out=out, block_size=block_size, batch_size=batch_size, grad_accum=grad_accum, lr=lr, warmup=warmup,
                 schedule=schedule, min_lr_ratio=min_lr_ratio, weight_decay=weight_decay, max_steps=max_steps,
                 max_minutes=max_minutes, stop_at=stop_at, save_every_min=save_every_min, save_every_steps=save_every_steps,
                 eval_every=eval_every, eval_batches=eval_batches, log_every=log_every, seed=seed, threads=threads,
                 bf16=bf16, resume=resume, init=init, device=device, progress=progress, shard=shard)
    _run("autoencoder", ctx, data, tokenizer, make_config, loop)


def _backbone_config(vocab: int, special: dict[str, int | None], k: int, hidden: int, intermediate: int, layers: int,
                     heads: int, kv_heads: Optional[int], context: int, **head: Any) -> CALMConfig:
    if context % k:
        raise UsageError(f"--context {context} must be a multiple of the patch size {k}")
    return CALMConfig(
        vocab_size=vocab, patch_size=k, hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=kv_heads, max_position_embeddings=context // k, **head, **special,
    )


@train_app.command(epilog=examples("calm train calm data/prepared --ae runs/ae/checkpoint --out runs/calm", "calm train calm data/prepared --out runs/calm --resume"))
def calm(
    ctx: typer.Context, data: Path = Data, out: Path = Out, tokenizer: Optional[Path] = Tok,
    ae: Optional[Path] = typer.Option(None, "--ae", help="Trained autoencoder directory (frozen; needed for a fresh run)."),
    hidden: int = Hidden, intermediate: int = Intermediate, layers: int = Layers, heads: int = Heads,
    kv_heads: Optional[int] = KvHeads, context: int = Context,
    noise_size: int = typer.Option(64, "--noise-size", help="Uniform noise dimensions fed to the head."),
    mlp_layers: int = typer.Option(3, "--mlp-layers", help="Residual blocks in the generative head."),
    num_samples: int = typer.Option(4, "--num-samples", help="Head samples per position in the energy loss (N >= 2)."),
    beta: float = typer.Option(1.0, "--beta", help="Energy-score exponent, in (0, 2)."),
    target_samples: int = typer.Option(32, "--target-samples", help="Autoencoder posterior samples per position (the authors use 100)."),
    block_size: int = typer.Option(1024, "--block-size", help="Tokens per training block (a multiple of K)."),
    batch_size: int = BatchSize, grad_accum: int = Accum, lr: float = Lr, warmup: int = Warmup, schedule: str = Schedule,
    min_lr_ratio: float = MinLr, weight_decay: float = Wd, max_steps: Optional[int] = MaxSteps,
    max_minutes: Optional[float] = MaxMin, stop_at: Optional[int] = StopAt, save_every_min: float = SaveMin, save_every_steps: Optional[int] = SaveSteps,
    eval_every: int = EvalEvery, eval_batches: int = EvalBatches, log_every: int = LogEvery, seed: int = Seed,
    threads: Optional[int] = Threads, bf16: bool = Bf16, resume: bool = Resume, init: Optional[Path] = Init,
    device: Optional[str] = Device, progress: bool = Progress, shard: bool = Shard,
) -> None:
    """Train CALM on a frozen autoencoder with the energy-score loss."""
    from ..io.checkpoint import load_autoencoder

    if not 0 < beta < 2:
        raise UsageError("--beta must be in (0, 2)")
    if num_samples < 2:
        raise UsageError("--num-samples must be at least 2")
    autoenc = None
    if not resume:
        if ae is None:
            raise UsageError("a fresh CALM run needs --ae DIR (a trained autoencoder)")
        autoenc = load_autoencoder(ae)

    def make_config(vocab: int, special: dict[str, int | None]) -> CALMConfig:
        c = autoenc.config
        if vocab != c.vocab_size:
            raise CalmError(f"the tokenizer has {vocab} tokens but the autoencoder's vocabulary is {c.vocab_size}")
        return _backbone_config(vocab, special, c.patch_size, hidden, intermediate, layers, heads, kv_heads, context,
                                latent_size=c.latent_size, noise_size=noise_size, num_mlp_layers=mlp_layers,
                                num_samples=num_samples, beta=beta)

    loop = _loop(out=out, block_size=block_size, batch_size=batch_size, grad_accum=grad_accum, lr=lr, warmup=warmup,
                 schedule=schedule, min_lr_ratio=min_lr_ratio, weight_decay=weight_decay, max_steps=max_steps,
                 max_minutes=max_minutes, stop_at=stop_at, save_every_min=save_every_min, save_every_steps=save_every_steps,
                 eval_every=eval_every, eval_batches=eval_batches, log_every=log_every, seed=seed, threads=threads,
                 bf16=bf16, resume=resume, init=init, device=device, progress=progress, target_samples=target_samples, shard=shard)
    _run("calm", ctx, data, tokenizer, make_config, loop, autoenc)


@train_app.command(epilog=examples("calm train baseline data/prepared --out runs/baseline --max-steps 4000"))
def baseline(
    ctx: typer.Context, data: Path = Data, out: Path = Out, tokenizer: Optional[Path] = Tok,
    hidden: int = Hidden, intermediate: int = Intermediate, layers: int = Layers, heads: int = Heads,
    kv_heads: Optional[int] = KvHeads, context: int = Context,
    block_size: int = typer.Option(1024, "--block-size", help="Tokens per training block."),
    batch_size: int = BatchSize, grad_accum: int = Accum, lr: float = Lr, warmup: int = Warmup, schedule: str = Schedule,
    min_lr_ratio: float = MinLr, weight_decay: float = Wd, max_steps: Optional[int] = MaxSteps,
    max_minutes: Optional[float] = MaxMin, stop_at: Optional[int] = StopAt, save_every_min: float = SaveMin, save_every_steps: Optional[int] = SaveSteps,
    eval_every: int = EvalEvery, eval_batches: int = EvalBatches, log_every: int = LogEvery, seed: int = Seed,
    threads: Optional[int] = Threads, bf16: bool = Bf16, resume: bool = Resume, init: Optional[Path] = Init,
    device: Optional[str] = Device, progress: bool = Progress, shard: bool = Shard,
) -> None:
    """Train the token-level Transformer baseline (same backbone, next-token cross-entropy)."""

    def make_config(vocab: int, special: dict[str, int | None]) -> CALMConfig:
        return _backbone_config(vocab, special, 1, hidden, intermediate, layers, heads, kv_heads, context)

    loop = _loop(out=out, block_size=block_size, batch_size=batch_size, grad_accum=grad_accum, lr=lr, warmup=warmup,
                 schedule=schedule, min_lr_ratio=min_lr_ratio, weight_decay=weight_decay, max_steps=max_steps,
                 max_minutes=max_minutes, stop_at=stop_at, save_every_min=save_every_min, save_every_steps=save_every_steps,
                 eval_every=eval_every, eval_batches=eval_batches, log_every=log_every, seed=seed, threads=threads,
                 bf16=bf16, resume=resume, init=init, device=device, progress=progress, shard=shard)
    _run("baseline", ctx, data, tokenizer, make_config, loop)
