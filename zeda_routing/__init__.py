"""zeda_routing: the routing core of zeda's zero-output experts (imports only torch and the stdlib).

One implementation of the routing math, imported by zeda (transformers routers, calibration,
baselines, the distillation start, telemetry), the vLLM plugin, the SGLang models and evals/:

- `kinds`: a router kind per routing family (`KINDS`: ``softmax``, ``sigmoid_bias`` with
  group-limited selection, ``topk_softmax``, ``softmax_group``, ``topk_sigmoid``), each one small
  function; `register_kind` adds one.
- `slots`: slot selection, renormalise-then-drop, forced drops, training-free slot policies.
- `share`: the share solve behind every calibration to a target skipped share.
- `counts`: router telemetry counts.
- `layers`: which layers are MoE layers per family; the per-layer zero-logit bias.
- `serving`: engine-neutral glue of the serving adapters.
"""

from .counts import LayerStats, total_zero_share
from .kinds import KINDS, RouterKind, RouterParams, get_kind, limit_groups, register_kind, router_probs
from .layers import MOE_LAYERS, layer_zero_logit_bias, moe_layer_indices, per_layer_values
from .share import ShareSolution, solve_share
from .slots import (
    DROPPED,
    SlotPolicy,
    drop_slots,
    entropy_keep_count,
    forced_zero_mask,
    keep_strongest,
    rescale_kept,
    route,
    select_slots,
)

__all__ = [
    "DROPPED",
    "KINDS",
    "MOE_LAYERS",
    "LayerStats",
    "RouterKind",
    "RouterParams",
    "ShareSolution",
    "SlotPolicy",
    "drop_slots",
    "entropy_keep_count",
    "forced_zero_mask",
    "get_kind",
    "keep_strongest",
    "layer_zero_logit_bias",
    "limit_groups",
    "moe_layer_indices",
    "per_layer_values",
    "register_kind",
    "rescale_kept",
    "route",
    "router_probs",
    "select_slots",
    "solve_share",
    "total_zero_share",
]
