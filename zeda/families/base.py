"""The per-family MoE description (`MoESpec`) and the registry keyed by `model_type`.

Each supported family has one small module in this package that builds a frozen `MoESpec`
and calls `register`. Everything family-specific lives there: where the MoE block, router and
experts sit, which router math applies, which config keys hold the expert counts, and the
family's zero-aware router subclass. The rest of zeda only reads specs.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import nn

from zeda.errors import ZedaError
from zeda_routing import MOE_LAYERS, get_kind

RouterKind = str
"""A router kind of the routing core (a key of `zeda_routing.KINDS`), e.g.:

- ``softmax``: softmax over all experts, top-k, optional renormalisation (Qwen, OLMoE, Mixtral).
- ``sigmoid_bias``: sigmoid scores, selection on score + correction bias, optional group-limited
  selection, weights from the unbiased scores normalised over the k, times a scaling factor
  (DeepSeek-V3, GLM-4.x, MiniMax-M2).
- ``topk_softmax``: top-k on the raw (biased) logits, then softmax over the k chosen (gpt-oss).
- ``softmax_group``: softmax over all experts, optional group-limited selection (groups ranked by
  their best expert), the chosen probabilities times a scaling factor (DeepSeek-V2: no
  renormalisation).
- ``topk_sigmoid``: top-k on the raw logits, then the sigmoid of each chosen logit (Llama 4).
"""

AttentionKind = Literal["gqa", "mla", "hybrid_linear"]

QkNorm = Literal["none", "per_head", "full"]
"""Where a GQA family normalises queries and keys: not at all, per head (``head_dim`` weights,
Qwen3/GLM), or over the full projection (``heads * head_dim`` weights, OLMoE)."""


def _zero(_config: Any) -> int:
    return 0


def _attention_bias_from_config(config: Any) -> tuple[bool, bool]:
    bias = bool(getattr(config, "attention_bias", False))
    return bias, bias


def _no_qk_norm(_config: Any) -> QkNorm:
    return "none"


@dataclass(frozen=True)
class MoESpec:
    """Everything zeda needs to know about one model family.

    Attributes:
        model_type: The transformers ``model_type`` of the family (e.g. ``"qwen3_moe"``).
        router_kind: Which routing math the family uses (see `RouterKind`).
        config_class: The family's transformers config class.
        causal_lm_class: The family's ``...ForCausalLM`` class.
        router_class: The family's router module class (instances are found by isinstance).
        experts_class: The family's fused experts module class.
        moe_block_attr: Attribute of a decoder layer that holds the MoE block (``"mlp"``).
        router_attr: Attribute of the MoE block holding the router (``"gate"`` or ``"router"``).
        experts_attr: Attribute of the MoE block holding the fused experts.
        shared_expert_attrs: Attributes of the MoE block that hold always-on shared experts.
        num_experts_key: Config key with the number of routed experts per MoE layer.
        top_k_key: Config key with the number of experts chosen per token.
        expert_intermediate_key: Config key with one routed expert's FFN width.
        dense_intermediate: ``config -> int``: FFN width of the dense (non-MoE) layers.
        shared_expert_intermediate: ``config -> int``: total FFN width of the shared experts
            (0 when the family has none).
        shared_expert_gated: Whether the shared expert output is scaled by a sigmoid gate
            (a ``hidden -> 1`` linear, as in Qwen2-MoE).
        attention: ``"gqa"`` (q/k/v/o projections) or ``"mla"`` (multi-head latent attention).
        expert_bias: Whether the fused expert projections carry biases (gpt-oss).
        router_bias: Whether the router linear has a bias (gpt-oss).
        eager_skips_sentinel: Whether the family's stock eager experts loop skips the sentinel
            index ``E`` (gpt-oss's loop does not, so zeda routes it to its own backend).
        attention_biases: ``config -> (qkv_bias, o_bias)``: whether the GQA q/k/v projections and
            the output projection carry biases (default: both follow ``config.attention_bias``).
            Used by `zeda.flops`; MLA's bias layout is fixed by the MLA attention itself.
        qk_norm: ``config -> QkNorm``: the GQA query/key norm layout (used by `zeda.flops`).
        attention_sinks: Whether attention has one learned sink logit per head (gpt-oss).
        aliases: Other ``model_type`` names that resolve to this family: the composite
            (multimodal) configs whose ``text_config`` builds this family's causal LM
            (``llama4`` -> ``llama4_text``).
        block_buffers: Per-expert buffers that the MoE block (not the router) holds and passes to
            the router (MiniMax-M2's ``e_score_correction_bias``): grown by Z entries at injection.
        block_forward: The MoE block's forward for an injected model, for families whose stock
            block cannot consume the ``(logits, weights, indices)`` router contract (Llama 4's
            block takes dense per-expert scores); None keeps the stock block.
        experts_attrs: Class attributes for an experts module that transformers'
            ``@use_experts_implementation`` does not decorate (Llama 4): the layout flags
            (``has_gate``, ``is_transposed``, ...) and ``_apply_gate``, so zeda's and
            transformers' experts backends can run it.
        router_attrs: Class attributes of zeda's router of the family that the stock router lacks
            and routing reads (MiniMax-M2: ``num_group``, ``routed_scaling_factor``, ...).
        native_router_forward: ``(router, hidden_states) -> (logits, weights (T, k), indices (T, k))``
            for a stock router with another output contract (Llama 4 returns dense scores); None
            calls the stock forward, which already returns that triple.
        norm_topk_prob: Whether the router always renormalises the chosen weights over the k
            (Mixtral, whose router has no flag for it); ``None`` reads the router's own
            ``norm_topk_prob`` attribute.
        lora_target_parameters: Names (relative to the MoE block's experts module) of the fused
            3-D expert parameters that PEFT's ``target_parameters`` should wrap.
    """

    model_type: str
    router_kind: RouterKind
    config_class: type
    causal_lm_class: type
    router_class: type[nn.Module]
    experts_class: type[nn.Module]
    num_experts_key: str
    expert_intermediate_key: str
    dense_intermediate: Callable[[Any], int] = _zero
    shared_expert_intermediate: Callable[[Any], int] = _zero
    shared_expert_gated: bool = False
    moe_block_attr: str = "mlp"
    router_attr: str = "gate"
    experts_attr: str = "experts"
    shared_expert_attrs: tuple[str, ...] = ()
    top_k_key: str = "num_experts_per_tok"
    attention: AttentionKind = "gqa"
    expert_bias: bool = False
    router_bias: bool = False
    eager_skips_sentinel: bool = True
    lora_target_parameters: tuple[str, ...] = ("gate_up_proj", "down_proj")
    attention_biases: Callable[[Any], tuple[bool, bool]] = _attention_bias_from_config
    qk_norm: Callable[[Any], QkNorm] = _no_qk_norm
    attention_sinks: bool = False
    norm_topk_prob: bool | None = None
    aliases: tuple[str, ...] = ()
    block_buffers: tuple[str, ...] = ()
    block_forward: Callable[..., Any] | None = None
    experts_attrs: dict[str, Any] | None = None
    router_attrs: dict[str, Any] = field(default_factory=dict)
    native_router_forward: Callable[..., Any] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def num_experts(self, config: Any) -> int:
        """Routed experts per MoE layer, read from ``config``."""
        return int(getattr(config, self.num_experts_key))

    def top_k(self, config: Any) -> int:
        """Experts chosen per token, read from ``config``."""
        return int(getattr(config, self.top_k_key))

    def moe_layer_indices(self, config: Any) -> list[int]:
        """Decoder layers of ``config`` that hold an MoE block (the family's rule in
        `zeda_routing.MOE_LAYERS`, which the serving adapters read too)."""
        return MOE_LAYERS[self.model_type](config)

    def expert_intermediate(self, config: Any) -> int:
        """FFN width of one routed expert, read from ``config``."""
        return int(getattr(config, self.expert_intermediate_key))


_REGISTRY: dict[str, MoESpec] = {}
_ALIASES: dict[str, str] = {}


def register(spec: MoESpec) -> MoESpec:
    """Add a family to the registry (keyed by ``spec.model_type``, also reachable by its aliases).

    Raises:
        ValueError: if the routing core lacks the family's router kind or MoE-layer rule.
    """
    get_kind(spec.router_kind)
    if spec.model_type not in MOE_LAYERS:
        raise ValueError(f"add the MoE-layer rule of {spec.model_type!r} to zeda_routing.MOE_LAYERS")
    _REGISTRY[spec.model_type] = spec
    for alias in spec.aliases:
        _ALIASES[alias] = spec.model_type
    return spec


def supported_model_types() -> list[str]:
    """Sorted ``model_type`` names of every registered family."""
    return sorted(_REGISTRY)


def get_spec(model_type: str) -> MoESpec:
    """The spec of a family, accepting zeda's own ``zeda_<family>`` model types too.

    Raises:
        ZedaError: if the family is not supported.
    """
    base = model_type.removeprefix("zeda_")
    base = _ALIASES.get(base, base)
    if base not in _REGISTRY:
        raise ZedaError(
            f"unsupported model family {model_type!r}; zeda supports: {', '.join(supported_model_types())}"
        )
    return _REGISTRY[base]


def spec_for_model(model: nn.Module) -> MoESpec:
    """The spec of a loaded model, from ``model.config.model_type``.

    Raises:
        ZedaError: if the model has no config or an unsupported family.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None:
        raise ZedaError(
            f"{type(model).__name__} has no config.model_type; pass a transformers MoE model "
            f"(supported: {', '.join(supported_model_types())})"
        )
    return get_spec(model_type)


def all_specs() -> list[MoESpec]:
    """Every registered spec, sorted by model type."""
    return [_REGISTRY[k] for k in supported_model_types()]
