"""Zero-expert injection, teacher mode and the structure of an injected model.

`inject_zero_experts` grows every MoE router by Z rows (seeded Gaussian rows drawn per hidden
dimension from the statistics of the existing rows; original rows copied bit-exactly), swaps the
router instance to the family's zero-aware subclass, and marks the model as a zeda model so it
saves and reloads through `AutoModelForCausalLM`.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import asdict, dataclass

import torch
from torch import nn

from zeda.errors import ZedaError
from zeda.families import MoESpec, spec_for_model, supported_model_types
from zeda.families.base import get_spec
from zeda.zero.routing import PER_EXPERT_TENSORS, ZeroRouterMixin, telemetry_hook, zero_routers

logger = logging.getLogger(__name__)

ZEDA_FORMAT_VERSION = 1


@dataclass(frozen=True)
class MoELayer:
    """One MoE block of a model: its decoder-layer index and its router/experts modules."""

    index: int
    block: nn.Module
    router: nn.Module
    experts: nn.Module


@dataclass
class InjectionReport:
    """What `inject_zero_experts` did.

    Attributes:
        model_type: The family's model type.
        router_kind: The routing math of the family.
        layers: Decoder-layer indices whose router was grown.
        num_experts: E, real routed experts per MoE layer.
        num_zero_experts: Z, zero experts added per MoE layer.
        top_k: k, unchanged.
        seed: Seed of the new router rows.
    """

    model_type: str
    router_kind: str
    layers: list[int]
    num_experts: int
    num_zero_experts: int
    top_k: int
    seed: int

    def to_dict(self) -> dict:
        """Plain-dict form (JSON-serialisable)."""
        return asdict(self)

    def _repr_markdown_(self) -> str:
        rows = "\n".join(f"| {k} | {v} |" for k, v in self.to_dict().items() if k != "layers")
        return f"| field | value |\n|---|---|\n{rows}\n| MoE layers | {len(self.layers)} |"


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


def _convert_router(
    router: nn.Module, spec: MoESpec, z: int, index: int, gen: torch.Generator | None
) -> None:
    e = router.num_experts
    for name in PER_EXPERT_TENSORS:
        if name in router._parameters and router._parameters[name] is not None:
            old = router._parameters[name]
            if old.shape[0] != e:
                raise ZedaError(
                    f"router {name} has {old.shape[0]} rows, expected E={e}; is the model already injected?"
                )
            router._parameters[name] = nn.Parameter(_grow(old, z, gen), requires_grad=old.requires_grad)
        elif name in router._buffers and router._buffers[name] is not None:
            router._buffers[name] = _grow(router._buffers[name], z, gen)
    router.__class__ = spec.zero_router_class
    router.num_zero_experts = z
    router.zeda_layer_index = index
    if telemetry_hook not in [h for h in router._forward_hooks.values()]:
        router.register_forward_hook(telemetry_hook)


def apply_zero_structure(
    model: nn.Module, num_zero_experts: int, gen: torch.Generator | None = None
) -> list[MoELayer]:
    """Give ``model`` the structure of an injected model (routers grown, classes swapped).

    With ``gen=None`` the new rows are left uninitialised for a checkpoint to fill; with a
    generator they get the seeded Gaussian init of `inject_zero_experts`.

    Returns:
        The MoE layers touched.
    """
    spec = spec_for_model(model)
    layers = find_moe_layers(model, spec)
    for layer in layers:
        _convert_router(layer.router, spec, num_zero_experts, layer.index, gen)
        # Makes stock grouped_mm / batched_mm skip or mask sentinel rows instead of reading garbage.
        layer.experts._is_expert_parallel = True
    return layers


def inject_zero_experts(
    model: nn.Module,
    num_zero_experts: int | None = None,
    seed: int = 0,
    experts_implementation: str | None = "zeda",
) -> InjectionReport:
    """Add Z parameter-free zero-output experts to every MoE router of ``model``, in place.

    Args:
        model: A loaded transformers causal LM of a supported family (not yet injected).
        num_zero_experts: Z per MoE layer; default E // 2. Must satisfy 1 ≤ Z ≤ 4·E.
        seed: Seed for the new router rows.
        experts_implementation: Experts backend to switch to (``"zeda"`` skips zero slots on
            every device); None keeps the model's current backend.

    Returns:
        An `InjectionReport`.

    Raises:
        ZedaError: for an unknown family, a non-MoE model, an already-injected model or a bad Z.
    """
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    if model_type is None or model_type.removeprefix("zeda_") not in supported_model_types():
        raise ZedaError(
            f"{type(model).__name__} (model_type={model_type!r}) is not a supported MoE model; "
            f"zeda supports: {', '.join(supported_model_types())}"
        )
    if is_injected(model):
        raise ZedaError("model already has zero experts; load the original checkpoint to inject again")
    spec = get_spec(model_type)
    layers = find_moe_layers(model, spec)
    if not layers:
        raise ZedaError(
            f"{type(model).__name__} has no MoE layers (is it a dense model?); "
            f"zeda supports MoE models of: {', '.join(supported_model_types())}"
        )
    e = layers[0].router.num_experts
    z = e // 2 if num_zero_experts is None else int(num_zero_experts)
    if not 1 <= z <= 4 * e:
        raise ZedaError(
            f"num_zero_experts={z} is out of range; use 1 ≤ Z ≤ 4·E = {4 * e} (default E/2 = {e // 2})"
        )
    gen = torch.Generator().manual_seed(seed)
    apply_zero_structure(model, z, gen)
    from zeda.zero.modeling import mark_as_zeda_model  # local import: modeling imports this module

    mark_as_zeda_model(model, num_zero_experts=z, seed=seed)
    if experts_implementation is not None:
        set_experts_backend(model, experts_implementation)
    report = InjectionReport(
        model_type=spec.model_type,
        router_kind=spec.router_kind,
        layers=[layer.index for layer in layers],
        num_experts=e,
        num_zero_experts=z,
        top_k=layers[0].router.top_k,
        seed=seed,
    )
    logger.info("injected %d zero experts into %d MoE layers (E=%d, k=%d)", z, len(layers), e, report.top_k)
    return report


def set_experts_backend(model: nn.Module, name: str) -> None:
    """Switch the experts backend, refusing one that would mis-handle zero slots.

    gpt-oss's stock eager loop cannot skip the sentinel index, so ``eager`` is replaced by
    zeda's loop backend (which matches eager's math) on such families.
    """
    from zeda.zero import experts as _experts  # noqa: F401  (registers the zeda backends)

    spec = spec_for_model(model)
    if name == "eager" and not spec.eager_skips_sentinel and is_injected(model):
        logger.warning(
            "%s's stock eager experts cannot skip zero slots; using zeda's loop backend", spec.model_type
        )
        name = "zeda"
    base = getattr(model, "get_base_model", lambda: model)()
    base.set_experts_implementation(name)


@contextlib.contextmanager
def teacher_mode(model: nn.Module) -> Iterator[nn.Module]:
    """The frozen original inside the same weights: zero experts off, LoRA adapters off.

    Inside the context the logits are bit-identical (fp32) to the untouched original model:
    routers run their family's own forward on their first E rows and PEFT's
    ``disable_adapter()`` switches routers back to the frozen copies kept by ``modules_to_save``.
    """
    routers = list(zero_routers(model))
    saved = [r.__dict__.get("zero_experts_enabled") for r in routers]
    adapter_ctx = model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()
    # Trainable copies made without a PeftModel (full expert fine-tuning) switch back too.
    wrappers = [
        m for m in model.modules() if type(m).__name__ == "ModulesToSaveWrapper" and not m.disable_adapters
    ]
    try:
        for r in routers:
            r.zero_experts_enabled = False
        with adapter_ctx:
            for w in wrappers:
                w.enable_adapters(False)
            try:
                yield model
            finally:
                for w in wrappers:
                    w.enable_adapters(True)
    finally:
        for r, old in zip(routers, saved, strict=True):
            if old is None:
                r.__dict__.pop("zero_experts_enabled", None)
            else:
                r.zero_experts_enabled = old


__all__ = [
    "InjectionReport",
    "MoELayer",
    "ZEDA_FORMAT_VERSION",
    "ZeroRouterMixin",
    "apply_zero_structure",
    "find_moe_layers",
    "inject_zero_experts",
    "is_injected",
    "set_experts_backend",
    "teacher_mode",
]
