"""The ``eval`` section of a recipe: what is measured after training."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from zeda.errors import check_config

_RULES = ("keep_top_m", "top_p", "threshold")
BASELINE_KINDS: tuple[str, ...] = (*_RULES, *(r + "_no_renorm" for r in _RULES), "adaptive_k")
"""The training-free baselines zeda calibrates to a matched share (`zeda.evaluation.baselines`)."""


@dataclass
class EvalConfig:
    """What is measured after training."""

    section: ClassVar[str] = "eval"

    tasks: list[str] = field(default_factory=lambda: ["ref_perplexity"])
    """Evaluation tasks (zeda's own ``ref_*`` tasks or lm-eval task names)."""
    limit: int | None = None
    """Examples per task (``None`` = all)."""
    max_eval_tokens: int = 20000
    """Token budget of the perplexity / KL evaluation."""
    zero_bias_sweep: list[float] = field(default_factory=list)
    """Extra biases added to the zero-expert logits at eval time to trace a FLOPs/quality curve."""
    baselines: list[str] = field(
        default_factory=lambda: ["keep_top_m", "top_p", "top_p_no_renorm", "threshold", "adaptive_k"]
    )
    """Training-free dynamic-k baselines evaluated at matched measured share (``BASELINE_KINDS``)."""

    def validate(self) -> None:
        """Raise `ZedaError` on an invalid value."""
        if self.limit is not None:
            check_config(self.limit >= 1, "eval.limit", "must be >= 1 (or null for all)")
        check_config(self.max_eval_tokens >= 1, "eval.max_eval_tokens", "must be >= 1")
        for name in ("tasks", "baselines"):
            values = getattr(self, name)
            check_config(all(v.strip() for v in values), f"eval.{name}", "entries must not be empty")
            check_config(len(set(values)) == len(values), f"eval.{name}", "entries must be unique")
        unknown = [b for b in self.baselines if b not in BASELINE_KINDS]
        check_config(not unknown, "eval.baselines", f"unknown {unknown}; choose from {list(BASELINE_KINDS)}")
        check_config(
            all(math.isfinite(b) for b in self.zero_bias_sweep),
            "eval.zero_bias_sweep",
            "entries must be finite",
        )
