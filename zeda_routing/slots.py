"""From router logits to the slots the experts run: selection, renormalise-then-drop, forced drops,
training-free slot policies.

A router over ``E`` real + ``Z`` zero experts keeps top-k over all ``E + Z``; its weights are
normalised over the k chosen slots *including* zero slots, and only then are the zero slots
dropped (renormalise first, then drop). A dropped slot carries a caller-chosen expert id
(``E`` for zeda's transformers experts, `DROPPED` = -1 for serving kernels) and weight 0.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch

from .kinds import RouterParams, get_kind

__all__ = [
    "DROPPED",
    "SlotPolicy",
    "drop_slots",
    "entropy_keep_count",
    "forced_zero_mask",
    "keep_strongest",
    "rescale_kept",
    "route",
    "select_slots",
]

DROPPED = -1
"""Expert id of a slot that does no expert work in a serving kernel (expert-map convention)."""


def select_slots(
    logits: torch.Tensor, kind: str, params: RouterParams, zero_experts_enabled: bool = True
) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k slots of ``(T, E + Z)`` router logits with the router kind's math.

    Args:
        logits: ``(T, E + Z)`` gate outputs, as the family's gate computes them.
        kind: A router kind (`zeda_routing.KINDS`).
        params: The router's facts.
        zero_experts_enabled: False scores the first E columns only: the original router.

    Returns:
        ``(weights (T, k), ids (T, k) int64)``; ids ``>= E`` are zero experts.
    """
    if not zero_experts_enabled:
        logits = logits[:, : params.num_experts]
    return get_kind(kind).select(logits, params)


def forced_zero_mask(weights: torch.Tensor, share: float) -> torch.Tensor:
    """Choose which slots to force onto zero experts so exactly ``floor(share·T·k)`` go there.

    Each token gives up its lowest-weight slots; the per-token count is spread evenly over the
    tokens (Bresenham), so the share holds for any T.

    Args:
        weights: ``(T, k)`` routing weights.
        share: Fraction in [0, 1] of all slots to force to zero experts.

    Returns:
        ``(T, k)`` bool mask of the slots to zero.
    """
    t, k = weights.shape
    pos = torch.arange(t + 1, device=weights.device, dtype=torch.float64) * share * k
    per_token = (torch.floor(pos[1:] + 1e-9) - torch.floor(pos[:-1] + 1e-9)).long().clamp(0, k)
    order = torch.argsort(weights.float(), dim=-1, descending=False)  # weakest first
    rank = torch.arange(k, device=weights.device).expand(t, k)
    zero_sorted = rank < per_token[:, None]
    mask = torch.zeros_like(zero_sorted)
    mask.scatter_(-1, order, zero_sorted)
    return mask


def rescale_kept(weights: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """Zero the dropped slots and rescale the kept ones to the original total of the k weights.

    Args:
        weights: ``(T, k)`` routing weights.
        keep: ``(T, k)`` bool mask of the kept slots.

    Returns:
        ``(T, k)`` weights in ``weights``' dtype.
    """
    kept = weights.masked_fill(~keep, 0)
    scale = weights.sum(-1, keepdim=True) / kept.sum(-1, keepdim=True).clamp_min(1e-20)
    return kept * scale.to(weights.dtype)


@dataclass(frozen=True)
class SlotPolicy:
    """A training-free slot-dropping rule applied to the chosen top-k slots (the baselines).

    Attributes:
        kind: ``keep_top_m`` keeps the ``m = value`` highest-weight slots; ``top_p`` keeps the
            smallest prefix of weight-sorted slots whose normalised weight reaches ``value``;
            ``threshold`` keeps slots whose normalised weight is at least ``value``. The
            top-1 slot is always kept.
        value: The rule's parameter (int-like for keep_top_m, in (0, 1] otherwise).
        renormalize: Rescale kept weights so they sum to the original total of the k weights.
    """

    kind: Literal["keep_top_m", "top_p", "threshold"]
    value: float
    renormalize: bool = True

    def keep_mask(self, weights: torch.Tensor) -> torch.Tensor:
        """Which slots survive.

        Args:
            weights: ``(T, k)`` routing weights of the chosen slots.

        Returns:
            ``(T, k)`` bool mask.
        """
        w = weights.float()
        order = torch.argsort(w, dim=-1, descending=True)
        sorted_w = w.gather(-1, order)
        total = sorted_w.sum(-1, keepdim=True).clamp_min(1e-20)
        rank = torch.arange(w.shape[-1], device=w.device).expand_as(w)
        if self.kind == "keep_top_m":
            keep_sorted = rank < max(1, int(round(self.value)))
        elif self.kind == "top_p":
            before = torch.cumsum(sorted_w / total, -1) - sorted_w / total
            keep_sorted = before < self.value
        elif self.kind == "threshold":
            keep_sorted = (sorted_w / total) >= self.value
        else:  # pragma: no cover - Literal guards this
            raise ValueError(f"unknown slot policy {self.kind!r}")
        keep_sorted = keep_sorted | (rank == 0)
        keep = torch.zeros_like(keep_sorted)
        keep.scatter_(-1, order, keep_sorted)
        return keep


def entropy_keep_count(logits: torch.Tensor, kind: str, k: int, value: float) -> torch.Tensor:
    """Entropy-guided adaptive k: how many of its k slots each token keeps.

    ``h`` is the entropy of the router's distribution over the E real experts divided by
    ``log E`` (in [0, 1]); with the scale ``s = value / (1 - value)`` a token keeps
    ``clamp(ceil(k·h / s), 1, k)`` slots. ``value = 0`` keeps all k, ``value = 1`` only the top-1.

    Args:
        logits: ``(T, E)`` router logits over the real experts.
        kind: The router kind (its distribution: softmax, or sigmoid normalised over E).
        k: Routed slots per token.
        value: The knob in [0, 1].

    Returns:
        ``(T,)`` int64 counts in ``1..k``.
    """
    p = get_kind(kind).probs(logits)
    h = -(p * torch.log(p.clamp_min(1e-30))).sum(-1) / math.log(max(2, logits.shape[-1]))
    if value <= 0.0:
        return torch.full_like(h, k, dtype=torch.long)
    if value >= 1.0:
        return torch.ones_like(h, dtype=torch.long)
    scale = value / (1.0 - value)
    return torch.ceil(k * h / scale).clamp(1, k).long()


def keep_strongest(weights: torch.Tensor, live: torch.Tensor, keep_n: torch.Tensor) -> torch.Tensor:
    """Keep each token's ``keep_n`` highest-weight live slots.

    Args:
        weights: ``(T, k)`` routing weights.
        live: ``(T, k)`` bool: slots that may be kept (not already dropped).
        keep_n: ``(T,)`` slots to keep per token.

    Returns:
        ``(T, k)`` bool mask of the kept slots.
    """
    k = weights.shape[-1]
    order = torch.argsort(weights.float().masked_fill(~live, -1.0), dim=-1, descending=True)
    rank = torch.empty_like(order).scatter_(-1, order, torch.arange(k, device=order.device).expand_as(order))
    return live & (rank < keep_n[:, None])


def drop_slots(
    weights: torch.Tensor,
    ids: torch.Tensor,
    num_experts: int,
    *,
    dropped_id: int,
    zero_routing: bool = True,
    slot_policy: SlotPolicy | None = None,
    forced_share: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop zero slots, a slot policy's drops and forced drops, after normalisation.

    Args:
        weights: ``(T, k)`` weights, normalised over the k chosen slots (zero slots included).
        ids: ``(T, k)`` expert ids; ids ``>= num_experts`` are zero experts.
        num_experts: E.
        dropped_id: The id a dropped slot gets (``E`` in zeda, `DROPPED` in serving kernels).
        zero_routing: Whether zero experts took part in selection (False: the original router).
        slot_policy: A training-free rule; with ``renormalize`` its kept weights are rescaled.
        forced_share: Also drop exactly ``floor(share·T·k)`` of the lowest-weight slots.

    Returns:
        ``(weights, ids)``: dropped slots have weight 0 and ``dropped_id``. Unchanged when
        nothing can drop.
    """
    drop = ids >= num_experts if zero_routing else None
    if slot_policy is not None:
        keep = slot_policy.keep_mask(weights.masked_fill(drop, 0) if drop is not None else weights)
        if slot_policy.renormalize:
            weights = rescale_kept(weights, keep)
        drop = ~keep if drop is None else (drop | ~keep)
    if forced_share is not None:
        forced = forced_zero_mask(weights, forced_share)
        drop = forced if drop is None else (drop | forced)
    if drop is not None:
        ids = ids.masked_fill(drop, dropped_id)
        weights = weights.masked_fill(drop, 0)
    return weights, ids


def route(
    logits: torch.Tensor,
    kind: str,
    params: RouterParams,
    *,
    zero_experts_enabled: bool = True,
    forced_share: float | None = None,
    dropped_id: int = DROPPED,
) -> tuple[torch.Tensor, torch.Tensor]:
    """A serving engine's routing: select, renormalise, then drop.

    Static shapes and no host synchronisation (``torch.compile(fullgraph=True)`` traces it), so
    it runs inside CUDA-graph capture.

    Args:
        logits: ``(T, E + Z)`` gate outputs (``(T, E)`` is fine with ``zero_experts_enabled=False``).
        kind: A router kind.
        params: The router's facts.
        zero_experts_enabled: False routes as the original router (zeda's teacher mode).
        forced_share: Also drop exactly ``floor(share·T·k)`` of the lowest-weight slots.
        dropped_id: The id of a dropped slot: `DROPPED` (-1: kernels that skip it, or a host-side
            compaction), or E where an expert map sends E to "no expert here".

    Returns:
        ``(weights (T, k) float32, ids (T, k) int32)`` with dropped slots at ``dropped_id``, weight 0.
    """
    weights, ids = select_slots(logits, kind, params, zero_experts_enabled)
    weights, ids = drop_slots(
        weights, ids, params.num_experts, dropped_id=dropped_id, forced_share=forced_share
    )
    return weights.float().contiguous(), ids.to(torch.int32).contiguous()
