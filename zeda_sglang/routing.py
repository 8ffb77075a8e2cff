"""zeda's zero-aware routing as an SGLang ``custom_routing_function`` (pure torch, no SGLang import).

SGLang's ``TopK`` calls ``custom_routing_function(hidden_states=, gating_output=, topk=,
renormalize=)`` and expects ``(topk_weights (T, k) float32, topk_ids (T, k) int32)``. `ZedaRouting`
returns zeda's routing over ``E`` real + ``Z`` zero experts: zero slots (and forced drops) get
expert id ``-1`` and weight 0, weights normalised over the k chosen slots *including* the zero
slots (renormalise first, then drop), exactly as zeda's transformers routers.

The math itself is the routing core's `zeda_routing.route` (torch only), the one implementation
zeda's transformers routers and the vLLM plugin use too; tests/serving/test_sglang_routing.py pins
this adapter to zeda's routers.

Sigmoid routers (glm4_moe) return weights *without* ``routed_scaling_factor`` where SGLang
applies that factor itself after the experts, and *with* it where SGLang's experts expect it in
the top-k weights (`zeda_sglang.compat.folded_scaling`), as SGLang's own biased grouped top-k.
"""

from __future__ import annotations

import logging
from typing import Any

import torch

from zeda_routing import DROPPED
from zeda_routing.serving import LayerRouting

logger = logging.getLogger(__name__)

__all__ = ["DROPPED", "ZedaRouting"]


class ZedaRouting(LayerRouting):
    """A per-layer SGLang ``custom_routing_function`` over ``E`` real + ``Z`` zero experts.

    Args:
        kernel_skips_dropped: True where the experts kernel skips expert id -1 (SGLang's
            Triton fused MoE on CUDA). Otherwise dropped slots are sent to expert 0 with weight
            0: correct, but computed.
        **kwargs: `zeda_routing.serving.LayerRouting`'s arguments (``routed_scaling_factor``: 1
            where SGLang scales routed outputs itself).
    """

    def __init__(self, *, kernel_skips_dropped: bool = True, **kwargs: Any) -> None:
        try:
            super().__init__(**kwargs)
        except ValueError as err:
            raise ValueError(f"zeda_sglang: {err}") from None
        self.kernel_skips_dropped = kernel_skips_dropped

    def __call__(
        self,
        hidden_states: torch.Tensor,
        gating_output: torch.Tensor,
        topk: int,
        renormalize: bool,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Route ``(T, E + Z)`` gate logits.

        Args:
            hidden_states: ``(T, H)`` MoE input (unused: the logits are given).
            gating_output: ``(T, E + Z)`` router logits.
            topk: k as SGLang passes it (must equal this router's k: no fused shared slots).
            renormalize: SGLang's flag (must equal this router's).

        Returns:
            ``(weights (T, k) float32, ids (T, k) int32)``; dropped slots have weight 0 and id
            -1, or id 0 where ``kernel_skips_dropped`` is False.
        """
        if topk != self.top_k or bool(renormalize) != self.renormalize:
            raise ValueError(
                f"zeda_sglang: TopK asked for top-{topk} (renormalize={renormalize}) but this layer routes "
                f"top-{self.top_k} (renormalize={self.renormalize}); fused shared-expert slots are not supported"
            )
        expected = self.num_experts + self.num_zero_experts
        if gating_output.shape[-1] != expected:
            raise ValueError(
                f"zeda_sglang: router logits have {gating_output.shape[-1]} columns, expected E + Z = {expected}"
            )
        weights, ids = self.route(gating_output)
        if not self.kernel_skips_dropped:
            ids = ids.clamp_min(0)  # weight stays 0: the slot adds nothing
        return weights, ids
