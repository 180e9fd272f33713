"""The one error type that means "the user asked for something that cannot be done".

Every layer raises :class:`UsageError` (or a subclass: ``ConfigError``, ``DataError``, ...) for a mistake in a
command line, a config or an input file; ``parcae`` prints it as one line and exits non-zero. Anything else is a
bug or an environment fault and keeps its traceback.
"""


class UsageError(ValueError):
    """A user mistake (command line, config, data, file); its message is one line that says what to change."""


class ConfigError(UsageError):
    """An invalid configuration value; the message names the field and what it accepts."""
