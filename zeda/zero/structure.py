"""The structure of an injected model: finding MoE layers and growing routers by Z rows.

`apply_zero_structure` gives a model the shape of an injected one (every MoE router grown by Z
rows and switched to zeda's router class of its family); `zeda.zero.inject` fills the new rows
with seeded values, `zeda.zero.modeling` lets a checkpoint fill them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn
from transformers import PretrainedConfig

from zeda.errors import ZedaError
from zeda.families import MoESpec, spec_for_model
from zeda.zero.experts import skip_sentinel_slots
from zeda.zero.routing import PER_EXPERT_TENSORS, zero_router_class, zero_routers
from zeda_routing import per_layer_values


@dataclass(frozen=True)
class MoELayer:
    """One MoE block of a model: its decoder-layer index and its router/experts modules."""

    index: int
    block: nn.Module
    router: nn.Module
    experts: nn.Module

    def route(self, hidden_states: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Call the router as its block does: ``(T, H) -> (logits, weights (T, k), indices (T, k))``,
        passing the per-expert buffers the block holds for it (MiniMax-M2's correction bias)."""
        names = getattr(self.router, "zeda_block_buffers", ())
        return self.router(hidden_states, *(getattr(self.block, n) for n in names))


def _layer_index(name: str) -> int:
    parts = name.split(".")
    for a, b in zip(parts, parts[1:], strict=False):
        if a == "layers" and b.isdigit():
            return int(b)
    return -1


def find_moe_layers(model: nn.Module, spec: MoESpec | None = None) -> list[MoELayer]:
    """Every MoE block of ``model``, found by isinstance on the family's router class.

    Args:
        model: A transformers causal LM of a supported family (PEFT wrappers allowed).
        spec: The family spec (looked up from the model when omitted).

    Returns:
        One `MoELayer` per block, in layer order. Saved PEFT copies of a router are skipped.
    """
    spec = spec or spec_for_model(model)
    layers = []
    for name, block in model.named_modules():
        router = getattr(block, spec.router_attr, None)
        experts = getattr(block, spec.experts_attr, None)
        router = getattr(router, "original_module", router)  # PEFT ModulesToSaveWrapper
        experts = getattr(experts, "original_module", experts)
        while hasattr(experts, "base_layer"):  # PEFT LoRA wrappers of fused parameters
            experts = experts.base_layer
        if isinstance(router, spec.router_class) and isinstance(experts, spec.experts_class):
            layers.append(MoELayer(_layer_index(name), block, router, experts))
    return sorted(layers, key=lambda layer: layer.index)


def is_injected(model: nn.Module) -> bool:
    """Whether ``model`` already carries zero experts."""
    return any(r.num_zero_experts > 0 for r in zero_routers(model)) or bool(
        getattr(getattr(model, "config", None), "zeda", None)
    )


def _grow(t: torch.Tensor, z: int, gen: torch.Generator | None) -> torch.Tensor:
    """Append ``z`` rows to a per-expert tensor ``(E, ...)`` → ``(E+z, ...)``.

    New rows are drawn per trailing position from N(mean, std) over the E existing rows; with
    ``gen=None`` (structure only, weights come from a checkpoint) they are left uninitialised.
    """
    shape = (z, *t.shape[1:])
    if gen is None or t.device.type == "meta":
        new = torch.empty(shape, dtype=t.dtype, device=t.device)
    else:
        src = t.detach().float()
        mean, std = src.mean(0), src.std(0) if src.shape[0] > 1 else torch.zeros_like(src[0])
        new = (mean + std * torch.randn(shape, generator=gen)).to(t.dtype).to(t.device)
    return torch.cat([t.detach(), new], dim=0)


def attach_zero_router(
    layer: MoELayer, spec: MoESpec, num_zero_experts: int = 0, gen: torch.Generator | None = None
) -> None:
    """Turn one MoE layer's router into zeda's router of its family, with ``num_zero_experts`` rows added.

    With ``num_zero_experts = 0`` (the training-free baselines) the router keeps its weights and
    its exact forward and only gains zeda's knobs (``slot_policy``, ``forced_zero_share``). Either
    way the experts are told to skip the sentinel index ``E`` that a zero or dropped slot carries.

    Raises:
        ZedaError: if the router's per-expert tensors do not have E rows (already grown).
    """
    router = layer.router
    e = router.num_experts
    if num_zero_experts:
        for name in PER_EXPERT_TENSORS:
            if name in router._parameters and router._parameters[name] is not None:
                old = router._parameters[name]
                if old.shape[0] != e:
                    raise ZedaError(
                        f"router {name} has {old.shape[0]} rows, expected E={e}; is the model already injected?"
                    )
                grown = _grow(old, num_zero_experts, gen)
                router._parameters[name] = nn.Parameter(grown, requires_grad=old.requires_grad)
            elif name in router._buffers and router._buffers[name] is not None:
                router._buffers[name] = _grow(router._buffers[name], num_zero_experts, gen)
        for name in spec.block_buffers:
            old = layer.block._buffers[name]
            if old.shape[0] != e:
                raise ZedaError(
                    f"MoE block {name} has {old.shape[0]} rows, expected E={e}; is the model already injected?"
                )
            layer.block._buffers[name] = _grow(old, num_zero_experts, gen)
    router.__class__ = zero_router_class(spec)
    router.num_zero_experts = num_zero_experts
    router.zeda_layer_index = layer.index
    if spec.block_forward is not None and not isinstance(layer.block, _ZedaGenerated):
        layer.block.__class__ = _generated(spec, "block", type(layer.block), {"forward": spec.block_forward})
    if spec.experts_attrs is not None and not isinstance(layer.experts, _ZedaGenerated):
        layer.experts.__class__ = _generated(spec, "experts", type(layer.experts), spec.experts_attrs)
        # @use_experts_implementation gives each experts module the model's config (the backend
        # choice); an undecorated one takes it from the block's submodules (Llama 4's shared expert).
        layer.experts.config = next(
            c
            for c in (getattr(m, "config", None) for m in layer.block.modules())
            if isinstance(c, PretrainedConfig)
        )
    skip_sentinel_slots(layer.experts)


class _ZedaGenerated:
    """Marks the MoE block and experts classes zeda generated for a family."""


# (model_type, role) -> generated class: one per family and role, so isinstance checks agree.
_GENERATED: dict[tuple[str, str], type] = {}


def _generated(spec: MoESpec, role: str, base: type, attrs: dict) -> type:
    """zeda's subclass of a family's MoE block or experts class (`MoESpec.block_forward`,
    `MoESpec.experts_attrs`), generated once per family."""
    cls = _GENERATED.get((spec.model_type, role))
    if cls is None:
        doc = f"{base.__name__} on zeda's router contract (generated by zeda)."
        cls = type(
            f"Zeda{base.__name__}", (_ZedaGenerated, base), {**attrs, "__module__": __name__, "__doc__": doc}
        )
        _GENERATED[(spec.model_type, role)] = cls
    return cls


def apply_zero_structure(
    model: nn.Module, num_zero_experts: int, gen: torch.Generator | None = None
) -> list[MoELayer]:
    """Give ``model`` the structure of an injected model (routers grown, router classes switched).

    With ``gen=None`` the new rows are left uninitialised for a checkpoint to fill; with a
    generator they get the seeded Gaussian init of `zeda.inject_zero_experts`.

    Returns:
        The MoE layers touched.
    """
    spec = spec_for_model(model)
    layers = find_moe_layers(model, spec)
    for layer in layers:
        attach_zero_router(layer, spec, num_zero_experts, gen)
    return layers


def set_zero_logit_bias(model: nn.Module, bias: float | list[float] | None) -> None:
    """Set the zero-logit bias of every zeda router: one float, or one per MoE layer (layer order).

    Raises:
        ZedaError: if a list does not have one entry per MoE layer.
    """
    if bias is None:
        return
    layers = find_moe_layers(model)
    try:
        values = per_layer_values(bias, len(layers))
    except ValueError as err:
        raise ZedaError(str(err)) from None
    by_index = {layer.index: v for layer, v in zip(layers, values, strict=True)}
    # PEFT keeps trainable router copies beside the originals: every copy of a layer gets its value.
    for router in zero_routers(model):
        if router.zeda_layer_index in by_index:
            router.zero_logit_bias = by_index[router.zeda_layer_index]


def current_zero_logit_bias(model: nn.Module) -> float | list[float] | None:
    """The zero-logit bias the model routes with: one float if all MoE layers share it, else one
    per MoE layer (layer order); None when it is 0 everywhere."""
    values = [float(layer.router.zero_logit_bias) for layer in find_moe_layers(model)]
    if not values or all(v == 0.0 for v in values):
        return None
    return values[0] if all(v == values[0] for v in values) else values
