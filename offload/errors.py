"""The project's exception types.

Every error a user can cause (a bad path, a bad config key, a prompt that is too
long) is raised as a subclass of `OffloadError` with a message that names the
file, key or value at fault. The CLI turns these into one line and exit code 2.
"""


class OffloadError(Exception):
    """Base class of every error the runtime raises on purpose."""


class ConfigError(OffloadError):
    """A config file, key or value is invalid."""


class ModelLoadError(OffloadError):
    """Model weights, config or tokenizer could not be loaded."""


class ContextLengthError(OffloadError):
    """A prompt (or a conversation) does not fit the model's context window."""


class DeviceMemoryError(OffloadError):
    """The GPU ran out of memory (torch's `OutOfMemoryError`, with what was being done)."""


CUDA_FORKED = (
    "CUDA was in use in the process this one was forked from, and CUDA does not survive "
    "a fork: start this process with multiprocessing's 'spawn' (or fork before CUDA is "
    "used, and load the model after)"
)
