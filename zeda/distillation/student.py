"""The student: the injected model wrapped by PEFT, built in exactly one place.

What trains: LoRA on the routed experts' fused 3-D weights (PEFT ``target_parameters``; applied
per expert without a merged weight copy unless ``lora.split=false``, see `split_lora`) and the
routers in full. Routers are listed in PEFT's ``modules_to_save``: PEFT trains a copy and keeps
the original frozen, so ``disable_adapter()`` switches every router back to its original rows
and the teacher (`zeda.teacher_mode`) stays bit-exact. With ``lora.full_experts`` the experts get
a trained copy through ``modules_to_save`` as well. Nothing else trains.

`build_student` is the one constructor (from a model, an injected checkpoint or a run
directory); `load_run` rebuilds a run's student for export. Zero experts are injected here and in
the pipeline, nowhere else.
"""

from __future__ import annotations

import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from peft.utils.constants import DUMMY_TARGET_MODULES
from torch import nn

from zeda.config import LoraConfig as ZedaLoraConfig
from zeda.config import RunConfig
from zeda.distillation.split_lora import enable_split_lora
from zeda.errors import ZedaError
from zeda.families import spec_for_model
from zeda.zero.inject import InjectionReport, find_moe_layers, inject_zero_experts, is_injected
from zeda.zero.routing import zero_routers

logger = logging.getLogger(__name__)

__all__ = ["build_student", "is_student", "load_run", "peft_config_for", "trainable_parameters"]


def _module_names(model: nn.Module, modules: list[nn.Module]) -> list[str]:
    ids = {id(m) for m in modules}
    return [name for name, m in model.named_modules() if id(m) in ids]


def peft_config_for(model: nn.Module, cfg: ZedaLoraConfig) -> PeftLoraConfig:
    """The `peft.LoraConfig` of an injected model for zeda's ``lora`` section.

    Module paths are exact full names, so e.g. Qwen2-MoE's ``shared_expert_gate`` is never
    mistaken for the router ``gate``.
    """
    spec = spec_for_model(model)
    layers = find_moe_layers(model, spec)
    if not layers:
        raise ZedaError("model has no MoE layers to adapt")
    save: list[str] = []
    if cfg.train_router:
        save += _module_names(model, [layer.router for layer in layers])
    target_parameters: list[str] = []
    if cfg.full_experts:
        save += _module_names(model, [layer.experts for layer in layers])
    elif cfg.enabled:
        expert_paths = _module_names(model, [layer.experts for layer in layers])
        target_parameters = [f"{p}.{name}" for p in expert_paths for name in spec.lora_target_parameters]
    return PeftLoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=0.0,
        # An empty list adapts no nn.Linear (PEFT's documented way to target parameters only);
        # with nothing to adapt at all, PEFT's dummy target keeps just the trained copies.
        target_modules=[] if target_parameters else DUMMY_TARGET_MODULES,
        target_parameters=target_parameters or None,
        modules_to_save=save or None,
        bias="none",
    )


def _wrap(model: nn.Module, cfg: ZedaLoraConfig) -> PeftModel:
    if not cfg.enabled and not cfg.full_experts and not cfg.train_router:
        raise ZedaError("nothing to train: enable lora, lora.full_experts or lora.train_router")
    peft_cfg = peft_config_for(model, cfg)
    for p in model.parameters():
        p.requires_grad_(False)
    with warnings.catch_warnings():
        # PeftModel reads transformers' deprecated `is_gradient_checkpointing` alias (transformers 5).
        warnings.filterwarnings(
            "ignore", message=r"`is_gradient_checkpointing` is deprecated", category=FutureWarning
        )
        student = get_peft_model(model, peft_cfg)
    if cfg.enabled and not cfg.full_experts:
        enable_split_lora(student, cfg.split)
    for router in zero_routers(student):
        router.real_rows_frozen = cfg.train_router and cfg.router_rows == "zero"
    n_train = sum(p.numel() for p in student.parameters() if p.requires_grad)
    n_total = sum(p.numel() for p in student.parameters())
    logger.info("trainable parameters: %d of %d (%.3f%%)", n_train, n_total, 100 * n_train / max(n_total, 1))
    return student


def is_student(model: nn.Module) -> bool:
    """Whether ``model`` is already a student (a `peft.PeftModel`)."""
    return isinstance(model, PeftModel)


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """The trained parameters (LoRA factors, router/expert copies) by name."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def _is_run_dir(path: Path) -> bool:
    return (path / "recipe.yaml").is_file() and any(
        (path / d / "state.json").is_file() for d in ("checkpoint", ".checkpoint.old")
    )


def inject_for_run(model: nn.Module, cfg: RunConfig) -> InjectionReport | None:
    """Inject zero experts as the recipe's ``inject`` section says; None if already injected."""
    if is_injected(model):
        return None
    report = inject_zero_experts(
        model,
        num_zero_experts=cfg.inject.resolve_num_zero(spec_for_model(model).num_experts(model.config)),
        seed=cfg.inject.seed,
        experts_implementation=cfg.model.experts_implementation or "zeda",
    )
    logger.info("injected %s", report.to_dict())
    if cfg.inject.init in ("threshold", "relative"):
        _start_at_target_share(model, cfg, report)
    return report


def _start_at_target_share(model: nn.Module, cfg: RunConfig, report: InjectionReport) -> None:
    """``inject.init=threshold|relative``: set the zero rows (0, or fitted to each token's
    log-sum-exp) and calibrate the zero-logit bias on the training text so that step 0 skips the
    balance target share (deterministic, so a resume or an export of the run rebuilds the same
    start)."""
    from zeda.distillation.data import read_jsonl
    from zeda.io import load_tokenizer
    from zeda.zero.start import start_at_share

    target = cfg.balance.resolve_target_share(report.num_experts, report.num_zero_experts)
    texts = read_jsonl(cfg.data.train_file, cfg.data.text_field)
    tokenizer = load_tokenizer(cfg.model.name_or_path, model)
    result = start_at_share(
        model,
        target,
        texts,
        tokenizer,
        rows="fitted" if cfg.inject.init == "relative" else "zero",
        seq_len=cfg.data.seq_len,
        max_tokens=START_CALIBRATION_TOKENS,
    )
    logger.info("start at share %.3f: zero-logit bias %s", result.calibration_share, result.zero_logit_bias)


#: Training tokens the ``inject.init=threshold`` start is calibrated on.
START_CALIBRATION_TOKENS = 8192


def build_student(
    source: nn.Module | str | os.PathLike, cfg: RunConfig | None = None, *, load_checkpoint: bool = True
) -> PeftModel:
    """Build a student from a model, an injected checkpoint directory or a run directory.

    ``train.seed`` is applied right before the LoRA factors are created, so two identical
    runs start from bit-equal weights.

    Args:
        source: An original MoE model (zero experts are injected per ``cfg.inject``), an injected
            model, a student (returned as is), the directory of an original or injected
            checkpoint, or a ``zeda run`` directory (``recipe.yaml`` + ``checkpoint/``).
        cfg: The run configuration (a run directory's own ``recipe.yaml`` when omitted there).
        load_checkpoint: For a run directory, restore the trained tensors of its best validation
            checkpoint (``best/``) or, without one, of its latest checkpoint.

    Returns:
        The PEFT student; ``zeda.teacher_mode(student)`` is the frozen original.
    """
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if _is_run_dir(path):
            from zeda.distillation.inputs import run_config

            cfg = cfg or run_config(path)
            from zeda.io import load

            student = build_student(load(cfg.model.name_or_path, dtype=cfg.model.dtype), cfg)
            if load_checkpoint:
                from zeda.distillation.checkpoint import best_checkpoint, load_trainable

                # The weights a finished run keeps: its best validation checkpoint when it has one.
                load_trainable(best_checkpoint(path) or path, student)
                _attach_verdict(path, student, cfg)
            return student
        if cfg is None:
            raise ZedaError(
                f"build_student({path}) needs the run config (only a run directory carries its own)"
            )
        from zeda.io import load

        source = load(path, dtype=cfg.model.dtype, experts_implementation=cfg.model.experts_implementation)
    if cfg is None:
        raise ZedaError("build_student needs the run config")
    if is_student(source):
        return source
    inject_for_run(source, cfg)
    torch.manual_seed(cfg.train.seed)
    return _wrap(source, cfg.lora)


def _attach_verdict(run_dir: Path, student: nn.Module, cfg: RunConfig) -> None:
    """Record a run's validation verdict (``result.json``) in the student's ``config.zeda``, as
    `zeda.distillation.loop.distill` does, so that an export of the run carries it."""
    try:
        verdict = json.loads((run_dir / "result.json").read_text()).get("verdict")
    except (OSError, ValueError, AttributeError):  # no result yet (a stopped run) or not readable
        return
    if not isinstance(verdict, dict):
        return
    from zeda.distillation.validation import verdict_config

    base = student.get_base_model()
    zeda_meta = getattr(base.config, "zeda", None) or {}
    base.config.zeda = {**zeda_meta, "verdict": verdict_config(verdict, cfg.data.eval_file)}


def load_run(run_dir: str | os.PathLike) -> tuple[PeftModel, Any, RunConfig, dict | None]:
    """Rebuild the student of a ``zeda run`` directory (for export).

    Works for finished, killed and stopped runs alike: the recipe is written when a run starts
    and the checkpoint holds only finite weights.

    Returns:
        ``(student, tokenizer, cfg, card_metrics or None)``; the metrics come from the run's
        ``eval/results.json`` when it has one.
    """
    from zeda.io import load_tokenizer

    run_dir = Path(run_dir)
    if not (run_dir / "recipe.yaml").is_file():
        raise ZedaError(f"{run_dir} is not a zeda run directory (no recipe.yaml)")
    if not _is_run_dir(run_dir):
        raise ZedaError(f"{run_dir} holds no checkpoint to export; it stopped before its first checkpoint")
    from zeda.distillation.inputs import run_config

    cfg = run_config(run_dir)  # input paths as recorded (absolute), base model and recipe unchanged
    student = build_student(run_dir, cfg)
    tokenizer = load_tokenizer(cfg.model.name_or_path, model=student)
    metrics = None
    results = run_dir / "eval" / "results.json"
    if results.is_file():
        from zeda.card import card_metrics_from_results

        metrics = card_metrics_from_results(json.loads(results.read_text()))
    return student, tokenizer, cfg, metrics
