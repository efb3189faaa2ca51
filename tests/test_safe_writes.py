"""Saving never deletes what it did not write, and a kill -9 at any moment leaves a loadable model."""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import Callable

import pytest
import torch
from helpers import run_calm

from calm_cli import load_model, save_model
from calm_cli.errors import UsageError
from calm_cli.io.atomic import COMMIT_FILE
from calm_cli.io.checkpoint import (
    baseline_files,
    calm_files,
    load_baseline,
    write_directory,
)
from calm_cli.io.tokenizer import load_tokenizer
from calm_cli.models.config import CALMConfig
from calm_cli.training.objectives import BaselineObjective, CALMObjective, build_model
from calm_cli.training.train import _load_state, _save, checkpoint_dir

HOOKED = ("replace", "rename", "unlink", "fsync", "open", "close")


@pytest.fixture(scope="module")
def baseline(fixtures):
    """A token-level model whose files cannot be mixed with the CALM fixture's: a mix fails to load."""
    torch.manual_seed(0)
    config = CALMConfig(vocab_size=512, patch_size=1, hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    model = build_model("baseline", config).eval()
    model.tokenizer = load_tokenizer(fixtures / "tokenizer.json")
    return model


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def killed_at(event: int, action: Callable[[], None]) -> bool:
    """Run `action` in a forked child that SIGKILLs itself at its `event`-th file-system call; True if it died so."""
    pid = os.fork()
    if pid == 0:
        count = [0]

        def hook(original):
            def call(*args, **kwargs):
                count[0] += 1
                if count[0] == event:
                    os.kill(os.getpid(), signal.SIGKILL)
                return original(*args, **kwargs)
            return call

        for name in HOOKED:
            setattr(os, name, hook(getattr(os, name)))
        try:
            action()
        finally:
            os._exit(0)
    _, status = os.waitpid(pid, 0)
    return os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL


def kill_everywhere(action: Callable[[], None], check: Callable[[int], None]) -> int:
    """Kill `action` at each of its file-system calls in turn and `check` what it left; the number of kill points."""
    event = 1
    while killed_at(event, action):
        check(event)
        event += 1
    check(event)
    return event - 1


def test_convert_refuses_a_folder_that_holds_no_model(fixtures, tmp_path):
    models = tmp_path / "models"
    (models / "other-model").mkdir(parents=True)
    (models / "other-model" / "config.json").write_text("{}")
    (models / "notes.txt").write_text("mine")
    result = run_calm("convert", str(fixtures / "calm"), str(models))
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1 and "--force" in result.stderr
    assert sorted(p.name for p in models.rglob("*")) == ["config.json", "notes.txt", "other-model"]

    result = run_calm("convert", str(fixtures / "calm"), str(models), "--force")
    assert result.returncode == 0, result.stderr
    assert (models / "notes.txt").read_text() == "mine"
    assert (models / "other-model" / "config.json").read_text() == "{}"
    assert same_weights(load_model(models), load_model(fixtures / "calm"))


def test_saving_over_a_model_replaces_only_its_own_files(fixtures, tmp_path, baseline):
    target = tmp_path / "m"
    save_model(load_model(fixtures / "calm"), target)
    (target / "README.md").write_text("notes")
    (target / "generation_config.json").write_text("{}")
    write_directory(target, baseline_files(baseline))
    assert sorted(p.name for p in target.iterdir()) == ["README.md", "config.json", "generation_config.json", "model.safetensors", "tokenizer.json"]
    assert (target / "README.md").read_text() == "notes"
    assert same_weights(load_baseline(target), baseline)


def test_a_file_in_the_way_is_refused(fixtures, tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(UsageError, match="not a folder"):
        save_model(load_model(fixtures / "calm"), tmp_path / "f")
    assert (tmp_path / "f").read_text() == "x"


def test_kill_during_a_model_save_leaves_the_old_or_the_new_model(fixtures, tmp_path, baseline):
    old = load_model(fixtures / "calm")
    pristine = tmp_path / "pristine"
    save_model(old, pristine)
    (pristine / "notes.txt").write_text("mine")
    target = tmp_path / "target"
    files = baseline_files(baseline)
    outcomes = []

    def check(event: int) -> None:
        try:
            loaded = load_model(target)
            assert same_weights(loaded, old), f"kill at call {event}: a CALM model, but not the old one"
            outcomes.append("old")
        except Exception:
            assert same_weights(load_baseline(target), baseline), f"kill at call {event}: neither model loads"
            outcomes.append("new")
        assert (target / "notes.txt").read_text() == "mine"
        write_directory(target, files)
        assert same_weights(load_baseline(target), baseline)
        assert not [p.name for p in target.iterdir() if p.name.startswith(".")], f"kill at call {event}: litter"
        shutil.rmtree(target)
        shutil.copytree(pristine, target)

    shutil.copytree(pristine, target)
    points = kill_everywhere(lambda: write_directory(target, files), check)
    assert points >= 10
    assert outcomes[0] == "old" and outcomes[-1] == "new"


def test_the_next_save_finishes_an_interrupted_one(fixtures, tmp_path, baseline):
    target = tmp_path / "target"
    save_model(load_model(fixtures / "calm"), target)
    files = baseline_files(baseline)
    event = 1
    while killed_at(event, lambda: write_directory(target, files)) and not (target / COMMIT_FILE).exists():
        event += 1
    assert (target / COMMIT_FILE).exists(), "no kill point fell inside the commit"
    assert same_weights(load_baseline(target), baseline)
    write_directory(target, calm_files(load_model(fixtures / "calm")))
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors", "tokenizer.json"]
    load_model(target)


def test_kill_during_a_checkpoint_save_leaves_a_matching_state(fixtures, tmp_path, baseline):
    calm = load_model(fixtures / "calm")
    out = tmp_path / "run"
    _save(out, CALMObjective(calm, 2), {"step": 1})
    pristine = tmp_path / "pristine"
    shutil.copytree(out, pristine)
    objective = BaselineObjective(baseline)

    def check(event: int) -> None:
        directory = checkpoint_dir(out)
        assert directory is not None, f"kill at call {event}: no checkpoint"
        step = _load_state(directory)["step"]
        if step == 1:
            assert same_weights(load_model(directory), calm), f"kill at call {event}"
        else:
            assert step == 2 and same_weights(load_baseline(directory), baseline), f"kill at call {event}"
        shutil.rmtree(out)
        shutil.copytree(pristine, out)

    points = kill_everywhere(lambda: _save(out, objective, {"step": 2}), check)
    assert points >= 10


def test_a_model_without_a_tokenizer_does_not_inherit_the_old_one(tmp_path) -> None:
    model = load_model(os.path.join(os.path.dirname(__file__), "fixtures", "official-tiny", "calm"))
    save_model(model, tmp_path / "m")
    assert (tmp_path / "m" / "tokenizer.json").exists()
    model.tokenizer = None
    with pytest.raises(UsageError, match="tokenizer.json"):
        save_model(model, tmp_path / "m")
    save_model(model, tmp_path / "fresh")
    assert not (tmp_path / "fresh" / "tokenizer.json").exists()


def test_the_next_write_removes_temporaries_of_killed_writers_only(tmp_path) -> None:
    """A kill -9 leaves `.name.PID.x.tmp`; the next write of `name` deletes it, but not a live writer's or another file."""
    from calm_cli.io.atomic import write_text_atomic

    dead = subprocess_pid_that_exited()
    orphan = tmp_path / f".train.bin.{dead}.abc123.tmp"
    live = tmp_path / f".train.bin.{os.getpid()}.def456.tmp"
    other = tmp_path / f".heldout.bin.{dead}.abc123.tmp"
    unrelated = tmp_path / ".train.bin.notapid.tmp"
    recent = tmp_path / f".train.bin.{dead}.fresh1.tmp"  # another machine's writer may have this pid: too new to judge
    for path in (orphan, live, other, unrelated, recent):
        path.write_text("partial")
        if path is not recent:
            os.utime(path, (0, 0))
    write_text_atomic(tmp_path / "train.bin", "whole")
    assert (tmp_path / "train.bin").read_text() == "whole"
    assert not orphan.exists() and live.exists() and other.exists() and unrelated.exists() and recent.exists()


def subprocess_pid_that_exited() -> int:
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_data_prepare_refuses_a_folder_it_did_not_write(tmp_path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("one document\\n\\nanother one\\n")
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    r = run_calm("data", "prepare", str(corpus), "--tokenizer", "tests/fixtures/official-tiny/calm/tokenizer.json", "--out", str(out))
    assert r.returncode == 2 and "not empty" in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    forced = run_calm("data", "prepare", str(corpus), "--tokenizer", "tests/fixtures/official-tiny/calm/tokenizer.json",
                      "--out", str(out), "--force")
    assert forced.returncode == 0, forced.stderr
    assert (out / "notes.txt").read_text() == "mine" and (out / "manifest.json").exists()
    again = run_calm("data", "prepare", str(corpus), "--tokenizer", "tests/fixtures/official-tiny/calm/tokenizer.json", "--out", str(out))
    assert again.returncode == 0, again.stderr  # its own earlier output: no --force needed
