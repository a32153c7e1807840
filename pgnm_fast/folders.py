"""Output folders: checked before anything is written, locked while a process writes to them.

:func:`check_output_dir` finds, without creating anything, why a folder could not be written
(a file in its place or on its path, no permission, a read-only file system), so a run stops
before it starts. :func:`lock_folder` takes an exclusive ``fcntl.flock`` on ``FOLDER/.lock``
for as long as a run, a pack or a data set generation writes there: a second writer stops with
one line naming the process that holds it. The kernel drops the lock when its holder ends,
however it ends (Ctrl-C, SIGTERM, SIGKILL), so a lock is never stale: forked children (the
plain loader's workers, pack's decoders) close their copy of the lock's descriptor at once, so a
killed holder's orphaned workers do not keep the lock after it. The holder removes the
lock file before it lets go; a process that locked a file no longer at ``FOLDER/.lock`` (removed
as it opened it) lets go and locks the new one, so two processes never hold two files. A killed
holder leaves the file, which the next writer simply locks.
"""
from __future__ import annotations

import fcntl
import os
from contextlib import contextmanager
from pathlib import Path

from .atomic import os_reason, write_error
from .errors import OutputError

LOCK_FILE = ".lock"
_HELD: set[int] = set()  # descriptors of the locks this process holds


def _close_held_in_child() -> None:
    """In a forked child: drop the inherited lock descriptors (the parent keeps the locks)."""
    for fd in _HELD:
        try:
            os.close(fd)
        except OSError:
            pass
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


def check_output_dir(path, flag: str = "--out") -> Path:
    """Raise :class:`OutputError` (one line naming ``flag`` and the path) if ``path`` cannot be
    a folder this process writes to; creates nothing. Returns ``path``."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise OutputError(f"{flag} {path}: exists and is not a folder")
    probe = path
    while not probe.exists():  # the nearest existing folder on the path is where mkdir starts
        if probe.is_symlink():
            raise OutputError(f"{flag} {path}: {probe} is a broken symbolic link")
        probe = probe.parent
    if not probe.is_dir():
        raise OutputError(f"{flag} {path}: {probe} is a file, not a folder")
    try:
        if os.statvfs(probe).f_flag & os.ST_RDONLY:
            raise OutputError(f"{flag} {path}: {probe} is on a read-only file system")
    except OSError:
        pass
    if not os.access(probe, os.W_OK | os.X_OK):
        raise OutputError(f"{flag} {path}: no permission to write in {probe}")
    return path


@contextmanager
def lock_folder(path, what: str = "folder"):
    """Hold an exclusive lock on the folder ``path`` (created) for the ``with`` block (module
    docstring). ``what`` names the folder in the error (``run folder``, ``cache folder``). A
    folder this call created is removed again if the block fails before writing anything."""
    path = Path(path)
    lock = path / LOCK_FILE
    created = not path.exists()
    fd = _acquire(path, lock, what)
    try:
        yield path
        created = False  # the block ran through: whatever it left is the output
    finally:
        lock.unlink(missing_ok=True)  # still held: a process that opened it sees it replaced
        if created and path.is_dir() and not any(path.iterdir()):
            path.rmdir()  # stopped before writing anything: leave no folder
        _HELD.discard(fd)
        os.close(fd)  # releases the lock


def _acquire(path: Path, lock: Path, what: str) -> int:
    """Open and flock ``lock``; retried when its holder removed it in between (then the file
    this process locked is no longer the one at ``lock``)."""
    for _ in range(100):
        try:
            path.mkdir(parents=True, exist_ok=True)
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise write_error(lock, e) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise OutputError(f"{what} {path} is in use by process {holder} (another run or pack "
                              f"writing there): wait for it to end, or choose another folder") \
                from None
        except OSError as e:  # a file system without flock (some network mounts)
            os.close(fd)
            raise OutputError(f"{lock}: cannot lock ({os_reason(e)})") from None
        try:
            current = os.stat(lock).st_ino == os.fstat(fd).st_ino
        except FileNotFoundError:
            current = False
        if not current:
            os.close(fd)
            continue
        try:
            record = f"{os.getpid():<15}\n".encode()  # fixed width: a reader never sees ""
            os.pwrite(fd, record, 0)
            os.ftruncate(fd, len(record))
        except OSError as e:
            os.close(fd)
            raise write_error(lock, e) from None
        _HELD.add(fd)
        return fd
    raise OutputError(f"{lock}: cannot lock (the file keeps being replaced)")
