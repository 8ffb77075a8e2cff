"""File-system checks and locks shared by every verb that writes.

- `FileLock`: an advisory lock on a lock file (``fcntl.flock``): one writer per directory, and
  nothing a killed process held stays locked, since the system drops a process's locks when it
  dies, however it dies.
- `check_writable` / `check_space`: refuse a read-only place, a full disk or a file size limit
  (``ulimit -f``) below what a command will write, before the command does its work.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path

from zeda.errors import ZedaError, write_failure

try:
    import resource
except ImportError:  # pragma: no cover - Windows
    resource = None  # type: ignore[assignment]

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows: no advisory locks, nothing is locked
    fcntl = None  # type: ignore[assignment]

__all__ = ["FileLock", "check_space", "check_writable", "existing_ancestor", "is_locked"]


class FileLock:
    """An exclusive, non-blocking lock on ``path`` (created if needed, removed on release).

    Attributes:
        path: The lock file.
    """

    def __init__(self, path: str | os.PathLike) -> None:
        self.path = Path(path)
        self._fd: int | None = None

    @property
    def held(self) -> bool:
        """Whether this object holds the lock."""
        return self._fd is not None

    def acquire(self) -> str | None:
        """Take the lock; return None, or the holder's note (its pid) when another process holds it."""
        if fcntl is None or self._fd is not None:
            return None
        while True:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                note = ""
                with contextlib.suppress(OSError):
                    note = os.pread(fd, 64, 0).decode(errors="replace").strip()
                os.close(fd)
                return note or "another process"
            # The previous holder removes the file on release: if it did so between our open and
            # our lock, we locked a file nobody else will ever open again; start over.
            try:
                same = os.path.samestat(os.fstat(fd), os.stat(self.path))
            except FileNotFoundError:
                same = False
            if same:
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()}\n".encode(), 0)
                self._fd = fd
                return None
            os.close(fd)

    def release(self) -> None:
        """Remove the lock file and drop the lock (a no-op when not held)."""
        if self._fd is None:
            return
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None


def is_locked(path: str | os.PathLike) -> bool:
    """Whether a live process holds a lock on the file at ``path`` (False if it does not exist)."""
    if fcntl is None:
        return False
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return False
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        return True
    finally:
        os.close(fd)
    return False


def existing_ancestor(path: str | os.PathLike) -> Path:
    """``path`` itself if it exists, else its nearest existing parent (absolute)."""
    p = Path(path).expanduser().absolute()
    while not p.exists() and p != p.parent:
        p = p.parent
    return p


def check_writable(path: str | os.PathLike, fix: str) -> None:
    """Refuse to start when nothing can be created at ``path`` (or in it, if it is a directory).

    A real probe (a temporary file, removed at once) rather than permission bits, which say
    nothing about read-only mounts, immutable directories or a privileged user.

    Args:
        path: The output path (it need not exist yet: its nearest existing parent is probed).
        fix: The end of the message, e.g. ``"choose another --out"``.

    Raises:
        ZedaError: one line naming the directory and the reason.
    """
    where = existing_ancestor(path)
    if not where.is_dir():
        where = where.parent
    try:
        fd, probe = tempfile.mkstemp(prefix=".zeda-probe-", dir=where)
    except OSError as exc:
        reason = write_failure(exc) or exc.strerror or type(exc).__name__
        raise ZedaError(f"cannot write in {where}: {reason}; {fix}") from None
    os.close(fd)
    os.unlink(probe)


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"  # pragma: no cover


def file_size_limit() -> int | None:
    """The process's file size limit (``ulimit -f``) in bytes, or None when unlimited."""
    if resource is None:
        return None
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    return None if soft == resource.RLIM_INFINITY else int(soft)


def check_space(path: str | os.PathLike, total: int, largest: int, what: str) -> None:
    """Refuse to start a command that will write ``total`` bytes (the largest file ``largest``)
    under ``path`` when the disk has less free space or ``ulimit -f`` is lower.

    Raises:
        ZedaError: one line naming what is short and the fix.
    """
    where = existing_ancestor(path)
    free = shutil.disk_usage(where).free
    if free < total:
        raise ZedaError(
            f"{what} needs about {_size(total)} but only {_size(free)} is free on {where}; "
            "free some space or choose another output directory"
        )
    limit = file_size_limit()
    if limit is not None and limit < largest:
        raise ZedaError(
            f"{what} writes files of up to about {_size(largest)} but the file size limit "
            f"(ulimit -f) is {_size(limit)}; raise it (ulimit -f unlimited) and run again"
        )
