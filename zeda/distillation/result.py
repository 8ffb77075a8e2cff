"""`DistillResult`, the outcome `zeda.distill` returns beside the student (steps, share, the
best checkpoint kept, the verdict against the training-free rules), with its console summary."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

__all__ = ["DistillResult"]


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
        logit_share: Share of the positions whose logits stage 1 trained each step (below 1
            where ``stage1.head_budget`` applies).
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
    logit_share: float = 1.0

    def summary(self) -> str:
        """A few lines: steps, time, share, why training stopped and the verdict."""
        lines = [
            f"distilled: stage 1 {self.stage1_steps} steps, stage 2 {self.stage2_steps} steps, "
            f"{self.wall_seconds:.0f} s; zero share {self.final_zero_share:.3f} "
            f"(target {self.target_zero_share:.3f}); {self.stop_reason}"
        ]
        if self.logit_share < 1.0:
            lines.append(
                f"stage 1 trained the logits of {self.logit_share:.1%} of the positions each step "
                "(stage1.head_budget: the lm_head dominates this model's work per token)"
            )
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


def _nan(d: dict) -> dict:
    """``None`` back to NaN in a verdict dict read from JSON."""
    return {k: float("nan") if v is None and k == "increase_ratio" else v for k, v in d.items()}
