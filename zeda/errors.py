"""Exceptions raised by zeda. Every message is one line naming the problem and the fix."""


class ZedaError(ValueError):
    """A user-facing error: bad input, unsupported model, or a failed consistency check."""


def check_config(cond: bool, key: str, msg: str) -> None:
    """Raise a one-line `ZedaError` naming the dotted config ``key`` unless ``cond`` holds.

    Used by the ``validate()`` methods of the config sections (``zeda.config``).
    """
    if not cond:
        raise ZedaError(f"config key {key!r}: {msg}")


_WRITE_ERRNOS = {
    28: "the disk is full",  # ENOSPC
    122: "the disk quota is exceeded",  # EDQUOT
    27: "a file would exceed the file size limit (ulimit -f)",  # EFBIG
    30: "the file system is read-only",  # EROFS
    13: "permission denied",  # EACCES
    1: "the operation is not permitted (read-only or immutable directory)",  # EPERM
}
_WRITE_PHRASES = {
    "no space left": 28,
    "disk quota": 122,
    "file too large": 27,
    "read-only file system": 30,
    "os error 28": 28,
    "os error 27": 27,
    "os error 122": 122,
    "os error 30": 30,
}


def write_failure(exc: BaseException) -> str | None:
    """Why a write failed, if ``exc`` is a failed write (full disk, file size limit, read-only
    or forbidden place); None for any other exception.

    torch and safetensors wrap the operating system's error in their own exception types, so
    their messages are read too.
    """
    seen: set[int] = set()
    while exc is not None and id(exc) not in seen:
        seen.add(id(exc))
        if isinstance(exc, OSError) and exc.errno in _WRITE_ERRNOS:
            return _WRITE_ERRNOS[exc.errno]
        text = str(exc).lower()
        for phrase, errno in _WRITE_PHRASES.items():
            if phrase in text:
                return _WRITE_ERRNOS[errno]
        if "unexpected pos" in text or "failed writing" in text:  # torch's zip writer cut short
            return "the write was cut short (a full disk or the file size limit, ulimit -f)"
        exc = exc.__cause__ or exc.__context__  # type: ignore[assignment]
    return None


def write_fix(reason: str) -> str:
    """The fix for a `write_failure` reason."""
    if any(w in reason for w in ("full", "limit", "quota", "cut short")):
        return "free disk space (or raise ulimit -f) and run again"
    return "choose a writable output directory"
