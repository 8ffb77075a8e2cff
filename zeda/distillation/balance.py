"""The two-group (real vs zero experts) balance loss, from the routers' real selections.

With ``E`` real experts at indices ``[0, E)`` and ``Z`` zero experts at ``[E, E + Z)``, top-k
routing, and ``T`` tokens::

    f_E, f_Z = share of the T*k slots the router really chose that went to each group (no gradient)
    P_E, P_Z = mean over tokens of the summed router probability of each group
    L = alpha * (E + w*Z) * (f_E * P_E / E + f_Z * P_Z / (w*Z))

per MoE layer, summed over layers. Because P_E + P_Z = 1, dL/dP_Z is proportional to
``f_Z / (w*Z) - f_E / E``, so the router settles where ``f_Z / f_E = w*Z / E``, i.e. a zero share
of ``w*Z / (w*Z + E)`` (50 % for Z = E/2 and w = 2). `w_for_target` inverts this.

``f`` counts the indices the router selected (correction bias, group limits and all), so the
share the loss drives is the share the model skips. With ``global_batch`` the counts add up over
the micro-steps of the optimisation step and over data-parallel ranks (Qwen's global-batch
balancing); ``P`` stays per micro-batch and per rank.

With ``per_layer=False`` every layer's ``f`` is the share over *all* MoE layers' slots: each
layer's router gets the same push, which stops when the model-wide share reaches the target, so
the distillation loss decides which layers skip more (at matched FLOPs: every layer's routed
experts cost the same per slot).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from zeda.errors import ZedaError
from zeda.zero.checkpointing import is_recomputing
from zeda.zero.routing import zero_routers
from zeda_routing import router_probs

__all__ = [
    "BalanceTracker",
    "GroupStats",
    "RouterCapture",
    "RouterRecord",
    "all_reduce_sum",
    "equilibrium_zero_share",
    "group_balance_loss",
    "group_balance_stats",
    "real_balance_loss",
    "router_probs",
    "sum_stats",
    "w_for_target",
]


def w_for_target(target_zero_share: float, num_real: int, num_zero: int) -> float:
    """The zero-group weight ``w`` whose equilibrium zero share is ``target_zero_share``.

    Solves ``s = w*Z / (w*Z + E)`` for ``w``: ``w = s * E / (Z * (1 - s))``.

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


@dataclass(frozen=True)
class GroupStats:
    """Per-layer sufficient statistics of the group balance loss (float32 scalars).

    Statistics add up: ``a + b`` (or `sum_stats`) over micro-batches or ranks gives exactly the
    statistics of the concatenated batch.

    Attributes:
        count_E: Selected slots that went to real experts (detached).
        count_Z: Selected slots that went to zero experts (detached).
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
        return GroupStats(*(getattr(self, f.name) + getattr(other, f.name) for f in dataclasses.fields(self)))

    def detach(self) -> GroupStats:
        """A copy with no gradient."""
        return GroupStats(*(getattr(self, f.name).detach() for f in dataclasses.fields(self)))

    def with_counts(self, count_E: Tensor, count_Z: Tensor) -> GroupStats:
        """The same probabilities with other slot counts (e.g. the global batch's)."""
        return dataclasses.replace(self, count_E=count_E, count_Z=count_Z)

    @property
    def zero_share(self) -> Tensor:
        """Fraction of selected slots that went to zero experts, ``f_Z`` (detached scalar)."""
        return (self.count_Z / (self.count_E + self.count_Z).clamp_min(1e-12)).detach()


def group_balance_stats(
    probs: Tensor, num_real: int, indices: Tensor, mask: Tensor | None = None
) -> GroupStats:
    """Group statistics of one MoE layer for one batch.

    Args:
        probs: ``(T, E + Z)`` router probabilities (see `router_probs`), with gradient.
        num_real: ``E``; columns ``[E, E + Z)`` are zero experts.
        indices: ``(T, k)`` experts the router selected; any index ``>= E`` is a zero slot
            (zeda routers report zero slots as the sentinel ``E``).
        mask: ``(T,)`` bool or float token weights (``None`` = all tokens).

    Returns:
        `GroupStats` for this layer.
    """
    if probs.dim() != 2:
        raise ZedaError(f"probs must be (tokens, experts), got shape {tuple(probs.shape)}")
    if not 1 <= num_real < probs.shape[-1]:
        raise ZedaError(
            f"num_real={num_real} must be in [1, {probs.shape[-1]}) for {probs.shape[-1]} columns"
        )
    if indices.dim() != 2 or indices.shape[0] != probs.shape[0]:
        raise ZedaError(f"indices {tuple(indices.shape)} must be (tokens, k) for probs {tuple(probs.shape)}")
    p = probs.float()
    weights = (
        torch.ones(p.shape[0], device=p.device) if mask is None else mask.reshape(-1).float().to(p.device)
    )
    if weights.shape[0] != p.shape[0]:
        raise ZedaError(f"mask has {weights.shape[0]} tokens but probs has {p.shape[0]}")
    with torch.no_grad():
        k = indices.shape[-1]
        zero_slots = (indices.to(p.device) >= num_real).float().sum(-1)
        count_Z = (zero_slots * weights).sum()
        count_E = ((k - zero_slots) * weights).sum()
        n_tokens = weights.sum()
    prob_sum_E = (p[:, :num_real].sum(-1) * weights).sum()
    prob_sum_Z = (p[:, num_real:].sum(-1) * weights).sum()
    return GroupStats(count_E, count_Z, prob_sum_E, prob_sum_Z, n_tokens)


def sum_stats(stats: Iterable[GroupStats]) -> GroupStats:
    """Element-wise sum of one layer's `GroupStats` over micro-batches (or any partition of tokens)."""
    stats = list(stats)
    if not stats:
        raise ZedaError("sum_stats needs at least one GroupStats")
    total = stats[0]
    for st in stats[1:]:
        total = total + st
    return total


def all_reduce_sum(t: Tensor) -> Tensor:
    """Sum a detached tensor over data-parallel ranks (a copy; unchanged without torch.distributed)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        return t.detach().clone()
    # NCCL reduces device tensors only; gloo takes CPU tensors.
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else t.device
    out = t.detach().to(device, copy=True)
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out.to(t.device)


def group_balance_loss(
    stats_per_layer: Sequence[GroupStats], num_real: int, num_zero: int, alpha: float, w: float
) -> Tensor:
    """The two-group balance loss, summed over MoE layers.

    Per layer::

        f_E = count_E / (count_E + count_Z)      f_Z = count_Z / (count_E + count_Z)
        P_E = prob_sum_E / n_tokens              P_Z = prob_sum_Z / n_tokens
        L   = alpha * (E + w*Z) * (f_E * P_E / E + f_Z * P_Z / (w*Z))

    Only ``P`` carries gradient; ``L = alpha`` at the equilibrium when ``f = P``.

    Args:
        stats_per_layer: One `GroupStats` per MoE layer.
        num_real: ``E``.
        num_zero: ``Z`` >= 1.
        alpha: Loss coefficient.
        w: Zero-group weight > 0 (see `w_for_target`).

    Returns:
        Scalar float32 loss (0 for an empty list).
    """
    if num_real < 1 or num_zero < 1:
        raise ZedaError(f"need at least one real and one zero expert, got E={num_real}, Z={num_zero}")
    if not (w > 0 and math.isfinite(w)):
        raise ZedaError(f"balance weight w must be finite and > 0, got {w}")
    total = torch.zeros((), dtype=torch.float32)
    scale = alpha * (num_real + w * num_zero)
    for st in stats_per_layer:
        slots = (st.count_E + st.count_Z).detach().clamp_min(1e-12)
        n = st.n_tokens.detach().clamp_min(1e-12)
        layer = scale * (
            st.count_E.detach() / slots * (st.prob_sum_E / n) / num_real
            + st.count_Z.detach() / slots * (st.prob_sum_Z / n) / (w * num_zero)
        )
        total = total.to(layer.device) + layer.float()
    return total


@dataclass(frozen=True)
class RouterRecord:
    """One router forward seen by `RouterCapture`.

    Attributes:
        router: The zeda router module.
        logits: ``(T, E + Z)`` raw router logits, with gradient.
        indices: ``(T, k)`` selected experts (zero slots as the sentinel ``E``).
    """

    router: nn.Module
    logits: Tensor
    indices: Tensor


class RouterCapture:
    """Keeps the router outputs of the forwards inside the context, for the balance loss.

    Registers its own forward hooks on ``model``'s zeda routers on enter and removes them on
    exit (nothing global). Only forwards that route to zero experts are kept, so teacher-mode
    passes inside the context are ignored, and activation-checkpoint recomputes are never kept
    (each real forward is counted once). With ``teacher=True`` it is the other way round: only
    the teacher-mode forwards are kept (the original's routing, for `real_balance_loss`).

    Args:
        model: An injected model or a student built on one.
        teacher: Keep the forwards that do not route to zero experts instead.
    """

    def __init__(self, model: nn.Module, teacher: bool = False) -> None:
        self.model, self.teacher = model, teacher
        self.records: list[RouterRecord] = []
        self._handles: list[RemovableHandle] = []

    def _hook(self, module: nn.Module, args: tuple, output: tuple) -> None:
        if module.routes_to_zero != self.teacher and not is_recomputing():
            self.records.append(RouterRecord(module, output[0], output[2].detach()))

    def __enter__(self) -> RouterCapture:
        self._handles = [r.register_forward_hook(self._hook) for r in zero_routers(self.model)]
        return self

    def __exit__(self, *exc: object) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _real_load(indices: Tensor, num_real: int, weights: Tensor) -> Tensor:
    """``(E,)`` share of the (weighted) real slots that each real expert took."""
    idx = indices.to(weights.device)
    real = (idx < num_real).float() * weights[:, None]
    load = torch.zeros(num_real, device=weights.device).index_add_(
        0, idx.clamp_max(num_real - 1).reshape(-1), real.reshape(-1)
    )
    return load / load.sum().clamp_min(1e-12)


def real_balance_loss(
    records: Sequence[RouterRecord],
    teacher_records: Sequence[RouterRecord],
    mask: Tensor | None,
    alpha: float,
) -> Tensor:
    """Keep each layer's real-expert loads near the original's on the same tokens.

    Per MoE layer, with ``f_i`` the share of the student's real slots that went to real expert
    ``i``, ``q_i`` the same share in the original's routing of the same tokens (teacher mode; no
    gradient in either) and ``P_i`` the mean over tokens of the router's probability of expert
    ``i`` normalised over the ``E`` real experts::

        L = alpha * E * sum_i max(0, f_i - q_i) * P_i

    summed over layers. Only experts busier than in the original are pushed, each in proportion
    to its excess, so the busiest expert's load stays near the original's; since ``P`` is
    normalised over the real experts, the term moves load among real experts and has no gradient
    on the zero experts' logits (the share of skipped slots is the group balance loss's business).
    The loss is 0 when the student's real loads equal or undercut the original's everywhere.

    Args:
        records: The student forward's `RouterRecord` s (one per MoE layer).
        teacher_records: The teacher forward's, on the same batch (``RouterCapture(teacher=True)``);
            matched to the student's by MoE layer index.
        mask: ``(T,)`` token mask (padding 0) or None.
        alpha: ``balance.real_alpha``.

    Returns:
        Scalar float32 loss, with gradient through the student's router probabilities.
    """
    original = {r.router.zeda_layer_index: r for r in teacher_records}
    total = torch.zeros((), dtype=torch.float32)
    for rec in records:
        ref = original.get(rec.router.zeda_layer_index)
        if ref is None:
            continue
        e = rec.router.num_experts
        logits = rec.logits.reshape(-1, rec.logits.shape[-1])
        probs = router_probs(logits[:, :e], rec.router.zeda_router_kind)  # over the real experts only
        weights = (
            torch.ones(probs.shape[0], device=probs.device)
            if mask is None
            else mask.reshape(-1).float().to(probs.device)
        )
        with torch.no_grad():
            excess = (
                _real_load(rec.indices.reshape(probs.shape[0], -1), e, weights)
                - _real_load(ref.indices.reshape(probs.shape[0], -1), e, weights)
            ).clamp_min(0.0)
        mean_probs = (probs * weights[:, None]).sum(0) / weights.sum().clamp_min(1e-12)
        total = total.to(probs.device) + alpha * e * (excess * mean_probs).sum()
    return total


class BalanceTracker:
    """The balance loss the loop adds to each micro-batch, and the zero share it logs.

    Call `start_step` before the first micro-step of each optimisation step, `loss` once per
    micro-batch and `end_step` after the last. With ``global_batch`` the load fractions ``f`` of micro-step ``m`` use the slot
    counts of micro-steps ``0..m`` of this step summed over ranks, so the last micro-step sees
    the whole global batch; the probabilities ``P`` stay local.

    Args:
        alpha: ``balance.alpha``.
        w: The zero-group weight (``balance.resolve_w(E, Z)``).
        global_batch: ``balance.global_batch``.
        per_layer: ``balance.per_layer``: False forms ``f`` over all layers' slots together.
        target: ``balance.target_zero_share`` (needed when ``share_gain`` > 0).
        share_gain: ``balance.share_gain``: at each `end_step`, ``log w`` moves by
            ``share_gain * (target - the step's zero share over all layers and ranks)``, within
            `W_RANGE` of the starting ``w``.
    """

    W_RANGE = 1e3
    """The controller keeps ``w`` within [w0 / W_RANGE, w0 * W_RANGE] (no wind-up)."""

    def __init__(
        self,
        alpha: float,
        w: float,
        global_batch: bool,
        per_layer: bool = True,
        target: float | None = None,
        share_gain: float = 0.0,
    ) -> None:
        if share_gain and target is None:
            raise ZedaError("balance.share_gain needs balance.target_zero_share")
        self.alpha, self.w, self.global_batch, self.per_layer = alpha, w, global_batch, per_layer
        self.target, self.share_gain, self._w0 = target, share_gain, w
        self._step_counts: Tensor | None = None  # (layers, 2) local [count_E, count_Z] this step
        self._logged = torch.zeros(2, dtype=torch.float64)  # [count_E, count_Z] since pop_share

    def start_step(self) -> None:
        """Begin a new optimisation step (forget the previous step's counts)."""
        self._step_counts = None

    def end_step(self) -> None:
        """After the last micro-step of an optimisation step: with ``share_gain`` > 0 steer ``w``
        by this step's zero share over all layers and ranks (every rank must call it: it
        all-reduces). A checkpoint written after it holds the weight the next step uses."""
        if not self.share_gain or self._step_counts is None:
            return
        total = all_reduce_sum(self._step_counts).sum(0)  # [count_E, count_Z]
        if float(total.sum()) > 0:
            share = float(total[1] / total.sum())
            w = self.w * math.exp(self.share_gain * (self.target - share))
            self.w = min(max(w, self._w0 / self.W_RANGE), self._w0 * self.W_RANGE)

    def loss(self, records: Sequence[RouterRecord], mask: Tensor | None) -> Tensor:
        """Balance loss of one micro-batch.

        Args:
            records: The student forward's `RouterRecord` s, one per MoE layer in layer order.
            mask: ``(T,)`` token mask (padding 0) or None.

        Returns:
            Scalar float32 loss, with gradient through the router probabilities.
        """
        if not records:
            return torch.zeros(())
        stats = []
        for rec in records:
            probs = router_probs(rec.logits.reshape(-1, rec.logits.shape[-1]), rec.router.zeda_router_kind)
            stats.append(
                group_balance_stats(
                    probs, rec.router.num_experts, rec.indices.reshape(probs.shape[0], -1), mask
                )
            )
        counts = torch.stack([torch.stack([s.count_E, s.count_Z]) for s in stats]).detach().cpu().double()
        self._step_counts = counts if self._step_counts is None else self._step_counts + counts
        self._logged += counts.sum(0)
        if self.global_batch or not self.per_layer:
            counts = (all_reduce_sum(self._step_counts) if self.global_batch else counts).float()
            if not self.per_layer:
                counts = counts.sum(0, keepdim=True).expand_as(counts)
            stats = [s.with_counts(*(c.to(s.count_E.device) for c in counts[i])) for i, s in enumerate(stats)]
        router = records[0].router
        return group_balance_loss(stats, router.num_experts, router.num_zero_experts, self.alpha, self.w)

    def pop_share(self) -> float:
        """Share of the selected slots that went to zero experts since the last call, over all ranks.

        Every rank must call it at the same steps (it all-reduces).
        """
        total = all_reduce_sum(self._logged)
        self._logged.zero_()
        slots = float(total.sum())
        return float(total[1]) / slots if slots else float("nan")
