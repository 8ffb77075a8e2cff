"""Loss functions: distillation losses and the two-group (real vs zero experts) balance loss.

Everything here is a pure function of tensors. All losses are computed in float32 whatever the
input dtype, and return a scalar tensor.

Masks: every ``mask`` argument is ``(B, T)`` (or ``(T,)`` for router statistics) of bool or
float; float masks act as per-token weights, and "token mean" means ``sum(w * x) / sum(w)``
(0 when the mask is empty).

Balance loss. With ``E`` real experts at indices ``[0, E)`` and ``Z`` zero experts at
``[E, E + Z)``, top-k routing, and ``T`` tokens::

    f_E, f_Z = share of the T*k chosen slots that went to each group      (no gradient)
    P_E, P_Z = mean over tokens of the summed router probability of each group
    L = alpha * (E + w*Z) * (f_E * P_E / E + f_Z * P_Z / (w*Z))

per MoE layer, summed over layers. Because P_E + P_Z = 1, dL/dP_Z is proportional to
``f_Z / (w*Z) - f_E / E``, so the router settles where ``f_Z / f_E = w*Z / E``, i.e. a zero share
of ``w*Z / (w*Z + E)`` (50 % for Z = E/2 and w = 2). `w_for_target` inverts this.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

from zeda.errors import ZedaError

__all__ = [
    "GroupStats",
    "PGOutput",
    "all_reduce_counts",
    "balance_loss_from_logits",
    "distill_loss",
    "equilibrium_zero_share",
    "forward_kl",
    "group_balance_loss",
    "group_balance_stats",
    "policy_gradient_reverse_kl",
    "reverse_kl",
    "router_probs",
    "sum_stats",
    "token_nll",
    "w_for_target",
]

RouterKind = Literal["softmax", "sigmoid_bias", "topk_softmax"]


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


def _select(mask: Tensor, *tensors: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Keep only positions with ``mask > 0``.

    Args:
        mask: ``(B, T)`` bool or float.
        *tensors: Each ``(B, T, ...)``.

    Returns:
        ``(weights (N,), [t[mask] (N, ...)])`` with weights in float32.
    """
    if mask.dtype == torch.bool:
        keep = mask
        weights = torch.ones(int(keep.sum()), device=mask.device, dtype=torch.float32)
    else:
        keep = mask > 0
        weights = mask[keep].float()
    for t in tensors:
        if t.shape[: mask.dim()] != mask.shape:
            raise ZedaError(f"mask shape {tuple(mask.shape)} does not match tensor shape {tuple(t.shape)}")
    return weights, [t[keep] for t in tensors]


def _weighted_mean(values: Tensor, weights: Tensor) -> Tensor:
    """``sum(w * v) / sum(w)``, 0 (with a gradient path) when there is no weight."""
    total = weights.sum()
    return (values * weights).sum() / total.clamp_min(1e-12) if values.numel() else values.sum() * 0.0


# --------------------------------------------------------------------------------------------
# Distillation losses
# --------------------------------------------------------------------------------------------


def forward_kl(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, temperature: float = 1.0
) -> Tensor:
    """Token-mean KL(teacher || student) over the full vocabulary.

    ``KL = sum_v p_T(v) * (log p_T(v) - log p_S(v))`` with both distributions taken at
    ``temperature`` (no ``T**2`` rescaling). Mass-covering: the student is pushed to put
    probability wherever the teacher does.

    Args:
        student_logits: ``(B, T, V)``.
        teacher_logits: ``(B, T, V)``; treated as constant (detached).
        mask: ``(B, T)`` bool or float weights.
        temperature: Softmax temperature, > 0.

    Returns:
        Scalar float32 loss.
    """
    weights, (s, t) = _select(mask, student_logits, teacher_logits)
    log_ps = F.log_softmax(s.float() / temperature, dim=-1)
    log_pt = F.log_softmax(t.detach().float() / temperature, dim=-1)
    kl = (log_pt.exp() * (log_pt - log_ps)).sum(-1)
    return _weighted_mean(kl, weights)


def reverse_kl(
    student_logits: Tensor, teacher_logits: Tensor, mask: Tensor, temperature: float = 1.0
) -> Tensor:
    """Token-mean KL(student || teacher) over the full vocabulary.

    ``KL = sum_v p_S(v) * (log p_S(v) - log p_T(v))``. Mode-seeking.

    Args:
        student_logits: ``(B, T, V)``.
        teacher_logits: ``(B, T, V)``; treated as constant (detached).
        mask: ``(B, T)`` bool or float weights.
        temperature: Softmax temperature, > 0.

    Returns:
        Scalar float32 loss.
    """
    weights, (s, t) = _select(mask, student_logits, teacher_logits)
    log_ps = F.log_softmax(s.float() / temperature, dim=-1)
    log_pt = F.log_softmax(t.detach().float() / temperature, dim=-1)
    kl = (log_ps.exp() * (log_ps - log_pt)).sum(-1)
    return _weighted_mean(kl, weights)


def token_nll(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Token-mean negative log-likelihood of ``labels`` (already aligned with ``logits``).

    ``labels[b, t]`` is the target of ``logits[b, t]`` (shift before calling). Positions with a
    negative label (e.g. -100) are ignored as if masked.

    Args:
        logits: ``(B, T, V)``.
        labels: ``(B, T)`` int64.
        mask: ``(B, T)`` bool or float weights.

    Returns:
        Scalar float32 loss.
    """
    if labels.shape != mask.shape:
        raise ZedaError(f"labels shape {tuple(labels.shape)} does not match mask shape {tuple(mask.shape)}")
    mask = mask.float() * (labels >= 0).float()
    weights, (lg, lb) = _select(mask, logits, labels)
    nll = F.cross_entropy(lg.float(), lb.long(), reduction="none")
    return _weighted_mean(nll, weights)


class PGOutput(NamedTuple):
    """Result of `policy_gradient_reverse_kl`.

    Attributes:
        loss: Scalar surrogate loss to backpropagate.
        reverse_kl: Scalar detached single-sample estimate of KL(student || teacher) per token,
            for logging.
    """

    loss: Tensor
    reverse_kl: Tensor


def policy_gradient_reverse_kl(student_logprobs: Tensor, teacher_logprobs: Tensor, mask: Tensor) -> PGOutput:
    """Single-sample policy-gradient estimator of the reverse KL on student samples.

    For tokens ``y_t`` sampled from the student, the per-token advantage is
    ``A_t = log p_T(y_t) - log p_S(y_t)`` (detached) and the surrogate loss is
    ``-mean_t(A_t * log p_S(y_t))``. Since ``E_{y~p_S}[grad log p_S(y)] = 0``, its gradient equals
    ``grad KL(p_S || p_T)`` per token in expectation. (Per-token advantage: no credit is passed to
    earlier tokens for later ones.)

    Args:
        student_logprobs: ``(B, T)`` log p_S of the sampled tokens (with gradient).
        teacher_logprobs: ``(B, T)`` log p_T of the same tokens (constant).
        mask: ``(B, T)`` bool or float weights (response tokens only).

    Returns:
        `PGOutput` ``(loss, reverse_kl)``; ``reverse_kl`` is the token mean of ``-A_t``.
    """
    if student_logprobs.shape != teacher_logprobs.shape:
        raise ZedaError(
            f"student_logprobs {tuple(student_logprobs.shape)} and teacher_logprobs "
            f"{tuple(teacher_logprobs.shape)} must have the same shape"
        )
    weights, (lps, lpt) = _select(mask, student_logprobs, teacher_logprobs)
    lps = lps.float()
    advantage = (lpt.detach().float() - lps.detach()).detach()
    loss = _weighted_mean(-(advantage * lps), weights)
    estimate = _weighted_mean(-advantage, weights).detach()
    return PGOutput(loss, estimate)


def distill_loss(
    kind: Literal["forward_kl", "reverse_kl", "nll"],
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor | None,
    mask: Tensor,
    temperature: float = 1.0,
) -> Tensor:
    """Dispatch on ``stage1.kd``.

    Args:
        kind: ``"forward_kl"``, ``"reverse_kl"`` or ``"nll"``.
        student_logits: ``(B, T, V)``.
        teacher_logits: ``(B, T, V)``; required for the KL kinds.
        labels: ``(B, T)`` aligned targets; required for ``"nll"``.
        mask: ``(B, T)``.
        temperature: Softmax temperature for the KL kinds.

    Returns:
        Scalar float32 loss.
    """
    if kind in ("forward_kl", "reverse_kl"):
        if teacher_logits is None:
            raise ZedaError(f"{kind} distillation needs teacher logits")
        fn = forward_kl if kind == "forward_kl" else reverse_kl
        return fn(student_logits, teacher_logits, mask, temperature)
    if kind == "nll":
        if labels is None:
            raise ZedaError("nll distillation needs labels")
        return token_nll(student_logits, labels, mask)
    raise ZedaError(f"unknown distillation loss {kind!r}; use forward_kl, reverse_kl or nll")


# --------------------------------------------------------------------------------------------
# Group balance loss
# --------------------------------------------------------------------------------------------


def w_for_target(target_zero_share: float, num_real: int, num_zero: int) -> float:
    """The zero-group weight ``w`` whose equilibrium zero share is ``target_zero_share``.

    Solves ``s = w*Z / (w*Z + E)`` for ``w``: ``w = s * E / (Z * (1 - s))``.

    Args:
        target_zero_share: ``s`` in (0, 1).
        num_real: ``E`` >= 1.
        num_zero: ``Z`` >= 1.

    Raises:
        ZedaError: if an argument is out of range.
    """
    s = float(target_zero_share)
    if not 0.0 < s < 1.0:
        raise ZedaError(f"target_zero_share must be in (0, 1), got {s}")
    if num_real < 1 or num_zero < 1:
        raise ZedaError(f"need at least one real and one zero expert, got E={num_real}, Z={num_zero}")
    return s * num_real / (num_zero * (1.0 - s))


def equilibrium_zero_share(num_real: int, num_zero: int, w: float) -> float:
    """The zero share ``w*Z / (w*Z + E)`` the balance loss drives the router to."""
    return w * num_zero / (w * num_zero + num_real)


def router_probs(logits: Tensor, kind: RouterKind) -> Tensor:
    """Router probabilities over all ``E + Z`` experts, as used by the balance loss.

    Args:
        logits: ``(T, E + Z)`` raw router logits (without any selection-only correction bias).
        kind: ``"softmax"`` / ``"topk_softmax"``: softmax over all experts;
            ``"sigmoid_bias"``: sigmoid scores normalised to sum to 1 over all experts.

    Returns:
        ``(T, E + Z)`` float32 probabilities, each row summing to 1.
    """
    x = logits.float()
    if kind in ("softmax", "topk_softmax"):
        return torch.softmax(x, dim=-1)
    if kind == "sigmoid_bias":
        scores = torch.sigmoid(x)
        return scores / scores.sum(dim=-1, keepdim=True).clamp_min(1e-20)
    raise ZedaError(f"unknown router kind {kind!r}; use softmax, sigmoid_bias or topk_softmax")


@dataclass(frozen=True)
class GroupStats:
    """Per-layer sufficient statistics of the group balance loss (all float32 scalars).

    Statistics add up: ``a + b`` (or `sum_stats`) over micro-batches or ranks gives exactly the
    statistics of the concatenated batch.

    Attributes:
        count_E: Chosen top-k slots that went to real experts (detached).
        count_Z: Chosen top-k slots that went to zero experts (detached).
        prob_sum_E: Sum over tokens of the real-group probability (carries gradient).
        prob_sum_Z: Sum over tokens of the zero-group probability (carries gradient).
        n_tokens: Number (total weight) of tokens behind ``prob_sum_*`` (detached).
    """

    count_E: Tensor
    count_Z: Tensor
    prob_sum_E: Tensor
    prob_sum_Z: Tensor
    n_tokens: Tensor

    def __add__(self, other: GroupStats) -> GroupStats:
        if not isinstance(other, GroupStats):
            return NotImplemented
        return GroupStats(
            self.count_E + other.count_E,
            self.count_Z + other.count_Z,
            self.prob_sum_E + other.prob_sum_E,
            self.prob_sum_Z + other.prob_sum_Z,
            self.n_tokens + other.n_tokens,
        )

    def detach(self) -> GroupStats:
        """A copy with no gradient (e.g. to keep a running total for logging)."""
        return GroupStats(*(getattr(self, f.name).detach() for f in dataclasses.fields(self)))

    @property
    def zero_share(self) -> Tensor:
        """Fraction of chosen slots that went to zero experts, ``f_Z`` (detached scalar)."""
        return (self.count_Z / (self.count_E + self.count_Z).clamp_min(1e-12)).detach()


def group_balance_stats(probs: Tensor, num_real: int, top_k: int, mask: Tensor | None = None) -> GroupStats:
    """Group statistics of one MoE layer for one batch.

    The counts come from a fresh top-k over ``probs`` (no correction bias, ties broken by
    `torch.topk`), so they reflect the probabilities the loss acts on.

    Args:
        probs: ``(T, E + Z)`` router probabilities (see `router_probs`), with gradient.
        num_real: ``E``; columns ``[E, E + Z)`` are zero experts.
        top_k: Experts chosen per token, ``k``.
        mask: ``(T,)`` bool or float token weights (``None`` = all tokens).

    Returns:
        `GroupStats` for this layer.
    """
    if probs.dim() != 2:
        raise ZedaError(f"probs must be (tokens, experts), got shape {tuple(probs.shape)}")
    n_total = probs.shape[-1]
    if not 1 <= num_real < n_total:
        raise ZedaError(f"num_real={num_real} must be in [1, {n_total}) for {n_total} router columns")
    if not 1 <= top_k <= n_total:
        raise ZedaError(f"top_k={top_k} must be in [1, {n_total}]")
    p = probs.float()
    weights = torch.ones(p.shape[0], device=p.device) if mask is None else mask.reshape(-1).float()
    if weights.shape[0] != p.shape[0]:
        raise ZedaError(f"mask has {weights.shape[0]} tokens but probs has {p.shape[0]}")
    with torch.no_grad():
        chosen = p.detach().topk(top_k, dim=-1).indices
        zero_slots = (chosen >= num_real).float().sum(-1)
        count_Z = (zero_slots * weights).sum()
        count_E = (top_k - zero_slots).mul(weights).sum()
        n_tokens = weights.sum()
    prob_sum_E = (p[:, :num_real].sum(-1) * weights).sum()
    prob_sum_Z = (p[:, num_real:].sum(-1) * weights).sum()
    return GroupStats(count_E, count_Z, prob_sum_E, prob_sum_Z, n_tokens)


def sum_stats(stats: Iterable[GroupStats]) -> GroupStats:
    """Element-wise sum of `GroupStats` of one layer over micro-batches (or any partition of tokens).

    Summing the stats of the parts gives exactly the stats of the concatenated batch.
    """
    stats = list(stats)
    if not stats:
        raise ZedaError("sum_stats needs at least one GroupStats")
    total = stats[0]
    for st in stats[1:]:
        total = total + st
    return total


def all_reduce_counts(stats: GroupStats, group: object | None = None) -> GroupStats:
    """Sum the (detached) slot counts over data-parallel ranks; probabilities stay local.

    The load fractions ``f`` then describe the global batch while each rank's gradient flows only
    through its own probabilities (data-parallel gradient averaging completes the global mean).
    A no-op when ``torch.distributed`` is not initialised.

    Args:
        stats: One layer's local `GroupStats`.
        group: Optional process group.
    """
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return stats
    counts = torch.stack([stats.count_E, stats.count_Z]).detach().clone()
    dist.all_reduce(counts, op=dist.ReduceOp.SUM, group=group)
    return dataclasses.replace(stats, count_E=counts[0], count_Z=counts[1])


def group_balance_loss(
    stats_per_layer: Sequence[GroupStats],
    num_real: int,
    num_zero: int,
    top_k: int,
    alpha: float,
    w: float,
) -> Tensor:
    """The two-group balance loss, summed over MoE layers.

    Per layer::

        f_E = count_E / (count_E + count_Z)      f_Z = count_Z / (count_E + count_Z)
        P_E = prob_sum_E / n_tokens              P_Z = prob_sum_Z / n_tokens
        L   = alpha * (E + w*Z) * (f_E * P_E / E + f_Z * P_Z / (w*Z))

    (``count_E + count_Z = n_tokens * k`` for stats of one batch.) Only ``P`` carries gradient.
    The scaling ``(E + w*Z)`` makes ``L = alpha`` at the equilibrium when ``f = P``.

    Args:
        stats_per_layer: One `GroupStats` per MoE layer (possibly summed over micro-batches with
            `sum_stats` and with counts all-reduced with `all_reduce_counts`).
        num_real: ``E``.
        num_zero: ``Z`` >= 1.
        top_k: ``k`` (kept for API symmetry and checked; the counts already encode it).
        alpha: Loss coefficient.
        w: Zero-group weight > 0 (see `w_for_target`).

    Returns:
        Scalar float32 loss (0 for an empty list).
    """
    if num_real < 1 or num_zero < 1:
        raise ZedaError(f"need at least one real and one zero expert, got E={num_real}, Z={num_zero}")
    if top_k < 1:
        raise ZedaError(f"top_k must be >= 1, got {top_k}")
    if not (w > 0 and math.isfinite(w)):
        raise ZedaError(f"balance weight w must be finite and > 0, got {w}")
    total: Tensor | None = None
    scale = alpha * (num_real + w * num_zero)
    for st in stats_per_layer:
        slots = (st.count_E + st.count_Z).detach().clamp_min(1e-12)
        f_E = st.count_E.detach() / slots
        f_Z = st.count_Z.detach() / slots
        n = st.n_tokens.detach().clamp_min(1e-12)
        P_E = st.prob_sum_E / n
        P_Z = st.prob_sum_Z / n
        layer = scale * (f_E * P_E / num_real + f_Z * P_Z / (w * num_zero))
        total = layer if total is None else total + layer
    if total is None:
        return torch.zeros((), dtype=torch.float32)
    return total.float()


def balance_loss_from_logits(
    router_logits: Sequence[Tensor],
    kind: RouterKind,
    num_real: int,
    num_zero: int,
    top_k: int,
    alpha: float,
    w: float,
    mask: Tensor | None = None,
) -> tuple[Tensor, list[GroupStats]]:
    """Convenience: `router_probs` -> `group_balance_stats` -> `group_balance_loss` for one batch.

    Args:
        router_logits: One ``(T, E + Z)`` tensor per MoE layer.
        kind: Router kind (see `router_probs`).
        num_real: ``E``.
        num_zero: ``Z``.
        top_k: ``k``.
        alpha: Loss coefficient.
        w: Zero-group weight.
        mask: ``(T,)`` token weights, or ``None``.

    Returns:
        ``(loss, stats_per_layer)``.
    """
    stats = []
    for logits in router_logits:
        if logits.shape[-1] != num_real + num_zero:
            raise ZedaError(
                f"router logits have {logits.shape[-1]} columns, expected E+Z={num_real + num_zero}"
            )
        stats.append(
            group_balance_stats(
                router_probs(logits.reshape(-1, logits.shape[-1]), kind), num_real, top_k, mask
            )
        )
    return group_balance_loss(stats, num_real, num_zero, top_k, alpha, w), stats
