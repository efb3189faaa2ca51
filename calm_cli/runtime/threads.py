"""The default CPU thread count: the cores this process may use, less those other processes keep busy right now.

More torch threads than free cores is the one setting that collapses: every step waits for its
slowest thread, and a thread that shares a core with another process is very slow (on 2 cores
beside one busy process, 2 threads ran 5-20x slower than 1; README, Threads). So the default
counts the busy cores, and counts them from what runs now: the CPU time other processes used
over a window that closes just before the model loads. The 1-minute load average, used before,
remembered calm's own finished runs, so a second run right after a first one got fewer threads.

Torch-free and cheap (two small reads of /proc per sample), so the command line can open the
window before it imports torch: the import, about a second, is the window, at no extra cost.
"""

from __future__ import annotations

import math
import os
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from ..errors import UsageError

BUSY_SLACK = 0.2  # cores of other work that still leave a core idle: a shell, a monitor, a finished job's last tick
MIN_WINDOW_S = 0.05  # the shortest window worth reading (5 clock ticks per core); waited for only when torch was already loaded
MAX_THREADS = 4096  # the most --threads or $CALM_THREADS may ask for


@dataclass(frozen=True)
class CpuSample:
    """Cumulative clock ticks on the cores this process may use (busy, and all), and this process's own CPU time."""

    busy: int
    total: int
    own: int


@dataclass(frozen=True)
class ThreadChoice:
    """A thread count and why, as `-v`, `calm bench`, the serve banner and /health say it."""

    count: int
    reason: str

    def __str__(self) -> str:
        return f"{self.count} thread{'s' * (self.count != 1)} ({self.reason})"


def usable_cpus() -> list[int]:
    """The CPUs this process may run on: its affinity mask (cpusets and taskset show here), else every CPU."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def read_sample(cpus: Iterable[int], stat: str = "/proc/stat", own: str = "/proc/self/stat") -> CpuSample | None:
    """Ticks from /proc now; None where there is no /proc (macOS, Windows) or it cannot be read."""
    try:
        with open(stat) as f:
            lines = f.read().splitlines()
        with open(own) as f:
            fields = f.read().rsplit(")", 1)[1].split()  # the name in parentheses may hold spaces
        own_ticks = int(fields[11]) + int(fields[12])  # utime and stime, of every thread
    except (OSError, IndexError, ValueError):
        return None
    wanted = {f"cpu{i}" for i in cpus}
    busy = total = 0
    for line in lines:
        if not line.startswith("cpu"):
            break  # the per-CPU lines come first; the rest (intr, ...) is long
        name, *values = line.split()
        if name in wanted:
            # user nice system idle iowait irq softirq steal; guest time is already inside user and nice
            user, nice, system, idle, iowait, irq, softirq, steal = ([int(v) for v in values] + [0] * 8)[:8]
            work = user + nice + system + irq + softirq + steal  # stolen time is a core another machine keeps busy
            busy += work
            total += work + idle + iowait
    if total == 0:
        return None
    return CpuSample(busy=busy, total=total, own=own_ticks)


def decide(cores: int, limit: int, before: CpuSample | None, after: CpuSample | None) -> ThreadChoice:
    """The default thread count from two samples: `cores` less the cores others kept busy between them, in [1, limit].

    A core counts as busy once other processes used more than BUSY_SLACK of one over the window
    (this process's own time is taken out). Without samples, every usable core, as PyTorch does.
    """
    top = max(1, min(limit, cores))
    if before is None or after is None or after.total <= before.total:
        return ThreadChoice(top, f"{cores} core{'s' * (cores != 1)}, load not measured")
    others = (after.busy - before.busy) - (after.own - before.own)
    busy_cores = cores * max(others, 0) / (after.total - before.total)
    busy = min(cores, max(0, math.ceil(busy_cores - BUSY_SLACK)))
    count = max(1, min(limit, cores - busy))
    if busy:
        return ThreadChoice(count, f"{busy} of {cores} cores busy")
    if count < cores:
        return ThreadChoice(count, f"all {cores} cores idle, at most {limit} by torch's default")
    return ThreadChoice(count, "all cores idle")


class LoadWindow:
    """Opened before slow start-up work (importing torch), closed once it is done: the busy cores over that time.

    `read`, `clock` and `sleep` are the load source, the clock and the wait; tests pass fakes.
    """

    def __init__(
        self,
        read: Callable[[list[int]], CpuSample | None] = read_sample,
        cpus: list[int] | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.cpus = usable_cpus() if cpus is None else cpus
        self.read, self.clock, self.sleep = read, clock, sleep
        self.opened = clock()
        self.first = read(self.cpus)

    def close(self, limit: int) -> ThreadChoice:
        """Decide, first waiting out the rest of MIN_WINDOW_S when the window was shorter (torch already loaded)."""
        if self.first is not None:
            wait = MIN_WINDOW_S - (self.clock() - self.opened)
            if wait > 0:
                self.sleep(wait)
        return decide(len(self.cpus), limit, self.first, self.read(self.cpus))


def requested_threads(threads: int | None) -> ThreadChoice | None:
    """--threads, else $CALM_THREADS, else None (decide from the load); a count outside 1..MAX_THREADS is a usage error."""
    source = "--threads"
    if threads is None:
        raw = os.environ.get("CALM_THREADS")
        if not raw:
            return None
        try:
            threads = int(raw)
        except ValueError:
            raise UsageError(f"CALM_THREADS={raw}: not a whole number") from None
        source = "$CALM_THREADS"
    if threads < 1:
        raise UsageError(f"{source} must be at least 1, got {threads}")
    if threads > MAX_THREADS:  # torch takes a C int, and no machine calm runs on has this many cores
        raise UsageError(f"{source} must be at most {MAX_THREADS}, got {threads}")
    return ThreadChoice(threads, source)
