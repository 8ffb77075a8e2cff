"""Injected models as first-class transformers models: ``zeda_<family>`` config and model classes.

For each supported family, importing zeda registers a config class (``model_type =
"zeda_<family>"``) and a causal-LM class with `AutoConfig` / `AutoModelForCausalLM`, plus the
parent family's checkpoint conversion mapping. A saved injected model therefore reloads through
``AutoModelForCausalLM.from_pretrained`` once ``import zeda`` has run, and a reload that would
leave any weight uninitialised raises instead of warning.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM

from zeda.errors import ZedaError
from zeda.families import MoESpec, all_specs, get_spec
from zeda.zero.inject import ZEDA_FORMAT_VERSION, apply_zero_structure

logger = logging.getLogger(__name__)

_CONFIG_CLASSES: dict[str, type] = {}
_MODEL_CLASSES: dict[str, type] = {}


class ZedaModelMixin:
    """Placed before a family's ``...ForCausalLM``: builds the injected structure from ``config.zeda``."""

    zeda_spec: MoESpec

    def __init__(self, config: Any, *args: Any, **kwargs: Any) -> None:
        requested_backend = getattr(config, "_experts_implementation_internal", None)
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
        for experts in self.modules():
            if isinstance(experts, self.zeda_spec.experts_class):
                experts._is_expert_parallel = True
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


def _register(spec: MoESpec) -> None:
    zeda_type = f"zeda_{spec.model_type}"
    if zeda_type in _CONFIG_CLASSES:
        return
    base_cfg = spec.config_class
    cfg_cls = type(f"Zeda{base_cfg.__name__}", (base_cfg,), {"model_type": zeda_type, "__module__": __name__})
    base_lm = spec.causal_lm_class
    lm_cls = type(
        f"Zeda{base_lm.__name__}",
        (ZedaModelMixin, base_lm),
        {"config_class": cfg_cls, "zeda_spec": spec, "__module__": __name__},
    )
    AutoConfig.register(zeda_type, cfg_cls, exist_ok=True)
    AutoModelForCausalLM.register(cfg_cls, lm_cls, exist_ok=True)
    try:
        from transformers.conversion_mapping import (
            get_checkpoint_conversion_mapping,
            register_checkpoint_conversion_mapping,
        )

        mapping = get_checkpoint_conversion_mapping(spec.model_type)
        if mapping is not None:
            register_checkpoint_conversion_mapping(zeda_type, mapping, overwrite=True)
    except ImportError:  # pragma: no cover - older transformers without conversion mappings
        pass
    _CONFIG_CLASSES[zeda_type] = cfg_cls
    _MODEL_CLASSES[zeda_type] = lm_cls


for _spec in all_specs():
    _register(_spec)


def zeda_classes(model_type: str) -> tuple[type, type]:
    """The ``(config class, causal-LM class)`` zeda registered for a family."""
    spec = get_spec(model_type)
    key = f"zeda_{spec.model_type}"
    return _CONFIG_CLASSES[key], _MODEL_CLASSES[key]


def mark_as_zeda_model(model: nn.Module, num_zero_experts: int, seed: int) -> None:
    """Turn an in-memory injected model into its ``zeda_<family>`` classes (config + model)."""
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
