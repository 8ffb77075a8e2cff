"""Checkpoints of a run: trained tensors, optimiser and scheduler state, progress.

Layout of ``<run>/checkpoint/``: ``trainable.safetensors`` (LoRA factors and router copies),
``optim.pt`` (optimiser + scheduler state: tensors and plain values only, read back with
``torch.load(weights_only=True)`` so a crafted file cannot run code) and ``state.json``
(``{"stage", "step"}``), written last: a directory with ``state.json`` is complete.

The tensors and the optimiser state are always the full, consolidated ones, whatever the run's
layout (one process, DistributedDataParallel or FSDP2 shards): `gather_train_state` gathers them
with ``torch.distributed.checkpoint.state_dict`` (optimiser state keyed by parameter name) and
`restore_optimizer` shards them back onto the optimiser of any layout. A checkpoint written by
two sharded processes therefore resumes on one process and vice versa, and exports as is.

``<run>/best/`` holds the same tensors and ``state.json`` (no optimiser state) of the evaluation
with the lowest validation KL at the target share (`zeda.distillation.validation`): the weights a
finished run keeps; a resume continues from ``checkpoint/``, never from ``best/``.

A save writes ``.checkpoint.tmp``, moves the previous checkpoint to ``.checkpoint.old`` and renames
the new one into place. The previous one stays until the next optimisation step after the save
has proven finite (`prove_checkpoint` deletes it); if that step is not finite, `rollback_checkpoint`
puts it back, so the checkpoint a run keeps is always one whose next step was finite. A crash
between the renames leaves a complete ``.checkpoint.old``, which `find_checkpoint` then returns.
Non-finite weights are never saved; a save that fails (full disk, file size limit) leaves no
``.checkpoint.tmp`` and the previous checkpoint in place.
"""

from __future__ import annotations

import json
import pickle
import re
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from zeda.errors import ZedaError, write_failure

__all__ = [
    "BEST",
    "best_checkpoint",
    "gather_trained",
    "read_record",
    "restore_trained",
    "CHECKPOINT",
    "check_checkpoint",
    "checkpoint_bytes",
    "find_checkpoint",
    "gather_train_state",
    "load_optim_state",
    "load_trainable",
    "prove_checkpoint",
    "read_state",
    "restore_optimizer",
    "rollback_checkpoint",
    "save_checkpoint",
    "trim_metrics",
]

CHECKPOINT = "checkpoint"
OLD = f".{CHECKPOINT}.old"
TMP = f".{CHECKPOINT}.tmp"
BEST = "best"
STAGES = ("stage1", "stage2")


def _complete(path: Path) -> bool:
    return (path / "state.json").is_file() and (path / "trainable.safetensors").is_file()


def find_checkpoint(run_dir: str | Path) -> Path | None:
    """The run's latest complete checkpoint directory (``checkpoint/`` or ``.checkpoint.old/``), or None."""
    run_dir = Path(run_dir)
    for name in (CHECKPOINT, OLD):
        if _complete(run_dir / name):
            return run_dir / name
    return None


def best_checkpoint(run_dir: str | Path) -> Path | None:
    """The run's complete best checkpoint directory (``best/`` or ``.best.old/``), or None."""
    run_dir = Path(run_dir)
    for name in (BEST, f".{BEST}.old"):
        if _complete(run_dir / name):
            return run_dir / name
    return None


def gather_trained(model: nn.Module, names: set[str]) -> dict[str, torch.Tensor]:
    """The full trained tensors of a model of any layout (a collective: every rank calls it).

    The main process gets full CPU tensors by parameter name, the others an empty dict.
    """
    trained = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    tensors = get_model_state_dict(model, options=trained)
    # Buffers are not frozen parameters, so they are still in the state dict: keep parameters.
    return {n: t for n, t in tensors.items() if n in names}


def restore_trained(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Load full trained tensors (from `gather_trained` or a checkpoint) into a model of any layout.

    Every rank passes the same full tensors; each keeps its own shards. Frozen parameters and
    buffers are left as they are.
    """
    set_model_state_dict(model, tensors, options=StateDictOptions(full_state_dict=True, strict=False))


def gather_train_state(
    model: nn.Module, optimizer: torch.optim.Optimizer, names: set[str]
) -> tuple[dict[str, torch.Tensor], dict]:
    """The full trained tensors and optimiser state of a model, gathered from any layout.

    A collective: every rank must call it. The main process gets full CPU tensors, the others
    empty dicts (``StateDictOptions(full_state_dict=True, cpu_offload=True)``); frozen
    parameters are neither gathered nor returned.

    Args:
        model: The model the step runs (unwrapped, DDP-wrapped or FSDP2-sharded).
        optimizer: Its optimiser (a plain torch optimiser, not accelerate's wrapper).
        names: The trainable parameter names of the unwrapped model (the keys to keep).

    Returns:
        ``(tensors, optimizer_state)``: tensors by parameter name (shapes of the unsharded
        parameters) and the optimiser state keyed by parameter name.
    """
    full = StateDictOptions(full_state_dict=True, cpu_offload=True)
    tensors = gather_trained(model, names)
    return tensors, get_optimizer_state_dict(model, optimizer, options=full)


def restore_optimizer(model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load a full, name-keyed optimiser state (from `gather_train_state`) into ``optimizer``.

    Every rank passes the same full state; each keeps the part of its own shards.

    Raises:
        ZedaError: if the stored state does not name this model's trainable parameters.
    """
    groups = state.get("param_groups") if isinstance(state, dict) else None
    if not groups or not all(isinstance(n, str) for g in groups for n in g.get("params", [])):
        raise ZedaError("the checkpoint's optimiser state is not keyed by parameter name; start a new run")
    # torch initialises an empty optimiser state with one zero-gradient step, only without gradients.
    optimizer.zero_grad(set_to_none=True)
    try:
        set_optimizer_state_dict(model, optimizer, state, options=StateDictOptions(full_state_dict=True))
    except (KeyError, ValueError, RuntimeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ZedaError(
            f"the checkpoint's optimiser state does not match this model ({first[:160]})"
        ) from None


def checkpoint_bytes(model: nn.Module) -> tuple[int, int]:
    """``(total, largest file)`` bytes a checkpoint of ``model``'s trainable parameters takes.

    ``trainable.safetensors`` holds the tensors, ``optim.pt`` AdamW's two moments of each (fp32
    or the parameter's dtype, whichever is wider) plus a few KiB of bookkeeping.
    """
    tensors = moments = 0
    for p in model.parameters():
        if p.requires_grad:
            tensors += p.numel() * p.element_size()
            moments += 2 * p.numel() * max(p.element_size(), 4)
    overhead = 64 * 1024
    return tensors + moments + 2 * overhead, max(tensors, moments) + overhead


def save_checkpoint(
    run_dir: Path,
    tensors: dict[str, torch.Tensor],
    state: dict,
    optim_state: dict | None,
    name: str = CHECKPOINT,
    records: dict[str, dict] | None = None,
) -> None:
    """Atomically write ``run_dir/<name>`` (main process only). For ``checkpoint`` the previous one
    becomes ``.checkpoint.old`` until `prove_checkpoint` (or `rollback_checkpoint`); the previous
    ``best`` is deleted once the new one is in place.

    Args:
        run_dir: The run directory.
        tensors: The full (gathered) trained tensors by parameter name.
        state: Progress, e.g. ``{"stage": "stage1", "step": 4}``.
        optim_state: ``{"optimizer": full name-keyed optimiser state, "scheduler": its state}``, or
            None (no ``optim.pt``: the best checkpoint).
        name: ``checkpoint`` (`CHECKPOINT`) or ``best`` (`BEST`).
        records: Further JSON files to keep with it, ``{file name: content}`` (e.g. the
            validation bookkeeping, ``validation.json``); read back with `read_record`.

    Raises:
        ZedaError: if any tensor is not finite, or the disk is full (the previous checkpoint is
            kept and nothing else is left behind).
    """
    bad = [n for n, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:
        raise ZedaError(
            f"refusing to checkpoint non-finite weights ({bad[0]}); the previous checkpoint is kept"
        )
    tmp, final, old = run_dir / f".{name}.tmp", run_dir / name, run_dir / f".{name}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir(parents=True)
        save_file(
            {n: t.detach().contiguous().cpu() for n, t in tensors.items()}, tmp / "trainable.safetensors"
        )
        if optim_state is not None:
            torch.save(optim_state, tmp / "optim.pt")
        for file, content in (records or {}).items():
            (tmp / file).write_text(json.dumps(content, indent=1))
        (tmp / "state.json").write_text(json.dumps(state, indent=1))
    except BaseException as exc:
        shutil.rmtree(tmp, ignore_errors=True)
        reason = write_failure(exc)
        if reason is None:
            raise
        if find_checkpoint(run_dir) is None:  # the run is removed (or the overwritten one kept)
            raise ZedaError(
                f"cannot write the run's first checkpoint: {reason}; nothing was saved; "
                "free disk space (or raise ulimit -f) and run the same command again"
            ) from None
        raise ZedaError(
            f"cannot write a checkpoint in {run_dir}: {reason}; the previous checkpoint is kept; "
            "free disk space (or raise ulimit -f) and resume with train.resume=true"
        ) from None
    if _complete(final):
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    else:
        shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    if name != CHECKPOINT:  # only the training checkpoint waits for a finite next step
        shutil.rmtree(old, ignore_errors=True)


def prove_checkpoint(run_dir: Path) -> None:
    """The step after the latest save was finite: the checkpoint before it is no longer needed."""
    if _complete(Path(run_dir) / CHECKPOINT):
        shutil.rmtree(Path(run_dir) / OLD, ignore_errors=True)


def rollback_checkpoint(run_dir: Path, latest_unproven: bool) -> dict | None:
    """After a non-finite step: keep only a checkpoint whose next step was finite.

    Args:
        run_dir: The run directory.
        latest_unproven: No finite step has followed the latest save yet.

    Returns:
        The progress record of the checkpoint kept, or None when none is left.
    """
    run_dir = Path(run_dir)
    final, old = run_dir / CHECKPOINT, run_dir / OLD
    if _complete(old):
        shutil.rmtree(final, ignore_errors=True)
        old.rename(final)
    elif latest_unproven:
        shutil.rmtree(final, ignore_errors=True)
    return read_state(final) if _complete(final) else None


def read_record(ckpt: Path, file: str) -> dict | None:
    """A JSON record saved with a checkpoint (``records`` of `save_checkpoint`), or None."""
    path = ckpt / file
    return json.loads(path.read_text()) if path.is_file() else None


def read_state(ckpt: Path) -> dict:
    """The progress record (``state.json``) of a checkpoint directory.

    Raises:
        ZedaError: if the file is not ``{"stage": "stage1"|"stage2", "step": N}``.
    """
    path = Path(ckpt) / "state.json"
    try:
        state = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise _damaged(path, Path(ckpt), _first(exc)) from None
    ok = (
        isinstance(state, dict)
        and state.get("stage") in STAGES
        and isinstance(state.get("step"), int)
        and not isinstance(state.get("step"), bool)
        and state["step"] >= 0
    )
    if not ok:
        raise _damaged(path, Path(ckpt), 'expected {"stage": "stage1", "step": N}')
    return state


def _first(exc: BaseException) -> str:
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(exc)).strip().splitlines()
    return text[0] if text else type(exc).__name__


def _damaged(path: Path, ckpt: Path, detail: str) -> ZedaError:
    earlier = ckpt.name == CHECKPOINT and _complete(ckpt.parent / OLD)
    fix = f"delete {ckpt} to fall back to the earlier checkpoint" if earlier else "start a new run"
    return ZedaError(f"{path} is damaged or truncated ({detail}); {fix}")


def check_checkpoint(ckpt: Path, optimizer: bool = True) -> dict:
    """Read a checkpoint's progress record and headers (not its tensors): a damaged one is
    refused before any model is loaded.

    Args:
        ckpt: The checkpoint directory.
        optimizer: ``optim.pt`` must be there too (a resume needs it, an export does not).

    Returns:
        The progress record.

    Raises:
        ZedaError: naming the damaged or missing file.
    """
    from safetensors import safe_open

    state = read_state(ckpt)
    path = ckpt / "trainable.safetensors"
    try:
        with safe_open(str(path), framework="pt") as f:
            f.keys()
    except Exception as exc:  # safetensors raises its own error type for damaged files
        raise _damaged(path, ckpt, _first(exc)) from None
    if optimizer and not (ckpt / "optim.pt").is_file():
        raise ZedaError(
            f"{ckpt / 'optim.pt'} is missing, so the optimiser cannot resume; start a new run "
            "(or export the run as it is: zeda export --model RUN)"
        )
    return state


def load_trainable(run_dir_or_ckpt: str | Path, model: nn.Module) -> dict:
    """Copy a checkpoint's trained tensors into ``model``; return its progress record.

    Args:
        run_dir_or_ckpt: A run directory (its latest complete checkpoint is used) or a
            checkpoint directory.
        model: The student (same recipe) whose trainable parameters receive the tensors.

    Raises:
        ZedaError: if there is no checkpoint or it does not match the model.
    """
    path = Path(run_dir_or_ckpt)
    ckpt = path if _complete(path) else find_checkpoint(path)
    if ckpt is None:
        raise ZedaError(f"{path} holds no complete checkpoint")
    state = read_state(ckpt)
    try:
        tensors = load_file(ckpt / "trainable.safetensors")
    except Exception as exc:  # safetensors raises its own error type for damaged files
        raise _damaged(ckpt / "trainable.safetensors", ckpt, _first(exc)) from None
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != set(params):
        raise ZedaError(f"checkpoint {ckpt} does not match this model/recipe; use another train.output_dir")
    with torch.no_grad():
        for n, p in params.items():
            if tensors[n].shape != p.shape:
                raise ZedaError(
                    f"checkpoint {ckpt}: {n} has shape {tuple(tensors[n].shape)}, the model {tuple(p.shape)}"
                )
            if not torch.isfinite(tensors[n]).all():
                raise ZedaError(f"checkpoint {ckpt}: {n} holds NaN or Inf values; start a new run")
            p.copy_(tensors[n])
    return state


def load_optim_state(ckpt: Path) -> dict:
    """The optimiser and scheduler state of a checkpoint, read without running any code.

    Raises:
        ZedaError: if ``optim.pt`` holds anything but tensors and plain values.
    """
    path = ckpt / "optim.pt"
    if not path.is_file():
        raise ZedaError(
            f"{path} is missing, so the optimiser cannot resume; start a new run "
            "(or export the run as it is: zeda export --model RUN)"
        )
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except pickle.UnpicklingError as exc:
        found = re.search(r"GLOBAL ([\w.]+)", str(exc))
        what = f"a Python object ({found.group(1)})" if found else "something other than tensors"
        raise ZedaError(
            f"refusing to load {path}: it holds {what}, not plain optimiser state, and zeda never "
            "runs code from a run directory; delete the file or start a new run"
        ) from None
    except (RuntimeError, EOFError, AttributeError, TypeError, OSError) as exc:
        raise ZedaError(
            f"{path} is damaged or truncated ({_first(exc)}); start a new run "
            "(or export the run as it is: zeda export --model RUN)"
        ) from None
    if not (isinstance(state, dict) and isinstance(state.get("optimizer"), dict) and "scheduler" in state):
        raise ZedaError(f"{path} is not a zeda optimiser state; start a new run")
    return state


def trim_metrics(run_dir: Path, state: dict) -> None:
    """Drop ``metrics.jsonl`` rows logged after the checkpoint a resume starts from."""
    path = run_dir / "metrics.jsonl"
    if not path.is_file():
        return
    stage_i = STAGES.index(state["stage"])
    keep = []
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        row = json.loads(line)
        row_i = STAGES.index(row["stage"]) if row.get("stage") in STAGES else 0
        if row_i < stage_i or (row_i == stage_i and int(row.get("step", 0)) <= int(state["step"])):
            keep.append(line)
    tmp = path.with_suffix(".jsonl.tmp")
    tmp.write_text("".join(f"{line}\n" for line in keep))
    tmp.replace(path)
