"""Zero-aware routing math for serving engines (pure torch, no vLLM and no zeda import).

This module mirrors zeda's router math (``zeda`` routing: ``softmax`` and ``sigmoid_bias``)
so that an engine can route a zeda export exactly as zeda's transformers model does:

- A router scores ``E`` real + ``Z`` zero experts and keeps the top-k over all ``E + Z``.
- ``zero_logit_bias`` is added to the ``Z`` zero-expert logits before scoring.
- Sigmoid routers with a correction bias keep group-limited selection for the real experts;
  zero experts belong to no group and stay eligible for every token.
- Weights are normalised over the k chosen slots *including* zero slots, and only then are
  the zero slots dropped (renormalise first, then drop).

Dropped slots are returned with expert id ``-1`` and weight 0 (the expert-map convention for
"no expert here"); the caller must make sure no kernel sees them.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, Literal

import torch

RouterKind = Literal["softmax", "sigmoid_bias"]

DROPPED = -1
"""Expert id of a slot that does no expert work (a zero expert or a forced drop)."""


def layer_zero_logit_bias(value: float | Sequence[float] | None, moe_ordinal: int) -> float:
    """The ``zero_logit_bias`` of one MoE layer.

    Args:
        value: ``config.zeda["zero_logit_bias"]``: a float for every layer, or one float per
            MoE layer in layer order, or None (0).
        moe_ordinal: Position of the layer among the model's MoE layers (0-based).

    Returns:
        The bias added to that layer's zero-expert logits.

    Raises:
        ValueError: if a per-layer list does not have an entry for ``moe_ordinal``.
    """
    if value is None:
        return 0.0
    if isinstance(value, (int, float)):
        return float(value)
    values = list(value)
    if moe_ordinal >= len(values):
        raise ValueError(
            f"zeda.zero_logit_bias has {len(values)} entries but MoE layer #{moe_ordinal} exists; "
            "give one float per MoE layer or a single float"
        )
    return float(values[moe_ordinal])


def read_forced_share(config: Any, env_var: str) -> float | None:
    """The forced zero share of a served model: ``config.zeda_forced_zero_share`` (engine
    ``hf_overrides``), else the environment variable ``env_var``; None when neither is set.

    Raises:
        ValueError: for a share outside [0, 1].
    """
    value = getattr(config, "zeda_forced_zero_share", None)
    if value is None:
        env = os.environ.get(env_var, "").strip()
        value = float(env) if env else None
    if value is None:
        return None
    share = float(value)
    if not 0.0 <= share <= 1.0:
        raise ValueError(f"zeda forced zero share must be in [0, 1], got {share}")
    return share


def forced_zero_mask(weights: torch.Tensor, share: float) -> torch.Tensor:
    """Which slots to force to zero so exactly ``floor(share·T·k)`` slots are dropped.

    Each token gives up its lowest-weight slots; the per-token count is spread evenly over the
    T tokens (Bresenham), as zeda's ``forced_zero_share`` does.

    Args:
        weights: ``(T, k)`` routing weights.
        share: Fraction in [0, 1] of all slots to drop.

    Returns:
        ``(T, k)`` bool mask of the slots to drop.
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


def _bias_zero_columns(logits: torch.Tensor, num_experts: int, bias: float) -> torch.Tensor:
    if bias == 0.0 or logits.shape[-1] == num_experts:
        return logits
    add = torch.zeros(logits.shape[-1], dtype=logits.dtype, device=logits.device)
    add[num_experts:] = bias
    return logits + add


def _select_softmax(logits: torch.Tensor, top_k: int, renormalize: bool) -> tuple[torch.Tensor, torch.Tensor]:
    if renormalize:
        # softmax over all, top-k, renormalise == top-k of the logits, softmax over those k
        # (softmax is monotonic): k exponentials per token instead of E + Z, as vLLM's own router
        top_l, top_i = torch.topk(logits, top_k, dim=-1)
        return torch.softmax(top_l, dim=-1), top_i
    probs = torch.softmax(logits, dim=-1)
    return torch.topk(probs, top_k, dim=-1)


def _select_sigmoid_bias(
    logits: torch.Tensor,
    num_experts: int,
    top_k: int,
    renormalize: bool,
    e_score_correction_bias: torch.Tensor,
    num_expert_group: int,
    topk_group: int,
    routed_scaling_factor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    e = num_experts
    scores = torch.sigmoid(logits)
    choice = scores + e_score_correction_bias[: logits.shape[-1]].float()
    real = choice[:, :e]
    groups = real.view(-1, num_expert_group, e // num_expert_group)
    group_scores = groups.topk(min(2, groups.shape[-1]), dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0).bool()
    real_mask = group_mask.unsqueeze(-1).expand_as(groups).reshape(-1, e)
    choice = torch.cat([real.masked_fill(~real_mask, float("-inf")), choice[:, e:]], dim=-1)
    top_i = torch.topk(choice, k=top_k, dim=-1, sorted=False)[1]
    top_v = scores.gather(1, top_i)
    if renormalize:
        top_v = top_v / (top_v.sum(dim=-1, keepdim=True) + 1e-20)
    return top_v * routed_scaling_factor, top_i


def zero_aware_route(
    router_logits: torch.Tensor,
    *,
    kind: RouterKind,
    num_experts: int,
    top_k: int,
    renormalize: bool,
    zero_experts_enabled: bool = True,
    zero_logit_bias: float = 0.0,
    forced_zero_share: float | None = None,
    e_score_correction_bias: torch.Tensor | None = None,
    num_expert_group: int = 1,
    topk_group: int = 1,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Route tokens over ``E`` real + ``Z`` zero experts, zeda's math.

    Args:
        router_logits: ``(T, E + Z)`` gate outputs (any float dtype; computed in fp32).
        kind: ``"softmax"`` (Qwen3-MoE, Mixtral) or ``"sigmoid_bias"`` (GLM-4.5, DeepSeek-V3).
        num_experts: E, the real experts (the first E columns).
        top_k: k, slots per token.
        renormalize: Normalise the k chosen weights (zero slots included) to sum to 1.
        zero_experts_enabled: False routes on the first E columns only, i.e. the original
            un-injected router (zeda's teacher mode).
        zero_logit_bias: Added to the zero-expert logits before scoring.
        forced_zero_share: If set, additionally drop exactly ``floor(share·T·k)`` of the
            lowest-weight slots (Bresenham-spread over the T tokens), without renormalising.
        e_score_correction_bias: ``(E + Z,)`` selection bias of sigmoid routers.
        num_expert_group: Groups of real experts (sigmoid routers).
        topk_group: Groups kept per token (sigmoid routers).
        routed_scaling_factor: Multiplies the weights of sigmoid routers.

    Returns:
        ``(weights (T, k) float32, ids (T, k) int32)``; slots that do no expert work (zero
        experts chosen, forced drops) have id ``-1`` and weight 0.
    """
    e = num_experts
    logits = router_logits.float()
    if not zero_experts_enabled:
        logits = logits[:, :e]
    logits = _bias_zero_columns(logits, e, zero_logit_bias)
    if kind == "softmax":
        weights, ids = _select_softmax(logits, top_k, renormalize)
    elif kind == "sigmoid_bias":
        if e_score_correction_bias is None:
            raise ValueError("sigmoid_bias routing needs e_score_correction_bias")
        weights, ids = _select_sigmoid_bias(
            logits,
            e,
            top_k,
            renormalize,
            e_score_correction_bias,
            num_expert_group,
            topk_group,
            routed_scaling_factor,
        )
    else:  # pragma: no cover - Literal guards this
        raise ValueError(f"unknown router kind {kind!r}")
    drop = ids >= e
    if forced_zero_share is not None:
        drop = drop | forced_zero_mask(weights, forced_zero_share)
    ids = ids.masked_fill(drop, DROPPED)
    weights = weights.masked_fill(drop, 0.0)
    return weights.float().contiguous(), ids.to(torch.int32).contiguous()


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
