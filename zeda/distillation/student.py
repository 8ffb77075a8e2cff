"""Trainable parameters of a zeda student: LoRA on expert FFNs (PEFT), routers in full.

Routers are listed in PEFT's ``modules_to_save``: PEFT trains a copy and keeps the original
frozen, so ``disable_adapter()`` restores the original router rows and the teacher stays honest
while the router trains in full. Experts get LoRA through ``target_parameters`` on the fused
3-D weights (or, with ``full_experts``, a trained copy through ``modules_to_save`` too, so the
teacher still sees the frozen originals). Nothing else trains.
"""

from __future__ import annotations

import logging
import re

from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from torch import nn

from zeda.config import LoraConfig
from zeda.errors import ZedaError
from zeda.families import spec_for_model
from zeda.zero.inject import find_moe_layers, is_injected

logger = logging.getLogger(__name__)


def _module_names(model: nn.Module, modules: list[nn.Module]) -> list[str]:
    ids = {id(m) for m in modules}
    return [name for name, m in model.named_modules() if id(m) in ids]


def peft_config_for(model: nn.Module, cfg: LoraConfig) -> PeftLoraConfig:
    """Build the `peft.LoraConfig` for an injected model from zeda's ``lora`` section.

    Module paths are exact (anchored regexes / full names), so e.g. Qwen2-MoE's
    ``shared_expert_gate`` is never mistaken for the router ``gate``.
    """
    spec = spec_for_model(model)
    layers = find_moe_layers(model, spec)
    if not layers:
        raise ZedaError("model has no MoE layers to adapt")
    save: list[str] = []
    if cfg.train_router:
        save += _module_names(model, [layer.router for layer in layers])
    if cfg.full_experts:
        save += _module_names(model, [layer.experts for layer in layers])
        target_parameters: list[str] = []
    else:
        expert_paths = _module_names(model, [layer.experts for layer in layers])
        target_parameters = [f"{p}.{name}" for p in expert_paths for name in spec.lora_target_parameters]
    # A regex that matches no module keeps PEFT from adding LoRA to any nn.Linear.
    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=0.0,
        target_modules=r"^$",
        target_parameters=target_parameters or None,
        modules_to_save=save or None,
        bias="none",
    )


def make_student(model: nn.Module, cfg: LoraConfig) -> PeftModel:
    """Wrap an injected model for training: freeze everything, then LoRA experts + routers.

    Args:
        model: A model after `zeda.inject_zero_experts`.
        cfg: The ``lora`` section of the run config.

    Returns:
        The PEFT model. Its ``disable_adapter()`` context gives the original experts and routers.
    """
    if not is_injected(model):
        raise ZedaError("make_student needs an injected model; call zeda.inject_zero_experts first")
    if not cfg.enabled and not cfg.full_experts and not cfg.train_router:
        raise ZedaError("nothing to train: enable lora, lora.full_experts or lora.train_router")
    peft_cfg = peft_config_for(model, cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    if cfg.enabled and not cfg.full_experts:
        student = get_peft_model(model, peft_cfg)
    else:
        # No LoRA at all: PEFT's ModulesToSaveWrapper alone gives each trained module (experts
        # and/or routers) a trainable copy while keeping the frozen original for the teacher.
        from peft.utils.other import _set_trainable

        _set_trainable(
            model, "default", module_names=list(peft_cfg.modules_to_save or []), inference_mode=False
        )
        student = model
    n_train = sum(p.numel() for p in student.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in student.parameters())
    logger.info("trainable parameters: %d of %d (%.3f%%)", n_train, n_total, 100 * n_train / max(n_total, 1))
    return student


def is_student(model: nn.Module) -> bool:
    """Whether ``model`` was already prepared by `make_student` (LoRA or trainable copies)."""
    from peft.utils.other import ModulesToSaveWrapper

    return isinstance(model, PeftModel) or any(isinstance(m, ModulesToSaveWrapper) for m in model.modules())


def trainable_state_dict(model: nn.Module) -> dict:
    """The trained tensors only (LoRA factors, router copies), keyed by parameter name."""
    return {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def is_router_param(name: str, router_attr: str) -> bool:
    """Whether a parameter name belongs to a router (full training, no LoRA)."""
    return re.search(rf"\.{re.escape(router_attr)}\.", name) is not None
