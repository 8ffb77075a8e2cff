"""Zero-aware routing: the math shared by every family and the router mixin built on it.

A router with ``E`` real and ``Z`` zero experts scores ``E + Z`` candidates and keeps top-k over
all of them, so every zero expert chosen replaces a real one. The routing weights are
normalised over the k chosen *including* the zero experts, then the zero share is dropped
(real outputs are diluted, as in the ZEDA paper). Zero slots reach the experts module as the
sentinel index ``E`` with weight 0, which every experts backend skips.

Teacher mode (``zero_experts_enabled = False``) runs the family's own router forward on the
first ``E`` rows, so its outputs are bit-identical to the untouched original router.

zeda's router class of a family (``Zeda<Router>``: `ZeroRouterMixin` + the family's router) is
generated from its `MoESpec` by `zero_router_class`.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, ClassVar, Literal

import torch
import torch.nn.functional as F
from torch import nn

from zeda.families.base import MoESpec

# Parameters/buffers that carry one entry per expert and so grow by Z rows at injection.
PER_EXPERT_TENSORS = ("weight", "bias", "e_score_correction_bias")


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


def _route_softmax(router: ZeroRouterMixin, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
    h = h.reshape(-1, router.hidden_dim)
    logits = F.linear(h, router.routing_tensor("weight"))  # (T, E+Z)
    probs = torch.softmax(router.biased_logits(logits.float()), dim=-1)
    top_v, top_i = torch.topk(probs, router.top_k, dim=-1)
    if getattr(router, "norm_topk_prob", True):
        top_v = top_v / top_v.sum(dim=-1, keepdim=True)
    return logits, top_v.to(logits.dtype), top_i


def _route_sigmoid_bias(router: ZeroRouterMixin, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
    e = router.num_experts
    h = h.reshape(-1, router.hidden_dim)
    logits = F.linear(h.float(), router.routing_tensor("weight").float())  # (T, E+Z)
    scores = torch.sigmoid(router.biased_logits(logits))
    choice = scores + router.e_score_correction_bias
    real = choice[:, :e]
    # Group-limited selection applies to the real experts only; zero experts belong to no group
    # and stay eligible for every token.
    groups = real.view(-1, router.num_group, e // router.num_group)
    group_scores = groups.topk(min(2, groups.shape[-1]), dim=-1)[0].sum(dim=-1)
    group_idx = torch.topk(group_scores, k=router.topk_group, dim=-1, sorted=False)[1]
    group_mask = torch.zeros_like(group_scores).scatter_(1, group_idx, 1.0).bool()
    real_mask = group_mask.unsqueeze(-1).expand_as(groups).reshape(-1, e)
    choice = torch.cat([real.masked_fill(~real_mask, float("-inf")), choice[:, e:]], dim=-1)
    top_i = torch.topk(choice, k=router.top_k, dim=-1, sorted=False)[1]
    top_v = scores.gather(1, top_i)
    if router.norm_topk_prob:
        top_v = top_v / (top_v.sum(dim=-1, keepdim=True) + 1e-20)
    return logits, top_v * router.routed_scaling_factor, top_i


def _route_topk_softmax(router: ZeroRouterMixin, h: torch.Tensor) -> tuple[torch.Tensor, ...]:
    h = h.reshape(-1, router.hidden_dim)
    logits = F.linear(h, router.routing_tensor("weight"), router.routing_tensor("bias"))  # (T, E+Z)
    top_v, top_i = torch.topk(router.biased_logits(logits), router.top_k, dim=-1)
    return logits, torch.softmax(top_v, dim=1, dtype=top_v.dtype), top_i


_ROUTE = {"softmax": _route_softmax, "sigmoid_bias": _route_sigmoid_bias, "topk_softmax": _route_topk_softmax}


class ZeroRouterMixin:
    """Mixin placed before a family's router class: routes over ``E`` real + ``Z`` zero experts.

    The instance keeps the family router's attributes (``top_k``, ``num_experts`` = E, ...);
    its per-expert tensors hold ``E + Z`` rows. Router outputs keep the family's contract:
    ``(router_logits (T, E+Z), weights (T, k), indices (T, k))`` where zero slots carry index E
    (the sentinel) and weight 0.

    Attributes:
        num_zero_experts: Z.
        zero_experts_enabled: False in teacher mode: the original router on the first E rows.
        zero_logit_bias: Added to zero-expert logits at inference (the FLOPs knob).
        forced_zero_share: If set, force exactly this share of slots onto zero experts
            (benchmarks, tests).
        slot_policy: If set, a training-free slot-dropping baseline applied after routing.
        real_rows_frozen: If True, no gradient reaches the real experts' rows (``lora.router_rows=zero``):
            training learns only when to skip, the routing among real experts stays the original's.
    """

    zeda_router_kind: ClassVar[str]
    num_zero_experts: int = 0
    zero_experts_enabled: bool = True
    zero_logit_bias: float = 0.0
    forced_zero_share: float | None = None
    slot_policy: SlotPolicy | None = None
    zeda_layer_index: int = -1
    real_rows_frozen: bool = False

    def routing_tensor(self, name: str) -> torch.Tensor | None:
        """The router's ``weight`` ``(E+Z, H)`` or ``bias`` ``(E+Z,)`` as routing reads it: with
        `real_rows_frozen`, the first E rows are detached (same values, no gradient)."""
        t = getattr(self, name, None)
        if t is None or not self.real_rows_frozen or not t.requires_grad:
            return t
        e = self.num_experts
        return torch.cat([t[:e].detach(), t[e:]])

    def biased_logits(self, logits: torch.Tensor) -> torch.Tensor:
        """Add ``zero_logit_bias`` to the zero-expert columns of ``(T, E+Z)`` logits."""
        if self.zero_logit_bias == 0.0:
            return logits
        bias = torch.zeros(logits.shape[-1], dtype=logits.dtype, device=logits.device)
        bias[self.num_experts :] = self.zero_logit_bias
        return logits + bias

    @property
    def routes_to_zero(self) -> bool:
        """Whether the zero experts take part in routing right now."""
        return self.zero_experts_enabled and self.num_zero_experts > 0

    def native_forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The family's own router forward on the first E rows (bit-identical to the original)."""
        e = self.num_experts
        swapped: list[tuple[dict, str, Any]] = []
        for name in PER_EXPERT_TENSORS:
            store = self._parameters if name in self._parameters else self._buffers
            t = store.get(name)
            if t is not None and t.shape[0] > e:
                swapped.append((store, name, t))
                store[name] = t[:e]
        try:
            return super().forward(hidden_states)
        finally:
            for store, name, t in swapped:
                store[name] = t

    def forward(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Route tokens over real + zero experts.

        Args:
            hidden_states: ``(..., H)`` router input.

        Returns:
            ``(router_logits (T, E+Z) or (T, E) in teacher mode, weights (T, k), indices (T, k))``;
            zero slots have index E and weight 0.
        """
        if self.routes_to_zero:
            logits, weights, indices = _ROUTE[self.zeda_router_kind](self, hidden_states)
        else:
            logits, weights, indices = self.native_forward(hidden_states)
        e = self.num_experts
        drop = indices >= e if self.routes_to_zero else None
        if self.slot_policy is not None:
            keep = self.slot_policy.keep_mask(weights.masked_fill(drop, 0) if drop is not None else weights)
            if self.slot_policy.renormalize:
                kept = weights.masked_fill(~keep, 0)
                scale = weights.sum(-1, keepdim=True) / kept.sum(-1, keepdim=True).clamp_min(1e-20)
                weights = kept * scale.to(weights.dtype)
            drop = ~keep if drop is None else (drop | ~keep)
        if self.forced_zero_share is not None:
            forced = forced_zero_mask(weights, self.forced_zero_share)
            drop = forced if drop is None else (drop | forced)
        if drop is not None:
            indices = indices.masked_fill(drop, e)
            weights = weights.masked_fill(drop, 0)
        return logits, weights, indices


def zero_routers(model: nn.Module) -> Iterator[ZeroRouterMixin]:
    """Every zeda router in ``model`` (PEFT's saved copies of a router included)."""
    for m in model.modules():
        if isinstance(m, ZeroRouterMixin):
            yield m


@contextlib.contextmanager
def router_settings(model: nn.Module, **settings: Any) -> Iterator[None]:
    """Temporarily set router attributes (e.g. ``forced_zero_share=0.5``) on every zeda router."""
    routers = list(zero_routers(model))
    saved = [{k: r.__dict__.get(k, _MISSING) for k in settings} for r in routers]
    try:
        for r in routers:
            for k, v in settings.items():
                setattr(r, k, v)
        yield
    finally:
        for r, old in zip(routers, saved, strict=True):
            for k, v in old.items():
                if v is _MISSING:
                    r.__dict__.pop(k, None)
                else:
                    setattr(r, k, v)


_MISSING = object()

# model_type -> the generated router class: one class per family, so isinstance checks agree.
_ROUTER_CLASSES: dict[str, type] = {}


def zero_router_class(spec: MoESpec) -> type:
    """zeda's router class of a family: `ZeroRouterMixin` placed before ``spec.router_class``.

    Generated once per family from the spec's facts (routing math, forced renormalisation).
    """
    cls = _ROUTER_CLASSES.get(spec.model_type)
    if cls is None:
        attrs: dict[str, Any] = {
            "zeda_router_kind": spec.router_kind,
            "__module__": __name__,
            "__doc__": f"{spec.router_class.__name__} routing over real + zero experts (generated by zeda).",
        }
        if spec.norm_topk_prob is not None:
            attrs["norm_topk_prob"] = spec.norm_topk_prob
        cls = type(f"Zeda{spec.router_class.__name__}", (ZeroRouterMixin, spec.router_class), attrs)
        _ROUTER_CLASSES[spec.model_type] = cls
    return cls


def expected_share_bound(num_real: int, num_zero: int, w: float) -> float:
    """Equilibrium zero share of the group balance loss: ``wZ / (wZ + E)``."""
    return w * num_zero / (w * num_zero + num_real) if num_real + num_zero else math.nan
