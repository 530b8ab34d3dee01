"""The storage layer's exception types (importable without torch, for the CLI)."""


class StorageError(Exception):
    """A tier file is missing, corrupt, or cannot be written; the message names it."""


class DiskFullError(StorageError):
    """The disk budget (or the disk) cannot take what must be spilled; nothing was lost."""
