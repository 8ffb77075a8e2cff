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

A run records its inputs in `INPUTS` (``inputs.json``): the absolute path of the base model and
a fingerprint of its files (sizes and hashes of config, weights index, tokenizer and weights;
large weight files by their size and first and last MiB), the absolute paths of the data files,
and the hash of the ``recipe.yaml`` zeda wrote. `run_config` (export) rebuilds a run from that
absolute base path whatever the working directory, and refuses a base model or a ``recipe.yaml``
that changed since; `check_resume_inputs` does the same for a resume.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from zeda.config import RunConfig, load_recipe, save_recipe
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
#: The run's inputs: absolute paths, the base model's fingerprint, the recipe's hash.
INPUTS = "inputs.json"
#: Recipe keys that name input paths (resolved to absolute paths in `INPUTS`).
PATH_KEYS = (
    "model.name_or_path",
    "data.train_file",
    "data.eval_file",
    "data.prompt_file",
    "data.rollout_cache",
)

_HASH_WHOLE = 16 * 2**20  # files up to this size are hashed whole, larger ones by their ends
_HASH_ENDS = 2**20
_MODEL_SUFFIXES = (".json", ".safetensors", ".bin", ".model", ".txt", ".jinja", ".tiktoken", ".py")


def _is_zeda_run(path: Path) -> bool:
    # Runs written before the marker existed are recognised by their checkpoint.
    return (path / MARKER).is_file() or (path / "checkpoint" / "state.json").is_file()


def run_inputs(cfg: RunConfig) -> list[Path]:
    """The paths a run reads: the model (and its tokenizer) and every data file."""
    d = cfg.data
    paths = [cfg.model.name_or_path, d.train_file, d.eval_file, d.prompt_file, d.rollout_cache]
    return [Path(p) for p in paths if p]


# ----------------------------------------------------------------------------------------------
# Fingerprints and the inputs record
# ----------------------------------------------------------------------------------------------


def _file_hash(path: Path, size: int) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        if size <= _HASH_WHOLE:
            for chunk in iter(lambda: f.read(2**20), b""):
                h.update(chunk)
            return "sha256:" + h.hexdigest()
        h.update(f.read(_HASH_ENDS))
        f.seek(size - _HASH_ENDS)
        h.update(f.read(_HASH_ENDS))
    return "ends-sha256:" + h.hexdigest()


def fingerprint(model_dir: str | os.PathLike) -> dict[str, list]:
    """``file name -> [size, hash]`` of a model directory's config, weights and tokenizer files.

    Files up to 16 MiB are hashed whole; larger (weight) files by their size and their first
    and last MiB, so a fingerprint of a large checkpoint costs a few reads, not a full pass.
    """
    out: dict[str, list] = {}
    for f in sorted(Path(model_dir).iterdir()):
        if f.name.startswith(".") or not f.is_file() or not f.name.endswith(_MODEL_SUFFIXES):
            continue
        size = f.stat().st_size
        out[f.name] = [size, _file_hash(f, size)]
    return out


def _diff(recorded: dict[str, list], now: dict[str, list]) -> str | None:
    for name in sorted(set(recorded) | set(now)):
        if name not in now:
            return f"{name} is missing"
        if name not in recorded:
            return f"{name} was added"
        if list(recorded[name]) != list(now[name]):
            return f"{name} changed"
    return None


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _absolute_paths(cfg: RunConfig) -> dict[str, str]:
    out = {}
    for key in PATH_KEYS:
        section, name = key.split(".")
        value = getattr(getattr(cfg, section), name)
        if value and (key != "model.name_or_path" or Path(value).expanduser().exists()):
            out[key] = str(Path(value).expanduser().resolve())
    return out


def _write_record(run_path: Path, cfg: RunConfig, final: Path) -> None:
    """Write ``recipe.yaml`` and `INPUTS` (each to a temporary name, then renamed).

    Each input is recorded by absolute path and by its path relative to the run directory
    (``final``), so a run moved together with its inputs still finds them.
    """
    save_recipe(cfg, run_path / "recipe.yaml")
    model = Path(cfg.model.name_or_path).expanduser()
    paths = _absolute_paths(cfg)
    record = {
        "recipe_sha256": _sha256(run_path / "recipe.yaml"),
        "model": {
            "name_or_path": cfg.model.name_or_path,
            "path": str(model.resolve()) if model.is_dir() else None,
            "files": fingerprint(model) if model.is_dir() else None,
        },
        "paths": paths,
        "relative_to_run": {k: os.path.relpath(v, final) for k, v in paths.items()},
    }
    tmp = run_path / f".{INPUTS}.tmp"
    tmp.write_text(json.dumps(record, indent=1) + "\n")
    os.replace(tmp, run_path / INPUTS)


def _read_record(run_dir: Path) -> dict | None:
    path = run_dir / INPUTS
    if not path.is_file():
        return None  # a run written before zeda recorded its inputs
    try:
        record = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        record = None
    if not isinstance(record, dict) or not isinstance(record.get("model"), dict):
        raise ZedaError(f"{path} is damaged; the run's inputs cannot be checked: start a new run")
    return record


def _check_recipe(run_dir: Path, record: dict) -> None:
    recipe = run_dir / "recipe.yaml"
    if not recipe.is_file():
        raise ZedaError(f"{run_dir} has no recipe.yaml; it cannot be resumed or exported")
    if _sha256(recipe) != record.get("recipe_sha256"):
        raise ZedaError(
            f"{recipe} was edited after zeda wrote it, so it no longer describes the checkpoint; "
            "restore it (resume or rerun to change settings)"
        )


def _check_model(record: dict, model_dir: Path, run_dir: Path) -> None:
    files = record["model"].get("files")
    if files is None:
        return  # a hub id: nothing local to compare
    if not model_dir.is_dir():
        raise ZedaError(
            f"the base model {model_dir} that run {run_dir} was trained from is missing; "
            "restore it at that path"
        )
    what = _diff(files, fingerprint(model_dir))
    if what is not None:
        raise ZedaError(
            f"the base model {model_dir} is not the one run {run_dir} was trained from ({what}); "
            "restore the original model there, or start a new run"
        )


def _recorded(record: dict, run_dir: Path) -> dict[str, list[Path]]:
    """``key -> [absolute path, path relative to the run]`` of each recorded input."""
    rel = record.get("relative_to_run", {})
    return {
        k: [Path(v), *([run_dir.absolute() / rel[k]] if k in rel else [])]
        for k, v in record.get("paths", {}).items()
    }


def run_config(run_dir: str | os.PathLike) -> RunConfig:
    """A run's recipe with its input paths made absolute as recorded when the run started.

    The base model is read from the absolute path recorded in `INPUTS`, whatever the working
    directory (or, if the run and its inputs moved together, from the same place relative to
    the run); its files and ``recipe.yaml`` must be unchanged since the run wrote them.

    Raises:
        ZedaError: for a missing or edited recipe, a missing or changed base model.
    """
    run_dir = Path(run_dir)
    record = _read_record(run_dir)
    if record is not None:
        _check_recipe(run_dir, record)
    cfg = load_recipe(run_dir / "recipe.yaml")
    if record is None:
        return cfg
    for key, candidates in _recorded(record, run_dir).items():
        section, name = key.split(".")
        found = next((c for c in candidates if c.exists()), candidates[0])
        if key == "model.name_or_path" and record["model"].get("files") is not None:
            # The first candidate with the recorded files; else the error names the recorded path.
            found = next(
                (
                    c
                    for c in candidates
                    if c.is_dir() and _diff(record["model"]["files"], fingerprint(c)) is None
                ),
                None,
            )
            if found is None:
                _check_model(record, candidates[0], run_dir)
        setattr(getattr(cfg, section), name, str(os.path.normpath(found)))
    return cfg


def check_resume_inputs(run_dir: str | os.PathLike, cfg: RunConfig) -> None:
    """Refuse a resume whose ``recipe.yaml`` was edited or whose base model is not the recorded one.

    Raises:
        ZedaError: naming the edited recipe or the changed model file.
    """
    run_dir = Path(run_dir)
    record = _read_record(run_dir)
    if record is None:
        return
    _check_recipe(run_dir, record)
    model = Path(cfg.model.name_or_path).expanduser()
    if record["model"].get("files") is not None:
        _check_model(record, model.resolve() if model.exists() else model, run_dir)


def recorded_inputs(run_dir: str | os.PathLike) -> list[Path]:
    """Every input a run read, as absolute paths (for output checks that must never hit them).

    For a run written before inputs were recorded, the recipe's relative paths are taken from
    both the working directory and the run's parent directory.
    """
    run_dir = Path(run_dir)
    with contextlib.suppress(ZedaError):
        record = _read_record(run_dir)
        if record is not None:
            return [p for candidates in _recorded(record, run_dir).values() for p in candidates]
    try:
        cfg = load_recipe(run_dir / "recipe.yaml")
    except ZedaError:
        return []
    paths = run_inputs(cfg)
    return [*paths, *(run_dir.resolve().parent / p for p in paths if not p.is_absolute())]


# ----------------------------------------------------------------------------------------------
# The run directory
# ----------------------------------------------------------------------------------------------


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
                _write_record(self.path, cfg, self.final)

    def commit(self, main: bool = True) -> None:
        """Once a checkpoint is proven: replace the old run with the staged one (if staged); a
        resumed run records the recipe that produced the checkpoint."""
        from zeda.distillation.checkpoint import find_checkpoint, read_state

        self.committed = True
        if self._pending is not None:
            ckpt = find_checkpoint(self.path)
            if ckpt is not None and read_state(ckpt) != self._resumed_from:  # a new checkpoint
                if main:
                    _write_record(self.path, self._pending, self.final)
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
