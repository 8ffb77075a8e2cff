"""Router telemetry counts: how many routed slots did expert work, per layer.

A slot is *skipped* when its expert id lies outside ``[0, E)``: zeda's sentinel ``E`` (a zero
expert, a slot policy's drop, a forced drop) or a serving kernel's -1. The counting lives here;
attaching it to a model's routers is the caller's business (`zeda.RouterTelemetry`).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field

import torch

__all__ = ["LayerStats", "total_zero_share"]


@dataclass
class LayerStats:
    """Routed-slot counts of one MoE layer.

    Attributes:
        slots: Routed top-k slots seen (tokens · k).
        zero_slots: Slots that did no expert work.
        real_per_token: Histogram over ``0..k`` of real experts used per token.
        expert_load: Real slots per expert ``(E,)`` as a list.
    """

    slots: int = 0
    zero_slots: int = 0
    real_per_token: list[int] = field(default_factory=list)
    expert_load: list[int] = field(default_factory=list)

    def add(self, ids: torch.Tensor, num_experts: int) -> None:
        """Count one forward's slots.

        Args:
            ids: ``(T, k)`` expert ids of the routed slots (padding already removed).
            num_experts: E; ids outside ``[0, E)`` are skipped slots.
        """
        k = ids.shape[-1]
        if not self.real_per_token:
            self.real_per_token = [0] * (k + 1)
            self.expert_load = [0] * num_experts
        zero = (ids >= num_experts) | (ids < 0)
        self.slots += zero.numel()
        self.zero_slots += int(zero.sum())
        hist = torch.bincount(k - zero.sum(-1), minlength=k + 1).tolist()
        self.real_per_token = [a + b for a, b in zip(self.real_per_token, hist, strict=True)]
        load = torch.bincount(ids[~zero], minlength=num_experts).tolist()
        self.expert_load = [a + b for a, b in zip(self.expert_load, load, strict=True)]

    @property
    def zero_share(self) -> float:
        """Share of routed slots that did no expert work."""
        return self.zero_slots / self.slots if self.slots else 0.0

    @property
    def tokens(self) -> int:
        """Tokens seen (each contributes one entry to ``real_per_token``)."""
        return sum(self.real_per_token)

    @property
    def busiest_share(self) -> float:
        """Share of tokens that sent a slot to this layer's busiest real expert."""
        return max(self.expert_load, default=0) / self.tokens if self.tokens else 0.0

    @property
    def saturation(self) -> float:
        """Busiest expert's load divided by the mean load over the E real experts (1.0 = even)."""
        total = sum(self.expert_load)
        return max(self.expert_load) * len(self.expert_load) / total if total else 0.0


def total_zero_share(layers: Iterable[LayerStats]) -> float:
    """Share of all routed slots (all layers, all tokens) that did no expert work."""
    layers = list(layers)
    slots = sum(s.slots for s in layers)
    return sum(s.zero_slots for s in layers) / slots if slots else 0.0
