"""The CPU threads torch's ops run on (`model.threads = 0`): one per core that other
processes leave free, within the cores this process may use, followed while it runs.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from time import monotonic, sleep

import psutil
import torch

BUSY_CORE = 50.0  # percent: others' work of half a core or more leaves them one
THREADS_SAMPLE_SECONDS = 0.05  # the sample at the start
THREADS_CHECK_SECONDS = 1.0  # then the window over which a running request's is taken


class CoreWatch:
    """The intra-op threads of `model.threads = 0`: one per core that other processes
    leave free, taken at the start (a 50 ms sample) and again over each second of a
    request (`check`, between decode steps and prefill chunks).

    torch's default (one per core) collapses when another process uses a core: its
    threads wait on each other at every op. Measured on a 2-core machine, 40 tokens of
    the embedded model: idle, 2 threads 80 tok/s and 1 thread 54; with one core busy,
    2 threads 24 tok/s and 1 thread 65 (docs/performance.md). A process that starts
    while we run (another `offload ask`, a build) is followed within a second, and so
    is its end.

    This process's own work is not another's: a session load hashes its files on a
    thread during the first sample, and counted as busy, that thread took a core of a
    2-core machine away from every question asked after the load."""

    def __init__(self):
        self.me = psutil.Process()
        self.threads = torch.get_num_threads()
        # The cores we may run on (a cpuset, `taskset`) and the most we may keep busy
        # (a container's CPU quota): a 4-CPU container on a 64-core host counts as 4.
        self.allowed = allowed_cores()
        self.limit = cpu_quota()
        self._mark()

    def start(self) -> CoreWatch:
        """Take the first sample (50 ms) and set the threads by it."""
        sleep(THREADS_SAMPLE_SECONDS)
        self.threads = self._free()
        torch.set_num_threads(self.threads)
        return self

    def _mark(self) -> None:
        self.at = monotonic()
        self.cores, self.own = cpu_sample(self.me)

    def _free(self) -> int:
        """The cores free over the window since the last mark; marks anew."""
        at, cores, own = self.at, self.cores, self.own
        self._mark()
        busy = [
            100 * (b1 - b0) / max(t1 - t0, 1e-9)
            for i, ((b0, t0), (b1, t1)) in enumerate(zip(cores, self.cores, strict=False))
            if self.allowed is None or i in self.allowed  # (zip: a core unplugged meanwhile)
        ]
        free = free_cores(busy, (self.own - own) / max(self.at - at, 1e-3))
        return free if self.limit is None else max(1, min(free, self.limit))

    def check(self) -> None:
        """Follow the machine: the threads of the last second's sample, where a second has
        passed since the last (a clock read otherwise)."""
        if monotonic() - self.at < THREADS_CHECK_SECONDS:
            return
        threads = self._free()
        if threads != self.threads:
            self.threads = threads
            torch.set_num_threads(threads)


def cpu_sample(me: psutil.Process) -> tuple[list[tuple[float, float]], float]:
    """Each core's (busy, total) seconds since boot, and this process's CPU seconds."""
    cores = []
    for t in psutil.cpu_times(percpu=True):
        total = sum(t)
        cores.append((total - t.idle - getattr(t, "iowait", 0.0), total))
    return cores, sum(me.cpu_times()[:2])


def free_cores(busy_percent: list[float], own_cores: float) -> int:
    """The cores left to us, at least one: those the machine's work (percent of each
    core) less ours (in cores) does not take, a core's worth taken from half of one."""
    others = max(0.0, sum(busy_percent) / 100 - own_cores)
    return max(1, len(busy_percent) - int(others + 1 - BUSY_CORE / 100))


def allowed_cores() -> set[int] | None:
    """The cores this process may run on, where the platform says (None: all)."""
    if not hasattr(os, "sched_getaffinity"):
        return None
    return os.sched_getaffinity(0)


def cpu_quota(root: Path = Path("/sys/fs/cgroup"), cgroup: Path = Path("/proc/self/cgroup")):
    """The CPUs' worth of time this process's cgroup may use (its CPU quota, rounded up),
    or None without one: cgroup v2's `cpu.max`, v1's `cpu.cfs_quota_us` / `_period_us`."""
    try:
        lines = cgroup.read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        here = path.lstrip("/")
        if controllers == "":  # v2
            read = [(root / here / "cpu.max", None)]
        elif "cpu" in controllers.split(","):
            v1 = root / controllers
            read = [(v1 / here / "cpu.cfs_quota_us", v1 / here / "cpu.cfs_period_us")]
        else:
            continue
        for quota_file, period_file in read:
            try:
                if period_file is None:
                    quota, period = quota_file.read_text().split()[:2]
                else:
                    quota, period = quota_file.read_text(), period_file.read_text()
                if quota.strip() not in ("max", "-1"):
                    return max(1, math.ceil(int(quota) / int(period)))
            except (OSError, ValueError):
                continue
    return None
