"""The output head's share of a token's work, and the share of positions stage 1 trains logits at.

`lm_head_ratio` reads the FLOP accounting of `zeda.evaluation.flops`; `logit_fraction` turns
``stage1.head_budget`` into the share of positions whose logits each stage-1 step computes, and
`kept_positions` into their count (the loop, `zeda plan` and the transfer table all read them here).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from transformers import PretrainedConfig

from zeda.evaluation.flops import flop_report

__all__ = ["kept_positions", "lm_head_ratio", "logit_fraction"]


def lm_head_ratio(
    config_or_name: str | Path | Mapping[str, Any] | PretrainedConfig, context_len: int = 0
) -> float:
    """The original model's ``lm_head`` FLOPs per token over those of everything else.

    Real MoE checkpoints sit far below 1 (at 128 keys: Mixtral-8x7B 0.01, DeepSeek-V3 0.03,
    Qwen3-30B-A3B 0.11, gpt-oss-20b 0.19, the highest of the built-in configs): their
    unembedding is a small part of a token's work. A small model with a large vocabulary sits
    far above (hidden 128 against 151,936 rows: ~20), and then computing logits dominates
    training.

    Args:
        config_or_name: As for `flop_report`.
        context_len: Keys attended per token (as for `flop_report`; ``T / 2`` for the average
            over ``T``-token blocks).
    """
    report = flop_report(config_or_name, context_len=context_len)
    head = report.native_flops_by_component["lm_head"]
    rest = report.native_flops_per_token - head
    return head / rest if rest else math.inf


def logit_fraction(
    model_config: str | Path | Mapping[str, Any] | PretrainedConfig, head_budget: float | None, seq_len: int
) -> float:
    """Share of the positions whose logits stage 1 trains each step (see ``stage1.head_budget``).

    Args:
        model_config: The model's config, as for `flop_report` (the original's FLOPs are counted).
        head_budget: ``stage1.head_budget``.
        seq_len: Block length ``T``; attention is counted at ``T / 2`` keys per token.

    Returns:
        ``min(1, head_budget / lm_head_ratio)``; 1.0 when ``head_budget`` is None.
    """
    if head_budget is None:
        return 1.0
    return min(1.0, head_budget / lm_head_ratio(model_config, context_len=seq_len // 2))


def kept_positions(fraction: float, trained: int) -> int:
    """How many of ``trained`` positions a step computes logits at: ``max(1, round(fraction * trained))``.

    Args:
        fraction: `logit_fraction`'s share, in (0, 1).
        trained: Positions trained in some row of the batch (``T - 1`` for packed text blocks).
    """
    return max(1, round(fraction * trained))
