"""The optimisation machinery shared by both stages: the teacher → student → capture step,
the update with its non-finite guard, checkpoints and metrics, and the validation hooks (best
checkpoint, early stopping, the final verdict; `zeda.distillation.validation`). A stage's optimiser
is built by `zeda.distillation.optimizer`; the run's outcome is a
`zeda.distillation.result.DistillResult` (re-exported here)."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from accelerate import Accelerator
from torch import nn
from torch.distributed.tensor import DTensor
from tqdm.auto import tqdm

from zeda.config import RunConfig
from zeda.distillation.balance import BalanceTracker, RouterCapture, real_balance_loss
from zeda.distillation.checkpoint import (
    BEST,
    best_checkpoint,
    gather_train_state,
    gather_trained,
    prove_checkpoint,
    read_state,
    restore_trained,
    rollback_checkpoint,
    save_checkpoint,
)
from zeda.distillation.optimizer import stage_optimizer
from zeda.distillation.result import DistillResult
from zeda.distillation.rollouts import Batch, forward_logits
from zeda.distillation.run_dir import RunDir
from zeda.distillation.validation import log_verdict
from zeda.errors import ZedaError
from zeda.zero.inject import teacher_mode
from zeda.zero.routing import zero_routers

logger = logging.getLogger(__name__)

__all__ = ["STOP_FILE", "DistillResult", "Stage", "Trainer"]

#: Written into the run directory when a run stops on a non-finite update; a resume may then
#: lower the learning rates.
STOP_FILE = "stopped.json"


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
        self.tracker = BalanceTracker(
            b.alpha,
            b.resolve_w(e, z),
            b.global_batch,
            b.per_layer,
            target=b.target_zero_share,
            share_gain=b.share_gain,
        )
        self.result = DistillResult(output_dir=str(run.final), target_zero_share=b.resolve_target_share(e, z))
        # No finite step has followed the latest checkpoint yet (a resumed one may be such).
        self._unproven = run.resuming
        #: Set by `zeda.distillation.loop.distill` when there is validation text.
        self.validator: Any = None
        self._last_val: dict[str, str] = {}

    def step(self, stage: Stage, batch: Batch) -> tuple[torch.Tensor, dict[str, float]]:
        """Teacher → student → capture → loss, for one micro-batch.

        Each part runs inside ``self.section_timer(name)`` (``"teacher forward"``,
        ``"student forward"``, ``"loss"``), a no-op unless a benchmark sets one.
        """
        batch = batch.to(self.accelerator.device)
        t_logits = None
        real_alpha = self.cfg.balance.real_alpha
        # The real-expert balance compares with the original's routing of the same tokens, so a
        # stage that needs no teacher logits still runs the teacher then.
        if stage.needs_teacher_logits or real_alpha > 0:
            with (
                self.section_timer("teacher forward"),
                torch.no_grad(),
                teacher_mode(self.student),
                RouterCapture(self.student, teacher=True) as t_cap,
            ):
                t_logits = forward_logits(self.student, batch)
            if not stage.needs_teacher_logits:
                t_logits = None
        with self.section_timer("student forward"), RouterCapture(self.student) as cap:
            s_logits = forward_logits(self.model, batch)
        with self.section_timer("loss"):
            mask = batch.attention_mask.reshape(-1)
            balance = self.tracker.loss(cap.records, mask)
            kd, parts = stage.kd(batch, s_logits, t_logits)
            loss = kd + balance.to(kd.device)
            if real_alpha > 0:
                real = real_balance_loss(cap.records, t_cap.records, mask, real_alpha)
                loss = loss + real.to(kd.device)
                parts["real_balance"] = float(real.detach())
            parts.update(
                loss=float(loss.detach()),
                balance=float(balance.detach()),
                tokens=int(batch.attention_mask.sum()),
            )
        return loss, parts

    def _optimizer(self, stage: Stage, resume: dict | None) -> tuple[Any, Any, int]:
        return stage_optimizer(
            self.model,
            self.params,
            self.cfg,
            stage.lr,
            stage.steps,
            self.accelerator,
            self.run_dir.path,
            resume,
        )

    def _finite_everywhere(self, loss_ok: bool) -> tuple[bool, bool]:
        """(loss finite, gradients finite) on every rank; all ranks agree, so none waits on another."""
        grads_ok = _all_finite([p.grad for p in self.params if p.grad is not None])
        flags = torch.tensor([float(not loss_ok), float(not grads_ok)], device=self.accelerator.device)
        flags = self.accelerator.reduce(flags, reduction="sum")
        return bool(flags[0] == 0), bool(flags[1] == 0)

    def run(self, stage: Stage, resume: dict | None) -> None:
        """Optimise one stage from its start (or from the resumed step) to ``stage.steps``,
        or until validation patience runs out."""
        acc, cfg = self.accelerator, self.cfg.train
        if resume and resume.get("stopped"):  # the checkpoint ends a stage that stopped early
            setattr(self.result, f"{stage.name}_steps", int(resume["step"]))
            self.result.stop_reason = resume["stopped"]
            return
        optimizer, scheduler, start = self._optimizer(stage, resume)
        if resume and "balance_w" in resume:  # the share controller's weight at the checkpoint
            self.tracker.w = float(resume["balance_w"])
        if self.validator is not None and not resume:
            self.validator.new_stage()
        bar = tqdm(
            range(start, stage.steps),
            desc=stage.name,
            disable=not acc.is_main_process,
            initial=start,
            total=stage.steps,
        )
        window: dict[str, float] = {}
        window_steps, tokens, t0 = 0, 0, time.perf_counter()
        done, stop = start, None
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
            used_w = self.tracker.w
            self.tracker.end_step()
            self._apply_update(stage, step, optimizer, scheduler, loss_ok)
            self._prove()
            done, window_steps = step + 1, window_steps + 1
            validation = None
            if self.validator is not None and self.validator.due(done, stage.steps):
                validation = self._validate(stage, done)
                stop = self.validator.stop_reason()
            if done % cfg.log_every == 0 or done == stage.steps or validation is not None:
                row = self._global_mean({k: v / window_steps for k, v in window.items()})
                dt = time.perf_counter() - t0
                row.update(
                    stage=stage.name,
                    step=done,
                    lr=scheduler.get_last_lr()[0],
                    zero_share=self.tracker.pop_share(),
                    **({"balance_w": used_w} if self.tracker.share_gain else {}),
                    tokens_per_s=tokens / dt if dt > 0 else 0.0,
                    **(validation or {}),
                )
                self._log(row, bar)
                self.result.tokens_seen += tokens
                window, window_steps, tokens, t0 = {}, 0, 0, time.perf_counter()
            if stop is not None:
                stop = f"early stop at {stage.name} step {done}: {stop}"
                self.save({**self._progress(stage, done), "stopped": stop}, optimizer, scheduler)
                self.result.stop_reason = stop
                logger.info("%s", stop)
                break
            if (cfg.save_every > 0 and done % cfg.save_every == 0) or done == stage.steps:
                self.save(self._progress(stage, done), optimizer, scheduler)
        bar.close()
        setattr(self.result, f"{stage.name}_steps", done)

    def _progress(self, stage: Stage, done: int) -> dict[str, Any]:
        """The checkpoint's progress record, with the share controller's weight for the next step
        (which a resume restores)."""
        state: dict[str, Any] = {"stage": stage.name, "step": done}
        if self.tracker.share_gain:
            state["balance_w"] = self.tracker.w
        return state

    def _validate(self, stage: Stage, done: int) -> dict[str, Any]:
        """Score the student on the validation slice; write ``best/`` when it is the new best."""
        self.model.eval()
        try:
            row, is_best = self.validator.evaluate(stage.name, done)
        finally:
            self.model.train()
        if is_best:
            self.save_best(self.validator.best)
        return row

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
        records = {"validation.json": self.validator.state_dict()} if self.validator is not None else None
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
                records=records,
            )
        self._unproven = True
        acc.wait_for_everyone()

    def save_best(self, state: dict) -> None:
        """Write the current trained tensors as ``best/`` (atomically, no optimiser state)."""
        acc = self.accelerator
        names = {n for n, p in self.student.named_parameters() if p.requires_grad}
        tensors = gather_trained(self.model, names)  # every rank takes part
        acc.wait_for_everyone()
        if acc.is_main_process:
            save_checkpoint(self.run_dir.path, tensors, state, None, name=BEST)
        acc.wait_for_everyone()

    def finish_validation(self, verdict: bool) -> None:
        """The end of training: restore the student to ``best/`` and judge it against the rules.

        Without a best checkpoint at the target share (no evaluation reached the band, or
        ``train.eval_every=0``) the student keeps its last weights and is scored as it is.

        Args:
            verdict: Calibrate every rule to the student's measured share and compare
                (`zeda.evaluation.verdict`).
        """
        v = self.validator
        if v is None:
            return
        self.result.rules_at_target = v.rules_at_target
        ckpt = best_checkpoint(self.run_dir.path)
        best = read_state(ckpt) if ckpt is not None else None
        figures = None
        if best is not None and best.get("fingerprint") == v.fingerprint:
            from safetensors.torch import load_file

            restore_trained(self.model, load_file(ckpt / "trainable.safetensors"))
            self.result.best = {k: best[k] for k in ("stage", "step", "validation")}
            figures = best["validation"]
            logger.info(
                "restored the best validation checkpoint (%s step %s: KL %.4f at %.1f%% skipped)",
                best["stage"],
                best["step"],
                figures["mean_kl"],
                100 * figures["zero_share"],
            )
        if not verdict:
            return
        self.model.eval()
        try:
            figures = figures or v.score()
            result = v.verdict(figures)
        finally:
            self.model.train()
        if result is None:
            return
        self.result.verdict = result.to_dict()
        if self.accelerator.is_main_process:
            log_verdict(result)

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
        post = {
            "loss": f"{row.get('loss', 0):.4f}",
            "bal": f"{row.get('balance', 0):.4f}",
            "zero": f"{row['zero_share']:.3f}",
        }
        if "val_mean_kl" in row:
            self._last_val = {
                "val_kl": f"{row['val_mean_kl']:.4f}",
                "val_zero": f"{row['val_zero_share']:.3f}",
            }
        bar.set_postfix({**post, **self._last_val})


def _all_finite(tensors: list[torch.Tensor]) -> bool:
    """Whether every element of every tensor is finite (one device sync, not one per tensor).

    DTensor shards (FSDP2) are checked locally: the callers reduce the answer over ranks.
    """
    if not tensors:
        return True
    local = [t.to_local() if isinstance(t, DTensor) else t for t in tensors]
    return bool(torch.stack([torch.isfinite(t.detach()).all() for t in local]).all())
