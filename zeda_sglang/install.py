"""Convert the MoE blocks of a freshly built SGLang model to route over ``E`` real + ``Z`` zero experts.

Written against SGLang 0.5.23 (``sglang.srt.layers.moe.topk.TopK``, ``FusedMoE``,
``ReplicatedLinear``); it edits the model instance only, no SGLang class is modified. Per MoE block
(a module with ``gate``, ``topk`` (a ``TopK``) and ``experts`` (a ``FusedMoE``)):

1. The gate gets ``E + Z`` rows (and sigmoid routers an ``E + Z`` ``e_score_correction_bias``),
   so the export's grown router loads under its usual names.
2. ``topk`` is replaced by a ``TopK`` whose ``custom_routing_function`` is `ZedaRouting`: zeda's
   math over ``E + Z``, zero slots returned as expert id ``-1`` with weight 0. Its output format
   is forced to the standard one (top-k weights and ids), and MoE runner backends that run their
   own top-k on the raw logits are refused (`zeda_sglang.compat`).
3. The experts are untouched: E experts, loaded by SGLang's own loader. SGLang's Triton fused
   MoE on CUDA skips blocks whose expert id is ``-1`` (``fused_moe_kernel``: "Padding and
   nonlocal routes both use -1, including without EP"), so zero slots do no expert work there.
   Other runner backends (and SGLang's CPU paths, whose native MoE indexes with the id) get the
   dropped slots on expert 0 with weight 0 instead: correct, but computed; a warning says so.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from sglang.srt.layers.linear import ReplicatedLinear
from sglang.srt.layers.moe import get_moe_a2a_backend, get_moe_runner_backend
from sglang.srt.layers.moe.topk import TopK
from sglang.srt.runtime_context import get_exec
from sglang.srt.utils import is_cuda
from torch import nn

from zeda_routing.serving import ServedZeda, read_forced_share

from .compat import check_runner_backend, folded_scaling, shared_topk_slots, supports_kwarg
from .routing import ZedaRouting

try:  # absent from some SGLang releases: then TopK has one output format only
    from sglang.srt.layers.moe.topk import TopKOutputFormat
except ImportError:  # pragma: no cover - depends on the SGLang release
    TopKOutputFormat = None

logger = logging.getLogger(__name__)

FORCED_SHARE_ENV = "ZEDA_SGLANG_FORCED_ZERO_SHARE"
"""Environment variable forcing a zero share (benchmarks, tests); see `forced_zero_share`."""


def forced_zero_share(config: Any) -> float | None:
    """The forced zero share requested for this server, if any.

    ``--json-model-override-args '{"zeda_forced_zero_share": s}'`` or the environment variable
    ``ZEDA_SGLANG_FORCED_ZERO_SHARE=s`` (the override wins). The zero experts then take no part
    in selection (the original router) and exactly ``floor(s·T·k)`` of the lowest-weight slots
    of each forward are dropped without renormalising; ``s = 0`` is the original model.

    Raises:
        ValueError: for a share outside [0, 1].
    """
    return read_forced_share(config, FORCED_SHARE_ENV)


def _moe_blocks(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """``(layer id, block)`` of every MoE block, sorted by layer."""
    found = [
        (int(m.topk.layer_id), m)
        for m in model.modules()
        if isinstance(getattr(m, "topk", None), TopK) and hasattr(m, "gate") and hasattr(m, "experts")
    ]
    return sorted(found, key=lambda item: item[0])


def _kernel_skips_dropped(experts: nn.Module) -> bool:
    backend = getattr(experts, "runner_backend", None)
    return bool(is_cuda() and backend is not None and backend.is_triton())


def _grow_gate(block: nn.Module, e: int, z: int) -> nn.Module:
    """Give ``block.gate`` ``E + Z`` rows; returns the new gate."""
    old = block.gate
    if isinstance(old, ReplicatedLinear):
        gate = ReplicatedLinear(
            old.input_size,
            e + z,
            bias=getattr(old, "bias", None) is not None,
            params_dtype=old.params_dtype,
            quant_config=None,
        )
        block.gate = gate
        return gate
    # GLM's Glm4MoeGate: plain fp32 parameters read by the default weight loader.
    weight = getattr(old, "weight", None)
    bias = getattr(old, "e_score_correction_bias", None)
    if not isinstance(weight, torch.Tensor) or weight.shape[0] != e:
        raise ValueError(f"zeda_sglang: unsupported MoE gate {type(old).__name__}")
    old.weight = nn.Parameter(
        torch.empty(e + z, weight.shape[1], dtype=weight.dtype, device=weight.device), requires_grad=False
    )
    if isinstance(bias, torch.Tensor):
        old.e_score_correction_bias = nn.Parameter(
            torch.empty(e + z, dtype=bias.dtype, device=bias.device), requires_grad=False
        )
    return old


def install_zero_experts(model: nn.Module, config: Any) -> int:
    """Convert every MoE block of a freshly built SGLang model (before weight loading).

    Args:
        model: An SGLang ``...ForCausalLM`` of a supported family.
        config: Its hf config; ``config.zeda`` describes the zero experts. A per-layer
            ``zero_logit_bias`` list maps onto the family's MoE layers (`zeda_routing.MOE_LAYERS`;
            pipeline stages included) and must have one entry each.

    Returns:
        The number of MoE blocks converted.

    Raises:
        ValueError: without zero experts in the config, with a per-layer zero-logit bias of the
            wrong length, with a quantized checkpoint, with
            expert-parallel load balancing, an all-to-all MoE backend or an MoE runner backend
            that routes inside its kernel, or with shared experts fused into the routed top-k.
    """
    served = ServedZeda.read(config, "zeda_sglang", FORCED_SHARE_ENV)
    z, forced = served.num_zero_experts, served.forced_share
    if getattr(model, "quant_config", None) is not None:
        raise ValueError("zeda_sglang: quantized checkpoints are not supported")
    moe_args = get_exec().moe
    if getattr(moe_args, "enable_eplb", False) or getattr(moe_args, "ep_dispatch_algorithm", None):
        raise ValueError(
            "zeda_sglang: expert-parallel load balancing (EPLB) is not supported with zero experts"
        )
    if int(getattr(moe_args, "ep_num_redundant_experts", 0) or 0):
        raise ValueError("zeda_sglang: redundant experts (--ep-num-redundant-experts) are not supported")
    if not get_moe_a2a_backend().is_none():
        raise ValueError(
            "zeda_sglang: all-to-all MoE backends (--moe-a2a-backend) route inside their kernels; use 'none'"
        )
    check_runner_backend(get_moe_runner_backend())
    standard = {}
    if TopKOutputFormat is not None and supports_kwarg(TopK.__init__, "output_format"):
        standard["output_format"] = TopKOutputFormat.STANDARD
    blocks = _moe_blocks(model)
    computed = 0
    for layer, block in blocks:
        check_runner_backend(getattr(block.experts, "runner_backend", None))
        old_cfg = block.topk.topk_config
        if shared_topk_slots(old_cfg):
            raise ValueError(
                "zeda_sglang: shared experts fused into the routed top-k are not supported; "
                "launch with --disable-shared-experts-fusion"
            )
        e = int(block.experts.num_experts)
        gate = _grow_gate(block, e, z)
        kind = "sigmoid_bias" if old_cfg.correction_bias is not None else "softmax"
        skips = _kernel_skips_dropped(block.experts)
        computed += not skips
        routing = ZedaRouting(
            kind=kind,
            num_experts=e,
            num_zero_experts=z,
            top_k=int(old_cfg.top_k),
            renormalize=bool(old_cfg.renormalize),
            zero_logit_bias=served.layer_bias[layer],
            forced_share=forced,
            gate=gate if kind == "sigmoid_bias" else None,
            num_expert_group=int(old_cfg.num_expert_group or 1) if old_cfg.use_grouped_topk else 1,
            topk_group=int(old_cfg.topk_group or 1) if old_cfg.use_grouped_topk else 1,
            routed_scaling_factor=folded_scaling(old_cfg),
            kernel_skips_dropped=skips,
        )
        topk = TopK(
            top_k=int(old_cfg.top_k),
            layer_id=layer,
            renormalize=bool(old_cfg.renormalize),
            custom_routing_function=routing,
            routed_scaling_factor=old_cfg.routed_scaling_factor,
            # SGLang's custom-routing path asserts this is off; the routing folds the factor itself
            apply_routed_scaling_factor_on_output=False,
            **standard,
        )
        if hasattr(topk, "bind_runner_backend"):  # absent from some SGLang releases
            topk.bind_runner_backend(
                getattr(block.experts, "runner_backend", None),
                routing_method_type=getattr(block.experts, "routing_method_type", None),
            )
        block.topk = topk
    if computed:
        logger.warning(
            "zeda_sglang: %d of %d MoE blocks run on an experts kernel that does not skip expert id -1 "
            "(only the Triton fused MoE on CUDA does); their zero slots go to expert 0 with weight 0: "
            "correct, but computed. On a GPU launch with --moe-runner-backend triton.",
            computed,
            len(blocks),
        )
    logger.info(
        "zeda_sglang: %d MoE blocks route over E + %d zero experts%s",
        len(blocks),
        z,
        "" if forced is None else f" (forced zero share {forced})",
    )
    return len(blocks)
