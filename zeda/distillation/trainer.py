"""The optimisation machinery shared by both stages: the teacher → student → capture step,
the update with its non-finite guard, checkpoints and metrics, and the validation hooks (best
checkpoint, early stopping, the final verdict; `zeda.distillation.validation`)."""

from __future__ import annotations

import json
import logging
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
from zeda.distillation.balance import BalanceTracker, RouterCapture, real_balance_loss
from zeda.distillation.checkpoint import (
    BEST,
    best_checkpoint,
    find_checkpoint,
    gather_train_state,
    gather_trained,
    load_optim_state,
    prove_checkpoint,
    read_state,
    restore_optimizer,
    restore_trained,
    rollback_checkpoint,
    save_checkpoint,
)
from zeda.distillation.rollouts import Batch, forward_logits
from zeda.distillation.run_dir import RunDir
from zeda.distillation.sharding import prepare_optimizer
from zeda.errors import ZedaError
from zeda.zero.inject import teacher_mode
from zeda.zero.routing import zero_routers

logger = logging.getLogger(__name__)

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
        stop_reason: ``"completed"``, or why a stage stopped early (validation patience).
        best: The evaluation the student was restored to at the end (``stage``, ``step`` and its
            ``validation`` figures), or None (no evaluation reached the target share band).
        rules_at_target: Every training-free rule calibrated to the target share on the
            validation slice at the start (the figures to beat).
        verdict: `zeda.evaluation.verdict.Verdict` (as a dict) of the final student against every
            rule calibrated to its measured validation share, or None (``train.verdict=false``
            or no validation text).
    """

    output_dir: str
    stage1_steps: int = 0
    stage2_steps: int = 0
    final_zero_share: float = float("nan")
    target_zero_share: float = float("nan")
    tokens_seen: int = 0
    wall_seconds: float = 0.0
    last: dict = field(default_factory=dict)
    stop_reason: str = "completed"
    best: dict | None = None
    rules_at_target: list[dict] = field(default_factory=list)
    verdict: dict | None = None

    def summary(self) -> str:
        """A few lines: steps, time, share, why training stopped and the verdict."""
        lines = [
            f"distilled: stage 1 {self.stage1_steps} steps, stage 2 {self.stage2_steps} steps, "
            f"{self.wall_seconds:.0f} s; zero share {self.final_zero_share:.3f} "
            f"(target {self.target_zero_share:.3f}); {self.stop_reason}"
        ]
        if self.best:
            v = self.best["validation"]
            lines.append(
                f"kept the best validation checkpoint ({self.best['stage']} step {self.best['step']}): "
                f"KL {v['mean_kl']:.4f} at {v['zero_share']:.1%} skipped"
            )
        if self.verdict:
            from zeda.evaluation.verdict import Verdict

            lines.append(Verdict(**_nan(self.verdict)).summary())
        return "\n".join(lines)

    def to_dict(self) -> dict:
        """Plain-dict form (JSON-serialisable)."""
        return asdict(self)

    def _repr_markdown_(self) -> str:
        skip = ("last", "rules_at_target", "verdict", "best")
        rows = "\n".join(f"| {k} | {v} |" for k, v in self.to_dict().items() if k not in skip)
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
        """Optimise one stage from its start (or from the resumed step) to ``stage.steps``,
        or until validation patience runs out."""
        acc, cfg = self.accelerator, self.cfg.train
        if resume and resume.get("stopped"):  # the checkpoint ends a stage that stopped early
            setattr(self.result, f"{stage.name}_steps", int(resume["step"]))
            self.result.stop_reason = resume["stopped"]
            return
        optimizer, scheduler, start = self._optimizer(stage, resume)
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
                    tokens_per_s=tokens / dt if dt > 0 else 0.0,
                    **(validation or {}),
                )
                self._log(row, bar)
                self.result.tokens_seen += tokens
                window, window_steps, tokens, t0 = {}, 0, 0, time.perf_counter()
            if stop is not None:
                stop = f"early stop at {stage.name} step {done}: {stop}"
                self.save({"stage": stage.name, "step": done, "stopped": stop}, optimizer, scheduler)
                self.result.stop_reason = stop
                logger.info("%s", stop)
                break
            if (cfg.save_every > 0 and done % cfg.save_every == 0) or done == stage.steps:
                self.save({"stage": stage.name, "step": done}, optimizer, scheduler)
        bar.close()
        setattr(self.result, f"{stage.name}_steps", done)

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
            if result.beats:
                logger.info("%s", result.summary())
            else:
                name, r = result.named_rule()
                logger.warning(
                    "zeda does not beat the training-free rule %s on validation text at %.1f%% skipped: "
                    "the rule's ppl ratio %.4f, top-1 agreement %.3f, KL %.4f against zeda's %.4f / %.3f / %.4f "
                    "(rules better on some figure: %s)",
                    name,
                    100 * result.zero_share,
                    r["ppl_ratio"],
                    r["top1_agreement"],
                    r["mean_kl"],
                    result.zeda["ppl_ratio"],
                    result.zeda["top1_agreement"],
                    result.zeda["mean_kl"],
                    ", ".join(result.beaten_by),
                )

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


def _nan(d: dict) -> dict:
    """``None`` back to NaN in a verdict dict read from JSON."""
    return {k: float("nan") if v is None and k == "increase_ratio" else v for k, v in d.items()}
