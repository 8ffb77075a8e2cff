"""Keep freed host memory in the process while a run trains on CPU (glibc only).

PyTorch's CPU allocator has no cache: every tensor is a fresh ``malloc``. glibc serves a block
above its mmap threshold (32 MiB at most) with a new mapping, returns it to the kernel when it is
freed, and the next one is faulted in and zeroed again page by page. A distillation step at a real
vocabulary allocates several ``(tokens, V)`` logits, gradients and softmaxes far above that (622
MiB each for 1,024 tokens at V = 151,936), so on CPU a large share of a step went into page faults
(`evals/distill_bench/results_cpu_malloc.md`). PyTorch's own CPU tuning guide advises a caching
allocator (jemalloc, tcmalloc) for the same reason.

`reuse_freed_memory` sets glibc, for the duration of a run, to serve every block from its heap and
not to trim it: a freed block is reused by the next allocation without faults. The resident set
then stays at the run's peak until the run ends, when the settings go back and the free heap is
handed back (``malloc_trim``). Nothing changes where the C library is not glibc, on accelerators,
or when the environment sets any of glibc's own ``MALLOC_*`` (or ``GLIBC_TUNABLES``) tunables.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
from collections.abc import Iterator

import torch

__all__ = ["ENABLED", "reuse_freed_memory"]

log = logging.getLogger(__name__)

#: Whether `reuse_freed_memory` acts at all (a benchmark sets it False to measure the default).
ENABLED = True

# <malloc.h> parameter numbers, and glibc's defaults that the settings return to.
_M_TRIM_THRESHOLD, _M_MMAP_MAX = -1, -4
_DEFAULT_TRIM_THRESHOLD, _DEFAULT_MMAP_MAX = 128 * 1024, 65536


def _user_tuned() -> bool:
    """Whether the environment sets any of glibc's malloc tunables (then they are left alone)."""
    return "GLIBC_TUNABLES" in os.environ or any(k.startswith("MALLOC_") for k in os.environ)


_depth = 0


def _glibc() -> ctypes.CDLL | None:
    """The process's C library when it is glibc (it has ``mallopt`` and ``malloc_trim``), else None."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version  # noqa: B018  (glibc only)
        libc.mallopt, libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


@contextlib.contextmanager
def reuse_freed_memory(device: torch.device | str | None) -> Iterator[bool]:
    """Within the block, freed host memory is kept and reused instead of returned to the kernel.

    Re-entrant: only the outermost block changes and restores the settings.

    Args:
        device: Where the run computes; only ``cpu`` changes anything.

    Yields:
        Whether the settings are in force for the block.
    """
    global _depth
    libc = None
    if (
        ENABLED
        and _depth == 0
        and device is not None
        and torch.device(device).type == "cpu"
        and not _user_tuned()
    ):
        libc = _glibc()
    if libc is None:
        yield _depth > 0
        return
    # mallopt returns 1 on success. glibc reads the trim threshold as a size_t: -1 is "never".
    if not (libc.mallopt(_M_MMAP_MAX, 0) and libc.mallopt(_M_TRIM_THRESHOLD, -1)):
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        yield False
        return
    log.debug("glibc: heap-only allocation without trimming for this run")
    _depth += 1
    try:
        yield True
    finally:
        _depth -= 1
        libc.mallopt(_M_MMAP_MAX, _DEFAULT_MMAP_MAX)
        libc.mallopt(_M_TRIM_THRESHOLD, _DEFAULT_TRIM_THRESHOLD)
        libc.malloc_trim(0)
