"""The ``inject`` section of a recipe: how zero experts are added to each MoE router."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar, Literal

from zeda.errors import check_config


@dataclass
class InjectConfig:
    """How zero experts are added to each MoE router."""

    section: ClassVar[str] = "inject"

    num_zero_experts: int | None = None
    """Zero experts Z added per MoE layer; ``None`` means ``zero_ratio`` x E, or E // 2 when that is
    unset too (E = real routed experts). Mutually exclusive with ``zero_ratio``."""
    zero_ratio: float | None = None
    """Zero experts per real expert when ``num_zero_experts`` is null: Z = round(zero_ratio x E),
    at least 1 (1.0 gives Z = E, one router row per zero expert; 0.5 the paper's E/2). Mutually
    exclusive with ``num_zero_experts``."""
    seed: int = 0
    """Seed for the initialisation of the new router rows."""
    init: Literal["random", "threshold", "relative"] = "random"
    """``random``: new router rows drawn from the existing rows' statistics (the share starts
    low and the balance loss raises it); ``threshold``: zero rows start at 0 with a zero-logit
    bias calibrated on ``data.train_file`` so that step 0 already skips the balance target
    share (an absolute logit-threshold rule that distillation improves on); ``relative``: zero
    rows of softmax routers fitted to each token's log-sum-exp of its real logits and one bias
    per layer calibrated the same way, so step 0 is a threshold on the token's own normalised
    routing weights (the threshold baseline's rule: a lower step-0 perplexity at the same
    share; the per-layer solve costs about 8 forward passes over 8,192 training tokens per MoE
    layer); sigmoid routers score experts independently and start as with ``threshold``."""

    def validate(self) -> None:
        """Raise `ZedaError` on an invalid value."""
        if self.num_zero_experts is not None:
            check_config(
                self.num_zero_experts >= 1, "inject.num_zero_experts", "must be >= 1 (or null for E/2)"
            )
        if self.zero_ratio is not None:
            check_config(
                0 < self.zero_ratio < 1e3 and math.isfinite(self.zero_ratio),
                "inject.zero_ratio",
                f"must be > 0 (zero experts per real expert), got {self.zero_ratio}",
            )
        check_config(
            self.num_zero_experts is None or self.zero_ratio is None,
            "inject.num_zero_experts",
            "set either inject.num_zero_experts or inject.zero_ratio, not both",
        )

    def resolve_num_zero(self, num_real: int) -> int:
        """The number of zero experts Z for a model with ``num_real`` routed experts."""
        if self.num_zero_experts is not None:
            return self.num_zero_experts
        if self.zero_ratio is not None:
            return max(1, round(self.zero_ratio * num_real))
        return max(1, num_real // 2)
