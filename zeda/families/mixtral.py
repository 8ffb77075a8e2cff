"""Mixtral: softmax router (always renormalised over the top-k), every layer MoE."""

from transformers.models.mixtral import modeling_mixtral as m
from transformers.models.mixtral.configuration_mixtral import MixtralConfig

from zeda.families.base import MoESpec, register
from zeda.zero.routing import ZeroRouterMixin


class ZedaMixtralTopKRouter(ZeroRouterMixin, m.MixtralTopKRouter):
    """Mixtral router routing over real + zero experts."""

    zeda_router_kind = "softmax"
    # Mixtral always renormalises the chosen weights; the original router has no flag for it.
    norm_topk_prob = True


SPEC = register(
    MoESpec(
        model_type="mixtral",
        router_kind="softmax",
        config_class=MixtralConfig,
        causal_lm_class=m.MixtralForCausalLM,
        router_class=m.MixtralTopKRouter,
        zero_router_class=ZedaMixtralTopKRouter,
        experts_class=m.MixtralExperts,
        num_experts_key="num_local_experts",
        expert_intermediate_key="intermediate_size",
        moe_layer_indices=lambda c: list(range(c.num_hidden_layers)),
        attention_biases=lambda c: (False, False),
    )
)
