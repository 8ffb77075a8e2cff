"""A run's inputs: which paths it reads, and the record that proves them unchanged.

A run records its inputs in `INPUTS` (``inputs.json``): the absolute path of the base model and
a fingerprint of its files (sizes and hashes of config, weights index, tokenizer and weights;
large weight files by their size and first and last MiB), the absolute paths of the data files,
and the hash of the ``recipe.yaml`` zeda wrote (`write_record`, called by
`zeda.distillation.run_dir.RunDir`). `run_config` (export) rebuilds a run from that absolute
base path whatever the working directory, and refuses a base model or a ``recipe.yaml`` that
changed since; `check_resume_inputs` does the same for a resume.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
from pathlib import Path

from zeda.config import RunConfig, load_recipe, save_recipe
from zeda.errors import ZedaError

__all__ = [
    "INPUTS",
    "PATH_KEYS",
    "check_resume_inputs",
    "fingerprint",
    "recorded_inputs",
    "run_config",
    "run_inputs",
    "write_record",
]

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


def run_inputs(cfg: RunConfig) -> list[Path]:
    """The paths a run reads: the model (and its tokenizer) and every data file."""
    d = cfg.data
    paths = [cfg.model.name_or_path, d.train_file, d.eval_file, d.prompt_file, d.rollout_cache]
    return [Path(p) for p in paths if p]


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


def write_record(run_path: Path, cfg: RunConfig, final: Path) -> None:
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
