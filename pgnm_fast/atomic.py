"""Write files so that a crash, Ctrl-C or full disk never leaves a half-written one behind.

A write that fails (full disk, read-only file system, no permission, a file where a folder
belongs) raises :class:`~pgnm_fast.errors.OutputError` naming the path; the previous file is
left as it was and the temporary one is removed.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from .errors import OutputError

TMP_SUFFIX = ".tmp"


def os_reason(e: OSError) -> str:
    """``No space left on device`` rather than ``[Errno 28] No space left on device: 'x'``."""
    return e.strerror or str(e) or type(e).__name__


def write_error(path, e: OSError) -> OutputError:
    return OutputError(f"{path}: cannot write ({os_reason(e)}); the previous file, if any, is "
                       f"unchanged")


@contextmanager
def atomic_open(path, mode: str = "wb"):
    """Yield a temporary file beside ``path``; on success fsync it and rename it over ``path``,
    on any error remove it and leave ``path`` as it was. The file gets the permissions a plain
    ``open`` would give (0666 less the user's umask), not ``mkstemp``'s private 0600."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TMP_SUFFIX, dir=path.parent)
    except OSError as e:
        raise write_error(path, e) from None
    try:
        os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException as e:
        Path(tmp).unlink(missing_ok=True)
        if isinstance(e, OSError):
            raise write_error(path, e) from None
        raise


def write_json_atomic(obj, path) -> None:
    """``obj`` as indented JSON at ``path``, written atomically (:func:`atomic_open`)."""
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def remove_stale_temporaries(folder, names=None) -> list[Path]:
    """Delete the temporaries a killed :func:`atomic_open` left in ``folder`` (``.NAME.*.tmp``;
    only for the file names in ``names`` if given). Call with the folder locked
    (:mod:`pgnm_fast.folders`), so no live writer owns them. Returns what was removed."""
    folder, removed = Path(folder), []
    if not folder.is_dir():
        return removed
    for p in folder.glob(f".*{TMP_SUFFIX}"):
        if names is None or any(p.name.startswith(f".{n}.") for n in names):
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


@contextmanager
def temporary_folder_beside(path):
    """Yield a new empty folder ``.NAME.tmp-PID-XXXX`` beside ``path`` (to fill and rename onto
    ``path``); it is removed when the block ends. Folders of this kind left by a process that is
    no longer alive (killed mid-write) are removed first."""
    import shutil
    path = Path(path)
    prefix = f".{path.name}.tmp-"
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        for old in path.parent.glob(prefix + "*"):
            pid = old.name[len(prefix):].split("-", 1)[0]
            if pid.isdigit() and not _pid_alive(int(pid)):
                shutil.rmtree(old, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=path.parent))
    except OSError as e:
        raise write_error(path, e) from None
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    """The process's umask (reading it means setting it: set it straight back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask
