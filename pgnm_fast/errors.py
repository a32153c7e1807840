"""User-facing errors: the CLI prints their message on one line and exits non-zero, no traceback."""


class PgnmError(Exception):
    """A mistake in the user's input (data, checkpoint, flag). The message names the culprit."""

    exit_code = 2


class DataError(PgnmError):
    """A data path, split file or image that cannot be used."""


class CheckpointError(PgnmError):
    """A checkpoint that is missing, unreadable, truncated or of the wrong kind."""


class ConfigError(PgnmError):
    """An unknown model name, preset or an inconsistent combination of flags."""
