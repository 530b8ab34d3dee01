"""offload: long-context LLM inference with a tiered KV cache."""

from offload.config import ModelArgs, RuntimeConfig
from offload.errors import ConfigError, ContextLengthError, ModelLoadError, OffloadError
from offload.runtime import Conversation, Runtime  # noqa: E402
from storage.disk import DiskFullError, StorageError

__all__ = [
    "ConfigError",
    "ContextLengthError",
    "DiskFullError",
    "Conversation",
    "ModelArgs",
    "ModelLoadError",
    "OffloadError",
    "Runtime",
    "RuntimeConfig",
    "StorageError",
]
