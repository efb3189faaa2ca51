"""Several processes (gloo, CPU): world-size invariance, resume across world sizes, FSDP2, rank-0-only output.

Each multi-process run spawns two fresh interpreters that call `train` as torchrun would
set them up (RANK, WORLD_SIZE, MASTER_ADDR/PORT); the single-process reference runs here.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file
from test_train import AE_CONFIG, BASE_CONFIG, CALM_CONFIG, HELDOUT, TOKENS, VOCAB

from calm_cli.io.checkpoint import load_autoencoder, load_baseline, load_model
from calm_cli.training.distributed import load_optimizer_state, optimizer_state
from calm_cli.training.objectives import build_model
from calm_cli.training.train import TrainOptions, sample_blocks, train

CONFIGS = {"autoencoder": AE_CONFIG, "baseline": BASE_CONFIG, "calm": CALM_CONFIG}
TOLERANCE = 1e-5  # max |w_2 ranks - w_1 rank| after a few AdamW steps: only summation order differs
LOOP = {"block_size": 32, "batch_size": 4, "warmup_steps": 2, "max_steps": 4, "log_every": 1, "eval_every": 0,
        "eval_batches": 1, "threads": 1, "progress": False, "target_samples": 4, "lr": 1e-2}


def _options(out: Path, **kw) -> TrainOptions:
    return TrainOptions(out=out, **{**LOOP, **kw})


def _autoencoder(kind: str):
    if kind != "calm":
        return None
    torch.manual_seed(0)
    return build_model("autoencoder", AE_CONFIG)


def _worker(rank: int, world: int, port: int, kind: str, out: Path, kw: dict) -> None:
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    train(kind, _options(out, **kw), TOKENS, HELDOUT, config=CONFIGS[kind], autoencoder=_autoencoder(kind))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_ranks(kind: str, out: Path, **kw) -> None:
    mp.spawn(_worker, args=(2, _free_port(), kind, out, kw), nprocs=2)


def one_rank(kind: str, out: Path, **kw) -> None:
    train(kind, _options(out, **kw), TOKENS, HELDOUT, config=CONFIGS[kind], autoencoder=_autoencoder(kind))


def weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "checkpoint" / "model.safetensors")


def max_difference(a: Path, b: Path) -> float:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    return max((wa[k] - wb[k]).abs().max().item() for k in wa)


def losses(out: Path) -> list[float]:
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if r["event"] == "train"]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """One process, global batch 4: checkpoints at step 2 (of a 4-step schedule) and at step 4."""
    root = tmp_path_factory.mktemp("reference")
    one_rank("baseline", root / "half", stop_at=2)
    shutil.copytree(root / "half", root / "full")
    one_rank("baseline", root / "full", resume=True)
    return root


def test_ranks_share_the_global_batch_in_order():
    whole = sample_blocks(TOKENS, 4, 32, torch.Generator().manual_seed(3))
    halves = [sample_blocks(TOKENS, 4, 32, torch.Generator().manual_seed(3), rows) for rows in (slice(0, 2), slice(2, 4))]
    assert torch.equal(torch.cat(halves), whole)


def test_two_ranks_train_the_same_model_as_one_and_resume_on_one(reference, tmp_path):
    two_ranks("baseline", tmp_path / "ddp", stop_at=2)
    assert max_difference(tmp_path / "ddp", reference / "half") < TOLERANCE
    assert losses(tmp_path / "ddp") == pytest.approx(losses(reference / "half"), abs=1e-5)
    one_rank("baseline", tmp_path / "ddp", resume=True)  # world size 2 -> 1
    assert max_difference(tmp_path / "ddp", reference / "full") < TOLERANCE


def test_fsdp2_trains_resumes_and_saves_an_ordinary_checkpoint(reference, tmp_path):
    two_ranks("baseline", tmp_path / "fsdp", stop_at=2, shard=True)
    assert max_difference(tmp_path / "fsdp", reference / "half") < TOLERANCE
    two_ranks("baseline", tmp_path / "fsdp", resume=True, shard=True)
    assert max_difference(tmp_path / "fsdp", reference / "full") < TOLERANCE
    assert load_baseline(tmp_path / "fsdp" / "checkpoint").config.num_hidden_layers == BASE_CONFIG.num_hidden_layers


def test_fsdp2_accumulates_gradients_as_one_process(tmp_path):
    one_rank("baseline", tmp_path / "one", max_steps=2, grad_accum=2)
    two_ranks("baseline", tmp_path / "two", max_steps=2, grad_accum=2, shard=True)
    assert max_difference(tmp_path / "two", tmp_path / "one") < TOLERANCE


def test_fsdp2_calm_with_its_frozen_autoencoder_and_evaluation(tmp_path):
    """CALM's evaluation calls parts of the model outside forward: every rank gathers the weights for it."""
    two_ranks("calm", tmp_path / "calm", max_steps=2, shard=True, eval_every=1)
    records = [json.loads(line) for line in (tmp_path / "calm" / "log.jsonl").read_text().splitlines()]
    assert sum(r["event"] == "eval" for r in records) == 2 and all(r["step"] <= 2 for r in records)
    model = load_model(tmp_path / "calm" / "checkpoint")
    assert torch.equal(model.ae_model.encoder.embed_tokens.weight, _autoencoder("calm").encoder.embed_tokens.weight)


def test_autoencoder_sharded_then_resumed_in_one_process(tmp_path):
    """Its tied embedding / output matrix keeps one name in the optimizer state, sharded or not."""
    two_ranks("autoencoder", tmp_path / "ae", max_steps=2, stop_at=1, shard=True)
    one_rank("autoencoder", tmp_path / "ae", resume=True)
    assert losses(tmp_path / "ae")[-1] < losses(tmp_path / "ae")[0]
    assert load_autoencoder(tmp_path / "ae" / "checkpoint").config.latent_size == AE_CONFIG.latent_size


def test_optimizer_state_by_index_still_loads():
    """Checkpoints written before the state was keyed by name resume as before."""
    model = build_model("baseline", BASE_CONFIG)
    optimizer = torch.optim.AdamW(model.parameters())
    model(torch.randint(0, VOCAB, (1, 8))).sum().backward()
    optimizer.step()
    fresh = torch.optim.AdamW(model.parameters())
    load_optimizer_state(model, fresh, optimizer.state_dict())
    assert str(fresh.state_dict()) == str(optimizer.state_dict())
    by_name = optimizer_state(model, optimizer)
    assert set(by_name["state"]) == {name for name, _ in model.named_parameters()}
    again = torch.optim.AdamW(model.parameters())
    load_optimizer_state(model, again, by_name)
    assert str(again.state_dict()) == str(optimizer.state_dict())


def test_global_batch_must_split_evenly(tmp_path):
    with pytest.raises(mp.ProcessRaisedException, match="multiple of the 2 processes"):
        two_ranks("baseline", tmp_path / "odd", batch_size=3)


def test_torchrun_only_rank_zero_speaks(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    TOKENS.numpy().astype("uint16").tofile(data / "train.bin")
    (data / "manifest.json").write_text(json.dumps({"vocab_size": VOCAB, "dtype": "uint16"}))
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "calm_cli",
               "train", "baseline", str(data), "--out", str(tmp_path / "run"), "--hidden", "32", "--intermediate", "64",
               "--layers", "1", "--heads", "2", "--context", "32", "--block-size", "32", "--batch-size", "2",
               "--max-steps", "1", "--threads", "1", "--no-progress"]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["step 1 loss " + done.stdout.split()[3], f"saved {tmp_path / 'run' / 'checkpoint'}"]
    assert done.stderr.count("calm train:") == 1


# ---- sharded evaluation ----------------------------------------------------------------------


def _eval_docs() -> list[torch.Tensor]:
    gen = torch.Generator().manual_seed(7)
    return [torch.randint(0, 8, (int(n),), generator=gen) for n in torch.randint(6, 60, (9,), generator=gen)]


def _eval_worker(rank: int, world: int, port: int, out: Path) -> None:
    import torch.distributed as dist
    from test_eval import _tiny_baseline

    from calm_cli.eval.evaluate import evaluate_documents, summarize

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    torch.set_num_threads(1)
    report = summarize(evaluate_documents(_tiny_baseline(), _eval_docs(), seed=5, batch_size=2, rank=rank, world=world), seed=5)
    dist.destroy_process_group()
    (out / f"rank{rank}.json").write_text(json.dumps(report))


def test_sharded_eval_gives_the_one_process_numbers(tmp_path):
    """The same draws and positions; exact P(y) differs only by float32 rounding (thread counts differ here)."""
    from test_eval import _tiny_baseline

    from calm_cli.eval.evaluate import evaluate_documents, summarize

    alone = summarize(evaluate_documents(_tiny_baseline(), _eval_docs(), seed=5, batch_size=2), seed=5)
    mp.spawn(_eval_worker, args=(2, _free_port(), tmp_path), nprocs=2)
    for rank in (0, 1):
        shared = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert shared.keys() == alone.keys() and shared["positions"] == alone["positions"] > 0
        for key in ("brier1", "brier2", "brier3", "brier4", "brierlm"):
            assert shared[key] == pytest.approx(alone[key], abs=1e-7)
        assert shared["brierlm_ci95"] == pytest.approx(alone["brierlm_ci95"], abs=1e-7)
    assert all(alone[f"brier{n}"] != 0 for n in range(1, 5))  # numbers that a change of draws would move


def test_torchrun_eval_prints_one_report(tmp_path):
    from test_eval import CORPUS, FIXTURE

    args = ["eval", str(CORPUS), "--model", str(FIXTURE), "--json", "--seed", "3", "--max-docs", "6", "--batch-size", "2", "--threads", "1"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "NO_COLOR": "1"}
    alone = subprocess.run([sys.executable, "-m", "calm_cli", *args], capture_output=True, text=True, timeout=120, env=env)
    shared = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2", "-m", "calm_cli", *args],
                            capture_output=True, text=True, timeout=120, env=env)
    assert alone.returncode == 0 and shared.returncode == 0, shared.stderr
    assert len(shared.stdout.splitlines()) == 1
    one, two = json.loads(alone.stdout), json.loads(shared.stdout)
    for key in ("brier1", "brier2", "brier3", "brier4", "brierlm", "positions", "documents"):
        assert two[key] == pytest.approx(one[key], abs=1e-12)
    assert two["brierlm_ci95"] == pytest.approx(one["brierlm_ci95"], abs=1e-12)
