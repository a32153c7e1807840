"""User-facing errors: the CLI prints their message on one line and exits non-zero, no traceback."""


class PgnmError(Exception):
    """A mistake in the user's input (data, checkpoint, flag). The message names the culprit.

    Raised in a DataLoader worker, PyTorch rebuilds the error in the main process from a message
    that carries the worker's traceback; only the original one-line message is kept, so the CLI
    prints it as is."""

    exit_code = 2

    def __init__(self, message: str = ""):
        if "Original Traceback" in message:
            marker = f"{type(self).__name__}: "
            tail = [ln for ln in message.splitlines() if marker in ln]
            if tail:
                message = tail[-1].split(marker, 1)[1]
        super().__init__(message)


class DataError(PgnmError):
    """A data path, split file or image that cannot be used."""


class CheckpointError(PgnmError):
    """A checkpoint that is missing, unreadable, truncated or of the wrong kind."""


class ConfigError(PgnmError):
    """An unknown model name, preset or an inconsistent combination of flags."""


class OutputError(PgnmError):
    """An output path that cannot be written: a file where a folder belongs, no permission, a
    read-only file system, a full disk, or a folder another process is writing to."""


def first_line(error: BaseException) -> str:
    """The user-facing line of an error: the first line of its text, else its type's name
    (a :class:`PgnmError` already dropped a worker's traceback)."""
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def interrupt_in(error: BaseException) -> KeyboardInterrupt | None:
    """The Ctrl-C or SIGTERM behind ``error``: itself, or one a library wrapped while it ran (a
    signal that lands inside an import or a ``__set_name__`` comes back as another exception
    whose cause or context is the interrupt). None when there is none."""
    seen = set()
    while error is not None and id(error) not in seen:
        if isinstance(error, KeyboardInterrupt):
            return error
        seen.add(id(error))
        error = error.__cause__ or error.__context__
    return None
