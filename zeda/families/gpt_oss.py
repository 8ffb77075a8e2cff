"""gpt-oss: biased router, top-k on logits then softmax over the k; transposed fused experts with biases."""

from transformers.models.gpt_oss import modeling_gpt_oss as m
from transformers.models.gpt_oss.configuration_gpt_oss import GptOssConfig

from zeda.families.base import MoESpec, register

SPEC = register(
    MoESpec(
        model_type="gpt_oss",
        router_kind="topk_softmax",
        config_class=GptOssConfig,
        causal_lm_class=m.GptOssForCausalLM,
        router_class=m.GptOssTopKRouter,
        experts_class=m.GptOssExperts,
        num_experts_key="num_local_experts",
        expert_intermediate_key="intermediate_size",
        router_attr="router",
        expert_bias=True,
        router_bias=True,
        # The stock gpt-oss eager loop one-hots with E classes, so the sentinel E would crash it.
        eager_skips_sentinel=False,
        attention_sinks=True,
    )
)
