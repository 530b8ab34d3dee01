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
from dataclasses import dataclass
from pathlib import Path

import psutil
import torch

from offload.config import KVSection
from offload.errors import DeviceMemoryError
from storage.atomic import existing_ancestor
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
    return int(shutil.disk_usage(existing_ancestor(directory)).free * (1 - DISK_MARGIN))


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
