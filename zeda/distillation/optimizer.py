"""A stage's optimiser: AdamW over the trainable parameters (the routers' at their own
learning-rate multiple), its warmup schedule, and on a resume the stored state under the recipe's
learning rates."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from zeda.config import RunConfig
from zeda.distillation.checkpoint import find_checkpoint, load_optim_state, restore_optimizer
from zeda.distillation.sharding import prepare_optimizer
from zeda.zero.routing import zero_routers

__all__ = ["lr_scales", "stage_optimizer"]


def stage_optimizer(
    model: nn.Module,
    params: list[nn.Parameter],
    cfg: RunConfig,
    lr: float,
    steps: int,
    accelerator: Accelerator,
    run_path: Path,
    resume: dict | None,
) -> tuple[Any, Any, int]:
    """The optimiser and scheduler of a stage, and the step it starts from.

    Args:
        model: The prepared (wrapped or sharded) student.
        params: Its trainable parameters.
        cfg: The run configuration (``train`` and ``lora`` sections).
        lr: The stage's peak learning rate.
        steps: The stage's optimisation steps (the schedule's length).
        accelerator: The run's accelerator (it prepares the optimiser).
        run_path: Where the run writes (the checkpoint a resume reads).
        resume: The resumed checkpoint's progress record, or None for a fresh stage.

    Returns:
        ``(optimizer, scheduler, start step)``.
    """
    train = cfg.train
    scales = lr_scales(model, params, cfg)
    # With lora.router_rows=zero the real rows get zero gradients; AdamW would still decay
    # them, so the routers' group has no weight decay then.
    frozen_rows = cfg.lora.router_rows == "zero"
    groups = [
        {
            "params": ps,
            "lr": lr * scale,
            **({"weight_decay": 0.0} if router and frozen_rows else {}),
        }
        for (scale, router), ps in scales.items()
        if ps
    ]
    optimizer = torch.optim.AdamW(groups, lr=lr, weight_decay=train.weight_decay)
    warmup = int(train.warmup_ratio * steps)
    if train.lr_schedule == "cosine":
        scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, steps)
    else:
        scheduler = get_constant_schedule_with_warmup(optimizer, warmup)
    start = 0
    if resume:
        state = load_optim_state(find_checkpoint(run_path))
        restore_optimizer(model, optimizer, state["optimizer"])  # any layout: 1 process, DDP, FSDP2
        scheduler.load_state_dict(state["scheduler"])
        # The recipe's lr wins over the stored one, so "lower the lr and resume" works.
        peaks = [lr * scale for (scale, _), ps in scales.items() if ps]
        scheduler.base_lrs = peaks
        for group, fn, peak in zip(optimizer.param_groups, scheduler.lr_lambdas, peaks, strict=True):
            group["initial_lr"] = peak
            group["lr"] = peak * fn(scheduler.last_epoch)
        scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
        start = int(resume["step"])
    return prepare_optimizer(accelerator, optimizer), scheduler, start


def lr_scales(
    model: nn.Module, params: list[nn.Parameter], cfg: RunConfig
) -> dict[tuple[float, bool], list[nn.Parameter]]:
    """Trainable parameters grouped by (learning-rate multiple, is a router parameter):
    routers get ``lora.router_lr_scale``, everything else 1. Routers share the others' group
    when their scale is 1 and all their rows train (``lora.router_rows=all``)."""
    scale = float(cfg.lora.router_lr_scale)
    own = scale != 1.0 or cfg.lora.router_rows == "zero"
    router_ids = {id(p) for r in zero_routers(model) for p in r.parameters()}
    groups: dict[tuple[float, bool], list[nn.Parameter]] = {(1.0, False): [], (scale, own): []}
    for p in params:
        groups[(scale, own) if id(p) in router_ids else (1.0, False)].append(p)
    return groups
