"""The default thread count (issue 28): decided from injected CPU samples, never from the machine's real load."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from helpers import run_calm

from calm_cli.errors import UsageError
from calm_cli.runtime import threads
from calm_cli.runtime.threads import (
    MIN_WINDOW_S,
    CpuSample,
    LoadWindow,
    ThreadChoice,
    decide,
    read_sample,
    requested_threads,
)

TINY = "tests/fixtures/official-tiny/calm"
TICKS = 100  # clock ticks per core in one window (one second at USER_HZ 100)


def window(cores: int, others: float, own: float = 0.0) -> tuple[CpuSample, CpuSample]:
    """Two samples one window apart: other processes kept `others` cores busy, this process `own` cores."""
    before = CpuSample(busy=5000, total=40000, own=300)
    after = CpuSample(busy=before.busy + round((others + own) * TICKS), total=before.total + cores * TICKS,
                      own=before.own + round(own * TICKS))
    return before, after


@pytest.mark.parametrize(("cores", "limit", "others", "own", "count", "reason"), [
    (2, 2, 0.0, 0.0, 2, "all cores idle"),
    (2, 2, 0.1, 0.0, 2, "all cores idle"),  # a shell or a monitor is not a busy core
    (2, 2, 1.0, 0.0, 1, "1 of 2 cores busy"),
    (2, 2, 0.4, 0.0, 1, "1 of 2 cores busy"),  # part of a core is enough to collapse a second thread
    (2, 2, 2.0, 0.0, 1, "2 of 2 cores busy"),
    (2, 2, 1.3, 0.7, 1, "2 of 2 cores busy"),  # saturated: our own work displaced some of theirs
    (2, 2, 0.0, 1.0, 2, "all cores idle"),  # our own import of torch is nobody else's work
    (4, 4, 1.0, 0.0, 3, "1 of 4 cores busy"),
    (4, 4, 3.5, 0.0, 1, "4 of 4 cores busy"),
    (8, 4, 0.0, 0.0, 4, "all 8 cores idle, at most 4 by torch's default"),
    (1, 1, 0.0, 0.0, 1, "all cores idle"),
])
def test_busy_cores_from_a_window(cores, limit, others, own, count, reason):
    assert decide(cores, limit, *window(cores, others, own)) == ThreadChoice(count, reason)


def test_without_samples_every_usable_core():
    assert decide(4, 8, None, None) == ThreadChoice(4, "4 cores, load not measured")
    assert decide(4, 2, *window(4, 0)[:1], None).count == 2
    same = CpuSample(busy=1, total=2, own=0)
    assert decide(2, 2, same, same) == ThreadChoice(2, "2 cores, load not measured")


class FakeLoad:
    """A load source that hands out the given samples in turn, with a clock that the waits advance."""

    def __init__(self, *samples: CpuSample | None) -> None:
        self.samples, self.now, self.slept = list(samples), 100.0, []

    def read(self, cpus: list[int]) -> CpuSample | None:
        return self.samples.pop(0)

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.slept.append(seconds)
        self.now += seconds

    def open(self) -> LoadWindow:
        return LoadWindow(read=self.read, cpus=[0, 1], clock=self.clock, sleep=self.sleep)


def test_our_own_finished_run_does_not_count(monkeypatch):
    """The run that ended a moment ago left a load average of 2, but nothing runs now: both cores."""
    monkeypatch.setattr(threads.os, "getloadavg", lambda: (2.0, 1.5, 0.7), raising=False)
    load = FakeLoad(*window(2, 0.0))
    opened = load.open()
    load.now += 1.2  # importing torch
    assert opened.close(2) == ThreadChoice(2, "all cores idle")
    assert load.slept == []  # the import was window enough


def test_a_short_window_waits_for_the_rest():
    load = FakeLoad(*window(2, 1.0))
    opened = load.open()
    load.now += 0.01  # torch was already loaded
    assert opened.close(2) == ThreadChoice(1, "1 of 2 cores busy")
    assert load.slept == [pytest.approx(MIN_WINDOW_S - 0.01)]


def test_no_proc_no_wait():
    load = FakeLoad(None, None)
    assert load.open().close(8) == ThreadChoice(2, "2 cores, load not measured")
    assert load.slept == []


def test_read_sample_counts_only_usable_cores_and_this_process(tmp_path):
    stat = tmp_path / "stat"
    stat.write_text(
        "cpu  300 0 100 1000 10 0 0 0 0 0\n"
        "cpu0 200 0 50 400 5 0 0 0 0 0\n"
        "cpu1 100 7 50 600 5 3 2 1 40 0\n"  # guest (40) is already inside user
        "intr 12345 0 0\nprocs_running 3\n"
    )
    own = tmp_path / "self"
    own.write_text("4242 (a (strange) name) R 1 4242 4242 0 -1 4194304 100 0 0 0 " "17 5 0 0 20 0 3 0 1000 0\n")
    assert read_sample([1], stat, own) == CpuSample(busy=100 + 7 + 50 + 3 + 2 + 1, total=163 + 600 + 5, own=22)
    assert read_sample([0, 1], stat, own).total == 250 + 400 + 5 + 768
    assert read_sample([5], stat, own) is None  # none of our CPUs listed
    assert read_sample([0], tmp_path / "missing", own) is None
    own.write_text("4242 (cut short) R 1\n")
    assert read_sample([0], stat, own) is None


@pytest.mark.skipif(not Path("/proc/stat").exists(), reason="no /proc/stat: not Linux")
def test_read_sample_on_this_machine():
    """Whatever the load, the real /proc parses: a sample for our CPUs, not None."""
    sample = read_sample(threads.usable_cpus())
    assert sample is not None
    assert 0 <= sample.busy <= sample.total and sample.own >= 0


def test_option_then_variable_then_load(monkeypatch):
    monkeypatch.setenv("CALM_THREADS", "3")
    assert requested_threads(2) == ThreadChoice(2, "--threads")
    assert requested_threads(None) == ThreadChoice(3, "$CALM_THREADS")
    monkeypatch.setenv("CALM_THREADS", "0")
    with pytest.raises(UsageError, match=r"\$CALM_THREADS must be at least 1"):
        requested_threads(None)
    with pytest.raises(UsageError, match="--threads must be at least 1"):
        requested_threads(0)
    monkeypatch.delenv("CALM_THREADS")
    assert requested_threads(None) is None


def test_set_threads_applies_the_choice(monkeypatch):
    import torch

    from calm_cli.cli import common

    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("CALM_THREADS", raising=False)
        monkeypatch.setattr(common, "LoadWindow", FakeLoad(*window(2, 1.0)).open)
        assert common.set_threads(None) == ThreadChoice(1, "1 of 2 cores busy") and torch.get_num_threads() == 1
        monkeypatch.setenv("CALM_THREADS", "2")
        assert common.set_threads(None) == ThreadChoice(2, "$CALM_THREADS") and torch.get_num_threads() == 2
        assert common.set_threads(1) == ThreadChoice(1, "--threads") and torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)


def test_generate_verbose_says_how_many_threads_and_why():
    args = ["generate", "Hello", "-m", TINY, "-n", "4", "--temp", "1", "--seed", "1", "-v"]
    named = run_calm(*args, "--threads", "1")
    assert named.returncode == 0 and "1 thread (--threads)" in named.stderr, named.stderr
    chosen = run_calm(*args, env={"CALM_THREADS": ""})
    assert chosen.returncode == 0, chosen.stderr
    assert re.search(r"^\d+ threads? \((all cores idle|\d+ of \d+ cores busy)\)$", chosen.stderr, re.M), chosen.stderr


def test_a_thread_count_torch_cannot_take_is_a_usage_error(monkeypatch):
    """torch.set_num_threads takes a C int: 2^31 overflowed into a ValueError (found by the fuzz test)."""
    with pytest.raises(UsageError, match="--threads must be at most 4096, got 2147483648"):
        requested_threads(2**31)
    monkeypatch.setenv("CALM_THREADS", "5000")
    with pytest.raises(UsageError, match=r"\$CALM_THREADS must be at most 4096"):
        requested_threads(None)
    assert requested_threads(threads.MAX_THREADS) == ThreadChoice(threads.MAX_THREADS, "--threads")
