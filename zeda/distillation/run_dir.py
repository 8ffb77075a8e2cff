"""The run directory: what may be written, resumed or replaced.

Rules (`prepare_run_dir`):

- an output directory that is, or contains, an input (model, data, tokenizer) is refused;
- an existing non-empty directory needs ``train.resume`` (it must hold a checkpoint) or
  ``train.overwrite``;
- ``train.overwrite`` replaces only a zeda run (it carries `MARKER`), unless the user named
  the directory explicitly;
- the old run is replaced only once the new one has written its first checkpoint: until then
  the new run lives in a hidden sibling, and `RunDir.commit` swaps the two.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

from zeda.config import RunConfig
from zeda.errors import ZedaError

__all__ = ["MARKER", "RunDir", "prepare_run_dir", "run_inputs"]

#: File that marks a directory as a zeda run (written when a run starts).
MARKER = ".zeda-run"


def _is_zeda_run(path: Path) -> bool:
    # Runs written before the marker existed are recognised by their checkpoint.
    return (path / MARKER).is_file() or (path / "checkpoint" / "state.json").is_file()


def run_inputs(cfg: RunConfig) -> list[Path]:
    """The paths a run reads: the model (and its tokenizer) and every data file."""
    d = cfg.data
    paths = [cfg.model.name_or_path, d.train_file, d.eval_file, d.prompt_file, d.rollout_cache]
    return [Path(p) for p in paths if p]


@dataclass
class RunDir:
    """Where a run writes.

    Attributes:
        final: ``train.output_dir``.
        path: Where files go now: ``final``, or a hidden sibling until `commit`.
        resuming: Whether the run continues an existing checkpoint.
    """

    final: Path
    path: Path
    resuming: bool = False

    @property
    def staged(self) -> bool:
        """Whether the run still writes into the sibling that will replace ``final``."""
        return self.path != self.final

    def start(self, main: bool = True) -> None:
        """Create the directory the run writes into and mark it as a zeda run."""
        if main:
            self.path.mkdir(parents=True, exist_ok=True)
            (self.path / MARKER).write_text(json.dumps({"zeda_run": 1}) + "\n")

    def commit(self, main: bool = True) -> None:
        """After the first checkpoint: replace the old run with the staged one (no-op otherwise)."""
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

    Nothing of the old run is touched here (it is replaced by `RunDir.commit`); only a stale
    staging sibling left by an earlier attempt is cleared.

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
    from zeda.distillation.checkpoint import find_checkpoint

    final = Path(cfg.train.output_dir).expanduser().resolve()
    for inp in inputs:
        src = Path(inp).expanduser().resolve()
        if _inside(src, final):
            raise ZedaError(
                f"train.output_dir {final} is or contains the input {inp}; choose a separate output directory"
            )
    if not final.exists() or (final.is_dir() and not any(final.iterdir())):
        if cfg.train.resume:
            raise ZedaError(f"train.resume=true but {final} holds no run; start a new run without resume")
        return RunDir(final, final)
    if not final.is_dir():
        raise ZedaError(f"train.output_dir {final} is a file, not a directory")
    if cfg.train.resume:
        if find_checkpoint(final) is None:
            raise ZedaError(
                f"train.resume=true but {final} holds no checkpoint; start a new run without resume"
            )
        return RunDir(final, final, resuming=True)
    if not cfg.train.overwrite:
        raise ZedaError(
            f"output directory {final} already exists; pass train.resume=true to continue it "
            "or train.overwrite=true to start over"
        )
    if not _is_zeda_run(final) and not explicit:
        raise ZedaError(
            f"train.overwrite=true would delete {final}, which is not a zeda run (no {MARKER}); "
            "remove it yourself or choose another train.output_dir"
        )
    staging = final.with_name(f".{final.name}.new")
    if staging.exists():
        if not _is_zeda_run(staging) and any(staging.iterdir()):
            raise ZedaError(
                f"{staging} exists and is not a zeda run; remove it or choose another train.output_dir"
            )
        shutil.rmtree(staging)
    return RunDir(final, staging)
