"""Injected models as first-class transformers models: ``zeda_<family>`` config and model classes.

`register` generates, from a family's `MoESpec`, zeda's router class (`zero_router_class`), a
config class (``model_type = "zeda_<family>"``) and a causal-LM class, and registers the latter
two with `AutoConfig` / `AutoModelForCausalLM` together with the parent family's checkpoint
conversion mapping. Importing this module registers every family, so a saved injected model
reloads through ``AutoModelForCausalLM.from_pretrained`` once ``import zeda`` has run; a reload
that would leave any weight uninitialised raises instead of warning.

``config.zeda`` holds the injection metadata: ``num_zero_experts``, ``base_model_type``,
``seed``, ``format_version`` and optionally ``zero_logit_bias`` (a float, or one float per MoE
layer), which the model applies to its routers when it is built.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from zeda.errors import ZedaError
from zeda.families import MoESpec, all_specs, get_spec
from zeda.zero.routing import zero_router_class
from zeda.zero.structure import apply_zero_structure, find_moe_layers, set_zero_logit_bias

logger = logging.getLogger(__name__)

ZEDA_FORMAT_VERSION = 1

# family model_type -> (generated config class, generated causal-LM class)
_CLASSES: dict[str, tuple[type, type]] = {}


class ZedaModelMixin:
    """Placed before a family's ``...ForCausalLM``: builds the injected structure from ``config.zeda``."""

    zeda_spec: MoESpec

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        requested_backend = getattr(config, "_experts_implementation_internal", None)
        if requested_backend is None and self.zeda_spec.experts_attrs is not None:
            # transformers' default (grouped_mm) reaches the family's stock inner model, which cannot
            # take one (its experts are undecorated): build with eager, switch to zeda's below.
            config._experts_implementation_internal = "eager"
        super().__init__(config, *args, **kwargs)
        zeda = getattr(config, "zeda", None) or {}
        z = int(zeda.get("num_zero_experts", 0))
        if z < 1:
            raise ZedaError(
                f"config of model_type {config.model_type!r} lacks zeda.num_zero_experts; re-inject the original"
            )
        apply_zero_structure(self, z)
        # Fresh (non-checkpoint) construction: give the uninitialised rows a defined value.
        std = getattr(config, "initializer_range", 0.02)
        with torch.no_grad():
            for router in self.modules():
                if getattr(router, "num_zero_experts", 0) and router.weight.device.type != "meta":
                    e = router.num_experts
                    router.weight[e:].normal_(0.0, std)
                    for name in ("bias", "e_score_correction_bias"):
                        t = getattr(router, name, None)
                        if isinstance(t, torch.Tensor):
                            t[e:].zero_()
            for layer in find_moe_layers(self):
                for name in self.zeda_spec.block_buffers:
                    t = getattr(layer.block, name)
                    if t.device.type != "meta":
                        t[layer.router.num_experts :].zero_()
        set_zero_logit_bias(self, zeda.get("zero_logit_bias"))
        # zeda's backend skips zero slots on every device; an explicit request is respected,
        # except stock eager on families whose eager loop cannot skip the sentinel.
        if requested_backend is None or (
            requested_backend == "eager" and not self.zeda_spec.eager_skips_sentinel
        ):
            self.config._experts_implementation_internal = "zeda"

    @classmethod
    def _can_set_experts_implementation(cls) -> bool:
        return True

    @classmethod
    def from_pretrained(cls, *args: Any, **kwargs: Any) -> Any:
        """`PreTrainedModel.from_pretrained` that refuses missing or mismatched weights."""
        want_info = kwargs.pop("output_loading_info", False)
        model, info = super().from_pretrained(*args, output_loading_info=True, **kwargs)
        check_loading_info(info, str(args[0]) if args else "checkpoint")
        return (model, info) if want_info else model


def check_loading_info(info: dict, source: str) -> None:
    """Raise if a load left weights missing (randomly initialised), unexpected or mismatched."""
    missing = sorted(info.get("missing_keys") or [])
    mismatched = sorted(str(m) for m in (info.get("mismatched_keys") or []))
    if missing or mismatched:
        names = (missing + mismatched)[:3]
        raise ZedaError(
            f"{source}: {len(missing)} missing and {len(mismatched)} mismatched weights (e.g. {names}) "
            "would be randomly initialised; the checkpoint is incomplete or of another architecture"
        )


def register(spec: MoESpec) -> tuple[type, type]:
    """Generate zeda's classes of a family and register them with transformers' Auto classes.

    Idempotent. Generates the router class (`zero_router_class`), ``Zeda<Config>`` with
    ``model_type = "zeda_<family>"`` and ``Zeda<Family>ForCausalLM`` (`ZedaModelMixin` + the
    family's causal LM), and reuses the family's checkpoint conversion mapping.

    Returns:
        ``(config class, causal-LM class)``.
    """
    if spec.model_type in _CLASSES:
        return _CLASSES[spec.model_type]
    zeda_type = f"zeda_{spec.model_type}"
    zero_router_class(spec)
    base_cfg = spec.config_class
    cfg_cls = type(f"Zeda{base_cfg.__name__}", (base_cfg,), {"model_type": zeda_type, "__module__": __name__})
    base_lm = spec.causal_lm_class
    lm_cls = type(
        f"Zeda{base_lm.__name__}",
        (ZedaModelMixin, base_lm),
        {"config_class": cfg_cls, "zeda_spec": spec, "__module__": __name__},
    )
    # Importable by name (pickling across processes, e.g. an engine's workers beside zeda).
    globals()[cfg_cls.__name__], globals()[lm_cls.__name__] = cfg_cls, lm_cls
    AutoConfig.register(zeda_type, cfg_cls, exist_ok=True)
    AutoModelForCausalLM.register(cfg_cls, lm_cls, exist_ok=True)
    from transformers.conversion_mapping import (
        get_checkpoint_conversion_mapping,
        register_checkpoint_conversion_mapping,
    )

    mapping = get_checkpoint_conversion_mapping(spec.model_type)
    if mapping is not None:
        register_checkpoint_conversion_mapping(zeda_type, mapping, overwrite=True)
    _CLASSES[spec.model_type] = (cfg_cls, lm_cls)
    return cfg_cls, lm_cls


for _spec in all_specs():
    register(_spec)


def zeda_classes(model_type: str) -> tuple[type, type]:
    """The ``(config class, causal-LM class)`` zeda generated for a family (``zeda_`` prefix allowed)."""
    return register(get_spec(model_type))


def mark_as_zeda_model(model: nn.Module, num_zero_experts: int, seed: int) -> None:
    """Turn an in-memory injected model into its ``zeda_<family>`` classes (config + model).

    The model object keeps its identity (callers hold references to it); its config and its
    class become the generated ``zeda_<family>`` ones, so it saves and reloads as a zeda model.
    """
    spec = get_spec(model.config.model_type)
    cfg_cls, lm_cls = zeda_classes(spec.model_type)
    config = model.config
    config.__class__ = cfg_cls
    config.__dict__.pop("model_type", None)
    config.zeda = {
        "num_zero_experts": int(num_zero_experts),
        "base_model_type": spec.model_type,
        "seed": int(seed),
        "format_version": ZEDA_FORMAT_VERSION,
    }
    if isinstance(model, spec.causal_lm_class) and not isinstance(model, ZedaModelMixin):
        model.__class__ = lm_cls
