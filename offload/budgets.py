"""Tier byte budgets: from the config, or from the machine when unset.

device: CUDA free memory (after weights are loaded) minus a margin; on CPU the
        device tier is host memory and follows the host rule
host:   psutil's available memory minus a safety margin
disk:   free space of the disk directory minus a margin
"""

from __future__ import annotations

import contextlib
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from offload.config import KVSection
from offload.errors import DeviceMemoryError
from storage.errors import first_line

GiB = 1 << 30
HOST_MARGIN = 0.2  # of available memory left to the OS and the rest of the process
DISK_MARGIN = 0.1  # of free disk space left to everything else


@contextlib.contextmanager
def device_memory(what: str):
    """Torch's out-of-memory error on the GPU, raised inside, as one `DeviceMemoryError`
    that says what was being done and what to change (its cause keeps torch's)."""
    try:
        yield
    except torch.OutOfMemoryError as e:
        raise out_of_memory(what, e) from e


def out_of_memory(what: str, e: BaseException) -> DeviceMemoryError:
    said = first_line(e)
    said = said if len(said) <= 240 else said[:240] + "..."
    return DeviceMemoryError(
        f"the GPU ran out of memory {what} ({said}); `offload plan` shows what the model "
        "and its KV need there: a smaller kv.device_bytes, a shorter context, a smaller "
        "dtype or model takes less"
    )


@dataclass(frozen=True)
class Budgets:
    device_bytes: int
    host_bytes: int
    disk_dir: Path
    disk_bytes: int


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
        self._mark()

    def start(self) -> CoreWatch:
        """Take the first sample (50 ms) and set the threads by it."""
        time.sleep(THREADS_SAMPLE_SECONDS)
        self.threads = self._free()
        torch.set_num_threads(self.threads)
        return self

    def _mark(self) -> None:
        self.at = time.monotonic()
        self.cores, self.own = cpu_sample(self.me)

    def _free(self) -> int:
        """The cores free over the window since the last mark; marks anew."""
        at, cores, own = self.at, self.cores, self.own
        self._mark()
        busy = [
            100 * (b1 - b0) / max(t1 - t0, 1e-9)
            for (b0, t0), (b1, t1) in zip(cores, self.cores, strict=False)  # (a core unplugged)
        ]
        return free_cores(busy, (self.own - own) / max(self.at - at, 1e-3))

    def check(self) -> None:
        """Follow the machine: the threads of the last second's sample, where a second has
        passed since the last (a clock read otherwise)."""
        if time.monotonic() - self.at < THREADS_CHECK_SECONDS:
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


def default_disk_dir() -> Path:
    return Path(tempfile.gettempdir()) / "offload-kv"


def machine_host_bytes() -> int:
    return max(0, int(psutil.virtual_memory().available * (1 - HOST_MARGIN)) - GiB)


def machine_device_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return max(0, free - GiB)  # activations and the allocator's slack
    return machine_host_bytes()


def machine_disk_bytes(directory: Path) -> int:
    probe = directory
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    return int(shutil.disk_usage(probe).free * (1 - DISK_MARGIN))


def resolve_budgets(kv: KVSection, device: torch.device) -> Budgets:
    disk_dir = Path(kv.disk_dir).expanduser() if kv.disk_dir else default_disk_dir()
    return Budgets(
        device_bytes=kv.device_bytes
        if kv.device_bytes is not None
        else machine_device_bytes(device),
        host_bytes=kv.host_bytes if kv.host_bytes is not None else machine_host_bytes(),
        disk_dir=disk_dir,
        disk_bytes=kv.disk_bytes if kv.disk_bytes is not None else machine_disk_bytes(disk_dir),
    )
