"""Exceptions raised by zeda. Every message is one line naming the problem and the fix."""


class ZedaError(ValueError):
    """A user-facing error: bad input, unsupported model, or a failed consistency check."""
