"""offload: long-context LLM inference with a tiered KV cache."""

from offload.config import ModelArgs, RuntimeConfig
from offload.errors import ConfigError, ContextLengthError, ModelLoadError, OffloadError
from offload.runtime import Conversation, Runtime  # noqa: E402

__all__ = [
    "ConfigError",
    "ContextLengthError",
    "Conversation",
    "ModelArgs",
    "ModelLoadError",
    "OffloadError",
    "Runtime",
    "RuntimeConfig",
]
