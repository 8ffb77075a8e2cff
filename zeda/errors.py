"""Exceptions raised by zeda. Every message is one line naming the problem and the fix."""


class ZedaError(ValueError):
    """A user-facing error: bad input, unsupported model, or a failed consistency check."""


def check_config(cond: bool, key: str, msg: str) -> None:
    """Raise a one-line `ZedaError` naming the dotted config ``key`` unless ``cond`` holds.

    Used by the ``validate()`` methods of the config sections (``zeda.config``).
    """
    if not cond:
        raise ZedaError(f"config key {key!r}: {msg}")
