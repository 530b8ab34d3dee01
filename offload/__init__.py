"""offload: long-context LLM inference with a tiered KV cache.

`Runtime` and `Conversation` are imported on first use, so that the command line
(and `offload --help`) starts without importing torch.
"""

__version__ = "0.1.0"

from offload.config import RuntimeConfig
from offload.errors import (
    ConfigError,
    ContextLengthError,
    DeviceMemoryError,
    ModelLoadError,
    OffloadError,
)
from offload.model_args import ModelArgs
from offload.thinking import split_thinking
from storage.errors import DiskFullError, HostMemoryError, StorageError


def __getattr__(name: str):
    if name in ("Runtime", "Conversation"):
        from offload import runtime

        return getattr(runtime, name)
    raise AttributeError(f"module 'offload' has no attribute {name!r}")


__all__ = [
    "ConfigError",
    "ContextLengthError",
    "DeviceMemoryError",
    "DiskFullError",
    "HostMemoryError",
    "Conversation",
    "ModelArgs",
    "ModelLoadError",
    "OffloadError",
    "Runtime",
    "RuntimeConfig",
    "StorageError",
    "split_thinking",
]
