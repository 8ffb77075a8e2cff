"""Zero-aware routing in transformers models: the router mixin over the routing core (`zeda_routing`).

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
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from zeda.families.base import MoESpec
from zeda_routing import RouterParams, SlotPolicy, drop_slots, get_kind, select_slots

__all__ = [
    "PER_EXPERT_TENSORS",
    "SlotPolicy",
    "ZeroRouterMixin",
    "expected_share_bound",
    "router_settings",
    "zero_router_class",
    "zero_routers",
]

# Parameters/buffers that carry one entry per expert and so grow by Z rows at injection.
PER_EXPERT_TENSORS = ("weight", "bias", "e_score_correction_bias")


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
    zeda_native_router_forward: ClassVar[Any] = None
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

    def routing_params(self, *extra: torch.Tensor) -> RouterParams:
        """This router's facts as the routing core reads them.

        ``extra``: the per-expert tensors the family's block passes (named by the class's
        ``zeda_block_buffers``; MiniMax-M2's correction bias lives on its block).
        """
        passed = dict(zip(getattr(self, "zeda_block_buffers", ()), extra, strict=False))
        return RouterParams(
            num_experts=self.num_experts,
            top_k=self.top_k,
            renormalize=bool(getattr(self, "norm_topk_prob", True)),
            zero_logit_bias=self.zero_logit_bias,
            correction_bias=passed.get(
                "e_score_correction_bias", getattr(self, "e_score_correction_bias", None)
            ),
            # DeepSeek-V2's topk_method "greedy" selects without groups whatever n_group says.
            num_expert_group=1
            if getattr(self, "topk_method", None) == "greedy"
            else int(getattr(self, "num_group", None) or 1),
            topk_group=int(getattr(self, "topk_group", None) or 1),
            group_top=int(getattr(self, "group_top", 2)),
            routed_scaling_factor=getattr(self, "routed_scaling_factor", 1.0),
        )

    def gate_logits(self, hidden_states: torch.Tensor) -> torch.Tensor:
        """``(T, E+Z)`` router logits of ``(..., H)`` inputs, in the dtype the family's gate uses."""
        h = hidden_states.reshape(-1, self.weight.shape[-1])
        weight, bias = self.routing_tensor("weight"), self.routing_tensor("bias")
        if get_kind(self.zeda_router_kind).fp32_gate:
            return F.linear(h.float(), weight.float(), None if bias is None else bias.float())
        return F.linear(h, weight, bias)

    @property
    def routes_to_zero(self) -> bool:
        """Whether the zero experts take part in routing right now."""
        return self.zero_experts_enabled and self.num_zero_experts > 0

    def native_forward(self, hidden_states: torch.Tensor, *extra: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The family's own router forward on the first E rows (bit-identical to the original).

        ``extra``: per-expert tensors a family's block passes to its router (MiniMax-M2's correction
        bias), cut to their first E entries too.
        """
        e = self.num_experts
        extra = tuple(t[:e] if isinstance(t, torch.Tensor) and t.shape[0] > e else t for t in extra)
        swapped: list[tuple[dict, str, Any]] = []
        for name in PER_EXPERT_TENSORS:
            store = self._parameters if name in self._parameters else self._buffers
            t = store.get(name)
            if t is not None and t.shape[0] > e:
                swapped.append((store, name, t))
                store[name] = t[:e]
        try:
            native = self.zeda_native_router_forward
            if native is not None:
                return native(self, hidden_states, *extra)
            return super().forward(hidden_states, *extra)
        finally:
            for store, name, t in swapped:
                store[name] = t

    def forward(
        self, hidden_states: torch.Tensor, *extra: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Route tokens over real + zero experts.

        Args:
            hidden_states: ``(..., H)`` router input.
            *extra: What the family's block passes besides (MiniMax-M2: its ``(E + Z,)``
                correction bias).

        Returns:
            ``(router_logits (T, E+Z) or (T, E) in teacher mode, weights (T, k), indices (T, k))``;
            zero slots have index E and weight 0.
        """
        if self.routes_to_zero:
            logits = self.gate_logits(hidden_states)
            weights, indices = select_slots(logits, self.zeda_router_kind, self.routing_params(*extra))
        else:
            logits, weights, indices = self.native_forward(hidden_states, *extra)
        weights, indices = drop_slots(
            weights,
            indices,
            self.num_experts,
            dropped_id=self.num_experts,
            zero_routing=self.routes_to_zero,
            slot_policy=self.slot_policy,
            forced_share=self.forced_zero_share,
        )
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
        if spec.block_buffers:
            attrs["zeda_block_buffers"] = spec.block_buffers
        if spec.native_router_forward is not None:
            attrs["zeda_native_router_forward"] = staticmethod(spec.native_router_forward)
        attrs.update(spec.router_attrs)
        cls = type(f"Zeda{spec.router_class.__name__}", (ZeroRouterMixin, spec.router_class), attrs)
        _ROUTER_CLASSES[spec.model_type] = cls
    return cls


def expected_share_bound(num_real: int, num_zero: int, w: float) -> float:
    """Equilibrium zero share of the group balance loss: ``wZ / (wZ + E)``."""
    return w * num_zero / (w * num_zero + num_real) if num_real + num_zero else math.nan
