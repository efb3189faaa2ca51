"""Training: losses, BrierLM estimates, the shared loop, checkpoints and exact resume (tiny shapes, fp32)."""

from __future__ import annotations

import dataclasses
import json
import math
from pathlib import Path

import pytest
import torch

from calm_cli.errors import CalmError, UsageError
from calm_cli.eval.brier import brier_from_samples, brier_lm
from calm_cli.io.checkpoint import (
    is_baseline,
    load_autoencoder,
    load_baseline,
    load_model,
    save_baseline,
)
from calm_cli.models.baseline import TokenTransformer
from calm_cli.models.config import AutoencoderConfig, CALMConfig, read_json
from calm_cli.training.objectives import build_model, energy_loss
from calm_cli.training.train import TrainOptions, train

VOCAB = 48
AE_CONFIG = AutoencoderConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, latent_size=8)
CALM_CONFIG = CALMConfig(
    vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
    latent_size=8, noise_size=8, num_mlp_layers=2, num_samples=4,
)
BASE_CONFIG = CALMConfig(vocab_size=VOCAB, patch_size=1, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2)
CONFIGS = {"autoencoder": AE_CONFIG, "calm": CALM_CONFIG, "baseline": BASE_CONFIG}
LOADERS = {"autoencoder": load_autoencoder, "calm": load_model, "baseline": load_baseline}


def synthetic_tokens(n_words: int, seed: int = 0) -> torch.Tensor:
    """A 1-D token stream with structure to learn: words of 4 tokens drawn from a small lexicon."""
    gen = torch.Generator().manual_seed(seed)
    lexicon = torch.randint(3, VOCAB, (40, 4), generator=gen)
    return lexicon[torch.randint(0, len(lexicon), (n_words,), generator=gen)].flatten().to(torch.int32)


STREAM = synthetic_tokens(4300)
TOKENS, HELDOUT = STREAM[:16000], STREAM[16000:]


@pytest.fixture(scope="module")
def autoencoder():
    torch.manual_seed(0)
    return build_model("autoencoder", AE_CONFIG)


def run(kind: str, out: Path, autoencoder=None, records: list | None = None, **kw):
    options = TrainOptions(
        out=out, block_size=32, batch_size=4, warmup_steps=3, log_every=1, eval_every=0, eval_batches=2,
        threads=1, progress=False, target_samples=8, callback=records.append if records is not None else None, **kw,
    )
    return train(kind, options, TOKENS, HELDOUT, config=CONFIGS[kind], autoencoder=autoencoder)


def train_losses(out: Path) -> dict[int, float]:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return {r["step"]: r["loss"] for r in records if r["event"] == "train"}


# ---- pure functions ------------------------------------------------------------------------


def test_energy_loss_hand_computed():
    pred = torch.tensor([[0.0], [2.0]])  # N = 2 samples, D = 1
    target = torch.tensor([[1.0]])
    assert energy_loss(pred, target, 1.0).item() == pytest.approx(2 * 1 - 2)
    assert energy_loss(pred, target, 2.0).item() == pytest.approx(2 * 1 - 4)
    pred3 = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 4.0]])  # pairwise distances 5, 4, 3
    target3 = torch.zeros(1, 2)
    assert energy_loss(pred3, target3, 1.0).item() == pytest.approx(2 * (0 + 5 + 4) / 3 - (5 + 4 + 3) / 3, rel=1e-5)


def test_energy_loss_is_lowest_for_the_true_distribution():
    """Expected loss of a model Q minus that of the truth P is the energy distance D(P, Q) >= 0."""
    gen = torch.Generator().manual_seed(0)
    positions, n, m = 20000, 8, 8
    target = torch.randn(positions, m, 1, generator=gen)
    noise = torch.randn(positions, n, 1, generator=gen)
    losses = {name: energy_loss(scale * noise + shift, target).mean().item()
              for name, scale, shift in (("true", 1.0, 0.0), ("narrow", 0.5, 0.0), ("wide", 2.0, 0.0), ("shifted", 1.0, 0.5))}
    assert losses["true"] < min(losses["narrow"], losses["wide"], losses["shifted"])
    # For N(0, 1) against N(0, 0.25): D = 2 sqrt(2/pi) sqrt(1.25) - (2/sqrt(pi)) (1 + 0.5) ~ 0.091.
    expected = 2 * math.sqrt(2 / math.pi) * math.sqrt(1.25) - 2 / math.sqrt(math.pi) * 1.5
    assert losses["narrow"] - losses["true"] == pytest.approx(expected, abs=0.03)


def test_energy_loss_stays_fp32_under_autocast():
    gen = torch.Generator().manual_seed(0)
    pred, target = 30 + torch.randn(5, 4, 16, generator=gen), 30 + torch.randn(5, 32, 16, generator=gen)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        mixed = energy_loss(pred, target)
    assert mixed.dtype == torch.float32
    torch.testing.assert_close(mixed, energy_loss(pred, target))


def test_energy_loss_gradient_is_finite_for_equal_samples():
    pred = torch.zeros(3, 4, 5, requires_grad=True)
    energy_loss(pred, torch.randn(3, 6, 5)).sum().backward()
    assert torch.isfinite(pred.grad).all()


def test_brier_hand_made_cases():
    y = torch.tensor([[1, 2, 3, 4]])
    perfect = brier_from_samples(y, y, y)
    assert [perfect[f"brier{n}"] for n in range(1, 5)] == [1, 1, 1, 1] and perfect["brierlm"] == 100
    one_right = brier_from_samples(y, torch.tensor([[9, 2, 3, 4]]), y)  # 1 + 0 - 0
    assert [one_right[f"brier{n}"] for n in range(1, 5)] == [1, 1, 1, 1]
    wrong_twice = brier_from_samples(torch.tensor([[5, 5, 5, 5]]), torch.tensor([[5, 5, 5, 5]]), y)  # 0 + 0 - 1
    assert wrong_twice["brier1"] == -1 and wrong_twice["brierlm"] == 0
    # Both samples agree with the truth on two tokens, then with each other only: 1, 1, -1, -1.
    x = torch.tensor([[1, 2, 7, 7]])
    prefix = brier_from_samples(x, x, y)
    assert [prefix[f"brier{n}"] for n in range(1, 5)] == [1, 1, -1, -1]
    # Averaging over positions, and leading batch dimensions of any rank.
    mixed = brier_from_samples(torch.stack([y, x])[None], torch.stack([y, torch.tensor([[0, 0, 0, 0]])])[None], torch.stack([y, y])[None])
    assert mixed["count"] == 2 and mixed["brier1"] == pytest.approx((1 + 1) / 2) and mixed["brier3"] == pytest.approx((1 + 0) / 2)
    assert brier_lm([0.5, 0.5, 0.5, 0.5]) == pytest.approx(50)
    short = brier_from_samples(y[:, :2], y[:, :2], y[:, :2])
    assert "brierlm" not in short and short["brier2"] == 1


# ---- the baseline model ----------------------------------------------------------------------


def test_baseline_cached_steps_match_full_pass(tmp_path):
    torch.manual_seed(0)
    model = build_model("baseline", BASE_CONFIG).eval()
    ids = torch.randint(0, VOCAB, (2, 9))
    with torch.no_grad():
        full = model(ids)
        cache = model.new_cache(2, 16)
        cache.valid[:, :5] = True
        logits = [model.step(ids[:, :5], cache, 0)]
        for t in range(5, 9):
            cache.valid[:, t] = True
            logits.append(model.step(ids[:, t : t + 1], cache, t))
    torch.testing.assert_close(torch.cat(logits, 1), full, rtol=1e-4, atol=1e-5)
    save_baseline(model, tmp_path / "b")
    config = read_json(tmp_path / "b" / "config.json")
    assert is_baseline(config) and config["patch_size"] == 1
    loaded = load_baseline(tmp_path / "b")
    assert isinstance(loaded, TokenTransformer)
    torch.testing.assert_close(loaded(ids), full)


# ---- the training loop -----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["autoencoder", "calm", "baseline"])
def test_loss_falls_and_checkpoint_loads(kind, tmp_path, autoencoder):
    # The VAE starts with posterior noise swamping its small means, so it needs more steps to show.
    steps, lr, ratio = {"autoencoder": (60, 1e-2, 0.9), "calm": (40, 3e-3, 0.8), "baseline": (40, 3e-3, 0.8)}[kind]
    result = run(kind, tmp_path, autoencoder, max_steps=steps, lr=lr)
    losses = list(train_losses(tmp_path).values())
    assert len(losses) == steps
    assert sum(losses[-5:]) / 5 < ratio * sum(losses[:3]) / 3, losses
    assert result["step"] == steps and result["checkpoint"] == str(tmp_path / "checkpoint")
    expected = {"autoencoder": {"ce", "acc"}, "calm": {"energy", "brier1", "brierlm"}, "baseline": {"ce", "acc"}}[kind]
    assert expected <= set(result["eval"])
    model = LOADERS[kind](tmp_path / "checkpoint")
    if kind == "calm":  # the frozen autoencoder is saved with the model, untouched
        for key, value in autoencoder.state_dict().items():
            assert torch.equal(model.ae_model.state_dict()[key], value)


@pytest.mark.parametrize("kind", ["autoencoder", "calm", "baseline"])
def test_resume_after_a_crash_is_exact(kind, tmp_path, autoencoder):
    run(kind, tmp_path / "straight", autoencoder, max_steps=10, schedule="cosine", lr=3e-3)
    reference = train_losses(tmp_path / "straight")

    def crash(record: dict) -> None:
        if record["event"] == "train" and record["step"] == 8:
            raise RuntimeError("simulated crash")

    options = TrainOptions(out=tmp_path / "crashed", block_size=32, batch_size=4, lr=3e-3, warmup_steps=3, log_every=1,
                           eval_every=0, threads=1, progress=False, target_samples=8, max_steps=10, schedule="cosine",
                           save_every_steps=6, callback=crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(kind, options, TOKENS, HELDOUT, config=CONFIGS[kind], autoencoder=autoencoder)
    with pytest.raises(UsageError, match="already holds a checkpoint"):
        run(kind, tmp_path / "crashed", autoencoder, max_steps=10, lr=3e-3)
    options.callback, options.resume = None, True
    train(kind, options, TOKENS, HELDOUT)  # no config: the model comes from the checkpoint
    resumed = train_losses(tmp_path / "crashed")
    assert sorted(resumed) == list(range(1, 11))  # steps 7 and 8 of the crashed run were dropped and redone
    for step in range(7, 11):
        assert resumed[step] == reference[step], (step, resumed[step], reference[step])


def test_stop_at_ends_early_on_the_full_schedule_and_resume_finishes_it(tmp_path, autoencoder):
    records: list = []
    run("calm", tmp_path / "straight", autoencoder, records, max_steps=8, schedule="cosine", lr=3e-3)
    reference = {r["step"]: (r["loss"], r["lr"]) for r in records if r["event"] == "train"}
    first: list = []
    run("calm", tmp_path / "split", autoencoder, first, max_steps=8, schedule="cosine", lr=3e-3, stop_at=3)
    assert max(r["step"] for r in first if r["event"] == "train") == 3
    rest: list = []
    options = TrainOptions(out=tmp_path / "split", resume=True, log_every=1, eval_every=0, threads=1, progress=False,
                           block_size=32, batch_size=4, warmup_steps=3, target_samples=8, max_steps=8,
                           schedule="cosine", lr=3e-3, callback=rest.append)
    train("calm", options, TOKENS, HELDOUT)
    split = {r["step"]: (r["loss"], r["lr"]) for r in first + rest if r["event"] == "train"}
    assert split == reference  # same learning rates and bit-identical losses as the uninterrupted run


def warm_start_onto(tmp_path: Path, autoencoder, patch_size: int):
    """Train a CALM a few steps, then warm-start (lr 0) a CALM over a fresh 6-d autoencoder with K = patch_size."""
    run("calm", tmp_path / "first", autoencoder, max_steps=3, lr=3e-3)
    torch.manual_seed(1)
    other_ae = build_model("autoencoder", AutoencoderConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64,
                                                            latent_size=6, patch_size=patch_size))
    config = dataclasses.replace(CALM_CONFIG, latent_size=6, patch_size=patch_size)
    options = TrainOptions(out=tmp_path / "second", block_size=32, batch_size=4, warmup_steps=3, eval_every=0,
                           threads=1, progress=False, target_samples=8, max_steps=1, lr=0.0, init=tmp_path / "first" / "checkpoint")
    train("calm", options, TOKENS, HELDOUT, config=config, autoencoder=other_ae)
    return load_model(tmp_path / "first" / "checkpoint"), load_model(tmp_path / "second" / "checkpoint"), other_ae


def test_warm_start_copies_the_backbone_and_keeps_the_new_autoencoder(tmp_path, autoencoder):
    first, second, other_ae = warm_start_onto(tmp_path, autoencoder, patch_size=4)
    for key, value in first.transformer.state_dict().items():  # lr 0: the copied weights are untouched
        assert torch.equal(second.transformer.state_dict()[key], value), key
    assert second.generative_head.final_layer.linears[-1].weight.shape[0] == 6  # a fresh head for the 6-d latent
    for key, value in first.embed_proj.state_dict().items():  # same K: embed_proj carries over
        assert torch.equal(second.embed_proj.state_dict()[key], value), key
    for key, value in other_ae.state_dict().items():
        assert torch.equal(second.ae_model.state_dict()[key], value), key
    with pytest.raises(CalmError, match="shape"):
        train("calm", TrainOptions(out=tmp_path / "third", block_size=32, max_steps=1, progress=False,
                                   init=tmp_path / "first" / "checkpoint"),
              TOKENS, config=dataclasses.replace(CALM_CONFIG, hidden_size=16, intermediate_size=32),
              autoencoder=autoencoder)


def test_warm_start_to_another_patch_size_keeps_the_transformer_only(tmp_path, autoencoder):
    first, second, _ = warm_start_onto(tmp_path, autoencoder, patch_size=2)
    assert second.patch_size == 2
    for key, value in first.transformer.state_dict().items():
        assert torch.equal(second.transformer.state_dict()[key], value), key
    assert second.embed_proj[0].weight.shape[1] == 2 * CALM_CONFIG.hidden_size  # fresh, reading two embeddings


def test_block_size_must_fit_the_patch_size(tmp_path, autoencoder):
    with pytest.raises(UsageError, match="multiple of the patch size"):
        train("calm", TrainOptions(out=tmp_path, block_size=30, max_steps=1, progress=False), TOKENS,
              config=CALM_CONFIG, autoencoder=autoencoder)


def test_cli_trains_from_a_prepared_data_dir(tmp_path):
    import typer
    from typer.testing import CliRunner

    from calm_cli.cli.train import train_app
    from calm_cli.training.data import prepare_data, train_tokenizer

    corpus = Path(__file__).parent / "data" / "tiny_corpus.txt"
    data = tmp_path / "data"
    train_tokenizer([corpus], 300, data / "tokenizer.json")
    prepare_data([corpus], data / "tokenizer.json", data, 0.1)
    app = typer.Typer()
    app.add_typer(train_app, name="train")
    runner = CliRunner()
    shape = ["--hidden", "32", "--intermediate", "64", "--block-size", "64", "--batch-size", "2", "--no-progress"]
    result = runner.invoke(app, ["train", "autoencoder", str(data), "--out", str(tmp_path / "ae"), "--latent", "8", "--max-steps", "3", *shape])
    assert result.exit_code == 0, result.output
    ae = load_autoencoder(tmp_path / "ae" / "checkpoint")
    assert ae.config.vocab_size == 300 and ae.tokenizer is not None and ae.config.bos_token_id == 0
    result = runner.invoke(app, ["train", "calm", str(data), "--out", str(tmp_path / "calm"), "--max-steps", "2"])
    assert isinstance(result.exception, UsageError) and "--ae" in str(result.exception)
    calm_args = ["train", "calm", str(data), "--out", str(tmp_path / "calm"), "--ae", str(tmp_path / "ae" / "checkpoint"),
                 "--layers", "1", "--heads", "2", "--noise-size", "8", "--mlp-layers", "1", "--max-steps", "2", "--threads", "2", *shape]
    result = runner.invoke(app, calm_args)
    assert result.exit_code == 0, result.output
    # --resume keeps the checkpoint's loop flags (block and batch size) unless given again; not --threads,
    # which describes the machine: here $CALM_THREADS wins over the first run's --threads 2.
    result = runner.invoke(app, ["train", "calm", str(data), "--out", str(tmp_path / "calm"), "--resume", "--max-steps", "3", "--no-progress"],
                           env={"CALM_THREADS": "1"})
    assert result.exit_code == 0, result.output
    state = torch.load(tmp_path / "calm" / "checkpoint" / "trainer_state.pt", weights_only=True)
    assert state["step"] == 3 and state["options"]["block_size"] == 64 and state["options"]["threads"] == 1
    assert load_model(tmp_path / "calm" / "checkpoint").tokenizer is not None
    init = ["--init", str(tmp_path / "calm" / "checkpoint")]
    result = runner.invoke(app, ["train", "calm", str(data), "--out", str(tmp_path / "calm"), "--resume", *init])
    assert isinstance(result.exception, UsageError) and "--init" in str(result.exception)
    result = runner.invoke(app, [*calm_args[:4], str(tmp_path / "warm"), *calm_args[5:], *init, "--beta", "0.5"])
    assert result.exit_code == 0, result.output
    assert load_model(tmp_path / "warm" / "checkpoint").config.beta == 0.5


def test_pipeline_through_the_real_cli(tmp_path):
    """tokenizer -> data -> autoencoder -> CALM -> baseline with the `calm` program, then generate from both."""
    from helpers import run_calm

    corpus = str(Path(__file__).parent / "data" / "tiny_corpus.txt")
    data, tok = tmp_path / "data", tmp_path / "tok.json"
    assert run_calm("tokenizer", "train", corpus, "--vocab", "300", "--out", str(tok)).returncode == 0
    assert run_calm("data", "prepare", corpus, "--tokenizer", str(tok), "--out", str(data), "--heldout", "0.1").returncode == 0
    shape = ["--hidden", "32", "--intermediate", "64", "--block-size", "64", "--batch-size", "2", "--no-progress",
             "--max-steps", "2", "--threads", "1"]
    backbone = ["--layers", "1", "--heads", "2", "--context", "256"]
    steps = [
        ["train", "autoencoder", str(data), "--out", str(tmp_path / "ae"), "--latent", "8", *shape],
        ["train", "calm", str(data), "--out", str(tmp_path / "calm"), "--ae", str(tmp_path / "ae" / "checkpoint"),
         "--noise-size", "8", "--mlp-layers", "1", *backbone, *shape],
        ["train", "baseline", str(data), "--out", str(tmp_path / "base"), *backbone, *shape],
    ]
    for args in steps:
        r = run_calm(*args)
        assert r.returncode == 0, r.stderr
    for model in ("calm", "base"):
        r = run_calm("generate", "The", "-m", str(tmp_path / model / "checkpoint"), "-n", "8", "--temp", "1", "--seed", "0", "--json")
        assert r.returncode == 0, r.stderr
        assert json.loads(r.stdout)["completion_tokens"] >= 1


def test_bad_data_is_a_one_line_error(tmp_path):
    from helpers import run_calm

    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    tok = Path(__file__).parent / "data" / "tiny_corpus.txt"
    runs = [
        run_calm("tokenizer", "train", str(empty), "--vocab", "300", "--out", str(tmp_path / "t.json")),
        run_calm("data", "prepare", str(tmp_path / "missing.txt"), "--tokenizer", str(tok), "--out", str(tmp_path / "d")),
        run_calm("train", "autoencoder", str(tmp_path / "nodata"), "--out", str(tmp_path / "o"), "--max-steps", "1"),
    ]
    for r in runs:
        assert r.returncode in (1, 2) and len(r.stderr.strip().splitlines()) == 1 and "Traceback" not in r.stderr, r.stderr
