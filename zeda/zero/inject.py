"""Zero-expert injection: the one place where an original model gains zero experts.

`inject_zero_experts` grows every MoE router by Z rows (seeded Gaussian rows drawn per hidden
dimension from the statistics of the existing rows; original rows copied bit-exactly), switches
the router to zeda's router class of its family, and marks the model as a zeda model so it saves
and reloads through `AutoModelForCausalLM`.

This module also re-exports the structure helpers and `teacher_mode` that callers of injection
use alongside it.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
from torch import nn

from zeda.errors import ZedaError
from zeda.families import spec_for_model, supported_model_types
from zeda.families.base import get_spec
from zeda.zero.modeling import ZEDA_FORMAT_VERSION, mark_as_zeda_model
from zeda.zero.routing import ZeroRouterMixin
from zeda.zero.structure import MoELayer, apply_zero_structure, find_moe_layers, is_injected
from zeda.zero.teacher import teacher_mode

logger = logging.getLogger(__name__)


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
    spec = spec_for_model(model)
    if name == "eager" and not spec.eager_skips_sentinel and is_injected(model):
        logger.warning(
            "%s's stock eager experts cannot skip zero slots; using zeda's loop backend", spec.model_type
        )
        name = "zeda"
    base = getattr(model, "get_base_model", lambda: model)()
    base.set_experts_implementation(name)


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
