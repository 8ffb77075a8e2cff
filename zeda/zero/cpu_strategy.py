"""How the ``"zeda"`` experts backend runs bf16/fp16 inference on CPU: the per-expert loop over
kept rows or compaction + grouped GEMMs (`zeda.zero.experts`), whichever was measured faster on
this machine for the shape and the number of kept rows (timed once per shape and row-count
bucket, then cached), or the one `set_cpu_strategy` forces. The environment variable
``ZEDA_CPU_EXPERTS_STRATEGY`` sets the initial choice.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable

import torch
from torch import nn

from zeda.errors import ZedaError

logger = logging.getLogger(__name__)

__all__ = [
    "CPU_STRATEGIES",
    "GROUPED_MARGIN",
    "autotuned_forward",
    "cpu_strategy_choices",
    "set_cpu_strategy",
]

CPU_STRATEGIES = ("auto", "loop", "grouped")
# Autotuning takes compaction + grouped GEMMs only when they beat the loop by more than 5%.
GROUPED_MARGIN = 0.95
_cpu_strategy = "auto"
# (dtype, E, down_proj shape, layout, kept-row bucket) -> "loop" | "grouped", filled by autotuning.
_tuned: dict[tuple, str] = {}


def set_cpu_strategy(strategy: str) -> None:
    """Choose how the ``"zeda"`` backend runs bf16/fp16 inference on CPU.

    Args:
        strategy: ``"auto"`` (default: time both strategies once per shape and kept-row bucket
            and keep the faster), ``"loop"`` (per-expert loop over kept rows, as stock eager) or
            ``"grouped"`` (compaction + grouped GEMMs). The environment variable
            ``ZEDA_CPU_EXPERTS_STRATEGY`` sets the initial value. Clears the autotuning cache.
    """
    global _cpu_strategy
    if strategy not in CPU_STRATEGIES:
        raise ZedaError(f"unknown CPU experts strategy {strategy!r}: use one of {', '.join(CPU_STRATEGIES)}")
    _cpu_strategy = strategy
    _tuned.clear()


def cpu_strategy_choices() -> dict[tuple, str]:
    """The autotuned CPU choices so far: ``(dtype, E, per-expert down_proj shape, transposed,
    gated, kept-row bucket) -> "loop" | "grouped"``."""
    return dict(_tuned)


def _bucket(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def _stored_shape(module: nn.Module, name: str) -> tuple[int, ...]:
    """Shape of a parameter as stored, without evaluating a parametrization (PEFT's LoRA on
    ``target_parameters`` parametrizes the fused weights during forward: reading them would
    compute base + delta once more)."""
    parametrizations = getattr(module, "parametrizations", None)
    if parametrizations is not None and name in parametrizations:
        return tuple(parametrizations[name].original.shape)
    return tuple(getattr(module, name).shape)


def autotuned_forward(
    strategies: dict[str, Callable[..., torch.Tensor]],
    module: nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
) -> torch.Tensor:
    """Run the CPU strategy measured faster for this shape and number of kept rows.

    The first call for a (dtype, expert shapes, kept-row power-of-two bucket) runs both
    strategies three times each, interleaved, keeps the grouped GEMMs if their best time beats
    the loop's by more than 5% (else the loop) and returns its output; later calls look the
    choice up (one host sync for the kept-row count).

    Args:
        strategies: ``{"loop": fn, "grouped": fn}``, each called as
            ``fn(module, hidden_states, top_k_index, top_k_weights)``.
        module, hidden_states, top_k_index, top_k_weights: As in `zeda.zero.experts.zeda_experts_forward`.
    """
    fns = strategies
    if _cpu_strategy != "auto":
        return fns[_cpu_strategy](module, hidden_states, top_k_index, top_k_weights)
    kept = int((top_k_index < module.num_experts).sum())
    key = (
        hidden_states.dtype,
        module.num_experts,
        _stored_shape(module, "down_proj")[1:],
        bool(module.is_transposed),
        bool(module.has_gate),
        _bucket(kept),
    )
    choice = _tuned.get(key)
    if choice is not None:
        return fns[choice](module, hidden_states, top_k_index, top_k_weights)
    best = {name: float("inf") for name in fns}
    outs: dict[str, torch.Tensor] = {}
    for _ in range(3):
        for name, fn in fns.items():
            t0 = time.perf_counter()
            outs[name] = fn(module, hidden_states, top_k_index, top_k_weights)
            best[name] = min(best[name], time.perf_counter() - t0)
    # The loop is stock eager's own algorithm: near-ties go to it, so the backend is never slower
    # than eager because of a noisy measurement.
    choice = "grouped" if best["grouped"] < GROUPED_MARGIN * best["loop"] else "loop"
    _tuned[key] = choice
    logger.debug(
        "zeda experts CPU autotune %s: loop %.2f ms, grouped %.2f ms -> %s",
        key,
        best["loop"] * 1e3,
        best["grouped"] * 1e3,
        choice,
    )
    return outs[choice]


set_cpu_strategy(os.environ.get("ZEDA_CPU_EXPERTS_STRATEGY", "auto"))
