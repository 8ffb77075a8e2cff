"""The run directory: what may be written, resumed or replaced, by whom, and from which inputs.

Rules (`prepare_run_dir`, checked before anything is written):

- an output directory that is, or contains, an input (model, data, tokenizer) is refused;
- an existing non-empty directory needs ``train.resume`` (it must hold a checkpoint) or
  ``train.overwrite``;
- ``train.overwrite`` replaces only a zeda run (it carries `MARKER`), unless the user named
  the directory explicitly;
- the old run is replaced only once the new one holds a checkpoint that a finite step followed:
  until then the new run lives in a hidden sibling, and `RunDir.commit` swaps the two.

While a run writes (`RunDir.session`), it holds a lock on ``.<name>.lock`` beside the directory:
a second writer is refused in one line, and a lock held by a process that died is released by
the system. A run that fails before its first such checkpoint leaves nothing behind (a new
directory is removed, an overwritten run is kept as it was); a resumed run that fails keeps its
checkpoint, and its ``metrics.jsonl`` is trimmed back to it.

A run records and checks its inputs (the base model's fingerprint, the data paths, the recipe's
hash) through `zeda.distillation.inputs`; its public names are re-exported here.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from zeda.config import RunConfig
from zeda.distillation.inputs import (
    INPUTS,
    check_resume_inputs,
    fingerprint,
    recorded_inputs,
    run_config,
    run_inputs,
    write_record,
)
from zeda.errors import ZedaError, write_failure
from zeda.fs import FileLock, check_writable

__all__ = [
    "INPUTS",
    "MARKER",
    "RunDir",
    "check_resume_inputs",
    "fingerprint",
    "prepare_run_dir",
    "recorded_inputs",
    "run_config",
    "run_inputs",
]

#: File that marks a directory as a zeda run (written when a run starts).
MARKER = ".zeda-run"


def _is_zeda_run(path: Path) -> bool:
    # Runs written before the marker existed are recognised by their checkpoint.
    return (path / MARKER).is_file() or (path / "checkpoint" / "state.json").is_file()


@dataclass
class RunDir:
    """Where a run writes.

    Attributes:
        final: ``train.output_dir``.
        path: Where files go now: ``final``, or a hidden sibling until `commit`.
        resuming: Whether the run continues an existing checkpoint.
        committed: Whether ``path`` holds a checkpoint a finite step followed (always for a
            resume): from then on a failure keeps the run.
    """

    final: Path
    path: Path
    resuming: bool = False
    recheck: Callable[[], RunDir] | None = field(default=None, repr=False, compare=False)
    committed: bool = field(default=False, compare=False)
    _started: bool = field(default=False, repr=False, compare=False)
    _final_existed: bool = field(default=False, repr=False, compare=False)
    _pending: RunConfig | None = field(default=None, repr=False, compare=False)
    _resumed_from: dict | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        self.committed = self.committed or self.resuming

    @property
    def staged(self) -> bool:
        """Whether the run still writes into the sibling that will replace ``final``."""
        return self.path != self.final

    @property
    def _writes_in_final(self) -> bool:
        # A resume, or a new run in an existing empty directory (perhaps a mount point whose
        # parent is not writable), writes inside ``final``; anything else creates entries beside it.
        return not self.staged and self.final.is_dir()

    @property
    def lock_path(self) -> Path:
        """The lock file: ``.<name>.lock`` beside the run directory (inside it when the run
        writes only inside an existing directory whose parent is not writable)."""
        if self._writes_in_final and not os.access(self.final.parent, os.W_OK):
            return self.final / ".zeda-run.lock"
        return self.final.with_name(f".{self.final.name}.lock")

    @contextlib.contextmanager
    def session(self, main: bool = True) -> Iterator[RunDir]:
        """Hold the run's lock while the block writes it; on failure, leave nothing half done.

        On entry (main process): the parent directory must be writable, no live process may
        hold the lock, and the checks of `prepare_run_dir` must still hold under the lock. A
        stale staging directory from a killed run is removed then. If the block raises: a run
        without a checkpoint that a finite step followed is removed (an overwritten run stays as
        it was), a resumed or committed run keeps its checkpoint and its ``metrics.jsonl`` is
        trimmed back to it.

        Raises:
            ZedaError: if another process writes the run, or the place is not writable.
        """
        if not main:
            yield self
            return
        created = self._make_parents()
        lock = FileLock(self.lock_path)
        try:
            try:
                holder = lock.acquire()
            except OSError as exc:
                reason = write_failure(exc) or exc.strerror
                raise ZedaError(
                    f"cannot write in {self.final.parent}: {reason}; choose another train.output_dir"
                ) from None
            if holder is not None:
                raise ZedaError(
                    f"another zeda process ({holder}) is writing {self.final}; wait for it to finish "
                    "or choose another train.output_dir"
                )
            if self.recheck is not None:
                now = self.recheck()
                if (now.path, now.resuming) != (self.path, self.resuming):
                    raise ZedaError(f"{self.final} changed while this run started; run the command again")
            target = self.final if self._writes_in_final else self.final.parent
            check_writable(target, "choose another train.output_dir or make it writable")
            self._final_existed = self.final.exists()
            if self.staged and self.path.exists():
                shutil.rmtree(self.path)  # left by a killed run (checked to be a zeda run)
            yield self
        except BaseException:
            self._abort()
            raise
        finally:
            lock.release()
            if not self.final.exists():
                for d in reversed(created):
                    with contextlib.suppress(OSError):
                        d.rmdir()

    def _make_parents(self) -> list[Path]:
        created = []
        p = self.final.parent
        while not p.exists() and p != p.parent:
            created.append(p)
            p = p.parent
        created.reverse()
        for d in created:
            try:
                d.mkdir()
            except OSError as exc:
                reason = write_failure(exc) or exc.strerror
                raise ZedaError(f"cannot create {d}: {reason}; choose another train.output_dir") from None
        return created

    def _abort(self) -> None:
        from zeda.distillation.checkpoint import find_checkpoint, read_state, trim_metrics

        if not self._started:
            return
        if not self.committed and find_checkpoint(self.path) is not None:
            # Stopped (not by a non-finite step) after a checkpoint: keep the run to resume.
            with contextlib.suppress(OSError):
                self.commit()
        if not self.committed:
            if self.staged:
                shutil.rmtree(self.path, ignore_errors=True)
            elif self._final_existed:  # an empty directory before the run: empty it again
                for child in self.final.iterdir():
                    if child.is_dir() and not child.is_symlink():
                        shutil.rmtree(child, ignore_errors=True)
                    else:
                        child.unlink(missing_ok=True)
            else:
                shutil.rmtree(self.final, ignore_errors=True)
            return
        with contextlib.suppress(Exception):  # never mask the error that stopped the run
            ckpt = find_checkpoint(self.path)
            if ckpt is not None:
                trim_metrics(self.path, read_state(ckpt))

    def start(self, main: bool = True, cfg: RunConfig | None = None) -> None:
        """Create the directory the run writes into and mark it as a zeda run.

        A new run writes ``recipe.yaml`` and `INPUTS` now; a resumed one once a finite step has
        followed its first new checkpoint (`commit`), so a resume that fails changes neither.
        """
        self._started = True
        if not main:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        (self.path / MARKER).write_text(json.dumps({"zeda_run": 1}) + "\n")
        if cfg is not None:
            if self.resuming:
                from zeda.distillation.checkpoint import find_checkpoint, read_state

                ckpt = find_checkpoint(self.path)
                self._pending = cfg
                self._resumed_from = read_state(ckpt) if ckpt is not None else None
            else:
                write_record(self.path, cfg, self.final)

    def commit(self, main: bool = True) -> None:
        """Once a checkpoint is proven: replace the old run with the staged one (if staged); a
        resumed run records the recipe that produced the checkpoint."""
        from zeda.distillation.checkpoint import find_checkpoint, read_state

        self.committed = True
        if self._pending is not None:
            ckpt = find_checkpoint(self.path)
            if ckpt is not None and read_state(ckpt) != self._resumed_from:  # a new checkpoint
                if main:
                    write_record(self.path, self._pending, self.final)
                self._pending = None
        if not self.staged:
            return
        if main:
            trash = self.final.with_name(f".{self.final.name}.replaced")
            shutil.rmtree(trash, ignore_errors=True)
            if self.final.exists():
                self.final.rename(trash)
            self.path.rename(self.final)
            shutil.rmtree(trash, ignore_errors=True)
        self.path = self.final


def _inside(child: Path, parent: Path) -> bool:
    return child == parent or parent in child.parents


def prepare_run_dir(cfg: RunConfig, inputs: list[Path], explicit: bool = False) -> RunDir:
    """Check ``train.output_dir`` against the inputs and the resume/overwrite flags.

    Nothing is written or deleted here: `RunDir.session` takes the lock and clears a stale
    staging sibling, and the old run is replaced by `RunDir.commit`.

    Args:
        cfg: The run configuration.
        inputs: Paths the run reads (see `run_inputs`).
        explicit: The user named the output directory on the command line; then a directory
            without the zeda marker may be replaced too.

    Returns:
        The `RunDir`.

    Raises:
        ZedaError: one line naming the problem.
    """
    from zeda.distillation.checkpoint import check_checkpoint, find_checkpoint

    final = Path(cfg.train.output_dir).expanduser().resolve()
    for inp in inputs:
        src = Path(inp).expanduser().resolve()
        if _inside(src, final):
            raise ZedaError(
                f"train.output_dir {final} is or contains the input {inp}; choose a separate output directory"
            )

    def recheck() -> RunDir:
        return prepare_run_dir(cfg, inputs, explicit)

    if not final.exists() or (final.is_dir() and not any(final.iterdir())):
        if cfg.train.resume:
            raise ZedaError(f"train.resume=true but {final} holds no run; start a new run without resume")
        return RunDir(final, final, recheck=recheck)
    if not final.is_dir():
        raise ZedaError(f"train.output_dir {final} is a file, not a directory")
    if cfg.train.resume:
        ckpt = find_checkpoint(final)
        if ckpt is None:
            raise ZedaError(
                f"train.resume=true but {final} holds no checkpoint; start over with train.overwrite=true"
                if _is_zeda_run(final)
                else f"train.resume=true but {final} holds no checkpoint; start a new run without resume"
            )
        check_checkpoint(ckpt)  # a damaged one is refused before the model is loaded
        return RunDir(final, final, resuming=True, recheck=recheck)
    if not cfg.train.overwrite:
        raise ZedaError(
            f"output directory {final} already exists; pass train.resume=true to continue it "
            "or train.overwrite=true to start over"
            if find_checkpoint(final) is not None or not _is_zeda_run(final)
            else f"output directory {final} holds a zeda run that stopped before its first checkpoint; "
            "pass train.overwrite=true to start over"
        )
    if not _is_zeda_run(final) and not explicit:
        raise ZedaError(
            f"train.overwrite=true would delete {final}, which is not a zeda run (no {MARKER}); "
            "remove it yourself or choose another train.output_dir"
        )
    staging = final.with_name(f".{final.name}.new")
    if staging.exists() and not _is_zeda_run(staging) and any(staging.iterdir()):
        raise ZedaError(
            f"{staging} exists and is not a zeda run; remove it or choose another train.output_dir"
        )
    return RunDir(final, staging, recheck=recheck)
