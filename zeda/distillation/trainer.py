"""The optimisation machinery shared by both stages: the teacher → student → capture step,
the update with its non-finite guard, checkpoints and metrics."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm
from transformers import get_constant_schedule_with_warmup, get_cosine_schedule_with_warmup

from zeda.config import RunConfig
from zeda.distillation.balance import BalanceTracker, RouterCapture
from zeda.distillation.checkpoint import (
    find_checkpoint,
    gather_train_state,
    load_optim_state,
    prove_checkpoint,
    restore_optimizer,
    rollback_checkpoint,
    save_checkpoint,
)
from zeda.distillation.rollouts import Batch, forward_logits
from zeda.distillation.run_dir import RunDir
from zeda.distillation.sharding import prepare_optimizer
from zeda.errors import ZedaError
from zeda.zero.inject import teacher_mode
from zeda.zero.routing import zero_routers

__all__ = ["STOP_FILE", "DistillResult", "Stage", "Trainer"]

#: Written into the run directory when a run stops on a non-finite update; a resume may then
#: lower the learning rates.
STOP_FILE = "stopped.json"


@dataclass
class DistillResult:
    """Outcome of `distill`.

    Attributes:
        output_dir: Run directory (recipe.yaml, metrics.jsonl, checkpoint/).
        stage1_steps: Optimisation steps done in stage 1.
        stage2_steps: Optimisation steps done in stage 2.
        final_zero_share: Share of the selected slots that went to zero experts over the last
            logged window (the router's real selections, all ranks).
        target_zero_share: Equilibrium share the balance loss aims at.
        tokens_seen: Student tokens processed (this process).
        wall_seconds: Training time of this call.
        last: The last logged metrics row.
    """

    output_dir: str
    stage1_steps: int = 0
    stage2_steps: int = 0
    final_zero_share: float = float("nan")
    target_zero_share: float = float("nan")
    tokens_seen: int = 0
    wall_seconds: float = 0.0
    last: dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        """Plain-dict form (JSON-serialisable)."""
        return asdict(self)

    def _repr_markdown_(self) -> str:
        rows = "\n".join(f"| {k} | {v} |" for k, v in self.to_dict().items() if k != "last")
        return f"| field | value |\n|---|---|\n{rows}"


# A micro-batch source: (step, micro) -> this rank's batch; a distillation term:
# (batch, student logits, teacher logits or None) -> (loss, logged parts).
BatchFn = Callable[[int, int], Batch]
KDFn = Callable[[Batch, torch.Tensor, "torch.Tensor | None"], tuple[torch.Tensor, dict[str, float]]]


@dataclass
class Stage:
    """What differs between the two stages."""

    name: str
    steps: int
    lr: float
    batch: BatchFn
    kd: KDFn
    needs_teacher_logits: bool = True


class Trainer:
    """Runs stages on a prepared model: the shared step, checkpoints, metrics, the non-finite stop."""

    #: ``name -> context manager`` wrapped around each part of `step` (benchmarks time them).
    section_timer: Callable[[str], AbstractContextManager] = staticmethod(lambda name: nullcontext())

    def __init__(
        self,
        student: nn.Module,
        prepared: nn.Module,
        cfg: RunConfig,
        accelerator: Accelerator,
        run: RunDir,
        tokenizer: Any,
    ) -> None:
        self.student, self.model, self.cfg, self.accelerator = student, prepared, cfg, accelerator
        self.run_dir, self.tokenizer = run, tokenizer
        self.params = [p for p in prepared.parameters() if p.requires_grad]
        routers = [r for r in zero_routers(student) if r.num_zero_experts > 0]
        if not routers:
            raise ZedaError(
                "the student has no zero experts; inject them first (inject.num_zero_experts >= 1)"
            )
        e, z = routers[0].num_experts, routers[0].num_zero_experts
        b = cfg.balance
        self.tracker = BalanceTracker(b.alpha, b.resolve_w(e, z), b.global_batch, b.per_layer)
        self.result = DistillResult(output_dir=str(run.final), target_zero_share=b.resolve_target_share(e, z))
        # No finite step has followed the latest checkpoint yet (a resumed one may be such).
        self._unproven = run.resuming

    def step(self, stage: Stage, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Teacher → student → capture → loss, for one micro-batch.

        Each part runs inside ``self.section_timer(name)`` (``"teacher forward"``,
        ``"student forward"``, ``"loss"``), a no-op unless a benchmark sets one.
        """
        batch = batch.to(self.accelerator.device)
        t_logits = None
        if stage.needs_teacher_logits:
            with self.section_timer("teacher forward"), torch.no_grad(), teacher_mode(self.student):
                t_logits = forward_logits(self.student, batch)
        with self.section_timer("student forward"), RouterCapture(self.student) as cap:
            s_logits = forward_logits(self.model, batch)
        with self.section_timer("loss"):
            balance = self.tracker.loss(cap.records, batch.attention_mask.reshape(-1))
            kd, parts = stage.kd(batch, s_logits, t_logits)
            loss = kd + balance.to(kd.device)
            parts.update(
                loss=float(loss.detach()),
                balance=float(balance.detach()),
                tokens=int(batch.attention_mask.sum()),
            )
        return loss, parts

    def _optimizer(self, stage: Stage, resume: dict | None) -> tuple[Any, Any, int]:
        cfg = self.cfg.train
        scales = self._lr_scales()
        # With lora.router_rows=zero the real rows get zero gradients; AdamW would still decay
        # them, so the routers' group has no weight decay then.
        frozen_rows = self.cfg.lora.router_rows == "zero"
        groups = [
            {
                "params": ps,
                "lr": stage.lr * scale,
                **({"weight_decay": 0.0} if router and frozen_rows else {}),
            }
            for (scale, router), ps in scales.items()
            if ps
        ]
        optimizer = torch.optim.AdamW(groups, lr=stage.lr, weight_decay=cfg.weight_decay)
        warmup = int(cfg.warmup_ratio * stage.steps)
        if cfg.lr_schedule == "cosine":
            scheduler = get_cosine_schedule_with_warmup(optimizer, warmup, stage.steps)
        else:
            scheduler = get_constant_schedule_with_warmup(optimizer, warmup)
        start = 0
        if resume:
            state = load_optim_state(find_checkpoint(self.run_dir.path))
            restore_optimizer(self.model, optimizer, state["optimizer"])  # any layout: 1 process, DDP, FSDP2
            scheduler.load_state_dict(state["scheduler"])
            # The recipe's lr wins over the stored one, so "lower the lr and resume" works.
            peaks = [stage.lr * scale for (scale, _), ps in scales.items() if ps]
            scheduler.base_lrs = peaks
            for group, fn, peak in zip(optimizer.param_groups, scheduler.lr_lambdas, peaks, strict=True):
                group["initial_lr"] = peak
                group["lr"] = peak * fn(scheduler.last_epoch)
            scheduler._last_lr = [g["lr"] for g in optimizer.param_groups]
            start = int(resume["step"])
        return prepare_optimizer(self.accelerator, optimizer), scheduler, start

    def _lr_scales(self) -> dict[tuple[float, bool], list[nn.Parameter]]:
        """Trainable parameters grouped by (learning-rate multiple, is a router parameter):
        routers get ``lora.router_lr_scale``, everything else 1. Routers share the others' group
        when their scale is 1 and all their rows train (``lora.router_rows=all``)."""
        scale = float(self.cfg.lora.router_lr_scale)
        own = scale != 1.0 or self.cfg.lora.router_rows == "zero"
        router_ids = {id(p) for r in zero_routers(self.model) for p in r.parameters()}
        groups: dict[tuple[float, bool], list[nn.Parameter]] = {(1.0, False): [], (scale, own): []}
        for p in self.params:
            groups[(scale, own) if id(p) in router_ids else (1.0, False)].append(p)
        return groups

    def _finite_everywhere(self, loss_ok: bool) -> tuple[bool, bool]:
        """(loss finite, gradients finite) on every rank; all ranks agree, so none waits on another."""
        grads_ok = _all_finite([p.grad for p in self.params if p.grad is not None])
        flags = torch.tensor([float(not loss_ok), float(not grads_ok)], device=self.accelerator.device)
        flags = self.accelerator.reduce(flags, reduction="sum")
        return bool(flags[0] == 0), bool(flags[1] == 0)

    def run(self, stage: Stage, resume: dict | None) -> None:
        """Optimise one stage from its start (or from the resumed step) to ``stage.steps``."""
        acc, cfg = self.accelerator, self.cfg.train
        optimizer, scheduler, start = self._optimizer(stage, resume)
        bar = tqdm(
            range(start, stage.steps),
            desc=stage.name,
            disable=not acc.is_main_process,
            initial=start,
            total=stage.steps,
        )
        window: dict[str, float] = {}
        window_steps, tokens, t0 = 0, 0, time.perf_counter()
        self.model.train()
        for step in bar:
            self.tracker.start_step()
            loss_ok = True
            for micro in range(cfg.grad_accum):
                with acc.accumulate(self.model):
                    loss, parts = self.step(stage, stage.batch(step, micro))
                    loss_ok &= bool(torch.isfinite(loss.detach()))
                    # Backward even on a bad loss: every rank must join the gradient all-reduce.
                    acc.backward(loss)
                tokens += int(parts.pop("tokens", 0))
                for k, v in parts.items():
                    window[k] = window.get(k, 0.0) + v / cfg.grad_accum
            self._apply_update(stage, step, optimizer, scheduler, loss_ok)
            self._prove()
            done, window_steps = step + 1, window_steps + 1
            if done % cfg.log_every == 0 or done == stage.steps:
                row = self._global_mean({k: v / window_steps for k, v in window.items()})
                dt = time.perf_counter() - t0
                row.update(
                    stage=stage.name,
                    step=done,
                    lr=scheduler.get_last_lr()[0],
                    zero_share=self.tracker.pop_share(),
                    tokens_per_s=tokens / dt if dt > 0 else 0.0,
                )
                self._log(row, bar)
                self.result.tokens_seen += tokens
                window, window_steps, tokens, t0 = {}, 0, 0, time.perf_counter()
            if (cfg.save_every > 0 and done % cfg.save_every == 0) or done == stage.steps:
                self.save({"stage": stage.name, "step": done}, optimizer, scheduler)
        setattr(self.result, f"{stage.name}_steps", stage.steps)

    def _apply_update(self, stage: Stage, step: int, optimizer: Any, scheduler: Any, loss_ok: bool) -> None:
        """Keep the step's update only if loss, gradients and resulting weights are finite."""
        acc = self.accelerator
        loss_ok, grads_ok = self._finite_everywhere(loss_ok)
        if loss_ok and grads_ok:
            if self.cfg.train.max_grad_norm > 0:
                acc.clip_grad_norm_(self.params, self.cfg.train.max_grad_norm)
            optimizer.step()
            scheduler.step()
            weights_ok = _all_finite(self.params)
            flag = acc.reduce(torch.tensor([float(not weights_ok)], device=acc.device), reduction="sum")
            if flag.item() == 0:
                optimizer.zero_grad()
                return
        optimizer.zero_grad()
        what = "loss" if not loss_ok else "gradients" if not grads_ok else "weights"
        where = f"non-finite {what} at {stage.name} step {step}; the update was discarded"
        kept = self._rollback()
        if kept is None:
            raise ZedaError(
                f"{where}, before any checkpoint that a finite step followed, so nothing was saved and "
                f"{self.run_dir.final} is as it was; lower {stage.name}.lr and run the same command again"
            )
        if acc.is_main_process:
            (self.run_dir.path / STOP_FILE).write_text(
                json.dumps({"reason": f"non-finite {what}", "stage": stage.name, "step": step}) + "\n"
            )
        raise ZedaError(
            f"{where}; kept the checkpoint at {kept['stage']} step {kept['step']} in {self.run_dir.final} "
            f"(the last one a finite step followed); lower {stage.name}.lr and resume with train.resume=true"
        )

    def _prove(self) -> None:
        """A finite step followed the latest checkpoint: drop the one before it and, for a new
        run, make the run directory final (an overwritten run is replaced only now)."""
        if not self._unproven:
            return
        acc = self.accelerator
        if acc.is_main_process:
            prove_checkpoint(self.run_dir.path)
        acc.wait_for_everyone()
        self.run_dir.commit(acc.is_main_process)
        acc.wait_for_everyone()
        self._unproven = False

    def _rollback(self) -> dict | None:
        """After a non-finite step: the progress record of the checkpoint kept (None if none is)."""
        acc = self.accelerator
        kept = None
        if acc.is_main_process:
            kept = rollback_checkpoint(self.run_dir.path, self._unproven)
        acc.wait_for_everyone()
        if acc.num_processes > 1:
            from accelerate.utils import broadcast_object_list

            kept = broadcast_object_list([kept])[0]
        return kept

    def finish(self) -> None:
        """At the end of training: the last checkpoint stands (no step follows it)."""
        self._unproven = True
        self._prove()

    def save(self, state: dict, optimizer: Any, scheduler: Any) -> None:
        """Checkpoint the consolidated trained tensors and optimiser state (gathered from every
        rank's shards; the main process writes); the next finite step proves it (`_prove`)."""
        acc = self.accelerator
        names = {n for n, p in self.student.named_parameters() if p.requires_grad}
        raw = optimizer.optimizer if hasattr(optimizer, "optimizer") else optimizer
        tensors, optim_state = gather_train_state(self.model, raw, names)  # every rank takes part
        acc.wait_for_everyone()
        if acc.is_main_process:
            save_checkpoint(
                self.run_dir.path,
                tensors,
                state,
                {"optimizer": optim_state, "scheduler": scheduler.state_dict()},
            )
        self._unproven = True
        acc.wait_for_everyone()

    def _global_mean(self, row: dict[str, float]) -> dict[str, float]:
        """The mean over ranks of each logged value, so the logged loss is the one whose gradient
        the update applies (data parallelism and FSDP average gradients over ranks), not the main
        process's part of it."""
        if self.accelerator.num_processes == 1 or not row:
            return row
        keys = sorted(row)
        values = torch.tensor([row[k] for k in keys], dtype=torch.float64, device=self.accelerator.device)
        values = self.accelerator.reduce(values, reduction="mean")
        return dict(zip(keys, values.tolist(), strict=True))

    def _log(self, row: dict, bar: Any) -> None:
        self.result.final_zero_share, self.result.last = row["zero_share"], row
        if not self.accelerator.is_main_process:
            return
        with (self.run_dir.path / "metrics.jsonl").open("a") as f:
            f.write(json.dumps(row) + "\n")
        bar.set_postfix(
            loss=f"{row.get('loss', 0):.4f}",
            bal=f"{row.get('balance', 0):.4f}",
            zero=f"{row['zero_share']:.3f}",
        )


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element of every tensor is finite (one device sync, not one per tensor).

    DTensor shards (FSDP2) are checked locally: the callers reduce the answer over ranks.
    """
    if not tensors:
        return True
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    return bool(torch.stack([torch.isfinite(t.detach()).all() for t in local]).all())
