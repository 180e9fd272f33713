"""The errors of the runs layer: each is a :class:`parcae.errors.UsageError` whose message is one line naming the
file or folder, so every verb reports them the same way."""

from parcae.errors import UsageError


class RunDirError(UsageError):
    """A run directory or checkpoint that cannot be used as asked; the message is one line naming the file."""


class CheckpointError(RunDirError):
    """A file that is not a readable parcae checkpoint (missing, truncated, foreign, random bytes)."""


class RunLockedError(RunDirError):
    """Another live ``parcae fit`` writes this run directory."""


class StorageError(RunDirError):
    """Writing failed (disk full, read-only or missing folder); the message names what and the last good
    checkpoint."""
