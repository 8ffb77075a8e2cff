"""Router kinds: how a router turns its ``(T, E + Z)`` logits into k slots, one small function each.

A kind is a `RouterKind` in `KINDS`: a ``select`` function ``(logits, params) -> (weights, ids)``
and a ``probs`` function giving the router's distribution over all experts (used by the group
balance loss and the entropy baseline). Every ``select`` adds the zero-logit bias itself (with
`zero_biased`) at the point and in the dtype its family scores, so that zeda's routers stay
bit-identical to the family's own router math. Add a kind with `register_kind`.

Zero experts are the columns ``[E, E + Z)``; they take part in top-k like real experts, belong to
no expert group, and never receive a correction bias other than their own entries.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch

__all__ = [
    "KINDS",
    "get_kind",
    "RouterKind",
    "RouterParams",
    "limit_groups",
    "register_kind",
    "router_probs",
    "zero_biased",
]


class RouterParams(NamedTuple):
    """The static facts of one router that a ``select`` function reads.

    Attributes:
        num_experts: E, the real experts (the first E logit columns).
        top_k: k, slots per token.
        renormalize: Normalise the k chosen weights (zero slots included) to sum to 1.
        zero_logit_bias: Added to the zero-expert logits before scoring.
        correction_bias: ``(E + Z,)`` selection-only bias (sigmoid routers), or None.
        num_expert_group: Groups of real experts for group-limited selection (1: no limit).
        topk_group: Groups kept per token.
        group_top: Scores summed per group to rank the groups (DeepSeek-V3/GLM: 2; a group's max: 1).
        routed_scaling_factor: Multiplies the final weights (sigmoid routers).
    """

    num_experts: int
    top_k: int
    renormalize: bool = True
    zero_logit_bias: float = 0.0
    correction_bias: torch.Tensor | None = None
    num_expert_group: int = 1
    topk_group: int = 1
    group_top: int = 2
    routed_scaling_factor: float = 1.0


SelectFn = Callable[[torch.Tensor, RouterParams], tuple[torch.Tensor, torch.Tensor]]
ProbsFn = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class RouterKind:
    """One router kind.

    Attributes:
        name: The key in `KINDS` (a family's ``router_kind``).
        select: ``(logits (T, N), params) -> (weights (T, k), ids (T, k) int64 in [0, N))``.
        probs: ``(T, N) logits -> (T, N)`` float32 distribution over the N experts (rows sum to 1).
        fp32_gate: The family computes its gate projection in float32.
        correction_bias: ``select`` needs ``params.correction_bias``.
        normalised: The scores are normalised over the experts (softmax), so a zero expert's
            row can be fitted to a token's normaliser (`zeda.zero.start.fit_zero_rows`).
    """

    name: str
    select: SelectFn
    probs: ProbsFn
    fp32_gate: bool = False
    correction_bias: bool = False
    normalised: bool = True


def zero_biased(logits: torch.Tensor, p: RouterParams) -> torch.Tensor:
    """``logits`` with ``p.zero_logit_bias`` added to the zero-expert columns ``[E, N)``."""
    if p.zero_logit_bias == 0.0 or logits.shape[-1] == p.num_experts:
        return logits
    bias = torch.zeros(logits.shape[-1], dtype=logits.dtype, device=logits.device)
    bias[p.num_experts :] = p.zero_logit_bias
    return logits + bias


def limit_groups(choice: torch.Tensor, p: RouterParams) -> torch.Tensor:
    """Group-limited selection: real experts outside a token's ``topk_group`` best groups get -inf.

    The groups partition the E real experts only; zero experts belong to no group and stay
    eligible for every token.

    Args:
        choice: ``(T, N)`` selection scores, zero experts in columns ``[E, N)``.
        p: The router's params (``num_expert_group``, ``topk_group``, ``group_top``).

    Returns:
        ``(T, N)`` scores to take the top-k of.
    """
    e = p.num_experts
    real = choice[:, :e]
    groups = real.view(-1, p.num_expert_group, e // p.num_expert_group)
    group_scores = groups.topk(min(p.group_top, groups.shape[-1]), dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=p.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0).bool()
    real_mask = group_mask.unsqueeze(-1).expand_as(groups).reshape(-1, e)
    return torch.cat([real.masked_fill(~real_mask, float("-inf")), choice[:, e:]], dim=-1)


def _softmax_probs(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float(), dim=-1)


def _sigmoid_probs(logits: torch.Tensor) -> torch.Tensor:
    scores = torch.sigmoid(logits.float())
    return scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-20)


def _select_softmax(logits: torch.Tensor, p: RouterParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Qwen-MoE, OLMoE, Mixtral: softmax over all experts (fp32), top-k, optional renormalisation."""
    probs = torch.softmax(zero_biased(logits.float(), p), dim=-1)
    top_v, top_i = torch.topk(probs, p.top_k, dim=-1)
    if p.renormalize:
        top_v = top_v / top_v.sum(dim=-1, keepdim=True)
    return top_v.to(logits.dtype), top_i


def _select_sigmoid_bias(logits: torch.Tensor, p: RouterParams) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V3, GLM-4.x: select on sigmoid + correction bias (group-limited), weight by the
    unbiased sigmoid normalised over the k (+1e-20), times ``routed_scaling_factor``."""
    if p.correction_bias is None:
        raise ValueError("sigmoid_bias routing needs an e_score_correction_bias")
    scores = torch.sigmoid(zero_biased(logits.float(), p))
    choice = limit_groups(scores + p.correction_bias[: logits.shape[-1]], p)
    top_i = torch.topk(choice, k=p.top_k, dim=-1, sorted=False)[1]
    top_v = scores.gather(1, top_i)
    if p.renormalize:
        top_v = top_v / (top_v.sum(dim=-1, keepdim=True) + 1e-20)
    return top_v * p.routed_scaling_factor, top_i


def _select_topk_softmax(logits: torch.Tensor, p: RouterParams) -> tuple[torch.Tensor, torch.Tensor]:
    """gpt-oss: top-k of the (biased) logits in the model dtype, then softmax over the k."""
    top_v, top_i = torch.topk(zero_biased(logits, p), p.top_k, dim=-1)
    return torch.softmax(top_v, dim=1, dtype=top_v.dtype), top_i


def _select_softmax_group(logits: torch.Tensor, p: RouterParams) -> tuple[torch.Tensor, torch.Tensor]:
    """DeepSeek-V2: softmax over all experts (fp32); with groups, a token keeps the real experts of
    its ``topk_group`` groups (ranked by their best expert: ``group_top`` 1), zero experts stay
    eligible; the chosen probabilities, renormalised if asked (DeepSeek-V2: not), times
    ``routed_scaling_factor``."""
    probs = torch.softmax(zero_biased(logits.float(), p), dim=-1)
    choice = limit_groups(probs, p) if p.num_expert_group > 1 else probs
    top_i = torch.topk(choice, k=p.top_k, dim=-1, sorted=False)[1]
    top_v = probs.gather(1, top_i)
    if p.renormalize:
        top_v = top_v / (top_v.sum(dim=-1, keepdim=True) + 1e-20)
    return top_v * p.routed_scaling_factor, top_i


def _select_topk_sigmoid(logits: torch.Tensor, p: RouterParams) -> tuple[torch.Tensor, torch.Tensor]:
    """Llama 4: top-k of the logits in the model dtype, then the sigmoid (fp32) of each chosen one."""
    top_v, top_i = torch.topk(zero_biased(logits, p), p.top_k, dim=-1)
    weights = torch.sigmoid(top_v.float())
    if p.renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights.to(logits.dtype), top_i


KINDS: dict[str, RouterKind] = {}
"""Every router kind by name."""


def register_kind(kind: RouterKind) -> RouterKind:
    """Add ``kind`` to `KINDS` (a name may be registered once) and return it."""
    if kind.name in KINDS and KINDS[kind.name] is not kind:
        raise ValueError(f"router kind {kind.name!r} is already registered")
    KINDS[kind.name] = kind
    return kind


register_kind(RouterKind("softmax", _select_softmax, _softmax_probs))
register_kind(
    RouterKind(
        "sigmoid_bias",
        _select_sigmoid_bias,
        _sigmoid_probs,
        fp32_gate=True,
        correction_bias=True,
        normalised=False,
    )
)
register_kind(RouterKind("topk_softmax", _select_topk_softmax, _softmax_probs))
register_kind(RouterKind("softmax_group", _select_softmax_group, _softmax_probs, fp32_gate=True))
register_kind(RouterKind("topk_sigmoid", _select_topk_sigmoid, _sigmoid_probs, normalised=False))


def get_kind(name: str) -> RouterKind:
    """The registered kind ``name``.

    Raises:
        ValueError: naming the known kinds.
    """
    kind = KINDS.get(name)
    if kind is None:
        raise ValueError(f"unknown router kind {name!r}; known kinds: {', '.join(sorted(KINDS))}")
    return kind


def router_probs(logits: torch.Tensor, kind: str) -> torch.Tensor:
    """The router's distribution over all its experts (no correction bias, no zero-logit bias).

    Args:
        logits: ``(T, N)`` raw router logits.
        kind: A router kind name.

    Returns:
        ``(T, N)`` float32, each row summing to 1.
    """
    return get_kind(kind).probs(logits)
