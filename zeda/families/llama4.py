"""Llama 4 (Scout, Maverick; ``llama4_text``): top-1 on the router logits, the sigmoid of the chosen
logit scales the expert's *input*, plus a shared expert in every MoE layer; Maverick interleaves
dense and MoE layers.

The stock MoE block takes dense ``(T, E)`` scores and runs every expert on every token
(``Llama4TextExperts`` is a batched matmul over all experts, not an ``@use_experts_implementation``
module). An injected model swaps the block's class for one running `moe_block_forward`, which
consumes zeda's ``(logits, weights, indices)`` router contract: in teacher mode (and with the
``eager`` backend) it runs the stock dense algorithm on the same scores, so the original is
reproduced bit for bit; with zero experts routing it hands the kept slots to the configured experts
backend (``zeda`` skips zero slots). Published checkpoints are multimodal (``llama4``);
transformers builds the text causal LM from their ``text_config``.
"""

from __future__ import annotations

import torch
from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS
from transformers.models.llama4 import modeling_llama4 as m
from transformers.models.llama4.configuration_llama4 import Llama4TextConfig

from zeda.families.base import MoESpec, register


def dense_experts(
    experts: torch.nn.Module, x: torch.Tensor, indices: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """The stock algorithm: every expert on every token, inputs scaled by the dense scores.

    Args:
        experts: The block's experts module.
        x: ``(T, H)`` tokens.
        indices: ``(T, k)`` expert ids; the sentinel ``E`` (a zero or dropped slot) scores 0.
        weights: ``(T, k)`` routing weights.

    Returns:
        ``(T, H)`` routed output, summed over the experts as the stock block sums it.
    """
    e = experts.num_experts
    scores = torch.zeros(x.shape[0], e + 1, dtype=weights.dtype, device=x.device)
    scores = scores.scatter(1, indices, weights)[:, :e]
    routed_in = x.repeat(e, 1) * scores.transpose(0, 1).reshape(-1, 1)
    routed_out = m.Llama4TextExperts.forward(experts, routed_in)
    return routed_out.reshape(e, -1, routed_out.shape[-1]).sum(dim=0)


def experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    dense: bool = False,
) -> torch.Tensor:
    """Llama 4's routed experts on the ``(hidden, indices, weights)`` contract of every other family.

    ``eager`` (or ``dense=True``): `dense_experts`. Any other backend (``zeda`` skips zero slots):
    Llama 4 scales each expert's input, not its output, so every slot becomes one row ``x · w``
    with weight 1.

    Returns:
        ``(T, H)``.
    """
    backend = self.config._experts_implementation
    if dense or backend == "eager":
        return dense_experts(self, hidden_states, top_k_index, top_k_weights)
    t, k = top_k_index.shape
    rows = (hidden_states.unsqueeze(1) * top_k_weights.unsqueeze(-1).to(hidden_states.dtype)).reshape(
        t * k, -1
    )
    ones = torch.ones(t * k, 1, dtype=hidden_states.dtype, device=hidden_states.device)
    out = ALL_EXPERTS_FUNCTIONS[backend](self, rows, top_k_index.reshape(t * k, 1), ones)
    return out.reshape(t, k, -1).sum(dim=1) if k > 1 else out


# As on ``@use_experts_implementation`` modules, ``__wrapped__`` is the family's stock (eager) algorithm.
experts_forward.__wrapped__ = dense_experts  # type: ignore[attr-defined]


def moe_block_forward(
    self: torch.nn.Module, hidden_states: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """``Llama4TextMoe.forward`` on zeda's router contract.

    In teacher mode the stock dense algorithm runs whatever the backend, so the original model is
    reproduced bit for bit.

    Args:
        hidden_states: ``(..., H)``.

    Returns:
        ``(out (T, H), router_logits (T, E[+Z]))`` as the stock block returns them.
    """
    x = hidden_states.reshape(-1, self.hidden_dim)
    logits, weights, indices = self.router(x)
    # Through the module call (PEFT's LoRA wrappers of the fused weights act there).
    routed = self.experts(x, indices, weights, dense=not self.router.routes_to_zero)
    out = self.shared_expert(x)
    out.add_(routed)
    return out, logits


def _apply_gate(self: torch.nn.Module, gate_up: torch.Tensor) -> torch.Tensor:
    """``Llama4TextExperts``' gating on ``(S, 2I)``: gate first, then up."""
    gate, up = gate_up.chunk(2, dim=-1)
    return up * self.act_fn(gate)


def native_router_forward(router: torch.nn.Module, hidden_states: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The stock router's forward turned into ``(logits, weights (T, k), indices (T, k))``: its
    dense scores hold the sigmoid of the chosen logits at the chosen experts."""
    scores, logits = m.Llama4Router.forward(router, hidden_states)
    indices = torch.topk(logits, router.top_k, dim=1)[1]
    return logits, scores.gather(1, indices), indices


SPEC = register(
    MoESpec(
        model_type="llama4_text",
        aliases=("llama4",),
        router_kind="topk_sigmoid",
        config_class=Llama4TextConfig,
        causal_lm_class=m.Llama4ForCausalLM,
        router_class=m.Llama4Router,
        experts_class=m.Llama4TextExperts,
        num_experts_key="num_local_experts",
        expert_intermediate_key="intermediate_size",
        dense_intermediate=lambda c: c.intermediate_size_mlp,
        shared_expert_intermediate=lambda c: c.intermediate_size,
        moe_block_attr="feed_forward",
        router_attr="router",
        shared_expert_attrs=("shared_expert",),
        # No stock eager loop reads the sentinel: zeda's block runs the dense stock algorithm instead.
        eager_skips_sentinel=True,
        norm_topk_prob=False,
        block_forward=moe_block_forward,
        experts_attrs={
            "has_gate": True,
            "has_bias": False,
            "is_transposed": True,  # gate_up_proj (E, H, 2I), down_proj (E, I, H)
            "is_concatenated": True,
            "has_post_expert_norm": False,
            "_apply_gate": _apply_gate,
            "forward": experts_forward,
        },
        native_router_forward=native_router_forward,
    )
)
