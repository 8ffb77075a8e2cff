"""Validation during distillation: the rules to beat, the best checkpoint, early stopping, the verdict.

Everything here is measured on a fixed slice of validation text (``data.eval_file``, the first
``train.eval_tokens`` tokens packed into ``data.seq_len`` blocks) with the one held-out scorer,
`zeda.evaluation.heldout.HeldOut`: the teacher is the student's own `zeda.teacher_mode`, its
final hidden states are computed once (the teacher is frozen) and cached when they fit, and the
output head and log-softmaxes run over chunks of positions, so no ``(B, T, V)`` tensor beyond one
batch's hidden states is held. Scoring is forward passes only.

1. **Start**: every training-free rule (`zeda.evaluation.baselines.POLICY_KINDS`) is calibrated
   to the target share and scored (perplexity ratio, top-1 agreement, KL(teacher ‖ rule)); the
   best one is logged: the figure the run has to beat.
2. **Every** ``train.eval_every`` **steps** (and at each stage's last step) the student is scored:
   KL, perplexity ratio, agreement and its measured zero share go into ``metrics.jsonl`` (``val_*``
   keys) and the progress bar. Among evaluations whose share is at least the target minus
   ``train.best_tolerance``, the one with the lowest KL is written to ``<run>/best/``.
   With ``train.patience`` > 0, a stage stops once the share has reached that band and the KL
   has not improved for that many evaluations.
3. **End**: the student is restored to ``best/``, the rules are calibrated again to its
   *measured* share (matched FLOPs) and compared (`zeda.evaluation.verdict.compare`); the verdict
   goes into the `DistillResult`, the log (a WARNING when a rule wins) and the export's
   ``config.json``.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from zeda.config import RunConfig
from zeda.distillation.checkpoint import best_checkpoint, read_state
from zeda.distillation.sharding import root_gathered
from zeda.evaluation.baselines import POLICY_KINDS
from zeda.evaluation.curve import score_rules
from zeda.evaluation.heldout import HeldOut
from zeda.evaluation.verdict import Verdict, compare
from zeda.zero.teacher import teacher_mode

logger = logging.getLogger(__name__)

__all__ = ["Validator", "log_verdict", "verdict_config"]

_FIGURES = ("zero_share", "ppl_ratio", "top1_agreement", "mean_kl")

#: Tokens per validation forward (at least ``train.batch_size`` blocks): forwards without
#: gradients hold far less than a training step, and short blocks need not mean many forwards.
EVAL_BATCH_TOKENS = 4096
#: Validation tokens the rules are calibrated on (blocks spread over the slice).
CALIBRATION_TOKENS = 4096


class Validator:
    """The validation slice and the bookkeeping of best checkpoint and early stopping.

    Every rank runs the same forwards (sharded models need all ranks); ``reduce`` averages the
    figures over ranks so that every rank takes the same decisions.

    Args:
        student: The student (its teacher mode is the original).
        cfg: The run configuration.
        tokenizer: The model's tokenizer.
        target_share: The zero share the balance loss aims at.
        reduce: Mean over ranks of a ``{name: float}`` dict (identity on one process).
    """

    def __init__(
        self,
        student: nn.Module,
        cfg: RunConfig,
        tokenizer: Any,
        target_share: float,
        reduce: Callable[[dict[str, float]], dict[str, float]] = lambda d: d,
    ) -> None:
        from zeda.distillation.data import pack_texts, read_jsonl

        self.student, self.cfg, self.target, self.reduce = student, cfg, float(target_share), reduce
        t = cfg.train
        self.tolerance, self.patience, self.every = t.best_tolerance, t.patience, t.eval_every
        path = Path(cfg.data.eval_file)
        blocks = pack_texts(read_jsonl(path, cfg.data.text_field), tokenizer, cfg.data.seq_len, t.eval_tokens)
        self.held = HeldOut(
            blocks[: max(1, t.eval_tokens // cfg.data.seq_len)],
            student,
            lambda: teacher_mode(student),
            max(t.batch_size, EVAL_BATCH_TOKENS // cfg.data.seq_len),
            progress=False,
        )
        #: What makes two validations comparable (a resume on other text starts a fresh best).
        self.fingerprint = {
            "eval_file": str(path.resolve()),
            "tokens": int(self.held.blocks.numel()),
            "seq_len": cfg.data.seq_len,
        }
        self.best: dict | None = None
        self.bad_evals = 0
        self.in_band = False
        self.rules_at_target: list[dict] = []

    # -- start -----------------------------------------------------------------------------

    @property
    def tokens(self) -> int:
        """Validation tokens scored per evaluation (positions that predict a next token)."""
        return int(self.held.blocks[:, 1:].numel())

    def start(self, run_path: Path, state: dict | None, rules: bool) -> None:
        """The teacher pass (cached), the rules at the target share, and a resumed run's record.

        Args:
            run_path: The run directory (its ``best/`` is read back on a resume).
            state: The ``validation.json`` record of the checkpoint a resume starts from, or None.
            rules: Calibrate and score the training-free rules at the target share.
        """
        with torch.no_grad(), root_gathered(self.student):
            self.held.prepare()
        if state and state.get("fingerprint") == self.fingerprint:
            self.bad_evals, self.in_band = int(state.get("bad_evals", 0)), bool(state.get("in_band", False))
        self.best = self._stored_best(run_path)
        if rules:
            stored = (state or {}).get("rules_at_target")
            if (
                stored
                and state.get("fingerprint") == self.fingerprint
                and state.get("rules_key") == self._rules_key()
            ):
                # The rules run on the frozen original (teacher mode is bit-exact whatever the
                # training did), so a resume on the same slice reuses them.
                self.rules_at_target = stored
            else:
                with root_gathered(self.student):
                    self.rules_at_target = self._rules(self.target)
            best = min(self.rules_at_target, key=lambda r: r["ppl_ratio"])
            logger.info(
                "the rule to beat at %.1f%% skipped (validation, %d tokens): %s, ppl ratio %.4f, "
                "top-1 agreement %.3f, KL %.4f",
                100 * self.target,
                self.tokens,
                best["rule"],
                best["ppl_ratio"],
                best["top1_agreement"],
                best["mean_kl"],
            )

    def _stored_best(self, run_path: Path) -> dict | None:
        ckpt = best_checkpoint(run_path)
        if ckpt is None:
            return None
        state = read_state(ckpt)
        if state.get("fingerprint") != self.fingerprint:
            logger.warning("%s was chosen on other validation text; a new best is chosen", ckpt)
            return None
        return state

    def _rules_key(self) -> dict[str, Any]:
        """What the rules at the target depend on beside the slice: the rules and the share."""
        return {"kinds": list(POLICY_KINDS), "target": self.target, "calibration_tokens": CALIBRATION_TOKENS}

    def _rules(self, share: float) -> list[dict]:
        """Every rule calibrated to ``share`` and scored on the slice (the teacher mode's routers)."""
        scored = score_rules(
            self.student,
            self.held,
            POLICY_KINDS,
            [share],
            lambda: teacher_mode(self.student),
            calibration_tokens=CALIBRATION_TOKENS,
        )
        return [r.row() for r in scored]

    # -- during training -------------------------------------------------------------------

    def due(self, done: int, total: int) -> bool:
        """Whether to evaluate after step ``done`` of a stage of ``total`` steps."""
        return self.every > 0 and (done % self.every == 0 or done == total)

    def score(self) -> dict[str, float]:
        """The student's figures on the slice: ``zero_share``, ``ppl_ratio``, ``top1_agreement``, ``mean_kl``."""
        with root_gathered(self.student):
            metrics, tel = self.held.score(self.student, _nothing, "validation")
        return self.reduce({"zero_share": tel.zero_share, **{k: metrics[k] for k in _FIGURES[1:]}})

    def evaluate(self, stage: str, step: int) -> tuple[dict[str, Any], bool]:
        """Score the student after ``step`` of ``stage`` and update the best and the patience.

        Returns:
            ``(row, is_best)``: the ``val_*`` figures for ``metrics.jsonl`` and whether this
            evaluation is the new best (then the caller writes ``best/`` with `best_state`).
        """
        figures = self.score()
        in_band = figures["zero_share"] >= self.target - self.tolerance
        is_best = in_band and (self.best is None or figures["mean_kl"] < self.best["validation"]["mean_kl"])
        if is_best:
            self.best = {"stage": stage, "step": step, "validation": figures, "fingerprint": self.fingerprint}
            self.bad_evals = 0
        elif self.in_band or in_band:
            self.bad_evals += 1
        self.in_band |= in_band
        row = {f"val_{k}": v for k, v in figures.items()}
        row["val_best"] = is_best
        return row, is_best

    def stop_reason(self) -> str | None:
        """Why the current stage should stop now (patience exhausted), or None."""
        if self.patience <= 0 or not self.in_band or self.bad_evals < self.patience:
            return None
        b = self.best
        where = f"; best {b['validation']['mean_kl']:.4g} at {b['stage']} step {b['step']}" if b else ""
        return f"validation KL did not improve for {self.bad_evals} evaluations{where}"

    def new_stage(self) -> None:
        """A new stage starts its own patience count (the best carries over)."""
        self.bad_evals = 0

    def state_dict(self) -> dict[str, Any]:
        """The record a checkpoint keeps so that a resume continues the patience count."""
        state = {"bad_evals": self.bad_evals, "in_band": self.in_band, "fingerprint": self.fingerprint}
        if self.rules_at_target:
            state.update(rules_at_target=self.rules_at_target, rules_key=self._rules_key())
        return state

    # -- end -------------------------------------------------------------------------------

    def verdict(self, figures: dict[str, float]) -> Verdict | None:
        """Calibrate every rule to the student's measured share and compare (`compare`); None
        when the student skips no slots (no FLOP budget to match)."""
        with root_gathered(self.student):
            rules = self._rules(figures["zero_share"])
        if not rules:
            logger.warning("the student skips no routed slots on validation text: no rule to compare with")
            return None
        return compare(figures, rules, "validation", tokens=self.tokens)


def _nothing() -> Any:
    return contextlib.nullcontext()


def verdict_config(verdict: dict[str, Any], eval_file: str) -> dict[str, Any]:
    """The verdict (`Verdict.to_dict`) as the export's ``config.json`` records it (``zeda.verdict``)."""
    d = verdict
    return {
        "measured_on": "validation text",
        "eval_file": str(eval_file),
        "tokens": d["tokens"],
        "zero_share": d["zero_share"],
        "beats": d["beats"],
        "better_on_all_than_best_rule": d["better_on_all"],
        "increase_ratio": d["increase_ratio"],
        "rule": d["rule"],
        "rule_figures": d["rule_figures"],
        "zeda_figures": d["zeda"],
        "beaten_by": d["beaten_by"],
    }


def log_verdict(result: Any) -> None:
    """Log the end-of-training verdict: its summary when zeda beats every rule, else a warning
    naming the best rule and both sides' figures (a `zeda.evaluation.verdict.Verdict`)."""
    if result.beats:
        logger.info("%s", result.summary())
        return
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
