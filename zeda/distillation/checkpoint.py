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

A save writes ``.checkpoint.tmp``, moves the old checkpoint to ``.checkpoint.old``, renames the
new one into place and deletes the old one. A crash between those renames leaves a complete
``.checkpoint.old``, which `find_checkpoint` then returns. Non-finite weights are never saved.
"""

from __future__ import annotations

import json
import pickle
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)

from zeda.errors import ZedaError

__all__ = [
    "CHECKPOINT",
    "find_checkpoint",
    "gather_train_state",
    "load_optim_state",
    "load_trainable",
    "read_state",
    "restore_optimizer",
    "save_checkpoint",
    "trim_metrics",
]

CHECKPOINT = "checkpoint"
STAGES = ("stage1", "stage2")


def _complete(path: Path) -> bool:
    return (path / "state.json").is_file() and (path / "trainable.safetensors").is_file()


def find_checkpoint(run_dir: str | Path) -> Path | None:
    """The run's latest complete checkpoint directory (``checkpoint/`` or ``.checkpoint.old/``), or None."""
    run_dir = Path(run_dir)
    for name in (CHECKPOINT, f".{CHECKPOINT}.old"):
        if _complete(run_dir / name):
            return run_dir / name
    return None


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
    trained = StateDictOptions(full_state_dict=True, cpu_offload=True, ignore_frozen_params=True)
    tensors = get_model_state_dict(model, options=trained)
    optim = get_optimizer_state_dict(model, optimizer, options=full)
    # Buffers are not frozen parameters, so they are still in the state dict: keep parameters.
    return {n: t for n, t in tensors.items() if n in names}, optim


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


def save_checkpoint(run_dir: Path, tensors: dict[str, torch.Tensor], state: dict, optim_state: dict) -> None:
    """Atomically write ``run_dir/checkpoint`` (main process only).

    Args:
        run_dir: The run directory.
        tensors: The full (gathered) trained tensors by parameter name.
        state: Progress, e.g. ``{"stage": "stage1", "step": 4}``.
        optim_state: ``{"optimizer": full name-keyed optimiser state, "scheduler": its state}``.

    Raises:
        ZedaError: if any tensor is not finite (the previous checkpoint is kept).
    """
    bad = [n for n, t in tensors.items() if not torch.isfinite(t).all()]
    if bad:
        raise ZedaError(
            f"refusing to checkpoint non-finite weights ({bad[0]}); the previous checkpoint is kept"
        )
    tmp, final, old = run_dir / f".{CHECKPOINT}.tmp", run_dir / CHECKPOINT, run_dir / f".{CHECKPOINT}.old"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file({n: t.detach().contiguous().cpu() for n, t in tensors.items()}, tmp / "trainable.safetensors")
    torch.save(optim_state, tmp / "optim.pt")
    (tmp / "state.json").write_text(json.dumps(state, indent=1))
    if _complete(final):
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
    else:
        shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)


def read_state(ckpt: Path) -> dict:
    """The progress record (``state.json``) of a checkpoint directory."""
    return json.loads((ckpt / "state.json").read_text())


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
    tensors = load_file(ckpt / "trainable.safetensors")
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    if set(tensors) != set(params):
        raise ZedaError(f"checkpoint {ckpt} does not match this model/recipe; use another train.output_dir")
    with torch.no_grad():
        for n, p in params.items():
            if tensors[n].shape != p.shape:
                raise ZedaError(
                    f"checkpoint {ckpt}: {n} has shape {tuple(tensors[n].shape)}, the model {tuple(p.shape)}"
                )
            p.copy_(tensors[n])
    return read_state(ckpt)


def load_optim_state(ckpt: Path) -> dict:
    """The optimiser and scheduler state of a checkpoint, read without running any code.

    Raises:
        ZedaError: if ``optim.pt`` holds anything but tensors and plain values.
    """
    path = ckpt / "optim.pt"
    try:
        return torch.load(path, weights_only=True, map_location="cpu")
    except (pickle.UnpicklingError, RuntimeError, EOFError, AttributeError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ZedaError(
            f"refusing to load {path}: it is not plain optimiser state ({first[:160]}); "
            "delete the file or start a new run"
        ) from None


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
