"""zeda's zero-aware routing as an SGLang ``custom_routing_function`` (pure torch, no SGLang import).

SGLang's ``TopK`` calls ``custom_routing_function(hidden_states=, gating_output=, topk=,
renormalize=)`` and expects ``(topk_weights (T, k) float32, topk_ids (T, k) int32)``. `ZedaRouting`
returns zeda's routing over ``E`` real + ``Z`` zero experts: zero slots (and forced drops) get
expert id ``-1`` and weight 0, weights normalised over the k chosen slots *including* the zero
slots (renormalise first, then drop), exactly as zeda's transformers routers.

The math itself is ``zeda_vllm.routing.zero_aware_route`` (pure torch; it imports neither vLLM
nor zeda), so the vLLM plugin and the SGLang models route with one implementation, which
tests/serving/test_routing_math.py and test_sglang_routing.py pin to zeda's routers.

Sigmoid routers (glm4_moe) return weights *without* ``routed_scaling_factor``: SGLang applies
that factor itself after the experts (or folds it into the weights when its kernel asks), as it
does for its own biased grouped top-k.
"""

from __future__ import annotations

import logging
from typing import Literal

import torch
from torch import nn

from zeda_vllm.routing import DROPPED, layer_zero_logit_bias, zero_aware_route

logger = logging.getLogger(__name__)

__all__ = ["DROPPED", "ZedaRouting", "layer_zero_logit_bias"]


class ZedaRouting:
    """A per-layer SGLang ``custom_routing_function`` over ``E`` real + ``Z`` zero experts.

    Args:
        kind: ``"softmax"`` (qwen3_moe, mixtral) or ``"sigmoid_bias"`` (glm4_moe).
        num_experts: E, the real experts (the fused-MoE layer's expert count).
        num_zero_experts: Z.
        top_k: k, slots per token.
        renormalize: Normalise the k chosen weights (zero slots included).
        zero_logit_bias: Added to this layer's zero-expert logits.
        forced_share: If set, route as the original model (zero experts out of selection) and
            drop exactly ``floor(share·T·k)`` of the lowest-weight slots, as zeda's
            ``teacher_mode`` + ``forced_zero_share``.
        gate: Module holding the ``(E + Z,)`` ``e_score_correction_bias`` of sigmoid routers,
            read at call time (the checkpoint is loaded into it after construction).
        num_expert_group: Groups of real experts (sigmoid routers).
        topk_group: Groups kept per token (sigmoid routers).
        kernel_skips_dropped: True where the experts kernel skips expert id -1 (SGLang's
            Triton fused MoE on CUDA). Otherwise dropped slots are sent to expert 0 with weight
            0: correct, but computed.
    """

    def __init__(
        self,
        *,
        kind: Literal["softmax", "sigmoid_bias"],
        num_experts: int,
        num_zero_experts: int,
        top_k: int,
        renormalize: bool,
        zero_logit_bias: float = 0.0,
        forced_share: float | None = None,
        gate: nn.Module | None = None,
        num_expert_group: int = 1,
        topk_group: int = 1,
        kernel_skips_dropped: bool = True,
    ) -> None:
        if kind == "sigmoid_bias" and getattr(gate, "e_score_correction_bias", None) is None:
            raise ValueError("zeda_sglang: sigmoid routers need a gate with e_score_correction_bias")
        self.kind = kind
        self.num_experts = num_experts
        self.num_zero_experts = num_zero_experts
        self.top_k = top_k
        self.renormalize = renormalize
        self.zero_logit_bias = zero_logit_bias
        self.forced_share = forced_share
        self.gate = gate
        self.num_expert_group = num_expert_group
        self.topk_group = topk_group
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
        weights, ids = zero_aware_route(
            gating_output,
            kind=self.kind,
            num_experts=self.num_experts,
            top_k=self.top_k,
            renormalize=self.renormalize,
            zero_experts_enabled=self.forced_share is None,
            zero_logit_bias=self.zero_logit_bias,
            forced_zero_share=self.forced_share,
            e_score_correction_bias=getattr(self.gate, "e_score_correction_bias", None),
            num_expert_group=self.num_expert_group,
            topk_group=self.topk_group,
            routed_scaling_factor=1.0,  # SGLang scales routed outputs itself
        )
        if not self.kernel_skips_dropped:
            ids = ids.clamp_min(0)  # weight stays 0: the slot adds nothing
        return weights, ids
