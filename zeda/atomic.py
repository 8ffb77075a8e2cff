"""Atomic directory writes: the only place in zeda that replaces a directory.

`atomic_write` writes into a temporary sibling (``.<name>.tmp-*``), then renames it into place.
A write that fails (full disk, ``ulimit -f``) leaves the previous output as it was and nothing
else; a temporary sibling left by a killed process is removed by the next write to the same
place. A live writer holds an flock (`zeda.fs.FileLock`) on the `_TMP_MARKER` file inside its
temporary sibling, which tells its directory apart from one left by a killed process.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from zeda.errors import ZedaError, write_failure, write_fix
from zeda.fs import FileLock, is_locked

__all__ = ["atomic_write"]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _apply_umask(root: Path) -> None:
    """Give ``root`` and everything in it the modes a plain mkdir/open would (mkdtemp uses 0700)."""
    mask = _umask()
    root.chmod(0o777 & ~mask)
    for p in root.rglob("*"):
        p.chmod((0o777 if p.is_dir() else 0o666) & ~mask)


#: Inside a temporary sibling while its writer lives: an flock on it marks the directory as zeda's
#: and as in use; a sibling whose marker nobody holds was left by a killed process.
_TMP_MARKER = ".zeda-tmp"


def _clear_stale_temporaries(out: Path) -> None:
    """Remove ``.<name>.tmp-*`` siblings of ``out`` that a killed zeda process left behind.

    Only zeda's own: a directory whose `_TMP_MARKER` no live process holds a lock on.
    """
    for tmp in out.parent.glob(f".{out.name}.tmp-*"):
        marker = tmp / _TMP_MARKER
        if tmp.is_dir() and not tmp.is_symlink() and marker.is_file() and not is_locked(marker):
            shutil.rmtree(tmp, ignore_errors=True)


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink(missing_ok=True)
    else:
        shutil.rmtree(path, ignore_errors=True)


def atomic_write(out_dir: str | os.PathLike, write: Callable[[Path], None], overwrite: bool = False) -> Path:
    """Call ``write(tmp)`` on a fresh temporary sibling of ``out_dir``, then rename it into place.

    A crash or an exception in ``write`` never leaves a half-written ``out_dir``; an existing
    ``out_dir`` (or a symlink there, which is replaced, not followed) is replaced only once the
    new one is complete (and only with ``overwrite``). The result gets the user's umask.

    Raises:
        ZedaError: if ``out_dir`` exists and ``overwrite`` is False, or the write fails for want
            of space or permission (the previous ``out_dir`` is kept, nothing is left behind).
    """
    out = Path(out_dir)
    if (out.exists() or out.is_symlink()) and not overwrite:
        raise ZedaError(
            f"output directory {out} already exists; pass --overwrite (overwrite=True) to replace it"
        )
    created = []
    p = out.parent
    while not p.exists() and p != p.parent:
        created.append(p)
        p = p.parent
    tmp = None
    lock = None
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        _clear_stale_temporaries(out)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
        lock = FileLock(tmp / _TMP_MARKER)
        lock.acquire()
        write(tmp)
        _apply_umask(tmp)  # under the marker: a kill here still leaves a temporary marked as stale
        lock.release()  # removes the marker: nothing of it reaches the output
        if out.exists() or out.is_symlink():
            backup = out.with_name(f".{out.name}.old")
            _remove(backup)
            out.rename(backup)
            tmp.rename(out)
            _remove(backup)
        else:
            tmp.rename(out)
    except BaseException as exc:
        reason = write_failure(exc)
        if reason is None or isinstance(exc, ZedaError):
            raise
        raise ZedaError(
            f"cannot write {out}: {reason}; nothing was written"
            + (" and the previous one is kept" if out.exists() else "")
            + f"; {write_fix(reason)}"
        ) from None
    finally:
        if lock is not None:
            lock.release()
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
        if not out.exists():
            for d in created:
                with contextlib.suppress(OSError):
                    d.rmdir()
    return out
